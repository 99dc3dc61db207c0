"""The live process's stack sampler names the place where a thread spends its time."""

from __future__ import annotations

import json
import threading
import time

from musetalk_rt.live.sampler import StackSampler


def _busy_loop(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(2000))


def _waiting(stop: threading.Event) -> None:
    stop.wait()


def test_sampler_reports_each_threads_hot_place(tmp_path):
    stop = threading.Event()
    threads = [
        threading.Thread(target=_busy_loop, args=(stop,), name="busy"),
        threading.Thread(target=_waiting, args=(stop,), name="idle"),
    ]
    for t in threads:
        t.start()
    sampler = StackSampler(interval_s=0.005).start()
    time.sleep(0.5)
    sampler.stop()
    stop.set()
    for t in threads:
        t.join()
    sampler.write(tmp_path / "p.json")
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["samples"] > 20
    busy = rep["threads"]["busy"]["top"]
    assert any("_busy_loop" in where for where, share in busy if share > 0.5)
    idle = rep["threads"]["idle"]["top"][0][0]
    assert idle.startswith("threading:wait") and "_waiting" in idle
    # beside the places, what each thread ran: the busy one on a core, the idle one hardly
    busy_cpu, idle_cpu = rep["threads"]["busy"]["cpu_s"], rep["threads"]["idle"]["cpu_s"]
    assert busy_cpu > 10 * idle_cpu and busy_cpu > 0
    assert 0 < rep["threads"]["busy"]["cpu_share"] <= 1.05
    # the thread that started the sampler is measured from the start too, not from its own
    assert rep["threads"]["MainThread"]["cpu_share"] <= 1.05  # (this process's imports)
    # and what the sampling itself cost (the other threads' Python waited meanwhile)
    assert rep["sampler_ms_per_sample"] > 0 and 0 < rep["sampler_share"] < 1


def test_places_are_named_module_colon_function():
    import sys
    from pathlib import Path

    from musetalk_rt.live.sampler import _label, _where

    frame = sys._getframe()
    code = frame.f_code
    assert _label(code) == f"{Path(code.co_filename).stem}:{code.co_name}"
    assert _label(code) is _label(code)  # named once per code object, then looked up
    for filename, stem in (
        ("/usr/bin/tool", "tool"),
        (".hidden", ".hidden"),
        ("<string>", "<string>"),
    ):
        assert _label(compile("pass", filename, "exec")) == f"{stem}:<module>"
    here = "test_sampler:test_places_are_named_module_colon_function"
    assert _where(frame, 2).startswith(f"{here} < ")


def test_thread_cpu_seconds_read_from_proc():
    from musetalk_rt.live.sampler import thread_cpu_s

    me = threading.current_thread().native_id
    before = thread_cpu_s(me)
    sum(i * i for i in range(300_000))
    after = thread_cpu_s(me)
    assert before is not None and after >= before  # clock ticks: may not have moved
    assert thread_cpu_s(2**31 - 1) is None  # no such thread
