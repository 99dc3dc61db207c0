"""Stand-ins for the live process's parts in tests of what reads them (status line, metrics).

A real :class:`~musetalk_rt.live.worker.GpuWorker` with no channels (all counters zero) and a
channel that only carries the statistics the status line and ``/metrics`` read: enough to test
those readers without models, clocks or outputs.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace


def idle_worker(batch_sizes: tuple[int, ...] = (2,)):
    """A CPU GPU-worker with no channels that never ran; call ``stop()`` when done."""
    import torch

    from musetalk_rt.live.worker import GpuWorker

    gen = SimpleNamespace(batch_sizes=list(batch_sizes), device=torch.device("cpu"))
    return GpuWorker(gen, [], horizon_s=1.0, blend_threads=1)


def stats_channel(
    late_frames: int = 0,
    speech_frames: int = 10,
    delay_s: float = 0.2,
    voice_to_frame_p95_ms: float | None = None,
    window_lead_p05_ms: float | None = None,
):
    """A channel whose statistics say so many talking frames on time and late, the rest zero.

    ``ch.stats.as_dict()`` returns the same dict each time: a test may change a count in it.
    """
    from musetalk_rt.live.channel import ChannelStats

    stats = ChannelStats().as_dict()  # every counter a real channel has, at zero
    stats.update(
        late_frames=late_frames,
        speech_frames=speech_frames,
        voice_to_frame_p95_ms=voice_to_frame_p95_ms,
        window_lead_p05_ms=window_lead_p05_ms,
    )
    return SimpleNamespace(
        stats=SimpleNamespace(as_dict=lambda: stats),
        outputs=[],
        delay_s=delay_s,
        late_seconds=deque(),  # the seconds with late frames (none: no host hint from them)
    )


def idle_metrics(**parts) -> str:
    """``/metrics`` of a process with no channels and an idle worker, plus ``parts``.

    ``parts``: keyword arguments of :func:`~musetalk_rt.live.metrics.metrics_text`
    (``gc_watch``, ``host_load``, …).
    """
    from musetalk_rt.live.metrics import metrics_text

    worker = idle_worker()
    try:
        return metrics_text([], worker, **parts)
    finally:
        worker.stop()
