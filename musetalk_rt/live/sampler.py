"""A stack sampler for the live process: where each thread spends its time, without ptrace.

The live process runs its audio path, clocks, GPU worker and outputs as Python threads that
share one interpreter; when frames come late, the question is which thread holds the time.
Profilers that attach from outside need ptrace rights that containers often withhold, so this
samples from inside: every ``interval_s`` it reads ``sys._current_frames()`` and counts, per
thread, the innermost frames of our package (and the library frame below them). The report
(``--profile FILE.json``) lists, per thread, the share of samples in each place — a thread
waiting on a queue or a lock shows as that wait. The sampler costs one short GIL hold per
interval (about 1% at 100 Hz with 40 threads).

A share of samples is where a thread *was*, not what it ran: a thread waiting for the
interpreter lock shows in the Python function it waits in, so under contention a cheap place
can look hot. Each thread's CPU seconds (Linux: ``/proc/self/task/<id>/stat``, read about once
a second) are reported beside the places — ``cpu_share`` is the fraction of the run it
actually ran on a core.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path


def _where(frame, depth: int = 3) -> str:
    """The innermost ``depth`` frames as ``module:function`` (innermost first)."""
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        name = Path(code.co_filename).stem
        parts.append(f"{name}:{code.co_name}")
        frame = frame.f_back
    return " < ".join(parts)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu_s(native_id: int) -> float | None:
    """CPU seconds (user + system) a thread of this process has run; None off Linux or gone."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            # fields after the ")" that closes the name: state (3), ..., utime (14), stime (15)
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class StackSampler:
    """Sample every thread's stack at a fixed rate.

    Args:
        interval_s: Sampling period.
        depth: Frames kept per sample (innermost first).
    """

    def __init__(self, interval_s: float = 0.01, depth: int = 8):
        self.interval_s, self.depth = interval_s, depth
        self.counts: dict[str, Counter] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack sampler", daemon=True)
        self._t0 = 0.0
        # native thread id -> [name, CPU seconds at the start (0 if started later), latest]
        self._cpu: dict[int, list] = {}
        self._cpu_every = max(1, round(1.0 / interval_s))  # samples between CPU readings

    def start(self) -> StackSampler:
        self._t0 = time.monotonic()
        self._read_cpu(baseline=True)
        self._thread.start()
        return self

    def _read_cpu(self, baseline: bool = False) -> None:
        for t in threading.enumerate():  # every thread but the sampler (the caller included:
            if t.native_id is None or t is self._thread:  # start() runs on the main thread)
                continue
            cpu = thread_cpu_s(t.native_id)
            if cpu is None:
                continue
            entry = self._cpu.setdefault(t.native_id, [t.name, cpu if baseline else 0.0, cpu])
            entry[2] = cpu

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            if self.samples % self._cpu_every == 0:
                self._read_cpu()
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, str(ident))
                self.counts.setdefault(name, Counter())[_where(frame, self.depth)] += 1
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._read_cpu()

    def report(self, top: int = 8) -> dict:
        """Per thread: its top places with their share of the samples, and its CPU time."""
        duration_s = time.monotonic() - self._t0
        cpu: dict[str, float] = {}
        for name, first, last in self._cpu.values():  # threads of one name add up
            cpu[name] = cpu.get(name, 0.0) + max(0.0, last - first)
        threads = {}
        for name, c in sorted(self.counts.items()):
            total = sum(c.values())
            threads[name] = {
                "samples": total,
                "top": [[where, round(n / total, 3)] for where, n in c.most_common(top)],
            }
            if name in cpu:
                threads[name]["cpu_s"] = round(cpu[name], 2)
                threads[name]["cpu_share"] = round(cpu[name] / max(duration_s, 1e-9), 3)
        return {
            "duration_s": round(duration_s, 1),
            "interval_s": self.interval_s,
            "samples": self.samples,
            "threads": threads,
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.report(), indent=1))
