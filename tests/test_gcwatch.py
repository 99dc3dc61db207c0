"""The live process's garbage-collection watch and the start-up heap freeze."""

from __future__ import annotations

import gc

import pytest

from musetalk_rt.live.gcwatch import GcWatch, freeze_startup_heap
from musetalk_rt.testing.live import idle_metrics, idle_worker, stats_channel


@pytest.fixture
def unfrozen():
    """Leave the test process's collector as it found it."""
    yield
    gc.unfreeze()


def _cycles(n: int) -> None:
    for _ in range(n):
        a: list = []
        a.append(a)  # a reference cycle: only the collector frees it


def test_watch_counts_every_collection_per_generation():
    watch = GcWatch(keep=3).start()
    try:
        _cycles(1000)
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        watch.stop()
    s = watch.summary()
    assert s["collections"][0] >= 1 and s["collections"][2] >= 2
    assert all(t >= m >= 0 for t, m in zip(s["pause_ms_total"], s["pause_ms_max"], strict=True))
    assert watch.max_pause_ms() == pytest.approx(max(s["pause_ms_max"]), abs=1e-3)
    # the longest pauses, longest first, at most `keep`
    longest = [p["ms"] for p in s["longest"]]
    assert 1 <= len(longest) <= 3 and longest == sorted(longest, reverse=True)
    before = list(watch.collections)
    gc.collect(2)  # stopped: no longer counted
    assert watch.collections == before
    watch.stop()  # twice: harmless


def test_start_is_idempotent():
    watch = GcWatch()
    watch.start().start()
    try:
        assert gc.callbacks.count(watch._callback) == 1
    finally:
        watch.stop()
    assert watch._callback not in gc.callbacks


def test_freeze_moves_the_survivors_out_of_every_later_collection(unfrozen):
    keep = [[i] for i in range(20_000)]  # tracked objects that survive, like the models' modules
    frozen, collect_ms = freeze_startup_heap()
    assert frozen >= len(keep) and collect_ms >= 0
    assert gc.get_freeze_count() == frozen
    # a collection no longer walks them: the collector's lists do not hold them any more
    assert all(o is not keep[0] for o in gc.get_objects())
    del keep


def test_metrics_expose_the_pauses_and_the_frozen_heap(unfrozen):
    watch = GcWatch().start()
    try:
        gc.collect(2)
    finally:
        watch.stop()
    freeze_startup_heap()
    text = idle_metrics(gc_watch=watch)
    assert 'musetalk_gc_collections_total{generation="2"}' in text
    assert 'musetalk_gc_pause_ms_max{generation="0"}' in text
    line = next(ln for ln in text.splitlines() if ln.startswith("musetalk_gc_frozen_objects"))
    assert int(line.split()[-1]) == gc.get_freeze_count() > 0


def test_status_line_names_full_collections_since_the_last_line():
    from musetalk_rt.live.app import status_line

    ch = stats_channel()
    worker = idle_worker()
    watch = GcWatch().start()
    try:
        line, snap = status_line([ch], worker, None, 2.0, watch)
        before = snap["gc_full"]
        gc.collect(2)
        line, _ = status_line([ch], worker, snap, 2.0, watch)
    finally:
        watch.stop()
        worker.stop()
    n = watch.collections[2] - before
    assert n >= 1 and f", full garbage collections {n} (longest so far " in line
    quiet, _ = status_line([ch], worker, None, 2.0)  # no watch: nothing said
    assert "garbage" not in quiet
