"""The one GPU worker: batches the frames that are due across all channels into a bucket.

Every pass it asks each channel for frames that are speech, have their audio window and are due
within ``horizon_s``; it takes the earliest deadlines first, up to the largest bucket (the
runner pads a smaller batch to the nearest bucket), launches ``unet -> vae_decode -> to_host``
and blends each face into its own channel's avatar frame. With nothing due it waits a few ms on
an event, so a stop is immediate. Work for one channel never waits for another's audio.

Two batches in flight: when a full batch is waiting while one runs, the worker launches it
before collecting the running one, so the GPU need not idle while the host gathers inputs,
copies faces out and hands them to the blend threads (on an H200, 12 channels at batch 16 ran
one batch per 60 ms against 33 ms for the batch alone; that host side and the whisper calls
sharing the GPU are the suspects). A partial batch waits until the running one is collected:
launched at once it would be padded to a full bucket for a few frames.

Blending (a face into its avatar frame, OpenCV, the interpreter lock released) runs on a small
pool of blend threads, so the worker launches the next batch while the last one is pasted. A
frame is *pending* from the moment its batch is taken until its blend is stored; the channel
does not offer it again meanwhile. Overflow policy: at most four batches of blends wait; when
the pool is that far behind, the worker blocks before taking more work (backpressure — late
frames show idle at their deadline, nothing queues without bound).

Shedding frames that cannot make it: a frame whose deadline comes before the batch could be
back and blended — by the median of the last batches' launch-to-faces time plus the median
blend, both measured in this process — is not taken; it shows idle at its deadline and counts
as late, as it would have anyway, and its GPU time goes to frames that can still make theirs.
A frame passed over is marked on its channel and may still be taken a pass later (the estimate
moves with every batch); the channel's clock counts it as shed only if it shows it late
(:class:`.channel.PassedOver`), so the shed frames are always part of the late ones.
Without it an overloaded worker computes nearly every frame late (on an H200 at 12 channels,
~1% short of capacity, 74% of the talking frames came late). Nothing is shed before a batch has
been measured, and when no due frame is feasible the latest ones are taken (the estimate stays
fresh). An earlier attempt used the start-up measurement instead, and on a busy 2-core CPU shed
every frame (experiments/LOG.md). ``shed=False`` turns it off (``--no-load-shedding``).

Filling batches (on CUDA): a batch costs the same GPU time however few frames it carries (it is
padded to its bucket), so a partial batch waits for more frames while its earliest deadline
allows — while that deadline is further away than the slowest of the last batches'
launch-to-faces times plus a blend plus ``fill_guard_s``. On an H200 at 12 channels the worker
launched whatever was due as soon as it could: 11.4 frames per batch of 16 on average, one batch
per 54 ms, the GPU busy with padding while the whisper calls waited beside it. Frames are shown
at their deadline either way, so waiting costs no latency. ``fill=False`` turns it off
(``--no-batch-fill``); on the CPU it is off (a CPU batch's time grows with its frames).

A waiting batch may grow into the largest bucket, so that bucket's time always counts: its last
batches', or before one has been collected twice the start-up measurement (``full_batch_s``,
taken on an idle GPU, while a batch launched beside another waits for it); with neither, a
partial batch does not wait. On an H200 at 20 channels the only late frame of a 5-minute run
came from the run's second batch: the one batch measured so far was of bucket 16 (34 ms), and a
batch of 29 frames waited until 55 ms before its deadline, then took bucket 32's 56 ms; with the
start-up figure counted once, the next run's first batch of bucket 32 waited until 78 ms before
its deadline and took 82.
"""

from __future__ import annotations

import bisect
import logging
import os
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from musetalk_rt.avatar.geometry import blend
from musetalk_rt.errors import worth_logging
from musetalk_rt.pipeline import FaceGenerator
from musetalk_rt.stages import FrameBatch, StageClock

log = logging.getLogger("musetalk_rt.worker")


