"""Python's garbage collector in the live process: the start-up heap frozen, each pause timed.

A full (generation 2) collection walks every object the collector tracks, with every thread of
the process stopped. After start-up the live process holds hundreds of thousands of them that
live as long as it does — torch, transformers and diffusers, the models' modules, compiled
graphs: on a 2-core host ~450k objects and 224–314 ms per full collection with the full-size
models (eager), 825k objects and 430–690 ms with the compile engine built for the tiny ones
(``experiments/LOG.md``, 2026-12-03 16:40). Python starts one whenever enough new objects have
survived, at a moment nobody chooses (seldom: in steady state the process frees about as many
as it makes); 300 ms is seven frames at 25 fps, longer than the
one-channel playout margin. :func:`freeze_startup_heap` collects once after start-up
and moves the survivors to the permanent generation (:func:`gc.freeze`): later collections skip
them. :class:`GcWatch` times every collection (``gc.callbacks``), so a pause that still happens
shows in ``/metrics``, the status lines and the summary.
"""

from __future__ import annotations

import gc
import time


def freeze_startup_heap() -> tuple[int, float]:
    """Collect once, then freeze every surviving object (they are never walked again).

    Returns:
        ``(frozen_objects, collect_ms)``: the permanent generation's size and the one full
        collection's duration (what each later full collection would have cost).
    """
    t0 = time.perf_counter()
    gc.collect()
    collect_ms = (time.perf_counter() - t0) * 1000.0
    gc.freeze()
    return gc.get_freeze_count(), collect_ms


class GcWatch:
    """Times every garbage collection of this process, per generation.

    Collections run one at a time under the interpreter lock, in whichever thread triggered
    them; the callback keeps its start time on the instance.

    A pause is the collection's wall time: every other Python thread waits for it, unless a
    finalizer it runs lets them in.

    Args:
        keep: Longest pauses kept, with the generation and when they happened (seconds since
            the watch started, and ``time.monotonic()``, the frame log's clock).
    """

    def __init__(self, keep: int = 8):
        self.collections = [0, 0, 0]
        self.pause_ms_total = [0.0, 0.0, 0.0]
        self.pause_ms_max = [0.0, 0.0, 0.0]
        self.keep = keep
        self.longest: list[tuple[float, int, float]] = []  # (monotonic_s, gen, ms), longest first
        self._t0: float | None = None
        self._started = time.monotonic()

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        if self._t0 is None:  # started watching in the middle of a collection
            return
        ms = (time.perf_counter() - self._t0) * 1000.0
        self._t0 = None
        g = min(int(info.get("generation", 2)), 2)
        self.collections[g] += 1
        self.pause_ms_total[g] += ms
        self.pause_ms_max[g] = max(self.pause_ms_max[g], ms)
        if len(self.longest) < self.keep or ms > self.longest[-1][2]:
            self.longest.append((time.monotonic(), g, round(ms, 3)))
            self.longest.sort(key=lambda p: -p[2])
            del self.longest[self.keep :]

    def start(self) -> GcWatch:
        """Register the callback (idempotent)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        """Unregister the callback."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def max_pause_ms(self) -> float:
        """The longest collection so far, any generation (ms)."""
        return max(self.pause_ms_max)

    def summary(self) -> dict:
        """Counts and pause times per generation, the longest pauses, the frozen objects."""
        return {
            "collections": list(self.collections),
            "pause_ms_total": [round(x, 3) for x in self.pause_ms_total],
            "pause_ms_max": [round(x, 3) for x in self.pause_ms_max],
            "longest": [
                {
                    "at_s": round(t - self._started, 3),
                    "monotonic_s": round(t, 3),
                    "generation": g,
                    "ms": ms,
                }
                for t, g, ms in self.longest
            ],
            "started_monotonic_s": round(self._started, 3),
            "frozen_objects": gc.get_freeze_count(),
        }
