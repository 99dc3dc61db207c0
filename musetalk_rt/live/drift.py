"""A sender's audio clock against this host's: the drift of a long session, corrected in pauses.

A channel places a session's sample ``k`` at media frame ``base + k // 640`` for as long as the
session lasts, so the sender's sample rate is taken as exact. It is not: a microphone's clock
(the sound card's crystal, resampled by the browser to 16 kHz) is off by tens of parts per
million. A sender 50 ppm slow delivers its audio 180 ms later each hour against the slots it was
given; once that exceeds the playout delay's slack (a few hundred ms at the low-latency
settings), every window comes after its frame and the avatar stops talking, then its voice
turns to silence — after one or two hours of a show. A sender that runs fast builds up ahead
instead, and the ingest holds it back, so the lag grows in its browser.

:class:`DriftTracker` watches the lag of each chunk's last sample behind its slot. Its floor over
the last 5–10 s (the minimum: network delays only add) against the floor of the session's first
5 s is the drift; sample losses and route changes show the same way and are corrected alike.
Once it reaches 2 frames (80 ms, inside the playout delay's default 100 ms margin; 1 frame
when the delay leaves less than 100 ms of slack, as the low-latency settings' 40 ms margin
does: :func:`shift_at_for_slack`) and the speaker has been quiet for 300 ms (and the last
speech segment's padded end lies before the frames involved), the channel moves the session's
timeline by that many frames (at most 5 at once) from the next frame of audio on; what came
before keeps its slots. Later for a slow sender (the gap shows idle with silence), earlier for
a fast one (its newest quiet audio overwrites the last quiet frames). In a pause, nothing
visible changes; lips and sound stay
together because both follow the moved timeline. Simulated (``tests/test_drift.py``): a
sender 50 ppm slow for three hours, 540 ms of drift uncorrected, stays within 78 ms of where it
began.
"""

from __future__ import annotations

from musetalk_rt.audio.features import FPS

BUCKET_S = 5.0  # the lag's floor is taken per bucket; the estimate spans the last two
SHIFT_AT_S = 0.08  # drift that moves the timeline (2 frames: within the 100 ms margin of D)
MAX_SHIFT_FRAMES = 5  # at most this many frames at once (200 ms of a pause)
QUIET_MS = 300.0  # only after this much quiet
SETTLE_S = 60.0  # the floor may still fall this long (a start under congestion); no move earlier


def shift_at_for_slack(slack_s: float) -> float:
    """The drift that moves the timeline, for a playout delay with ``slack_s`` to spare.

    ``slack_s`` is what ``D`` holds beyond the look-ahead, a whisper call and two batches (the
    margin of a derived ``D``, more for a fixed one). Two frames while that leaves 20 ms once
    they are spent; else one frame, so that a slow sender's lag is corrected before it eats a
    small margin (a drift of 80 ms against the low-latency settings' 40 ms would make windows
    late first). Below one frame of slack a move still comes at one frame: late windows may
    come before it.
    """
    return SHIFT_AT_S if slack_s >= SHIFT_AT_S + 0.02 - 1e-6 else 1 / FPS  # (float sums)


class DriftTracker:
    """The drift of one session's audio against its slots, and when to move them.

    Args:
        shift_at_s: Drift that moves the timeline (:func:`shift_at_for_slack`).
    """

    def __init__(self, shift_at_s: float = SHIFT_AT_S) -> None:
        self.shift_at_s = shift_at_s
        self.floor_s: float | None = None  # the lag's floor in the session's first bucket
        self._prev: float | None = None  # the floor of the last full bucket
        self._cur: float | None = None  # of the bucket being filled
        self._t_cur: float | None = None
        self._t_first: float | None = None

    def update(self, now_s: float, lag_s: float, quiet_ms: float, min_frames: int) -> int:
        """Take one chunk's lag; return how many frames to move the timeline by (0: none).

        Args:
            now_s: When the chunk arrived (seconds, monotonic).
            lag_s: How late its last sample arrived behind its slot on the media clock.
            quiet_ms: How long the speaker has been quiet (0 while talking).
            min_frames: The earliest move allowed (negative: the next sample's slot must stay
                ahead of the frame on screen).

        Returns:
            Frames to move the session's later audio by: positive later, negative earlier.
        """
        if self._t_first is None:
            self._t_first = now_s
        settling = now_s - self._t_first < SETTLE_S
        if self._t_cur is None or now_s - self._t_cur >= BUCKET_S:
            if self._cur is not None:
                self._prev = self._cur
                if self.floor_s is None or (settling and self._cur < self.floor_s):
                    self.floor_s = self._cur  # a session that began congested: the better floor
            self._cur, self._t_cur = lag_s, now_s
        else:
            self._cur = min(self._cur, lag_s)
        if self.floor_s is None or self._prev is None or quiet_ms < QUIET_MS:
            return 0
        # later: both buckets' floors late (a delay spike lifts only one); earlier: both early,
        # and only once the floor has settled (a start under congestion is not a fast clock)
        late_s = min(self._prev, self._cur) - self.floor_s
        early_s = max(self._prev, self._cur) - self.floor_s
        if late_s >= self.shift_at_s:
            drift_s = late_s
        elif early_s <= -self.shift_at_s and not settling:
            drift_s = early_s
        else:
            return 0
        k = max(-MAX_SHIFT_FRAMES, min(MAX_SHIFT_FRAMES, round(drift_s * FPS)))
        k = max(k, min_frames)
        if k == 0 or (k > 0) != (drift_s > 0):
            return 0
        # the lags so far were against the old slots: measure again from the next bucket on
        self._cur -= k / FPS
        self._prev = None
        return k
