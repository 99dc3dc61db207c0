"""``to_host``: decoded images -> uint8 on the device -> one copy into pinned host memory.

It is the only stage that crosses to the CPU and the only one that synchronises.
"""

from __future__ import annotations

import numpy as np
import torch

from musetalk_rt.stages.base import FrameBatch, Stage


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """MuseTalk's output mapping on the device.

    ``[B, 3, 256, 256]`` in about [-1, 1] -> ``(x / 2 + 0.5).clamp(0, 1) * 255`` rounded ->
    ``[B, 256, 256, 3]`` uint8 RGB.
    """
    x = (images.float() / 2 + 0.5).clamp(0, 1) * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class ToHostStage(Stage):
    """Convert to uint8 where the images are, then copy once (pinned, on CUDA)."""

    name = "to_host"

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pinned: torch.Tensor | None = None

    def spec(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"in:images": (batch, 3, 256, 256), "out:faces": (batch, 256, 256, 3)}

    @torch.inference_mode()
    def __call__(self, batch: FrameBatch) -> FrameBatch:
        faces = images_to_uint8(batch.images)  # [B, 256, 256, 3] uint8, on the device
        if faces.device.type == "cuda":
            n = faces.shape[0]
            if self._pinned is None or self._pinned.shape[0] < n:
                self._pinned = torch.empty(
                    (n, *faces.shape[1:]), dtype=torch.uint8, pin_memory=True
                )
            host = self._pinned[:n]
            host.copy_(faces, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            batch.faces = host.numpy().copy()  # the pinned buffer is reused next batch
        else:
            batch.faces = np.ascontiguousarray(faces.numpy())
        return batch
