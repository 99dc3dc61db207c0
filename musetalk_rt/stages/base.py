"""Typed batches, the stage interface, and a per-stage clock that does not sync the GPU."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
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
        host_copy: ``(pinned buffer, event)`` of a started, unfinished ``to_host`` copy.
    """

    frame_ids: list[int]
    cycle_ids: list[int]
    latents: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    pred_latents: torch.Tensor | None = None
    images: torch.Tensor | None = None
    faces: np.ndarray | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    host_copy: tuple | None = None

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
    """Accumulates time per stage: CUDA events on the GPU (no sync), perf_counter on the CPU.

    Bounded for a process that runs for hours: finished event pairs are folded into running
    totals as the clock goes (at most ``max_pending`` pairs wait per stage; past that the clock
    waits for the oldest, which the GPU has normally finished long ago). Thread-safe: the live
    worker records while the ``/metrics`` thread reads.

    Args:
        device: Where the stages run (CUDA: events; otherwise: host time).
        max_pending: Event pairs kept per stage before the oldest are folded.
    """

    event = torch.cuda.Event  # the timing-event type (a class attribute, for CPU tests)

    def __init__(self, device: torch.device, max_pending: int = 256):
        self.cuda = torch.device(device).type == "cuda"
        self.max_pending = max_pending
        self._events: dict[str, deque] = defaultdict(deque)
        self._gpu_ms: dict[str, float] = defaultdict(float)
        self._cpu_s: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str, on_host: bool = False):
        if self.cuda and not on_host:
            start, end = self.event(enable_timing=True), self.event(enable_timing=True)
            start.record()
            yield
            end.record()
            with self._lock:
                self._events[name].append((start, end))
                self._fold(keep=self.max_pending)
        else:
            t0 = time.perf_counter()
            yield
            with self._lock:
                self._cpu_s[name] += time.perf_counter() - t0

    def _fold(self, keep: int | None) -> None:
        """Add event pairs to the totals.

        ``keep=None``: all of them (waiting for the GPU); else the finished ones, and beyond
        ``keep`` per stage the oldest, waiting for them (the GPU is far behind then).
        """
        for name, q in self._events.items():
            while q and (keep is None or len(q) > keep or q[0][1].query()):
                s, e = q.popleft()
                e.synchronize()  # returns at once for a finished event
                self._gpu_ms[name] += s.elapsed_time(e)

    def pending(self) -> int:
        """Event pairs not folded yet (all stages)."""
        with self._lock:
            return sum(len(q) for q in self._events.values())

    def totals_ms(self, wait: bool = True) -> dict[str, float]:
        """Total milliseconds per stage.

        Args:
            wait: Wait for the stages' GPU work to finish and count all of it (a bench or a
                render at its end); False counts only what the GPU has finished, without
                waiting (the live ``/metrics`` reader).
        """
        with self._lock:
            self._fold(keep=None if wait else self.max_pending)
            out = {k: v * 1000.0 for k, v in self._cpu_s.items()}
            for name, ms in self._gpu_ms.items():
                out[name] = out.get(name, 0.0) + ms
        return out
