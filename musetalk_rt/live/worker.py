"""The one GPU worker: batches the frames that are due across all channels into a bucket.

Every pass it asks each channel for frames that are speech, have their audio window and are due
within ``horizon_s``; it takes the earliest deadlines first, up to the largest bucket (the
runner pads a smaller batch to the nearest bucket), runs ``unet -> vae_decode -> to_host``, and
blends each face into its own channel's avatar frame. With nothing due it waits a few ms on an
event, so a stop is immediate. Work for one channel never waits for another's audio.

Blending (a face into its avatar frame, OpenCV, the interpreter lock released) runs on a small
pool of blend threads, so the worker launches the next batch while the last one is pasted. A
frame is *pending* from the moment its batch is taken until its blend is stored; the channel
does not offer it again meanwhile. Overflow policy: at most four batches of blends wait; when
the pool is that far behind, the worker blocks before taking more work (backpressure — late
frames show idle at their deadline, nothing queues without bound).

No load shedding: skipping frames whose deadline looked too close (by a batch-time estimate)
was tried and removed — a pessimistic estimate (the start-up measurement on a busy CPU) shed
every frame, and on the H100 it saved nothing (experiments/LOG.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from musetalk_rt.avatar.geometry import blend
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
    """

    def __init__(
        self,
        generator: FaceGenerator,
        channels: list,
        horizon_s: float,
        blend_threads: int | None = None,
    ):
        self.gen = generator
        self.channels = channels
        self.horizon_s = horizon_s
        self.max_batch = max(generator.batch_sizes)
        self.blend_threads = blend_threads or max(1, min(4, os.cpu_count() or 1))
        self._blend_pool = ThreadPoolExecutor(self.blend_threads, thread_name_prefix="blend")
        self._blend_slots = threading.BoundedSemaphore(4 * self.max_batch)
        self.blend_errors = 0
        self.clock = StageClock(generator.device)
        self.batches = 0
        self.frames = 0
        self._latents = {ch.name: ch.avatar.latents.to(generator.device) for ch in channels}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(10.0)
        self._blend_pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            jobs = [
                (d, i, m)
                for i, ch in enumerate(self.channels)
                for d, m in ch.due_jobs(now, self.horizon_s)
            ]
            if not jobs:
                self._stop.wait(0.005)
                continue
            jobs.sort()
            take = jobs[: self.max_batch]
            try:
                self._generate([(self.channels[i], m) for _, i, m in take])
            except Exception:  # never take the show down: log, count, go on with idle frames
                log.exception("GPU batch failed; those frames will show idle")
                time.sleep(0.05)

    def _generate(self, work: list) -> None:
        # a window the channel's clock has dropped meanwhile: its deadline passed, skip it
        wins = [(ch, m, ch.windows.get(m)) for ch, m in work]
        work = [(ch, m) for ch, m, w in wins if w is not None]
        wins = [w for _, _, w in wins if w is not None]
        if not work:
            return
        if self.gen.device.type == "cuda":
            stream = torch.cuda.current_stream(self.gen.device)
            for w in wins:  # made on the audio path's stream, read here: keep them alive
                w.record_stream(stream)
        cyc = [ch.avatar.cycle_frame(m) for ch, m in work]
        latents = torch.stack(
            [self._latents[ch.name][c] for (ch, _), c in zip(work, cyc, strict=True)]
        )
        audio = torch.stack(wins).to(self.gen.device)
        batch = FrameBatch(list(range(len(work))), cyc, latents=latents, audio=audio)
        for ch, m in work:
            ch.pending.add(m)
        try:
            self.gen(batch, self.clock)
        except Exception:
            for ch, m in work:
                ch.pending.discard(m)
            raise
        for (ch, m), c, face in zip(work, cyc, batch.faces, strict=True):
            self._blend_slots.acquire()  # backpressure: at most 4 batches of blends waiting
            self._blend_pool.submit(self._blend, ch, m, c, np.asarray(face))
        self.batches += 1
        self.frames += len(work)

    def _blend(self, ch, m: int, c: int, face: np.ndarray) -> None:
        """Paste one face into its avatar frame; the channel shows it at frame ``m``'s deadline."""
        try:
            a = ch.avatar
            ch.generated[m] = blend(a.frames[c], face, a.boxes[c], a.crops[c], a.masks[c])
        except Exception:  # that frame shows idle; the show goes on
            self.blend_errors += 1
            log.exception("blending frame %d of channel %s failed", m, ch.name)
        finally:
            ch.pending.discard(m)
            self._blend_slots.release()
