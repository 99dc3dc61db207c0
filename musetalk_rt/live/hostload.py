"""The host's CPU pressure as the live process sees it, read from Linux's ``/proc``.

Why: at 20 channels on an H200 the late frames of one run came in a 30-second episode in which
every host-side stage slowed at once — the voice-activity step, which runs on the CPU alone,
4x slower — and then recovered, while the GPU's own time did not change. Nothing the process
reported said whether the host's cores were saturated (by its own threads or by the output
encoders, which run as child processes), taken by a neighbour on a shared machine (the
hypervisor's *steal*), or idle. :class:`HostLoad` samples that once a second:

- ``busy`` / ``iowait`` / ``steal``: shares of all cores' time since the last sample, from the
  ``cpu`` line of ``/proc/stat`` (busy = user + nice + system + irq + softirq + steal; steal is
  reported apart as well, since it is time the host took away, not work of ours);
- ``process_cores``: this process's CPU time per second (every thread: features, clocks,
  blends, the GPU worker), in cores;
- ``encoder_cores``: the same for its child processes (the x264/AAC outputs), found through
  ``/proc/self/task/*/children``.

The status line shows the interval's mean and its busiest second, ``/metrics`` the last
second, ``--frame-log`` gets one ``host`` record per sample (so ``python -m
musetalk_rt.live.framelog`` puts the host's load beside the windows' lead and the late frames),
and the summary the run's means. Where ``/proc`` is missing (not Linux) every figure is absent
and nothing else changes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("musetalk_rt.live")

_TICKS_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_FIGURES = ("busy", "iowait", "steal", "process_cores", "encoder_cores")  # a sample's figures
# steal that earns a hint with late frames, as a share of all cores: the interval's mean, or
# its worst second (the clean 30 s windows of the runs that showed it: means <= 1.3%, worst
# seconds <= 7.9%; see host_hint)
INTERVAL_KEPT = 3600  # one-second samples kept between two status lines (an hour's)
STEAL_HINT_MEAN = 0.03
STEAL_HINT_MAX = 0.10
# steal in the seconds that had late frames that earns the hint even below those: at least
# this, and this many times the interval's other seconds (2026-12-05 on an H200: 2.4–11% in
# the late seconds against 0.02–1.4% in the others, in every 30 s window with late frames)
STEAL_LATE_MEAN = 0.02
STEAL_LATE_RATIO = 3.0
STEAL_ADVICE = (
    "another tenant shares this machine and its pauses delay the live threads — for the show, "
    "ask for a host without steal (a dedicated machine), or give the audio windows more lead "
    "over their frames with a larger --delay-ms (e.g. 1500)"
)


def late_steal(load: dict | None, late_seconds) -> tuple[float, float] | None:
    """Mean steal in the seconds that had late frames, and in the interval's other seconds.

    Args:
        load: One :meth:`HostLoad.take` (its ``steal_by_second``).
        late_seconds: ``int(time.monotonic())`` of the seconds with late frames.

    Returns:
        ``(late, other)`` shares of all cores; None without samples on both sides. A sample
        (the second before its ``t``) counts as late when a late second lies within 1 s of it.
    """
    late_set = set(late_seconds)
    if not load or not late_set:
        return None
    late, other = [], []
    for t, steal in load.get("steal_by_second", ()):
        hit = any(s in late_set for s in range(int(t) - 1, int(t) + 2))
        (late if hit else other).append(steal)
    if not late or not other:
        return None
    return sum(late) / len(late), sum(other) / len(other)


def parse_cpu_line(text: str) -> dict | None:
    """The all-cores ``cpu`` line of ``/proc/stat`` as jiffies, or None if it is not there.

    Returns:
        ``{"busy", "idle", "iowait", "steal", "total"}``. ``guest`` time is inside ``user``
        already and is not added again.
    """
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] != "cpu":
            continue
        try:
            v = [int(x) for x in parts[1:9]] + [0] * (8 - len(parts[1:9]))
        except ValueError:
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = v
        busy = user + nice + system + irq + softirq + steal
        return {
            "busy": busy,
            "idle": idle,
            "iowait": iowait,
            "steal": steal,
            "total": busy + idle + iowait,
        }
    return None


def cpu_shares(prev: dict, cur: dict) -> dict | None:
    """Shares (0..1) of all cores' time between two :func:`parse_cpu_line` readings.

    Returns:
        ``{"busy", "iowait", "steal"}``, or None when no time passed or a counter went back
        (a CPU taken offline).
    """
    dt = cur["total"] - prev["total"]
    deltas = {k: cur[k] - prev[k] for k in ("busy", "iowait", "steal")}
    if dt <= 0 or min(deltas.values()) < 0:
        return None
    return {k: min(1.0, v / dt) for k, v in deltas.items()}


def cpu_seconds(stat_text: str) -> float | None:
    """User + system CPU seconds from a ``/proc/PID/stat`` text (None if malformed)."""
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    _, sep, rest = stat_text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 13:
        return None
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS_S  # utime, stime (fields 14, 15)
    except ValueError:
        return None


class HostLoad:
    """Samples the host's CPU shares and this process's (and its children's) CPU use.

    Args:
        period_s: Seconds between samples.
        frame_log: A :class:`~.framelog.FrameLog` for one ``host`` record per sample.
        proc: The ``/proc`` folder (tests give a fake one).
    """

    def __init__(self, period_s: float = 1.0, frame_log=None, proc: str | Path = "/proc"):
        self.period_s = period_s
        self.frame_log = frame_log
        self.proc = Path(proc)
        self.available = self._read_cpu() is not None
        self.last: dict | None = None  # the latest sample
        self._lock = threading.Lock()
        # samples since the last take() (none comes with --status-interval-s 0: bounded)
        self._interval: deque = deque(maxlen=INTERVAL_KEPT)
        self._sums = dict.fromkeys(_FIGURES, 0.0)
        self._count = 0
        self._busy_max = 0.0
        self._steal_max = 0.0
        self._prev: tuple | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host load", daemon=True)

    # -- reading /proc ---------------------------------------------------------------------------

    def _read(self, *parts: str) -> str | None:
        try:
            return self.proc.joinpath(*parts).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def _read_cpu(self) -> dict | None:
        text = self._read("stat")
        return parse_cpu_line(text) if text is not None else None

    def _children_seconds(self) -> float:
        """CPU seconds of this process's living children (the output encoders)."""
        pids: set[str] = set()
        try:
            tasks = list(self.proc.joinpath("self", "task").iterdir())
        except OSError:
            return 0.0
        for task in tasks:
            text = self._read("self", "task", task.name, "children")
            if text:
                pids.update(text.split())
        total = 0.0
        for pid in pids:
            text = self._read(pid, "stat")
            s = cpu_seconds(text) if text is not None else None
            total += s or 0.0
        return total

    def _snapshot(self) -> tuple | None:
        cpu = self._read_cpu()
        if cpu is None:
            return None
        return (time.monotonic(), cpu, time.process_time(), self._children_seconds())

    # -- sampling ----------------------------------------------------------------------------------

    def sample(self) -> dict | None:
        """Take one sample: the shares and cores since the previous one (None the first time).

        Returns:
            ``{"t", "busy", "iowait", "steal", "process_cores", "encoder_cores"}`` (``t``:
            ``time.monotonic()``, the frame log's clock), or None.
        """
        snap = self._snapshot()
        prev, self._prev = self._prev, snap
        if snap is None or prev is None:
            return None
        (t0, cpu0, p0, c0), (t1, cpu1, p1, c1) = prev, snap
        shares = cpu_shares(cpu0, cpu1)
        dt = t1 - t0
        if shares is None or dt <= 0:
            return None
        rec = {
            "t": t1,
            **{k: round(v, 4) for k, v in shares.items()},
            "process_cores": round(max(0.0, p1 - p0) / dt, 3),
            # a child that ended takes its seconds with it: never below zero
            "encoder_cores": round(max(0.0, c1 - c0) / dt, 3),
        }
        with self._lock:
            self.last = rec
            self._interval.append(rec)
            self._count += 1
            self._busy_max = max(self._busy_max, rec["busy"])
            self._steal_max = max(self._steal_max, rec["steal"])
            for k in _FIGURES:
                self._sums[k] += rec[k]
        if self.frame_log is not None:
            self.frame_log.write(ev="host", **rec)
        return rec

    def take(self) -> dict | None:
        """The samples since the last call, for the status line (None if there were none).

        Returns:
            ``{"busy", "busy_max", "steal", "steal_max", "process_cores", "encoder_cores",
            "steal_by_second"}``: means over the interval, its busiest sample and the one with
            the most steal, and each sample's ``(t, steal)``.
        """
        with self._lock:
            recs, self._interval = list(self._interval), deque(maxlen=INTERVAL_KEPT)
        if not recs:
            return None
        n = len(recs)
        out = {
            k: sum(r[k] for r in recs) / n
            for k in ("busy", "steal", "process_cores", "encoder_cores")
        }
        out["busy_max"] = max(r["busy"] for r in recs)
        out["steal_max"] = max(r["steal"] for r in recs)
        out["steal_by_second"] = [(r["t"], r["steal"]) for r in recs]  # for late_steal
        return out

    def summary(self) -> dict:
        """The run's means, busiest second and worst second of steal, for the final JSON line."""
        with self._lock:
            n, s = self._count, dict(self._sums)
            busy_max, steal_max = self._busy_max, self._steal_max
        if not n:
            return {"samples": 0}
        return {
            "samples": n,
            "busy_pct_mean": round(100 * s["busy"] / n, 1),
            "busy_pct_max": round(100 * busy_max, 1),
            "iowait_pct_mean": round(100 * s["iowait"] / n, 2),
            "steal_pct_mean": round(100 * s["steal"] / n, 2),
            "steal_pct_max": round(100 * steal_max, 1),
            "process_cores_mean": round(s["process_cores"] / n, 2),
            "encoder_cores_mean": round(s["encoder_cores"] / n, 2),
        }

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> HostLoad:
        """Start sampling every ``period_s`` (nothing happens where ``/proc`` is missing)."""
        if self.available:
            self.sample()  # the baseline
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not stop the show
                log.error("host load sampling stopped: %s", exc)
                return


def status_part(load: dict | None, cores: int | None = None) -> str:
    """The status line's piece for one :meth:`HostLoad.take` (empty when there is none)."""
    if not load:
        return ""
    cores = cores or os.cpu_count() or 1
    steal = f", steal {load['steal']:.0%}" if load["steal"] >= 0.005 else ""
    return (
        f", host CPU {load['busy']:.0%} of {cores} cores (busiest second {load['busy_max']:.0%}"
        f"{steal}; this process {load['process_cores']:.1f} cores, encoders "
        f"{load['encoder_cores']:.1f})"
    )


def host_hint(load: dict | None, late_seconds=()) -> str:
    """A hint for a status line with late frames when the host's CPU was the limit.

    Two cases: the cores were saturated (by this host's work or by another tenant's steal),
    or the hypervisor took noticeable time (steal) with cores to spare. The second is what an
    H200 host showed in the 30 s windows of 16 aoti channels that went late: steal 4.8% and 7.1%
    of all cores on average, 13–16% in the worst seconds (7 and 10 seconds at 10% or more),
    against at most 1.2% and 7.3% in the clean windows, the host 40% busy throughout. A
    descheduled virtual CPU pauses whatever thread ran on it — the features, voice activity,
    the GPU worker — whatever the load. Below those levels the hint still comes when the
    seconds that had late frames (``late_seconds``) carried clearly more steal than the
    interval's others (:func:`late_steal`): on 2026-12-05 at 20 channels three windows went
    late with 0.9–2.6% steal on average and 4–9% in the worst second, all in the late seconds.
    """
    if not load:
        return ""
    if load["busy_max"] >= 0.9:
        who = (
            "another tenant of the machine (steal)" if load["steal"] >= 0.05 else "this host's work"
        )
        return (
            f", hint: the host's cores were saturated ({load['busy_max']:.0%} in the busiest "
            f"second), by {who}: late frames here come from the CPU side — serve fewer channels "
            "on this host, or give the encoders fewer threads (--encoder-threads)"
        )
    steal_max = load.get("steal_max", load["steal"])
    if load["steal"] >= STEAL_HINT_MEAN or steal_max >= STEAL_HINT_MAX:
        return (
            f", hint: the hypervisor took {load['steal']:.1%} of the host's CPU (steal; "
            f"{steal_max:.0%} in the worst second) although cores were free: {STEAL_ADVICE}"
        )
    both = late_steal(load, late_seconds)
    if both and both[0] >= STEAL_LATE_MEAN and both[0] >= STEAL_LATE_RATIO * max(both[1], 0.002):
        return (
            f", hint: the late frames came in seconds when the hypervisor took {both[0]:.1%} of "
            f"the host's CPU (steal), against {both[1]:.1%} in the other seconds: {STEAL_ADVICE}"
        )
    return ""
