"""``musetalk-rt avatar check``: the operator's look at an avatar before an event.

- **Box jitter**: frame-to-frame movement of the face box centre (median and max, px). A box
  that shakes makes the pasted face shake.
- **Identity round trip**: each frame's own 256x256 crop pasted back through the same resize
  and mask path the live system uses; PSNR over the crop box. Anything but a near-perfect score
  means the geometry is misaligned.
- **Mouth openness** per frame (inner-lip gap over face height); a source that itself talks
  shows a moving mouth in silence, so it is flagged.
- **Contact sheet**: a PNG of a few blended frames with the mask outline, the face box and the
  landmarks drawn, to see that the mask covers the mouth and jaw and not the eyes, hair or
  background.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from musetalk_rt.avatar.geometry import blend
from musetalk_rt.avatar.prepare import CLOSED_MOUTH, face_crop
from musetalk_rt.avatar.store import Avatar
from musetalk_rt.errors import UserError

TALKING_P90 = 0.04  # openness p90 above this: the source itself talks


@dataclass
class AvatarReport:
    """What ``avatar check`` measured."""

    jitter_median_px: float
    jitter_max_px: float
    identity_psnr_min_db: float
    identity_psnr_median_db: float
    openness_p10: float | None
    openness_p90: float | None
    source_talks: bool | None
    warnings: list[str]
    sheet: str | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def box_jitter(avatar: Avatar) -> np.ndarray:
    """Frame-to-frame movement of the face box centre, px, ``[N - 1]``."""
    b = np.array([x.as_list() for x in avatar.boxes], np.float64)
    centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    return np.linalg.norm(np.diff(centres, axis=0), axis=1)


def identity_psnr(avatar: Avatar, i: int) -> float:
    """PSNR (dB) over the crop box of frame ``i`` pasted back with its own face crop."""
    frame, box, crop = avatar.frames[i], avatar.boxes[i], avatar.crops[i]
    out = blend(frame, face_crop(frame, box), box, crop, avatar.masks[i])
    a = out[crop.y1 : crop.y2, crop.x1 : crop.x2].astype(np.float64)
    b = frame[crop.y1 : crop.y2, crop.x1 : crop.x2].astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def contact_sheet(avatar: Avatar, path: Path, count: int = 6, tile: int = 320) -> Path:
    """Blended frames (identity faces) with mask outline, face box and landmarks."""
    n = avatar.num_frames
    picks = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})
    landmarks = avatar.geometry.get("landmarks")
    tiles = []
    for i in picks:
        frame, box, crop = avatar.frames[i], avatar.boxes[i], avatar.crops[i]
        vis = blend(frame, face_crop(frame, box), box, crop, avatar.masks[i])
        contours, _ = cv2.findContours(
            (avatar.masks[i] > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        contours = [c + np.array([crop.x1, crop.y1]) for c in contours]
        cv2.drawContours(vis, contours, -1, (0, 255, 0), 2)
        cv2.rectangle(vis, (box.x1, box.y1), (box.x2 - 1, box.y2 - 1), (255, 255, 0), 1)
        if landmarks:
            for x, y in landmarks[i]:
                cv2.circle(vis, (int(round(x)), int(round(y))), 2, (255, 0, 0), -1)
        view = vis[crop.y1 : crop.y2, crop.x1 : crop.x2]
        view = cv2.resize(view, (tile, tile), interpolation=cv2.INTER_AREA)
        cv2.putText(view, f"frame {i}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        tiles.append(view)
    cols = min(3, len(tiles))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[r : r + cols]) for r in range(0, len(tiles), cols)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR)):
        raise UserError(f"could not write the contact sheet {path} (is its folder writable?)")
    return path


def check_avatar(avatar: Avatar, sheet: Path | None) -> AvatarReport:
    """Measure jitter, identity round trip and mouth openness; draw the contact sheet."""
    jit = box_jitter(avatar)
    psnr = [identity_psnr(avatar, i) for i in range(avatar.num_frames)]
    warnings = []
    openness = avatar.geometry.get("mouth_openness")
    p10 = p90 = talks = None
    if openness:
        o = np.asarray(openness)
        p10, p90 = float(np.percentile(o, 10)), float(np.percentile(o, 90))
        talks = p90 > TALKING_P90
        if talks:
            warnings.append(
                f"the source's mouth moves (openness p90 {p90:.3f} > {TALKING_P90}): silence "
                "will show a moving mouth; prepare with --idle closed or use a silent clip"
            )
        start, end = avatar.cycle
        if o[start:end].max() > CLOSED_MOUTH * 2:
            warnings.append(f"the idle cycle (frames {start}..{end - 1}) has an open mouth")
    else:
        warnings.append("no landmarks stored (the box was given by hand): mouth not checked")
    med_jit = float(np.median(jit)) if jit.size else 0.0
    if med_jit > 1.0:
        warnings.append(f"the face box jitters (median {med_jit:.2f} px per frame)")
    if min(psnr) < 40.0:
        warnings.append(f"identity round trip is only {min(psnr):.1f} dB: geometry misaligned")
    return AvatarReport(
        jitter_median_px=round(med_jit, 3),
        jitter_max_px=round(float(jit.max()) if jit.size else 0.0, 3),
        identity_psnr_min_db=round(min(psnr), 2),
        identity_psnr_median_db=round(float(np.median(psnr)), 2),
        openness_p10=None if p10 is None else round(p10, 4),
        openness_p90=None if p90 is None else round(p90, 4),
        source_talks=talks,
        warnings=warnings,
        sheet=str(contact_sheet(avatar, sheet)) if sheet else None,
    )
