"""``blend``: paste each generated face into its avatar frame through the feathered mask."""

from __future__ import annotations

import numpy as np

from musetalk_rt.avatar.geometry import blend
from musetalk_rt.avatar.store import Avatar
from musetalk_rt.stages.base import FrameBatch, Stage


class BlendStage(Stage):
    """Host-side compositing (the only per-frame work on full-size frames)."""

    name = "blend"

    def __init__(self, avatar: Avatar):
        self.avatar = avatar

    def spec(self, batch: int) -> dict[str, tuple[int, ...]]:
        w, h = self.avatar.size
        return {"in:faces": (batch, 256, 256, 3), "out:frames": (batch, h, w, 3)}

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        a = self.avatar
        batch.frames = [
            blend(a.frames[i], face, a.boxes[i], a.crops[i], a.masks[i])
            for i, face in zip(batch.cycle_ids, batch.faces, strict=True)
        ]
        return batch


def crossfade(idle: np.ndarray, talk: np.ndarray, weight: float) -> np.ndarray:
    """``idle + weight * (talk - idle)`` for uint8 frames (``weight`` in [0, 1])."""
    if weight >= 1.0:
        return talk
    if weight <= 0.0:
        return idle
    mixed = idle.astype(np.float32) + weight * (talk.astype(np.float32) - idle)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
