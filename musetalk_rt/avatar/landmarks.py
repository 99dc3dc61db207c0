"""Offline face landmarks and tracking: the 68 iBUG points per frame, smoothed and gap-filled.

MuseTalk's crop rule indexes the 68-point iBUG layout, so the detector must produce exactly that
layout. The default, :class:`DlibDetector`, is dlib's HOG face detector plus its 68-point shape
predictor, whose weights ship inside the ``face_recognition_models`` PyPI package (found without
importing that package, which needs the removed ``pkg_resources``). **Licence:** the 68-point
model was trained on the iBUG 300-W data set, whose terms exclude commercial use; a production
host can plug in another detector of the same layout (:func:`register_detector`).

Tracking keeps the main face — the largest face where one first appears, then the face that
overlaps the previous one most — fills frames without a detection by linear interpolation of the
points (holding the nearest at the ends), and smooths each point's path over time with a short
Gaussian so boxes do not jitter. A source with no face at all is an error.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from musetalk_rt.errors import UserError

NUM_POINTS = 68
# iBUG 68 indices
JAW = list(range(0, 17))
BROWS = list(range(17, 27))
NOSE_BRIDGE_29 = 29
EYES = list(range(36, 48))
MOUTH = list(range(48, 68))
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))


@dataclass
class Face:
    """One detected face: its detector rectangle and 68 ``(x, y)`` points in frame pixels."""

    rect: tuple[float, float, float, float]  # x1, y1, x2, y2
    points: np.ndarray  # [68, 2] float32

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.rect
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


class LandmarkDetector(ABC):
    """Interface of a 68-point (iBUG layout) face landmark detector."""

    name = ""
    licence = ""

    @abstractmethod
    def detect(self, frame: np.ndarray) -> list[Face]:
        """All faces in an ``[H, W, 3]`` uint8 RGB frame."""


def _models_folder() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "face landmarks need the packages dlib-bin and face_recognition_models "
            "(pip install dlib-bin face_recognition_models), or pass --bbox"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibDetector(LandmarkDetector):
    """dlib HOG detector + 68-point shape predictor (CPU).

    Args:
        max_side: Detection runs on the frame scaled so its longer side is at most this (faster;
            landmarks are then fitted on the full-resolution frame).
        upsample: dlib's upsampling passes for small faces.
    """

    name = "dlib68"
    licence = "68-point model trained on iBUG 300-W: non-commercial use only"

    def __init__(self, max_side: int = 640, upsample: int = 1):
        try:
            import dlib
        except ImportError:
            raise UserError(
                "face landmarks need dlib (pip install dlib-bin face_recognition_models), "
                "or pass --bbox"
            ) from None
        path = _models_folder() / "shape_predictor_68_face_landmarks.dat"
        if not path.is_file():
            raise UserError(f"{path} is missing: reinstall face_recognition_models")
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(path))
        self.max_side = max_side
        self.upsample = upsample

    def detect(self, frame: np.ndarray) -> list[Face]:
        h, w = frame.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = (
            frame
            if scale == 1.0
            else cv2.resize(
                frame,
                (max(1, round(w * scale)), max(1, round(h * scale))),
                interpolation=cv2.INTER_AREA,
            )
        )
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        faces = []
        for r in self._detector(gray, self.upsample):
            x1, y1, x2, y2 = (v / scale for v in (r.left(), r.top(), r.right(), r.bottom()))
            rect = self._dlib.rectangle(int(x1), int(y1), int(x2), int(y2))
            shape = self._predictor(frame, rect)
            pts = np.array(
                [(shape.part(i).x, shape.part(i).y) for i in range(NUM_POINTS)], np.float32
            )
            faces.append(Face((x1, y1, x2, y2), pts))
        return faces


_DETECTORS: dict[str, Callable[[], LandmarkDetector]] = {"dlib68": DlibDetector}


def register_detector(name: str, factory: Callable[[], LandmarkDetector]) -> None:
    """Make a detector (68 iBUG points) available by name."""
    _DETECTORS[name] = factory


def get_detector(name: str = "dlib68") -> LandmarkDetector:
    """Instantiate a registered detector."""
    if name not in _DETECTORS:
        raise UserError(f"unknown face detector {name!r}; choose one of {', '.join(_DETECTORS)}")
    return _DETECTORS[name]()


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    """The main face through a source.

    Attributes:
        points: ``[N, 68, 2]`` float32, smoothed, gaps filled.
        raw: ``[N, 68, 2]`` float32 as detected (NaN where no face was found).
        detected: ``[N]`` bool, a face was found in that frame.
        faces_seen: Most faces found in any one frame.
    """

    points: np.ndarray
    raw: np.ndarray
    detected: np.ndarray
    faces_seen: int

    @property
    def interpolated(self) -> int:
        return int((~self.detected).sum())


def smooth_paths(points: np.ndarray, sigma_frames: float) -> np.ndarray:
    """Gaussian smoothing of every point's path over time (edges reflected)."""
    if sigma_frames <= 0 or len(points) < 3:
        return points.copy()
    radius = int(3 * sigma_frames + 0.5)
    t = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (t / sigma_frames) ** 2)
    k /= k.sum()
    pad = np.pad(points, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    out = np.zeros_like(points)
    for i, w in enumerate(k):
        out += w * pad[i : i + len(points)]
    return out.astype(np.float32)


def track_main_face(
    frames: list[np.ndarray],
    detector: LandmarkDetector,
    smooth_sigma: float = 1.5,
    progress: Callable[[int], None] | None = None,
    source: str = "",
) -> Track:
    """Detect, pick and follow the main face, fill gaps and smooth.

    Raises:
        UserError: No face in any frame.
    """
    n = len(frames)
    raw = np.full((n, NUM_POINTS, 2), np.nan, np.float32)
    detected = np.zeros(n, bool)
    prev = None
    most = 0
    for i, frame in enumerate(frames):
        faces = detector.detect(frame)
        most = max(most, len(faces))
        if faces:
            if prev is None:
                best = max(faces, key=lambda f: f.area)
            else:
                best = max(faces, key=lambda f: (_iou(f.rect, prev), f.area))
                if _iou(best.rect, prev) < 0.2:  # lost it: take the largest again
                    best = max(faces, key=lambda f: f.area)
            raw[i], detected[i], prev = best.points, True, best.rect
        if progress:
            progress(1)
    if not detected.any():
        raise UserError(
            f"no face found in {source or 'the source'} ({n} frame(s)); use a source with a "
            "clearly visible frontal face, or give the box with --bbox x1,y1,x2,y2"
        )
    filled = raw.copy()
    idx = np.nonzero(detected)[0]
    for p in range(NUM_POINTS):
        for c in range(2):
            filled[:, p, c] = np.interp(np.arange(n), idx, raw[idx, p, c])
    return Track(smooth_paths(filled, smooth_sigma), raw, detected, most)


def mouth_openness(points: np.ndarray) -> np.ndarray:
    """Inner-lip gap over face height (nose bridge to chin), per frame: ``[N]``."""
    pts = points.reshape(-1, NUM_POINTS, 2)
    gap = np.mean(
        [np.linalg.norm(pts[:, a] - pts[:, b], axis=1) for a, b in INNER_LIP_PAIRS], axis=0
    )
    height = np.linalg.norm(pts[:, 27] - pts[:, 8], axis=1)
    return (gap / np.maximum(height, 1e-6)).astype(np.float32)
