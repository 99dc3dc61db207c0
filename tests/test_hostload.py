"""The live process's host CPU meter: /proc parsing, the sampler, and where its figures go."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musetalk_rt.live.hostload import (
    HostLoad,
    cpu_seconds,
    cpu_shares,
    host_hint,
    parse_cpu_line,
    status_part,
)
from musetalk_rt.testing.live import idle_metrics, idle_worker, stats_channel

TICK = os.sysconf("SC_CLK_TCK")


def _stat(user, nice, system, idle, iowait, irq, softirq, steal) -> str:
    return (
        f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 0 0\n"
        "cpu0 1 2 3 4 5 6 7 8 0 0\nintr 12345\nctxt 999\n"
    )


def _pid_stat(pid: int, seconds: float, comm: str = "python") -> str:
    ticks = int(round(seconds * TICK))
    fields = ["S", "1", "1", "1", "0", "-1", "0"] + ["0"] * 4 + [str(ticks), "0"] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def _fake_proc(root: Path, cpu: tuple, children: dict[int, float]) -> None:
    """A /proc with the all-cores line, one task of 'self' and its children's stat files."""
    (root / "self" / "task" / "1").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(_stat(*cpu))
    (root / "self" / "task" / "1" / "children").write_text(" ".join(map(str, children)) + " ")
    for pid, s in children.items():
        (root / str(pid)).mkdir(exist_ok=True)
        (root / str(pid) / "stat").write_text(_pid_stat(pid, s, comm="x264 (enc) 1"))


def test_parse_and_share_the_all_cores_line():
    a = parse_cpu_line(_stat(100, 0, 50, 800, 30, 10, 5, 5))
    assert a == {"busy": 170, "idle": 800, "iowait": 30, "steal": 5, "total": 1000}
    b = parse_cpu_line(_stat(460, 0, 50, 900, 30, 10, 5, 45))
    assert cpu_shares(a, b) == pytest.approx({"busy": 0.8, "iowait": 0.0, "steal": 0.08})
    assert cpu_shares(a, a) is None  # no time passed
    c = parse_cpu_line(_stat(10, 0, 50, 2000, 30, 10, 5, 5))  # a counter went back
    assert cpu_shares(a, c) is None
    assert parse_cpu_line("intr 1\n") is None
    assert parse_cpu_line("cpu  a b c\n") is None
    short = parse_cpu_line("cpu  1 2 3 4\n")  # an old kernel: no iowait, irq, steal columns
    assert short == {"busy": 6, "idle": 4, "iowait": 0, "steal": 0, "total": 10}


def test_cpu_seconds_reads_past_a_command_name_with_spaces_and_parentheses():
    assert cpu_seconds(_pid_stat(42, 3.0, comm="a (b) c")) == pytest.approx(3.0)
    assert cpu_seconds("42 (x) S 1") is None
    assert cpu_seconds("garbage") is None


def test_sampler_on_a_fake_proc_feeds_status_metrics_frame_log_and_summary(tmp_path):
    from musetalk_rt.live.framelog import FrameLog, summarize

    proc = tmp_path / "proc"
    _fake_proc(proc, (100, 0, 50, 800, 30, 10, 5, 5), {101: 1.0, 102: 2.0})
    log_path = tmp_path / "frames.jsonl"
    flog = FrameLog(log_path)
    flog.write(ev="start", ch="c0", t0=time.monotonic() - 0.5, delay_ms=100.0)
    load = HostLoad(frame_log=flog, proc=proc)
    assert load.available and load.sample() is None  # the first sample is the baseline
    time.sleep(0.05)
    # 1000 jiffies later: 950 busy (50 of them steal); the encoders used 0.02 + 0.03 s more
    _fake_proc(proc, (900, 0, 150, 850, 30, 10, 5, 55), {101: 1.02, 102: 2.03})
    rec = load.sample()
    assert rec["busy"] == pytest.approx(0.95) and rec["steal"] == pytest.approx(0.05)
    assert rec["iowait"] == 0.0 and rec["process_cores"] >= 0.0
    assert 0.0 < rec["encoder_cores"] <= 0.05 / 0.05 + 1e-6
    # an encoder that ended takes its seconds with it: never a negative figure
    _fake_proc(proc, (1000, 0, 150, 1750, 30, 10, 5, 55), {})
    (proc / "101").rename(proc / "gone101")
    rec2 = load.sample()
    assert rec2["encoder_cores"] == 0.0 and rec2["busy"] == pytest.approx(0.1)

    took = load.take()
    assert took["busy"] == pytest.approx(0.525) and took["busy_max"] == pytest.approx(0.95)
    assert load.take() is None  # nothing since
    part = status_part(took, cores=16)
    assert part.startswith(", host CPU 52% of 16 cores (busiest second 95%, steal 2%;")
    assert "encoders" in part and status_part(None) == ""
    assert "saturated (95% in the busiest second), by this host's work" in host_hint(took)
    assert "steal" in host_hint({**took, "steal": 0.2})
    assert host_hint({**took, "busy_max": 0.5}) == ""  # 2.5% steal, 5% in its worst second
    assert took["steal_max"] == pytest.approx(0.05)
    # steal with cores to spare: the hypervisor's pauses, named with the fix
    hint = host_hint({**took, "busy_max": 0.45, "steal": 0.048, "steal_max": 0.2})
    assert "the hypervisor took 4.8% of the host's CPU (steal; 20% in the worst second)" in hint
    assert "a host without steal" in hint
    assert "hypervisor" in host_hint({**took, "busy_max": 0.45, "steal": 0.01, "steal_max": 0.12})

    summary = load.summary()
    assert summary["samples"] == 2 and summary["busy_pct_max"] == 95.0
    assert summary["busy_pct_mean"] == 52.5 and summary["steal_pct_mean"] == 2.5
    assert summary["steal_pct_max"] == 5.0

    text = idle_metrics(host_load=load)
    assert 'musetalk_host_cpu_ratio{state="busy"} 0.1' in text
    assert 'musetalk_cpu_cores{who="encoders"} 0.0' in text

    flog.close()
    rows = summarize(log_path, bin_s=60.0)
    assert rows[0]["host_busy_pct"] == 52.5 and rows[0]["steal_pct"] == 2.5
    assert rows[0]["steal_max_pct"] == 5.0  # the worst second: a short episode in a long bin
    assert rows[0]["encoder_cores"] is not None


