"""Free space on the disks the recordings go to, and how long it lasts at the rate it falls.

A show runs for hours, and 20 channels record ~12 GB an hour (1.3 Mbit/s each at the encoder's
settings, measured with the tiny models' noise face on the 704x1216 fixture; a real face
compresses better). A full disk ends every recording on it at once; the
outputs survive it (:mod:`.output`), the recordings' tails do not. So the live process watches
each recording folder's file system: ``/metrics`` gains ``record_disk_free_bytes`` and
``record_disk_seconds_left``, and the status line names a disk once it has less than an hour
left (or less than 1 GB), early enough to free space or move ``--record``.

The rate is the fall of the free space over the last five minutes — whatever writes to that
disk, since all of it fills the disk. Sampling is one ``statvfs`` per disk every 10 s on a
thread of its own: on a hung network mount that call never returns, and the status line and
``/metrics`` run on the ingest's event loop, so they only read the last sample.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

WINDOW_S = 300.0  # the rate is measured over this much of the past
MIN_SPAN_S = 20.0  # no rate before two samples this far apart
WARN_LEFT_S = 3600.0  # the status line names a disk with less time left than this
WARN_FREE_BYTES = 1e9  # ... or less free space than this
SAMPLE_INTERVAL_S = 10.0

log = logging.getLogger("musetalk_rt.live")


class RecordingDisks:
    """The file systems of the given recording files: free space, rate and time left.

    Args:
        paths: The recording files (URLs and ``None`` are left out).
        usage: ``shutil.disk_usage``-like (for tests).
        clock: Seconds, monotonic (for tests).
    """

    def __init__(
        self,
        paths,
        usage: Callable = shutil.disk_usage,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._usage, self._clock = usage, clock
        self.folders: list[str] = []  # one folder per file system
        seen: set[int] = set()
        for p in paths:
            if not p or "://" in p:
                continue
            folder = Path(p).parent.resolve()
            try:
                dev = os.stat(folder).st_dev
            except OSError:
                dev = hash(str(folder))  # checked at start; a folder gone later still counts
            if dev not in seen:
                seen.add(dev)
                self.folders.append(str(folder))
        self._samples: dict[str, deque] = {f: deque() for f in self.folders}
        self.last: list[dict] = []  # the latest sample (what the status line and /metrics show)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float = SAMPLE_INTERVAL_S) -> RecordingDisks:
        """Sample every ``interval_s`` on a daemon thread (nothing to do without a disk)."""
        if self.folders and self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(interval_s,), name="recording disks", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.sample()
            except Exception:  # a watch, never a reason to stop the show
                log.exception("sampling the recording disks failed")

    def sample(self) -> list[dict]:
        """Take a sample of every disk.

        Returns:
            Per disk: ``folder``, ``free_bytes``, ``rate_bytes_s`` and ``left_s`` (None until
            known, or while the free space does not fall). A disk that cannot be read is left
            out.
        """
        now = self._clock()
        out = []
        for folder in self.folders:
            try:
                free = float(self._usage(folder).free)
            except OSError:
                continue
            q = self._samples[folder]
            q.append((now, free))
            while len(q) > 2 and now - q[1][0] >= WINDOW_S:
                q.popleft()
            rate = left = None
            t0, free0 = q[0]
            if now - t0 >= MIN_SPAN_S:
                rate = (free0 - free) / (now - t0)
                if rate > 0:
                    left = free / rate
            out.append({"folder": folder, "free_bytes": free, "rate_bytes_s": rate, "left_s": left})
        self.last = out
        return out

    def status_part(self) -> str:
        """The status line's words for disks about to fill ("" while every disk has room)."""
        parts = []
        for d in self.last:
            short = d["left_s"] is not None and d["left_s"] < WARN_LEFT_S
            if short or d["free_bytes"] < WARN_FREE_BYTES:
                left = f", ~{d['left_s'] / 60:.0f} min at the current rate" if short else ""
                parts.append(
                    f", recording disk {d['folder']}: {d['free_bytes'] / 1e9:.1f} GB free{left}"
                    " (free space there, or restart with --record on another disk)"
                )
        return "".join(parts)

    def start_line(self) -> str:
        """One line for the start: each recording disk's free space."""
        disks = self.sample()
        return "recording disks: " + "; ".join(
            f"{d['folder']} {d['free_bytes'] / 1e9:.1f} GB free" for d in disks
        )
