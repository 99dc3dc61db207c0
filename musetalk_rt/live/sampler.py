"""A stack sampler for the live process: where each thread spends its time, without ptrace.

The live process runs its audio path, clocks, GPU worker and outputs as Python threads that
share one interpreter; when frames come late, the question is which thread holds the time.
Profilers that attach from outside need ptrace rights that containers often withhold, so this
samples from inside: every ``interval_s`` it reads ``sys._current_frames()`` and counts, per
thread, the innermost frames of our package (and the library frame below them). The report
(``--profile FILE.json``) lists, per thread, the share of samples in each place — a thread
waiting on a queue or a lock shows as that wait. Each pass holds the interpreter lock while it
walks every thread's stack, and the report says what the passes took (``sampler_share``, an
upper bound). Each place's name is made once per code object: naming every frame of every pass
afresh made a pass over 72 waiting threads (as many as a 20-channel process runs) take ~14% of
the time at 100 Hz on a 2-core host, ~2% now (``experiments/sampler_cost.py``); in a real
20-channel run on an H200 host the passes took up to ~31%.

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

# id(code) -> (code, "module:function"). By identity: code objects compare equal across files
# when their name, first line and body match. Holding the code keeps its id from being reused;
# cleared when a sampler stops.
_LABELS: dict[int, tuple] = {}


def _label(code) -> str:
    entry = _LABELS.get(id(code))
    if entry is None or entry[0] is not code:
        base = code.co_filename.rpartition("/")[2]
        entry = _LABELS[id(code)] = (code, f"{base.rpartition('.')[0] or base}:{code.co_name}")
    return entry[1]


def _where(frame, depth: int = 3) -> str:
    """The innermost ``depth`` frames as ``module:function`` (innermost first)."""
    parts = []
    while frame is not None and len(parts) < depth:
        parts.append(_label(frame.f_code))
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
        # the passes' wall time: an upper bound on the interpreter lock they held (a pass that
        # loses the lock midway waits for it inside this time; the /proc reads are in it too)
        self.busy_s = 0.0
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

    def sample_once(self) -> None:
        """One pass: every other thread's place (and, once a second, every thread's CPU time)."""
        t0 = time.perf_counter()
        if self.samples % self._cpu_every == 0:
            self._read_cpu()
        me = threading.get_ident()
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            name = names.get(ident, str(ident))
            self.counts.setdefault(name, Counter())[_where(frame, self.depth)] += 1
        self.samples += 1
        self.busy_s += time.perf_counter() - t0

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._read_cpu()
        _LABELS.clear()  # the code objects seen while profiling

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
            # what sampling cost at most: the other threads could not run Python meanwhile
            "sampler_ms_per_sample": round(1000 * self.busy_s / max(self.samples, 1), 3),
            "sampler_share": round(self.busy_s / max(duration_s, 1e-9), 4),
            "threads": threads,
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.report(), indent=1))
