"""The recording disks' free space, its rate of fall and time left, on the status line and
``/metrics``."""

from __future__ import annotations

import threading
import time
from collections import namedtuple

from musetalk_rt.live.diskwatch import RecordingDisks
from musetalk_rt.testing.live import idle_metrics, idle_worker, stats_channel

Usage = namedtuple("Usage", "total used free")


class FakeDisk:
    """A disk whose free space falls at ``rate`` bytes/s of a fake clock."""

    def __init__(self, free: float, rate: float):
        self.t, self.free0, self.rate = 0.0, free, rate

    def clock(self) -> float:
        return self.t

    def usage(self, folder):
        return Usage(0, 0, max(0.0, self.free0 - self.rate * self.t))


def test_one_folder_per_disk_and_urls_left_out(tmp_path):
    (tmp_path / "b").mkdir()
    disks = RecordingDisks(
        [str(tmp_path / "a.mp4"), str(tmp_path / "b" / "c.mp4"), "rtmp://h/live/k", None]
    )
    assert disks.folders == [str(tmp_path.resolve())]  # b is on the same file system
    (d,) = disks.sample()  # the real disk
    assert d["free_bytes"] > 0 and d["rate_bytes_s"] is None and d["left_s"] is None
    assert disks.start_line().startswith(f"recording disks: {tmp_path.resolve()} ")


def test_time_left_from_the_fall_of_the_free_space(tmp_path):
    disk = FakeDisk(free=50e9, rate=1.5e6)  # ~9 channels at 1.3 Mbit/s
    disks = RecordingDisks([str(tmp_path / "a.mp4")], usage=disk.usage, clock=disk.clock)
    assert disks.sample()[0]["left_s"] is None  # one sample: no rate yet
    disk.t = 10.0
    assert disks.sample()[0]["rate_bytes_s"] is None  # too short a span
    disk.t = 60.0
    d = disks.sample()[0]
    assert abs(d["rate_bytes_s"] - 1.5e6) < 1.0
    assert abs(d["left_s"] - (50e9 - 1.5e6 * 60) / 1.5e6) < 1.0
    assert disks.status_part() == ""  # hours left: nothing to say
    disk.t = 50e9 / 1.5e6 - 1800  # half an hour before it is full
    disks.sample()
    part = disks.status_part()
    assert (
        f", recording disk {tmp_path.resolve()}: 2.7 GB free, ~30 min at the current rate" in part
    )
    assert "restart with --record on another disk" in part
    # the rate follows the last five minutes: a slower fall later raises the time left
    disk.free0, disk.rate = disk.usage(None).free + 0.5e6 * disk.t, 0.5e6
    for _ in range(12):
        disk.t += 30.0
        d = disks.sample()[0]
    assert abs(d["rate_bytes_s"] - 0.5e6) < 1.0


def test_rising_free_space_and_an_unreadable_disk(tmp_path):
    disk = FakeDisk(free=0.5e9, rate=-1e6)  # someone freed space, but under 1 GB is left
    disks = RecordingDisks([str(tmp_path / "a.mp4")], usage=disk.usage, clock=disk.clock)
    disks.sample()
    disk.t = 60.0
    d = disks.sample()[0]
    assert d["rate_bytes_s"] < 0 and d["left_s"] is None
    assert "0.6 GB free (free space there" in disks.status_part()

    def gone(folder):
        raise OSError(5, "Input/output error")

    assert RecordingDisks([str(tmp_path / "a.mp4")], usage=gone).sample() == []


def test_status_line_and_metrics_name_a_disk_about_to_fill(tmp_path):
    from musetalk_rt.live.app import status_line

    disk = FakeDisk(free=3e9, rate=1e6)
    disks = RecordingDisks([str(tmp_path / "a.mp4")], usage=disk.usage, clock=disk.clock)
    disks.sample()
    disk.t = 60.0
    disks.sample()
    worker = idle_worker()
    try:
        line, _ = status_line([stats_channel(late_frames=0)], worker, None, 30.0, disks=disks)
    finally:
        worker.stop()
    assert ", recording disk " in line and "GB free, ~49 min at the current rate" in line
    disk.t = 90.0
    disks.sample()
    text = idle_metrics(disks=disks)
    folder = tmp_path.resolve()
    assert f'musetalk_record_disk_free_bytes{{folder="{folder}"}} 2910000000.0' in text
    assert f'musetalk_record_disk_seconds_left{{folder="{folder}"}} 2910.0' in text


def test_a_hung_disk_never_stalls_the_status_line_or_metrics(tmp_path):
    """The samples come from the watch's own thread: while ``statvfs`` hangs (a dead network
    mount), the status line and ``/metrics`` show the last sample at once; a sampling error
    that is not an ``OSError`` is logged and the watch goes on."""
    release, calls = threading.Event(), []

    def usage(folder):
        calls.append(folder)
        if len(calls) == 2:
            raise RuntimeError("a bug in the watch")
        if len(calls) >= 4:
            release.wait(30.0)  # hangs until the test lets it go
        return Usage(0, 0, 0.5e9)

    disks = RecordingDisks([str(tmp_path / "a.mp4")], usage=usage)
    assert disks.start_line().endswith("0.5 GB free")  # the first sample, at start
    disks.start(interval_s=0.01)
    try:
        deadline = time.monotonic() + 10.0
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 4  # past the error, now hanging in the fourth call
        part = disks.status_part()
        text = idle_metrics(disks=disks)
        assert len(calls) == 4  # neither asked the disk itself (it would have hung in there)
        assert "0.5 GB free" in part and "musetalk_record_disk_free_bytes" in text
    finally:
        disks.stop()
        release.set()
