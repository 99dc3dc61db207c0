"""Prepare an avatar from a video or an image: frames, boxes, latents and blending masks.

Without a box, the face is found automatically: 68 landmarks per frame (tracked, gap-filled and
smoothed; see :mod:`musetalk_rt.avatar.landmarks`) give MuseTalk's face box and a landmark mask
per frame. With ``bbox`` the box is fixed and the mask is the ellipse in it. The idle cycle can be
limited to the longest closed-mouth stretch of the source (``idle="closed"``).

The manifest records everything the materials depend on (source hash, settings, weights
fingerprint, versions); preparing again with the same inputs reuses the folder, any change
rebuilds it, ``force`` always rebuilds. Nothing ever prompts. The folder is written under a
temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

import musetalk_rt
from musetalk_rt.avatar.geometry import (
    EXPAND,
    EXTRA_MARGIN_PX,
    UPPER_BOUNDARY_RATIO,
    Box,
    box_from_landmarks,
    clip_box,
    crop_box_for,
    extend_v15,
    landmark_mask,
    lower_face_mask,
    validate_box,
)
from musetalk_rt.avatar.landmarks import get_detector, mouth_openness, track_main_face
from musetalk_rt.avatar.store import FORMAT_VERSION, MODEL_VERSION, valid_id
from musetalk_rt.errors import UserError
from musetalk_rt.leftovers import remove_leftovers, temp_folder
from musetalk_rt.modeling import VaeEncoder
from musetalk_rt.modeling.configs import FACE_SIZE
from musetalk_rt.weights import sha256_file

ENCODE_BATCH = 16
SMOOTH_SIGMA_FRAMES = 1.5
CLOSED_MOUTH = 0.02  # inner-lip gap / face height below which a mouth counts as closed
MIN_IDLE_FRAMES = 25


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False, mininterval=1.0)


def closed_mouth_run(openness: np.ndarray, threshold: float = CLOSED_MOUTH) -> tuple[int, int]:
    """The longest run ``[start, end)`` of frames whose mouth openness is below ``threshold``."""
    best, start = (0, 0), None
    for i, closed in enumerate([*(openness < threshold), False]):
        if closed and start is None:
            start = i
        elif not closed and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def _complete(target: Path, num_frames: int) -> bool:
    """Whether a prepared folder still holds every file its manifest promises."""
    return (
        num_frames >= 1
        and (target / "geometry.json").is_file()
        and (target / "latents.safetensors").is_file()
        and all(
            (target / sub / f"{i:06d}.png").is_file()
            for sub in ("frames", "masks")
            for i in range(num_frames)
        )
    )


def face_crop(frame: np.ndarray, box: Box) -> np.ndarray:
    """The 256x256 RGB face crop of a frame (Lanczos), as MuseTalk makes it."""
    crop = frame[box.y1 : box.y2, box.x1 : box.x2]
    return cv2.resize(crop, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)


@torch.inference_mode()
def encode_faces(vae: torch.nn.Module, faces: list[np.ndarray], seed: int = 0) -> torch.Tensor:
    """VAE-encode 256x256 faces in batches to ``[N, 8, 32, 32]`` float32 latents (CPU)."""
    encoder = VaeEncoder(vae)
    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same latents on any device
    out = []
    bar = _progress(len(faces), "VAE encode")
    for i in range(0, len(faces), ENCODE_BATCH):
        batch = torch.from_numpy(np.stack(faces[i : i + ENCODE_BATCH])).to(device)
        out.append(encoder(batch, generator=gen).float().cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(out)


def _clip_mask(mask: np.ndarray, crop: Box, clipped: Box) -> np.ndarray:
    """The part of a crop-box mask inside the frame."""
    return mask[
        clipped.y1 - crop.y1 : clipped.y2 - crop.y1, clipped.x1 - crop.x1 : clipped.x2 - crop.x1
    ]


def check_prepare_inputs(source: str | Path, avatar_id: str, bbox: Box | None, idle: str) -> Path:
    """The checks of :func:`prepare_avatar` that need no models (run them before loading any).

    Returns:
        The source as a path.

    Raises:
        UserError: A bad id, a missing or unreadable source, or settings that do not go together.
    """
    valid_id(avatar_id)
    source = Path(source)
    if not source.is_file():
        raise UserError(f"source {source} does not exist or is not a file")
    if not os.access(source, os.R_OK):
        raise UserError(f"source {source} is not readable (check its permissions)")
    if idle not in ("all", "closed"):
        raise UserError(f"--idle must be all or closed, got {idle!r}")
    if idle == "closed" and bbox:
        raise UserError("--idle closed needs face landmarks; leave out --bbox")
    return source


def prepare_avatar(
    source: str | Path,
    avatar_id: str,
    models,
    avatars_dir: str | Path = "avatars",
    bbox: Box | None = None,
    extra_margin: int = EXTRA_MARGIN_PX,
    max_frames: int | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    idle: str = "all",
    detector: str = "dlib68",
) -> Path:
    """Prepare (or reuse) an avatar.

    Args:
        source: A video or an image file.
        avatar_id: Folder name under ``avatars_dir``.
        models: Loaded :class:`musetalk_rt.weights.Models` (its VAE encodes the latents).
        avatars_dir: Where avatars live.
        bbox: Face box in source pixels; default: found from face landmarks per frame.
        extra_margin: v1.5's downward extension of the box, px.
        max_frames: Use at most this many frames of a video.
        force: Rebuild even when the manifest says the folder is up to date.
        log: Progress lines go here.
        idle: ``all`` frames form the idle cycle, or ``closed``: the longest closed-mouth run
            (at least 1 s; otherwise all frames, with a warning). Needs landmarks.
        detector: Landmark detector name (68 iBUG points).

    Returns:
        The avatar's folder.

    Raises:
        UserError: Unreadable source, no face, a box outside the frame, a bad id.
    """
    from musetalk_rt.media import load_source

    source = check_prepare_inputs(source, avatar_id, bbox, idle)
    if extra_margin < 0:
        raise UserError(f"--extra-margin must be 0 or more, got {extra_margin}")
    root = Path(avatars_dir)
    target = root / avatar_id
    settings = {
        "bbox": bbox.as_list() if bbox else None,
        "extra_margin": extra_margin,
        "expand": EXPAND,
        "upper_boundary_ratio": UPPER_BOUNDARY_RATIO,
        "max_frames": max_frames,
        "mask": "ellipse-in-box" if bbox else "landmarks-jaw",
        "detector": None if bbox else detector,
        "smooth_sigma_frames": None if bbox else SMOOTH_SIGMA_FRAMES,
        "idle": idle,
    }
    digest = sha256_file(source)
    wanted = {
        "format": FORMAT_VERSION,
        "model": MODEL_VERSION,
        "settings": settings,
        "source_sha256": digest,
        "weights": models.fingerprint,
    }
    old = target / "manifest.json"
    if old.is_file() and not force:
        try:
            m = json.loads(old.read_text())
            have = {
                "format": m.get("format"),
                "model": m.get("model"),
                "settings": m.get("settings"),
                "source_sha256": m["source"]["sha256"],
                "weights": m["weights"]["fingerprint"],
            }
            complete = _complete(target, int(m["num_frames"]))
        except (ValueError, KeyError, TypeError):
            have, complete = None, False
        if have == wanted and complete:
            log(f"avatar {avatar_id!r} is up to date ({target})")
            return target
        changed = [k for k in wanted if have is None or have.get(k) != wanted[k]] or ["files"]
        log(f"avatar {avatar_id!r} changed ({', '.join(changed)}): rebuilding")

    t0 = time.perf_counter()
    frames, fps = load_source(source, max_frames or None)  # decoding stops at max_frames
    h, w = frames[0].shape[:2]
    n = len(frames)
    report: dict = {}
    landmarks = openness = None
    if bbox:
        box = extend_v15(validate_box(bbox, w, h), h, extra_margin)
        crop = crop_box_for(box)
        clipped = clip_box(crop, w, h)
        mask = _clip_mask(lower_face_mask(box, crop), crop, clipped)
        boxes, crops, masks = [box] * n, [clipped] * n, [mask] * n
    else:
        det = get_detector(detector)
        bar = _progress(n, "face landmarks")
        track = track_main_face(
            frames, det, SMOOTH_SIGMA_FRAMES, progress=bar.update, source=str(source)
        )
        bar.close()
        landmarks, openness = track.points, mouth_openness(track.points)
        boxes, crops, masks = [], [], []
        for pts in landmarks:
            box = box_from_landmarks(pts, w, h, extra_margin)
            crop = crop_box_for(box)
            clipped = clip_box(crop, w, h)
            boxes.append(box)
            crops.append(clipped)
            masks.append(_clip_mask(landmark_mask(pts, crop), crop, clipped))
        report = {
            "detector": det.name,
            "detector_licence": det.licence,
            "frames_with_face": int(track.detected.sum()),
            "frames_interpolated": track.interpolated,
            "most_faces_in_a_frame": track.faces_seen,
        }
        log(
            f"face landmarks ({det.name}): found in {report['frames_with_face']}/{n} frames, "
            f"{track.interpolated} interpolated; note: {det.licence}"
        )
    cycle = [0, n]
    if idle == "closed":
        start, end = closed_mouth_run(openness)
        if end - start >= min(MIN_IDLE_FRAMES, n):
            cycle = [start, end]
            log(f"idle cycle: closed-mouth frames {start}..{end - 1}")
        else:
            log(f"warning: no closed-mouth run of {MIN_IDLE_FRAMES} frames; idle uses all frames")
    faces = [face_crop(f, b) for f, b in zip(frames, boxes, strict=True)]
    log(f"encoding {len(faces)} face crops with the VAE ({models.kind} weights)")
    latents = encode_faces(models.vae, faces)  # [N, 8, 32, 32]

    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root, avatar_id)  # killed prepares' folders, and this process's own
    tmp = temp_folder(root, avatar_id)
    try:
        (tmp / "frames").mkdir(parents=True)
        (tmp / "masks").mkdir()
        png = [cv2.IMWRITE_PNG_COMPRESSION, 1]
        for i, f in enumerate(frames):
            for path, image in (
                (tmp / "frames" / f"{i:06d}.png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR)),
                (tmp / "masks" / f"{i:06d}.png", masks[i]),
            ):
                if not cv2.imwrite(str(path), image, png):  # False, not an exception: disk full
                    raise UserError(
                        f"could not write {path.name} under {root} (disk full or not writable?); "
                        "nothing was changed"
                    )
        from safetensors.torch import save_file

        save_file({"latents": latents.contiguous()}, str(tmp / "latents.safetensors"))
        geometry = {
            "boxes": [b.as_list() for b in boxes],
            "crops": [c.as_list() for c in crops],
            "cycle": cycle,
            "landmarks": None if landmarks is None else np.round(landmarks, 2).tolist(),
            "mouth_openness": None if openness is None else np.round(openness, 4).tolist(),
        }
        (tmp / "geometry.json").write_text(json.dumps(geometry))
        manifest = {
            "format": FORMAT_VERSION,
            "model": MODEL_VERSION,
            "id": avatar_id,
            "num_frames": len(frames),
            "fps": fps,
            "width": w,
            "height": h,
            "source": {"path": str(source), "sha256": digest},
            "settings": settings,
            "box_source": "given" if bbox else f"landmarks ({detector})",
            "report": report,
            "weights": {"kind": models.kind, "fingerprint": models.fingerprint},
            "versions": {"musetalk_rt": musetalk_rt.__version__, "torch": torch.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            trash = temp_folder(root, avatar_id, "old")
            target.rename(trash)
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"avatar {avatar_id!r}: {len(frames)} frames, box {boxes[0].as_list()}, "
        f"{time.perf_counter() - t0:.1f} s -> {target}"
    )
    return target
