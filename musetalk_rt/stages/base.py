"""Typed batches, the stage interface, and a per-stage clock that does not sync the GPU."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from musetalk_rt.engines.base import EngineReport


@dataclass
class FrameBatch:
    """A batch of output frames on its way through the stages.

    Attributes:
        frame_ids: Output frame numbers.
        cycle_ids: Avatar frame used for each output frame.
        latents: ``[B, 8, 32, 32]`` UNet input latents (device).
        audio: ``[B, 50, 384]`` audio conditioning (device).
        pred_latents: ``[B, 4, 32, 32]`` UNet output (device).
        images: ``[B, 3, 256, 256]`` decoded faces in about [-1, 1] (device).
        faces: ``[B, 256, 256, 3]`` uint8 RGB faces (host).
        frames: Blended full frames, ``[H, W, 3]`` uint8 RGB each (host).
    """

    frame_ids: list[int]
    cycle_ids: list[int]
    latents: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    pred_latents: torch.Tensor | None = None
    images: torch.Tensor | None = None
    faces: np.ndarray | None = None
    frames: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame_ids)


class Stage:
    """Base class: a named step with a shape spec, one-off ``prepare`` and a batch call."""

    name = ""

    def spec(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Input and output shapes for a batch size (``in:``/``out:`` prefixed names)."""
        return {}

    def prepare(self, batch_sizes: list[int]) -> EngineReport | None:
        """Do all one-off work (cast, compile, capture); return the engine report."""
        return None

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        raise NotImplementedError  # abstract: every concrete stage overrides it


class StageClock:
    """Accumulates time per stage: CUDA events on the GPU (no sync), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._events: dict[str, list] = defaultdict(list)
        self._cpu_s: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str, on_host: bool = False):
        if self.cuda and not on_host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_s[name] += time.perf_counter() - t0

    def totals_ms(self) -> dict[str, float]:
        """Total milliseconds per stage (synchronises once to read the events)."""
        out = {k: v * 1000.0 for k, v in self._cpu_s.items()}
        if self._events:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs)
        return out