class GpuWorker:
    """Generates speech frames for every channel (see the module docstring).

    Args:
        generator: Prepared :class:`~musetalk_rt.pipeline.FaceGenerator`.
        channels: The :class:`~.channel.LiveChannel` objects it serves.
        horizon_s: Generate frames whose deadline is at most this far ahead.
        blend_threads: Threads that paste faces into avatar frames (default: up to 4).
        shed: Skip frames that cannot be ready by their deadline (see the module docstring).
        fill: Let a partial batch wait for more frames while its deadlines allow (default: on
            CUDA; see the module docstring).
        fill_guard_s: Margin kept before the earliest deadline when a partial batch waits.
        overlap: Keep two batches in flight (default: on CUDA, where a launch returns before
            the GPU is done; on the CPU a launch computes the batch, so overlapping would only
            hold back the finished one's blends).
        frame_log: A :class:`~.framelog.FrameLog` that gets a ``batch`` record per batch.
        full_batch_s: Launch-to-faces seconds of a batch of the largest bucket measured at
            start-up; twice it is what a filling batch may cost until such a batch is collected.
    """

    def __init__(
        self,
        generator: FaceGenerator,
        channels: list,
        horizon_s: float,
        blend_threads: int | None = None,
        overlap: bool | None = None,
        shed: bool = True,
        fill: bool | None = None,
        fill_guard_s: float = 0.02,
        frame_log=None,
        full_batch_s: float | None = None,
    ):
        self.gen = generator
        self.channels = channels
        self.horizon_s = horizon_s
        self.max_batch = max(generator.batch_sizes)
        on_cuda = generator.device.type == "cuda"
        self.overlap = on_cuda if overlap is None else overlap
        self.fill = on_cuda if fill is None else fill
        self.fill_guard_s = fill_guard_s
        self.frame_log = frame_log
        self.fill_wait_s = 0.0  # time a partial batch waited for more frames
        self.blend_threads = blend_threads or max(1, min(4, os.cpu_count() or 1))
        self._blend_pool = ThreadPoolExecutor(self.blend_threads, thread_name_prefix="blend")
        self._blend_slots = threading.BoundedSemaphore(4 * self.max_batch)
        self.blend_errors = 0
        self.batch_errors = 0  # batches that failed to launch or to finish
        self.clock = StageClock(generator.device)
        self.batches = 0
        self.frames = 0
        self.overlapped = 0  # batches launched while another was still in flight
        self.idle_s = 0.0  # time with nothing due
        self.blend_wait_s = 0.0  # time blocked on the blend backpressure
        self.shed = shed
        self._batch_s: deque[float] = deque(maxlen=8)  # launch -> faces on the host, seconds
        # the same for batches of the largest bucket only (more frames than the next bucket)
        buckets = sorted(generator.batch_sizes)
        self._full_from = buckets[-2] + 1 if len(buckets) > 1 else 1
        self._full_s: deque[float] = deque(maxlen=8)
        self.full_batch_s = full_batch_s
        self._blend_s: deque[float] = deque(maxlen=32)  # one blend, seconds
        # every avatar's reference latents in one device tensor (an avatar shared by channels
        # once): a batch gathers its rows in one call, not one indexing call per frame
        firsts: dict[int, int] = {}
        parts = []
        for ch in channels:
            if id(ch.avatar) not in firsts:
                firsts[id(ch.avatar)] = sum(p.shape[0] for p in parts)
                parts.append(ch.avatar.latents)
        self._latents = torch.cat(parts).to(generator.device) if parts else None  # [N, 8, 32, 32]
        self._first_row = {ch.name: firsts[id(ch.avatar)] for ch in channels}
        self.gpu_busy_s = 0.0  # the batches' time on the GPU (CUDA events), seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(10.0)
        self._blend_pool.shutdown(wait=True, cancel_futures=True)

    def expected_s(self) -> float | None:
        """Seconds from taking a frame to its blended face (None before the first batch).

        The median of the last batches' launch-to-faces time plus the median of the last blends.
        """
        if not self._batch_s:
            return None
        return statistics.median(self._batch_s) + self._blend_median_s()

    def frame_wait_s(self) -> float | None:
        """The longest a frame may take from its audio window to its blended face, seconds.

        Under load a window can arrive just after a batch was launched: the frame waits for
        that batch and then rides in the next, so two medians of launch-to-faces plus a blend
        (:meth:`expected_s` and one more batch). None before the first batch.
        """
        one = self.expected_s()
        return None if one is None else one + statistics.median(self._batch_s)

    def _blend_median_s(self) -> float:
        """The median of the last blends, seconds (0 before the first)."""
        return statistics.median(self._blend_s) if self._blend_s else 0.0

    @property
    def shed_frames(self) -> int:
        """Late frames that this worker had passed over (no time left), all channels."""
        return sum(ch.stats.shed_frames for ch in self.channels)

    def _select(self, jobs: list, now: float) -> list:
        """The due ``(deadline, channel, frame)`` jobs worth taking, earliest deadline first.

        A frame passed over is marked on its channel, not counted: the estimate moves with every
        batch, so a frame passed over now may be taken (and shown on time) a pass later. The
        channel counts it as shed only if it shows late (:class:`.channel.PassedOver`).
        """
        need = self.expected_s() if self.shed else None
        if need is None or not jobs:
            return jobs
        k = bisect.bisect_left(jobs, (now + need,))  # jobs[:k] cannot be ready in time
        if k == len(jobs):  # none feasible: the latest ones (and a fresh measurement)
            return jobs[-self.max_batch :]
        for _, i, m in jobs[:k]:
            self.channels[i].passed_over.mark(m)
        return jobs[k:]

    def _can_wait(self, jobs: list, now: float) -> bool:
        """Whether a partial batch may wait for more frames (see the module docstring)."""
        if not self.fill or not jobs or len(jobs) >= self.max_batch:
            return False
        full = self._full_s or ([2 * self.full_batch_s] if self.full_batch_s else [])
        if not full:  # the bucket a waiting batch may grow into has no figure yet
            return False
        need_s = max([*self._batch_s, *full]) + self._blend_median_s() + self.fill_guard_s
        return jobs[0][0] - now > need_s

    def _note_batch(self, frames: int, seconds: float) -> None:
        """Record one collected batch's launch-to-faces time (``frames``: its frame count)."""
        self._batch_s.append(seconds)
        if frames >= self._full_from:
            self._full_s.append(seconds)

    def _due(self, now: float) -> list:
        jobs = [
            (d, i, m)
            for i, ch in enumerate(self.channels)
            for d, m in ch.due_jobs(now, self.horizon_s)
        ]
        jobs.sort()
        return jobs

    def _run(self) -> None:
        inflight = None  # a launched batch not collected yet
        while not self._stop.is_set():
            now = time.monotonic()
            jobs = self._select(self._due(now), now)
            if inflight is not None and len(jobs) < self.max_batch:
                self._finish(inflight)  # no full batch waits: collect first, then look again
                inflight = None
                continue
            if not jobs:
                self.idle_s += self._nap()
                continue
            if self._can_wait(jobs, now):  # a partial batch with time to spare: let it fill
                self.fill_wait_s += self._nap()
                continue
            taken = jobs[: self.max_batch]
            for _, i, m in taken:
                self.channels[i].passed_over.taken(m)  # passed over earlier, taken now: not shed
            try:
                launched = self._launch(
                    [(self.channels[i], m) for _, i, m in taken], [d for d, _, _ in taken]
                )
            except Exception:  # never take the show down: log, count, go on with idle frames
                self._batch_error()
                launched = None
                time.sleep(0.05)
            if inflight is not None:
                if launched is not None:
                    self.overlapped += 1
                    launched.overlapped = True
                self._finish(inflight)
            inflight = launched
            if inflight is not None and not self.overlap:
                self._finish(inflight)  # the CPU computed it in the launch: blend it now
                inflight = None
        if inflight is not None:
            self._finish(inflight)

    def _nap(self) -> float:
        """Wait 5 ms (a stop ends it at once); returns the seconds waited."""
        t = time.perf_counter()
        self._stop.wait(0.005)
        return time.perf_counter() - t

    def _launch(self, work: list, deadlines: list[float] | None = None) -> _Launched | None:
        """Queue one batch on the GPU; returns what :meth:`_finish` needs, or None.

        ``deadlines`` (``time.monotonic()`` seconds, one per ``(channel, frame)``) give the
        frame log the batch's earliest one.
        """
        t0 = time.monotonic()
        # a window the channel's clock has dropped meanwhile: its deadline passed, skip it
        kept = [
            (ch, m, w, d)
            for (ch, m), d in zip(work, deadlines or [None] * len(work), strict=True)
            if (w := ch.windows.get(m)) is not None
        ]
        if not kept:
            return None
        work = [(ch, m) for ch, m, _, _ in kept]
        wins = [w for _, _, w, _ in kept]
        earliest_s = min((d for *_, d in kept if d is not None), default=None)
        # few torch calls here: each one releases the interpreter lock and waits to retake it
        # behind the other threads (at 16 channels ~0.7 ms at the median)
        cyc = [ch.avatar.cycle_frame(m) for ch, m in work]
        rows = [self._first_row[ch.name] + c for (ch, _), c in zip(work, cyc, strict=True)]
        dev = self.gen.device
        latents = self._latents[torch.tensor(rows).to(dev, non_blocking=True)]  # [B, 8, 32, 32]
        audio = torch.stack(wins).to(dev)  # [B, 50, 384]
        batch = FrameBatch(list(range(len(work))), cyc, latents=latents, audio=audio)
        for ch, m in work:
            ch.pending.add(m)
        events = None
        if dev.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record(torch.cuda.current_stream(dev))
        try:
            self.gen.launch(batch, self.clock)
        except Exception:
            _release(work)
            raise
        if events is not None:
            events[1].record(torch.cuda.current_stream(dev))
        # the windows were made on the audio path's stream and are read on this one: holding
        # them until the batch is collected keeps their memory from reuse (no record_stream)
        return _Launched(work, cyc, batch, t0, earliest_s, wins=wins, events=events)

    def _finish(self, launched: _Launched) -> None:
        """Collect a launched batch's faces and hand them to the blend threads."""
        work, cyc, batch, t0 = launched.work, launched.cyc, launched.batch, launched.t0
        try:
            self.gen.finish(batch, self.clock)
        except Exception:
            _release(work)
            self._batch_error()
            time.sleep(0.05)
            return
        faces_t = time.monotonic()
        self._note_batch(len(work), faces_t - t0)
        if launched.events is not None:
            start, end = launched.events
            end.synchronize()  # recorded right after the copy that finish() waited for
            self.gpu_busy_s += start.elapsed_time(end) / 1000.0
        launched.wins = None
        for (ch, m), c, face in zip(work, cyc, batch.faces, strict=True):
            if not self._blend_slots.acquire(blocking=False):  # backpressure: 4 batches wait
                t = time.perf_counter()
                self._blend_slots.acquire()
                self.blend_wait_s += time.perf_counter() - t
            self._blend_pool.submit(self._blend, ch, m, c, np.asarray(face))
        self.batches += 1
        self.frames += len(work)
        if self.frame_log:  # after the blends are handed over: file I/O off the critical path
            self.frame_log.write(
                ev="batch",
                n=len(work),
                launched=t0,
                faces=faces_t,
                lead_ms=None
                if launched.earliest_s is None
                else round((launched.earliest_s - t0) * 1000.0, 3),
                overlapped=launched.overlapped,
            )

    def stats_dict(self) -> dict:
        """The worker's counters (the live summary and its probe rows)."""
        return {
            "gpu_batches": self.batches,
            "gpu_frames": self.frames,
            "gpu_busy_s": round(self.gpu_busy_s, 2),
            "mean_batch": round(self.frames / self.batches, 2) if self.batches else None,
            "overlapped_batches": self.overlapped,
            "worker_idle_s": round(self.idle_s, 2),
            "blend_wait_s": round(self.blend_wait_s, 2),
            "batch_errors": self.batch_errors,
            "blend_errors": self.blend_errors,
            "fill_wait_s": round(self.fill_wait_s, 2),
            "gpu_shed_frames": self.shed_frames,
            "expected_ms": None if (e := self.expected_s()) is None else round(e * 1000, 1),
            "stage_ms": {k: round(v, 1) for k, v in self.clock.totals_ms(wait=False).items()},
        }

    def _batch_error(self) -> None:
        """Count a failed batch; log it with its traceback the first times, then every 100th.

        A sticky CUDA error fails every batch, ~20 a second while anyone talks: one traceback
        each would bury the log (and fill its disk) while the show goes on with idle frames.
        """
        self.batch_errors += 1
        if worth_logging(self.batch_errors):
            log.exception(
                "GPU batch failed (error #%d); those frames will show idle", self.batch_errors
            )

    def _blend(self, ch, m: int, c: int, face: np.ndarray) -> None:
        """Paste one face into its avatar frame; the channel shows it at frame ``m``'s deadline."""
        try:
            a = ch.avatar
            t0 = time.monotonic()
            ch.generated[m] = blend(a.frames[c], face, a.boxes[c], a.crops[c], a.masks[c])
            self._blend_s.append(time.monotonic() - t0)
        except Exception:  # that frame shows idle; the show goes on
            self.blend_errors += 1
            if worth_logging(self.blend_errors):
                log.exception(
                    "blending frame %d of channel %s failed (error #%d)",
                    m,
                    ch.name,
                    self.blend_errors,
                )
        finally:
            ch.pending.discard(m)
            self._blend_slots.release()


@dataclass
class _Launched:
    """A batch on the GPU, not collected yet."""

    work: list  # (channel, frame)
    cyc: list[int]  # avatar cycle frames
    batch: FrameBatch
    t0: float  # launched, time.monotonic() seconds
    earliest_s: float | None  # its earliest deadline
    overlapped: bool = False  # launched while another was in flight
    wins: list | None = None  # the audio windows, held until the batch is collected
    # CUDA events around the batch's GPU work: the start completes when the stream reaches it
    # (after the batch before), so their interval is this batch's GPU time — an upper bound: a
    # GPU that ran dry while the host was still queuing the batch's kernels counts that gap too
    # (small with CUDA graphs, where a stage is one launch; large for eager)
    events: tuple | None = None


def _release(work: list) -> None:
    """The channels may offer these ``(channel, frame)`` again (their batch failed)."""
    for ch, m in work:
        ch.pending.discard(m)
