"""A sender's drifting audio clock: detected from the lag of its chunks, corrected in pauses."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from musetalk_rt.live.drift import MAX_SHIFT_FRAMES, SHIFT_AT_S, DriftTracker, shift_at_for_slack

CHUNK_S = 0.02  # 320 samples


def _simulate(
    ppm: float, hours: float, jitter_s=0.03, talk_s=8.0, pause_s=2.0, seed=0, shift_at_s=SHIFT_AT_S
):
    """A sender whose clock is ``ppm`` slow (negative: fast), 20 ms chunks, random network
    delay, talking ``talk_s`` then quiet ``pause_s`` in turns. Returns the lags behind the
    slots after each correction and the frames moved in all."""
    rng = np.random.default_rng(seed)
    tracker, moved, lags = DriftTracker(shift_at_s), 0, []
    n = int(hours * 3600 / CHUNK_S)
    rate = 1.0 - ppm * 1e-6  # the sender's samples per real second, as a share of 16 kHz
    for i in range(n):
        sent = (i + 1) * CHUNK_S / rate
        arrived = sent + 0.01 + rng.uniform(0, jitter_s)
        slot = (i + 1) * CHUNK_S + moved / 25
        lag = arrived - slot
        lags.append(lag)
        phase = sent % (talk_s + pause_s)
        quiet_ms = max(0.0, (phase - talk_s) * 1000) if phase > talk_s else 0.0
        moved += tracker.update(arrived, lag, quiet_ms, min_frames=-100)
    return np.array(lags), moved


def test_a_slow_sender_clock_is_followed_for_hours():
    """50 ppm slow for three hours (540 ms of drift): the lag never strays more than the
    threshold and a frame from where it began, and the timeline moved by the drift."""
    lags, moved = _simulate(50, 3.0)
    floor = lags[: int(5 / CHUNK_S)].min()
    assert moved == round(0.54 * 25) or abs(moved - 0.54 * 25) <= 3
    # the lag's floor over each minute stays near the start's (jitter adds, never subtracts)
    per_min = lags[: len(lags) // 3000 * 3000].reshape(-1, 3000).min(axis=1)
    assert np.all(np.abs(per_min - floor) <= SHIFT_AT_S + 0.04 + 0.005)


def test_a_fast_sender_clock_is_followed_the_other_way():
    lags, moved = _simulate(-80, 2.0)  # 576 ms ahead after two hours, uncorrected
    assert moved < 0 and abs(moved + 0.576 * 25) <= 3
    per_min = lags[: len(lags) // 3000 * 3000].reshape(-1, 3000).min(axis=1)
    assert np.all(np.abs(per_min - per_min[0]) <= SHIFT_AT_S + 0.04 + 0.005)


def test_network_jitter_alone_moves_nothing():
    """An exact clock behind a jittery network (up to 150 ms extra per chunk): the floor of
    the lag does not move, nor does the timeline."""
    _, moved = _simulate(0, 1.0, jitter_s=0.15)
    assert moved == 0


def test_a_small_margin_moves_the_timeline_at_one_frame():
    """The low-latency settings leave 40 ms of slack in D: a drift of 80 ms would make windows
    late before the move, so the threshold drops to one frame there; the default 100 ms margin
    (and any larger slack) keeps two. With one frame, a slow sender's lag stays within a frame
    of where it began, and jitter alone still moves nothing."""
    assert shift_at_for_slack(0.100) == SHIFT_AT_S == 0.08 and shift_at_for_slack(0.9) == 0.08
    assert shift_at_for_slack(0.099) == shift_at_for_slack(0.04) == 0.04
    assert shift_at_for_slack(-0.2) == 0.04  # a fixed D below its parts: still one frame
    # through the live process's own sums: a derived D gives back its margin exactly, whatever
    # the measured parts (float sums would often leave 0.0999... of a 100 ms margin)
    from musetalk_rt.live.app import delay_slack_s, derive_delay_s

    rng = np.random.default_rng(1)
    for _ in range(2000):
        look, canvas = rng.uniform(0.04, 0.5), rng.uniform(0.001, 0.05)
        batch = rng.uniform(0.005, 0.1)
        n, per = int(rng.integers(1, 25)), rng.choice([0.0, 0.04, 0.025])
        for margin, shift in ((0.1, 0.08), (0.04, 0.04), (0.3, 0.08)):
            d = derive_delay_s(look, canvas, batch, margin, n, per)
            assert shift_at_for_slack(delay_slack_s(d, look, canvas, batch, n, per)) == shift
    lags, moved = _simulate(50, 2.0, shift_at_s=0.04)
    floor = lags[: int(5 / CHUNK_S)].min()
    assert abs(moved - 0.36 * 25) <= 2
    per_min = lags[: len(lags) // 3000 * 3000].reshape(-1, 3000).min(axis=1)
    assert np.all(per_min - floor <= 0.04 + 0.005)  # a frame at most (two: 77 ms here)
    assert _simulate(0, 1.0, jitter_s=0.15, shift_at_s=0.04)[1] == 0


def test_no_move_while_talking_then_at_most_five_frames_in_the_pause():
    tracker = DriftTracker()
    t, moved = 0.0, []
    for _ in range(1000):  # 20 s at an exact clock: the floor, 20 ms
        t += CHUNK_S
        moved.append(tracker.update(t, 0.02, 1000.0, -100))
    assert not any(moved) and tracker.floor_s == 0.02
    for _ in range(600):  # 12 s of talk with 400 ms lost on the way: late by 400 ms
        t += CHUNK_S
        assert tracker.update(t, 0.42, 0.0, -100) == 0
    k = tracker.update(t + CHUNK_S, 0.42, 400.0, -100)  # a pause
    assert k == MAX_SHIFT_FRAMES  # 200 ms now, the rest in a later pause
    assert tracker.update(t + 2 * CHUNK_S, 0.42 - 0.2, 400.0, -100) == 0  # measures again first


def test_an_earlier_timeline_never_reaches_the_frame_on_screen():
    tracker = DriftTracker()
    t = 0.0
    for _ in range(3200):  # past the first minute, when the floor has settled
        t += CHUNK_S
        tracker.update(t, 0.02, 1000.0, -100)
    for _ in range(600):  # audio 300 ms ahead of its slots
        t += CHUNK_S
        k = tracker.update(t, -0.28, 1000.0, min_frames=-2)  # only 2 frames of room
        if k:
            break
    assert k == -2


def test_the_channel_moves_its_timeline_in_a_pause_and_says_so(caplog):
    """The feature thread's step: a session whose chunks arrive later and later against their
    slots (the sender's clock 1% slow, to be quick) moves its base frame forward once quiet and
    once the last speech segment ends before the frames a move re-maps, counts it and logs it;
    the audio after the move lands on the moved slots."""
    from musetalk_rt.live.channel import ChannelStats, LiveChannel, _Session

    vad = SimpleNamespace(push=lambda pcm: None, quiet_ms=0.0, segments=[])
    ex = SimpleNamespace(skip_to=lambda n: 0, push=lambda pcm: None)
    session = _Session(base_frame=10, extractor=ex, vad=vad)
    t0 = time.monotonic()
    ch = SimpleNamespace(
        name="c0", t0=t0, delay_s=1.0, next_out=0, windows={}, arrival={}, _audio={},
        stats=ChannelStats(), frame_log=None,
    )  # fmt: skip
    ch._take = lambda *a: LiveChannel._take(ch, *a)
    ch._follow_sender_clock = lambda s: LiveChannel._follow_sender_clock(ch, s)
    pcm = np.full(320, 0.1, np.float32)
    with caplog.at_level("INFO"):
        for i in range(2000):  # 40 s of audio
            if i == 1500:  # the speaker pauses; the speech segment's padded end: 100 ms on
                vad.quiet_ms = 1000.0
                vad.segments = [SimpleNamespace(end_ms=1500 * 20 + 100)]
            arrived = t0 + 0.4 + (i + 1) * CHUNK_S / 0.99  # the slot of frame 10 is t0 + 0.4
            ch.next_out = int((arrived - t0) * 25) - 1
            LiveChannel._add_audio(ch, session, [(pcm, arrived)])
            if session.moves:
                break
    # not while talking, nor while the move would re-map frames of the segment's end
    assert i >= 1500 + (100 + (MAX_SHIFT_FRAMES + 1) * 40) // 20 - 1
    ((f_from, k),) = session.moves
    assert f_from in (session.frames_begun - 1, session.frames_begun)  # after the audio before
    assert 2 <= k <= MAX_SHIFT_FRAMES and ch.stats.clock_shifts == 1
    assert ch.stats.clock_shift_frames == k
    assert f"timeline moved +{k} frames in a pause" in caplog.text
    LiveChannel._add_audio(ch, session, [(pcm, arrived + CHUNK_S)])
    f = (session.samples - 1) // 640
    assert session.media(f) == 10 + f + k and session.media(f) in ch._audio  # the moved slots
    assert session.media(f_from - 1) == 10 + f_from - 1  # the frames before keep theirs
    assert session.session_frame(10 + f_from) is None  # the gap shows idle


def test_a_sessions_timeline_in_stretches_after_moves():
    """Frames before a move keep their slots; a move forward leaves a gap (idle), a move back
    overlaps (the newer frames win); the extractor's next frame for a media frame follows."""
    from musetalk_rt.live.channel import _Session

    s = _Session(base_frame=100, extractor=None, vad=None)
    s.moves = ((50, 3),)  # from session frame 50 on: 3 frames later
    assert [s.media(f) for f in (0, 49, 50, 51)] == [100, 149, 153, 154]
    assert [s.session_frame(m) for m in (99, 100, 149, 150, 152, 153)] == [
        None, 0, 49, None, None, 50,
    ]  # fmt: skip
    assert [s.first_from(m) for m in (120, 150, 152, 153, 160)] == [20, 50, 50, 50, 57]
    s.moves = (*s.moves, (80, 1))  # from 80 on: 2 frames earlier than the stretch before
    assert [s.media(f) for f in (79, 80)] == [182, 181]
    assert s.session_frame(181) == 80 and s.session_frame(182) == 81  # the newer win
    assert s.session_frame(180) == 77 and s.first_from(181) == 80


def test_a_session_that_began_congested_is_not_taken_for_a_fast_clock():
    """6 s of +130 ms congestion at the start, then a clean network: the floor falls to the
    clean lag within the first minute, and the timeline never moves earlier."""
    tracker, t, moved = DriftTracker(), 0.0, 0
    for i in range(int(300 / CHUNK_S)):  # five minutes
        t += CHUNK_S
        lag = 0.02 + (0.13 if t < 6.0 else 0.0)
        moved += tracker.update(t, lag, 1000.0 if i % 500 > 400 else 0.0, -100)
    assert moved == 0 and abs(tracker.floor_s - 0.02) < 1e-9


def test_the_start_line_says_when_a_drift_moves_at_one_frame():
    """Two frames: no line; one frame with slack: the slack; a fixed D under its derived parts
    (20 channels at the channels preset's 1000 ms): said as such, not as negative slack."""
    from musetalk_rt.live.app import drift_threshold_line
    from musetalk_rt.live.drift import shift_at_for_slack

    assert drift_threshold_line(0.1, shift_at_for_slack(0.1), 1, 40) is None
    low = drift_threshold_line(0.04, shift_at_for_slack(0.04), 1, 40)
    assert low.startswith("D leaves 40 ms of slack") and "(1 frame), not 80" in low
    under = drift_threshold_line(-0.219, shift_at_for_slack(-0.219), 20, 40)
    assert under.startswith("the fixed D is 219 ms under its derived parts")
    assert "40 ms for each more channel" in under and "-219" not in under
