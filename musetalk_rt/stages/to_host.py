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
    """Convert to uint8 where the images are, then copy once (pinned, on CUDA).

    In two halves for a caller that keeps two batches in flight (the live worker): :meth:`start`
    queues the conversion and an asynchronous copy into one of ``ring`` pinned buffers and
    records an event; :meth:`finish` waits for that event and takes the faces. A batch must be
    finished before ``ring`` later batches are started (its buffer is reused then).

    Args:
        device: Where the images are.
        ring: Pinned host buffers used in turn.
        blocking: Make :meth:`finish` sleep until the copy is done (a CUDA event made with
            ``blocking=True``) instead of spinning on a core, CUDA's default. Sleeping leaves
            the core to the rest of the host; the waiter then has to be scheduled again when
            the GPU is done, which on a busy host may take longer (``live --gpu-wait`` says what
            was measured).
    """

    name = "to_host"

    def __init__(self, device: torch.device, ring: int = 3, blocking: bool = False):
        self.device = torch.device(device)
        self.blocking = blocking
        self._ring: list[torch.Tensor | None] = [None] * ring
        self._next = 0

    def spec(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"in:images": (batch, 3, 256, 256), "out:faces": (batch, 256, 256, 3)}

    @torch.inference_mode()
    def start(self, batch: FrameBatch) -> FrameBatch:
        """Queue the uint8 conversion and the copy (CUDA); on the CPU the faces are ready."""
        faces = images_to_uint8(batch.images)  # [B, 256, 256, 3] uint8, on the device
        if faces.device.type != "cuda":
            batch.faces = np.ascontiguousarray(faces.numpy())
            return batch
        n, i = faces.shape[0], self._next
        self._next = (i + 1) % len(self._ring)
        buf = self._ring[i]
        if buf is None or buf.shape[0] < n:
            buf = self._ring[i] = torch.empty(
                (n, *faces.shape[1:]), dtype=torch.uint8, pin_memory=True
            )
        host = buf[:n]
        host.copy_(faces, non_blocking=True)
        done = torch.cuda.Event(blocking=self.blocking)
        done.record(torch.cuda.current_stream(self.device))  # the images' device, not device 0
        batch.host_copy = (host, done)
        return batch

    def finish(self, batch: FrameBatch) -> FrameBatch:
        """Wait for :meth:`start`'s copy (the batch's GPU work ends with it); set ``faces``."""
        if batch.host_copy is not None:
            host, done = batch.host_copy
            done.synchronize()  # releases the interpreter lock; spins or sleeps (``blocking``)
            batch.faces = host.numpy().copy()  # the pinned buffer is reused later
            batch.host_copy = None
        return batch

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        return self.finish(self.start(batch))