def test_without_proc_nothing_is_sampled_and_nothing_is_shown(tmp_path):
    load = HostLoad(proc=tmp_path / "none").start()
    try:
        assert not load.available and load.sample() is None and load.take() is None
        assert load.summary() == {"samples": 0} and load.last is None
    finally:
        load.stop()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux's /proc")
def test_the_real_proc_sees_this_process_and_a_busy_child():
    """On this host: a child process that spins for a second shows as encoder cores, and the
    thread keeps sampling on its own."""
    load = HostLoad(period_s=0.2).start()
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.2: pass"]
    )
    try:
        child.wait(10)
        time.sleep(0.3)
    finally:
        load.stop()
    s = load.summary()
    assert s["samples"] >= 3
    assert 0.0 <= s["busy_pct_mean"] <= 100.0 and 0.0 <= s["steal_pct_mean"] <= 100.0
    # the child was reaped before the last sample: its seconds count while it lived
    assert s["encoder_cores_mean"] > 0.0


def test_status_line_shows_the_host_and_blames_saturated_cores_for_late_frames():
    from musetalk_rt.live.app import status_line

    ch = stats_channel(late_frames=7)
    host = {"busy": 0.7, "busy_max": 0.97, "steal": 0.0, "process_cores": 3.2,
            "encoder_cores": 9.5}  # fmt: skip
    worker = idle_worker()
    try:
        line, _ = status_line([ch], worker, None, 30.0, host=host)
        calm, _ = status_line([ch], worker, None, 30.0, host={**host, "busy_max": 0.6})
        none, _ = status_line([ch], worker, None, 30.0)
    finally:
        worker.stop()
    assert "late 7" in line and ", host CPU 70% of " in line
    assert "this process 3.2 cores, encoders 9.5)" in line
    assert "hint: the host's cores were saturated (97% in the busiest second)" in line
    assert "host CPU" in calm and "saturated" not in calm
    assert "host CPU" not in none


def test_late_frames_in_the_seconds_of_steal_earn_the_hint_below_its_levels():
    """A 30 s window like the 20-channel run of 2026-12-05: 1.3% steal on average and 7% in the
    worst second — below the mean and worst-second levels — but the late frames all came in the
    seconds with steal: the status line names the hypervisor; the same steal with the late
    frames elsewhere, or a steady steal everywhere, does not."""
    from collections import deque

    from musetalk_rt.live.app import late_seconds, status_line
    from musetalk_rt.live.hostload import late_steal

    now = time.monotonic()
    t0 = int(now) - 30
    by_second = [(t0 + i + 0.5, 0.002) for i in range(30)]
    for i in (10, 11, 12, 13, 14):
        by_second[i] = (t0 + i + 0.5, 0.07)
    steal = sum(s for _, s in by_second) / 30
    host = {"busy": 0.4, "busy_max": 0.45, "steal": steal, "steal_max": 0.07,
            "process_cores": 2.3, "encoder_cores": 3.0, "steal_by_second": by_second}  # fmt: skip
    assert host_hint(host) == ""  # below both levels (1.3% mean, 7% worst second)
    late = {t0 + 11, t0 + 12, t0 + 13}
    lt, other = late_steal(host, late)
    # the samples within a second of a late second (10-14 here) against the rest
    assert lt == pytest.approx(0.07) and other == pytest.approx(0.002)
    hint = host_hint(host, late)
    assert "the late frames came in seconds when the hypervisor took" in hint
    assert "a host without steal" in hint
    assert host_hint(host, {t0 + 25, t0 + 26}) == ""  # late elsewhere: not the steal
    steady = {**host, "steal_by_second": [(t, 0.025) for t, _ in by_second], "steal": 0.025}
    assert host_hint(steady, late) == ""  # steal everywhere alike: nothing tells it apart
    assert late_steal(host, set()) is None and late_steal(None, late) is None

    # through the status line: the channels' late seconds of this interval
    ch = stats_channel(late_frames=40)
    ch.late_seconds = deque([t0 - 100, *sorted(late)])  # one from an earlier interval
    assert late_seconds([ch], 31.0) == late
    worker = idle_worker()
    try:
        line, _ = status_line([ch], worker, None, 31.0, host=host)
    finally:
        worker.stop()
    assert "the late frames came in seconds when the hypervisor took" in line
