"""A live channel: its audio timeline, features, voice activity and media clock.

Time is counted in **media frames** since the channel started (25 per second). Output frame
``m`` is emitted at ``t0 + D + m / 25``: the input audio is the master clock and ``D``, the
playout delay, is constant, so the output audio (the input delayed by ``D``) and the video stay
in sync by construction. A sender's first sample is placed at the first frame boundary after
the moment it connected; its audio then runs contiguously.

Threads and queues (each bounded, each with its overflow policy):

- the ingest (event loop) calls :meth:`push`, which only enqueues (``audio_q``, bounded at 30 s
  of audio however it is chunked; when full the chunk is dropped and counted — the ingest paces
  senders, so this is a fault counter — and the next chunk that fits is preceded by as much
  silence, so the sender's later audio keeps its place on the timeline; a session's open and
  close are never dropped);
- the **feature thread** resamples nothing (ingest did), stores audio per frame, runs the
  incremental whisper extractor and the VAD — on all the chunks that queued up since its last
  turn at once (at most ``MAX_GATHER``), so a thread that fell behind catches up in a few calls;
  and it skips the windows of frames already on screen (lost anyway) instead of computing them.
  With several channels the VAD network runs in one shared thread
  (:class:`~musetalk_rt.audio.vad.VadBatcher`) that batches the waiting channels' windows, and
  the whisper canvases go through the shared batched encoder;
- the shared GPU worker (:mod:`.worker`) picks frames that are speech, have their window and are
  due soon, and stores the blended frames;
- the **clock thread** emits frame ``m`` at its deadline: the generated frame if ready (cross-
  faded at speech/idle switches), else the idle frame (counted late if it should have talked),
  with its 640 samples of audio or silence. It never waits for anything but the clock.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from musetalk_rt.audio.audioqueue import AudioQueue
from musetalk_rt.audio.features import FPS, SAMPLE_RATE
from musetalk_rt.audio.incremental import (
    BatchedEncoder,
    IncrementalFeatureExtractor,
    StreamingConfig,
)
from musetalk_rt.audio.vad import SpeechGate, VoiceActivity
from musetalk_rt.avatar.store import Avatar
from musetalk_rt.errors import worth_logging
from musetalk_rt.live.drift import MAX_SHIFT_FRAMES, SHIFT_AT_S, DriftTracker
from musetalk_rt.live.framelog import FrameLog
from musetalk_rt.live.output import AUDIO_PER_FRAME, Output
from musetalk_rt.stages import crossfade

log = logging.getLogger("musetalk_rt.channel")
MAX_GATHER = 50  # ingest chunks analysed together at most (1 s of 20 ms chunks)
AUDIO_QUEUE_S = 30.0  # audio the ingest may queue ahead of the feature thread


_ONE_STRETCH = ((0, None, 0),)  # a session's stretches before any move


@dataclass
class _Session:
    base_frame: int  # media frame of the session's first sample
    extractor: IncrementalFeatureExtractor
    vad: VoiceActivity
    samples: int = 0
    end_frame: int | None = None
    # the session frame of the extractor's frame 0: moves when a failed feature call restarts
    # the extractor at the frame the audio had reached, so later windows keep their frames
    first_frame: int = 0
    drop_samples: int = 0  # samples the extractor skips after a restart (up to a frame boundary)
    drift: DriftTracker = field(default_factory=DriftTracker)  # the sender's clock against ours
    last_lag: tuple[float, float] | None = None  # (arrived, lag_s) of the last chunk stored
    # the timeline's moves for a drifting sender clock (:mod:`.drift`): from session frame
    # ``f`` on, media frame = base_frame + f + offset; earlier frames keep their slots
    # a tuple, replaced whole by the feature thread: the clock and the GPU worker read it
    moves: tuple[tuple[int, int], ...] = ()  # (f, offset), in order

    @property
    def frames_begun(self) -> int:
        """Session frames the audio so far reaches into (the last one may be partial)."""
        return -(-self.samples // AUDIO_PER_FRAME)

    def media(self, f: int) -> int:
        """The media frame of session frame ``f``."""
        for f_from, offset in reversed(self.moves):  # (one read of the tuple)
            if f >= f_from:
                return self.base_frame + f + offset
        return self.base_frame + f

    def _stretches(self) -> tuple[tuple[int, int | None, int], ...]:
        """``(first, end, offset)`` of each stretch of session frames, newest first."""
        moves = self.moves  # one read: another thread may replace it meanwhile
        if not moves:  # (the usual case: is_speech asks for every due frame)
            return _ONE_STRETCH
        starts = [(0, 0), *moves]
        ends = [f for f, _ in moves] + [None]
        return tuple((f, e, o) for (f, o), e in zip(starts, ends, strict=True))[::-1]

    def session_frame(self, m: int) -> int | None:
        """The session frame on media frame ``m``.

        Where a move back overlapped two, the newer; None in the gap a move forward left (or
        before the session).
        """
        for first, end, offset in self._stretches():
            f = m - self.base_frame - offset
            if f >= first and (end is None or f < end):
                return f
        return None

    def first_from(self, m: int) -> int:
        """The first session frame still to come on media frame ``m`` or later."""
        for first, end, offset in self._stretches():
            f = m - self.base_frame - offset
            if f >= first:
                return f if end is None else min(f, end)
        return 0


class PassedOver:
    """The frames the GPU worker passed over (no time left), settled when the clock shows them.

    Counted on the channel, at the frame's display, so that a shed frame is by construction one
    of the late ones: a frame passed over and then taken a pass later (the estimate having
    fallen) is unmarked, and one that stopped being speech before its deadline shows idle or
    fading, not late. The worker thread marks and unmarks, the clock thread settles (a lock).
    """

    # frames never shown (a clock jump) or marked just after their display: forgotten once
    # more than this many are marked
    _KEEP = 4096

    def __init__(self):
        self._frames: set[int] = set()
        self._lock = threading.Lock()

    def mark(self, m: int) -> None:
        """The worker passed frame ``m`` over."""
        with self._lock:
            self._frames.add(m)

    def taken(self, m: int) -> None:
        """The worker took frame ``m`` after all: whatever comes of it, it was not shed."""
        with self._lock:
            self._frames.discard(m)

    def shown(self, n: int, late: bool) -> bool:
        """Frame ``n`` was shown; True if it was late and had been passed over (shed)."""
        with self._lock:
            if n not in self._frames:
                return False
            self._frames.discard(n)
            if len(self._frames) > self._KEEP:
                self._frames.difference_update([m for m in self._frames if m < n])
            return late

    def marked(self) -> set[int]:
        """The frames marked and not settled (a copy)."""
        with self._lock:
            return set(self._frames)


@dataclass
class ChannelStats:
    frames_out: int = 0
    speech_frames: int = 0
    late_frames: int = 0
    shed_frames: int = 0  # of the late frames, those the GPU worker passed over (no time left)
    skipped_frames: int = 0  # the clock fell behind by more than a second and jumped
    overlay_errors: int = 0
    clock_errors: int = 0  # frames the clock thread failed to emit (logged, survived)
    output_errors: int = 0  # frames an output's offer raised on (the others still got them)
    clock_shifts: int = 0  # timelines moved for a sender's drifting clock (in pauses)
    clock_shift_frames: int = 0  # by how much in all (net; positive: later)
    dropped_audio_chunks: int = 0
    sessions: int = 0
    late_windows: int = 0  # audio windows that reached the channel after their frame left
    skipped_windows: int = 0  # windows not computed: their frame had left before the audio came
    audio_errors: int = 0  # failed VAD or feature calls (logged; the audio path went on)
    voice_to_frame_ms: list[float] = field(default_factory=list)  # last 500
    # how long before its frame's deadline each window reached the channel (last 500): the
    # slack left for the GPU batch and the blend; near zero or negative = the audio path lags
    window_lead_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not k.endswith("_ms")}
        v = sorted(self.voice_to_frame_ms)
        d["voice_to_frame_p95_ms"] = round(v[int(0.95 * (len(v) - 1))], 1) if v else None
        w = sorted(self.window_lead_ms)
        d["window_lead_p05_ms"] = round(w[int(0.05 * (len(w) - 1))], 1) if w else None
        return d


class LiveChannel:
    """One avatar, one ingest, its outputs (an :class:`~.ingest.AudioSink`).

    Args:
        name: Channel name (``/ingest/<name>``).
        avatar: Prepared avatar (same weights as the models).
        whisper: Whisper encoder (shared).
        feature_extractor: transformers ``WhisperFeatureExtractor``.
        vad_net: silero-vad network (shared; holds no state), or a
            :class:`~musetalk_rt.audio.vad.VadBatcher` that runs it for all channels.
        stream_config: Incremental feature settings.
        delay_s: Playout delay ``D``.
        outputs: Where frames go.
        encoder: Shared batched whisper encoder (one batched call for all channels' canvases).
        frame_log: Where to record the clock start, sessions and per-frame timestamps (the
            outputs write the frame records; see :mod:`.framelog`).
        drift_shift_s: The sender clock drift that moves a session's timeline
            (:func:`~musetalk_rt.live.drift.shift_at_for_slack` of ``D``'s slack).
    """

    def __init__(
        self,
        name: str,
        avatar: Avatar,
        whisper,
        feature_extractor,
        vad_net,
        stream_config: StreamingConfig,
        delay_s: float,
        outputs: list[Output],
        encoder: BatchedEncoder | None = None,
        frame_log: FrameLog | None = None,
        drift_shift_s: float = SHIFT_AT_S,
    ):
        self.name = name
        self.drift_shift_s = drift_shift_s
        self.frame_log = frame_log
        self.avatar = avatar
        self.encoder = encoder
        self.whisper, self.fe, self.vad_net = whisper, feature_extractor, vad_net
        self.stream_config = stream_config
        self.delay_s = delay_s
        self.outputs = outputs
        self.stats = ChannelStats()
        self.t0 = time.monotonic()
        self.emitted_at: float | None = None  # when the clock last handed out a frame
        # bounded in seconds of audio; a dropped chunk's place is kept as silence
        self.audio_q = AudioQueue(AUDIO_QUEUE_S, SAMPLE_RATE, fill_drops=True)
        self.windows: dict[int, object] = {}  # media frame -> [50, 384] tensor
        self.generated: dict[int, np.ndarray] = {}  # media frame -> blended RGB frame
        self.pending: set[int] = set()  # frames taken by the GPU worker, not yet blended
        self.passed_over = PassedOver()  # frames the GPU worker skipped (no time left)
        # the monotonic seconds in which frames came late (an hour's; the clock appends, the
        # status line reads a copy): matched against the host's steal per second
        self.late_seconds: deque[int] = deque(maxlen=3600)
        self.arrival: dict[int, float] = {}  # media frame -> when its last sample was pushed
        self._audio: dict[int, np.ndarray] = {}  # media frame -> 640 samples
        self._sessions: list[_Session] = []
        self._lock = threading.Lock()
        self.next_out = 0
        self.last_frame: np.ndarray | None = None  # for the operator preview
        # (frame, output time in s) -> frame: burned-in captions; set before start()
        self.overlay = None
        self._gate = SpeechGate()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._feature_loop, name=f"features {name}", daemon=True),
            threading.Thread(target=self._clock_loop, name=f"clock {name}", daemon=True),
        ]

    # -- ingest side (event loop): enqueue only -------------------------------------------------

    def open_session(self, on_start=None) -> None:
        """A sender (or a voice-mode utterance) starts.

        Args:
            on_start: Called from the feature thread with the session's first media frame.
        """
        self.audio_q.put_control(("open", (time.monotonic(), on_start)), new_session=True)

    def push(self, audio_16k: np.ndarray) -> None:
        if audio_16k.size:
            t = time.monotonic()
            if not self.audio_q.put_audio(audio_16k, lambda a: ("audio", (a, t))):
                self.stats.dropped_audio_chunks = self.audio_q.dropped_chunks

    def close_session(self) -> None:
        self.audio_q.put_control(("close", None))

    def stats_dict(self) -> dict:
        return {
            "channel": self.name,
            **self.stats.as_dict(),
            "outputs": {o.label: dict(o.stats, up=o.up) for o in self.outputs},
        }

    def preview_jpeg(self, max_side: int = 640) -> bytes | None:
        """The latest emitted frame as a JPEG (None before the first frame)."""
        import cv2

        frame = self.last_frame
        if frame is None:
            return None
        h, w = frame.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        if scale < 1.0:
            frame = cv2.resize(frame, (round(w * scale), round(h * scale)), cv2.INTER_AREA)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80]
        )
        return buf.tobytes() if ok else None

    def sender_stats(self) -> dict:  # the AudioSink interface: sent to the sender every second
        s = self.stats.as_dict()
        return {
            "frames_out": s["frames_out"],
            "late_frames": s["late_frames"],
            "voice_to_frame_p95_ms": s["voice_to_frame_p95_ms"],
        }

    # -- feature thread ---------------------------------------------------------------------------

    def _feature_loop(self) -> None:
        cur: _Session | None = None
        held = None  # an item taken while gathering audio, handled next
        while not self._stop.is_set():
            if held is not None:
                (kind, payload), held = held, None
            else:
                try:
                    kind, payload = self.audio_q.get(timeout=0.1)
                except queue.Empty:
                    continue
            if kind == "open" and cur is not None:  # never two open sessions: end the first
                self._close(cur)
                cur = None
            if kind == "open":
                opened_at, on_start = payload
                now_frame = int(np.ceil((opened_at - self.t0) * FPS))
                start = max(now_frame, self._session_end_frame())
                cur = _Session(
                    start,
                    self._new_extractor(),
                    VoiceActivity(self.vad_net),
                    drift=DriftTracker(self.drift_shift_s),
                )
                cur.vad.keep_probs = False
                with self._lock:
                    self._sessions.append(cur)
                self.stats.sessions += 1
                if self.frame_log:
                    self.frame_log.write(
                        ev="session", ch=self.name, base_frame=start, opened=opened_at
                    )
                if on_start is not None:
                    try:
                        on_start(start)
                    except Exception:  # a listener's bug must not stop the audio path
                        log.exception("channel %s: session listener failed", self.name)
            elif kind == "audio" and cur is not None:
                # chunks that queued up meanwhile go through the VAD and the features at once:
                # behind, the thread catches up with a few calls instead of one set per chunk
                block = [payload]
                while len(block) < MAX_GATHER:
                    try:
                        item = self.audio_q.get_nowait()
                    except queue.Empty:
                        break
                    if item[0] != "audio":
                        held = item
                        break
                    block.append(item[1])
                self._guarded(self._add_audio, cur, block)
            elif kind == "close" and cur is not None:
                self._guarded(self._close, cur)
                cur = None

    def _guarded(self, fn, *args) -> None:
        """Run an audio-path step; an error is logged and counted and the thread goes on.

        The show must not lose a channel's lips to one bad call (a CUDA error in the encoder, a
        failed voice-activity batch): frames without windows show idle, later audio is served.
        """
        try:
            fn(*args)
        except Exception:
            self._audio_error("audio path")

    def _audio_error(self, what: str) -> None:
        """Count and log the exception being handled (the first ones with their traceback)."""
        self.stats.audio_errors += 1
        n = self.stats.audio_errors
        if worth_logging(n):
            log.exception("channel %s: %s error #%d; going on", self.name, what, n)

    def _close(self, s: _Session) -> None:
        try:
            if s.extractor is not None:
                self._take(s, s.extractor.flush())
        except Exception:  # the session still ends: its frames must not stay "speech"
            self._audio_error("features")
        s.vad.finish()
        s.end_frame = s.media(s.frames_begun)

    def _session_end_frame(self) -> int:
        if not self._sessions:
            return 0
        s = self._sessions[-1]
        if s.end_frame is not None:
            return s.end_frame
        return s.media(s.samples // AUDIO_PER_FRAME) + 1

    def _add_audio(self, s: _Session, block: list[tuple[np.ndarray, float]]) -> None:
        """Store ``(pcm, arrived)`` chunks per media frame, then analyse them in one go."""
        self._follow_sender_clock(s)
        for pcm, arrived in block:
            pos = s.samples
            s.samples += pcm.size
            first, last = pos // AUDIO_PER_FRAME, (s.samples - 1) // AUDIO_PER_FRAME
            for f in range(first, last + 1):  # audio per media frame (partial ones accumulate)
                a, b = max(pos, f * AUDIO_PER_FRAME), min(s.samples, (f + 1) * AUDIO_PER_FRAME)
                m = s.media(f)
                cur = self._audio.get(m, np.zeros(AUDIO_PER_FRAME, np.float32))
                cur[a - f * AUDIO_PER_FRAME : b - f * AUDIO_PER_FRAME] = pcm[a - pos : b - pos]
                self._audio[m] = cur
                if b == (f + 1) * AUDIO_PER_FRAME:
                    self.arrival[m] = arrived  # when the ingest handed over its last sample
        newest = block[-1][1]
        last = s.samples - 1  # its last sample's slot on the media clock
        spoken = (
            self.t0
            + (s.media(last // AUDIO_PER_FRAME) + (last % AUDIO_PER_FRAME + 1) / AUDIO_PER_FRAME)
            / FPS
        )
        s.last_lag = (newest, newest - spoken)
        t_start = time.monotonic()
        pcm = block[0][0] if len(block) == 1 else np.concatenate([c for c, _ in block])
        try:
            s.vad.push(pcm)  # on an error its windows count as silence: the timeline holds
        except Exception:
            self._audio_error("voice activity")
        t_vad = time.monotonic()
        # behind: frames up to the one on screen now are lost anyway; their windows are not
        # computed (on the shared encoder they would also delay every other channel's)
        if s.extractor is None:  # a restart failed: again, from after this audio
            self._restart_features(s)
            return
        feat_pcm = pcm
        if s.drop_samples:  # the end of the frame a restart began after
            cut = min(s.drop_samples, pcm.size)
            feat_pcm, s.drop_samples = pcm[cut:], s.drop_samples - cut
        try:
            self.stats.skipped_windows += s.extractor.skip_to(
                s.first_from(self.next_out + 1) - s.first_frame
            )
            chunk = s.extractor.push(feat_pcm) if feat_pcm.size else None
        except Exception:
            self._audio_error("features")
            self._restart_features(s)
            return
        if self.frame_log and chunk is not None:
            newest, lag_s = s.last_lag
            # where a window's lead goes: the ingest (its newest sample against the media
            # clock), the queue to this thread, the voice activity call, the features
            parts = {
                "ingest_lag_ms": round(lag_s * 1000.0, 3),
                "queued_ms": round((t_start - newest) * 1000.0, 3),
                "chunks": len(block),
                "vad_ms": round((t_vad - t_start) * 1000.0, 3),
                "features_ms": round((time.monotonic() - t_vad) * 1000.0, 3),
            }
        else:
            parts = None
        self._take(s, chunk, parts)

    def _follow_sender_clock(self, s: _Session) -> None:
        """Move the session's timeline when the sender's clock has drifted (see :mod:`.drift`).

        Runs before a block is stored, with the last block's lag and the voice activity so far,
        so that a block's audio, windows and speech decisions all follow one timeline.
        """
        if s.last_lag is None:
            return
        arrived, lag_s = s.last_lag
        # an earlier timeline must still leave the next sample's slot ahead of the screen
        f_next = s.frames_begun  # the first frame of audio still to come: the move starts there
        min_frames = self.next_out + 2 - s.media(f_next)
        quiet_ms = getattr(s.vad, "quiet_ms", 0.0)
        segments = getattr(s.vad, "segments", None)
        if segments:  # a speech segment's padded end must not reach the frames a move re-maps
            end_ms = segments[-1].end_ms
            now_ms = s.samples * 1000.0 / (AUDIO_PER_FRAME * FPS)
            if end_ms is None or end_ms > now_ms - (MAX_SHIFT_FRAMES + 1) * 1000.0 / FPS:
                quiet_ms = 0.0
        k = s.drift.update(arrived, lag_s, quiet_ms, min(0, min_frames))
        if k == 0:
            return
        offset = s.media(f_next) - s.base_frame - f_next + k
        s.moves = (*s.moves, (f_next, offset))
        self.stats.clock_shifts += 1
        self.stats.clock_shift_frames += k
        log.info(
            "channel %s: the sender's audio came %d ms %s its slots (its clock against this "
            "host's): timeline moved %+d frames in a pause",
            self.name,
            abs(k) * 1000 // FPS,
            "behind" if k > 0 else "ahead of",
            k,
        )
        if self.frame_log:
            self.frame_log.write(
                ev="clock_shift", ch=self.name, frames=k, session_frame=f_next, offset=offset
            )

    def _restart_features(self, s: _Session) -> None:
        """After a failed feature call: a new extractor from the next frame boundary on.

        The old one's state after the error is unknown (the audio of the failed call may or may
        not be in it), so it is replaced by one whose frame 0 is the first whole frame after the
        audio received so far; the rest of the current frame is dropped before it. The windows
        after it keep their frames (lips in sync), with less past context at first, as at a
        session start; the frames in between show idle. If even that fails, the extractor is
        None and the next call tries again.
        """
        f = s.frames_begun
        s.extractor, s.first_frame = None, f
        s.drop_samples = f * AUDIO_PER_FRAME - s.samples
        try:
            s.extractor = self._new_extractor()
        except Exception:
            self._audio_error("features")

    def _new_extractor(self) -> IncrementalFeatureExtractor:
        """A session's whisper feature extractor, on the channels' shared batched encoder."""
        return IncrementalFeatureExtractor(
            self.whisper, self.fe, self.stream_config, shared=self.encoder
        )

    def _take(self, s: _Session, chunk, parts: dict | None = None) -> None:
        if chunk is None:
            return
        now = time.monotonic()
        leads = []
        late = 0
        for i in range(len(chunk)):
            m = s.media(s.first_frame + chunk.start_frame + i)
            leads.append((self.t0 + self.delay_s + m / FPS - now) * 1000.0)
            if m >= self.next_out:
                self.windows[m] = chunk.windows[i]
            else:
                late += 1
        self.stats.late_windows += late
        self.stats.window_lead_ms = (self.stats.window_lead_ms + leads)[-500:]
        if self.frame_log and leads:
            self.frame_log.write(
                ev="windows",
                ch=self.name,
                frame=s.media(s.first_frame + chunk.start_frame),
                n=len(leads),
                t=now,
                lead_ms=round(min(leads), 3),
                late=late,
                **(parts or {}),
            )

    def is_speech(self, m: int) -> bool:
        """Whether media frame ``m`` is speech, as decided so far."""
        with self._lock:
            for s in reversed(self._sessions):
                if s.base_frame <= m and (s.end_frame is None or m < s.end_frame):
                    f = s.session_frame(m)
                    return f is not None and s.vad.is_speech((f + 0.5) * 1000.0 / FPS)
        return False

    # -- for the GPU worker -----------------------------------------------------------------------

    def due_jobs(self, now: float, horizon_s: float) -> list[tuple[float, int]]:
        """``(deadline, frame)`` of frames that should be generated now."""
        jobs = []
        for m in list(self.windows):
            deadline = self.t0 + self.delay_s + m / FPS
            if (
                m < self.next_out
                or m in self.generated
                or m in self.pending
                or deadline - now > horizon_s
            ):
                continue
            if self.is_speech(m):
                jobs.append((deadline, m))
        return jobs

    # -- clock thread -----------------------------------------------------------------------------

    def _clock_loop(self) -> None:
        n = 0
        silence = np.zeros(AUDIO_PER_FRAME, np.float32)
        last_gen = None  # the last generated (talking) frame, for the fade-out
        while not self._stop.is_set():
            due = self.t0 + self.delay_s + n / FPS
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            behind = time.monotonic() - due
            if behind > 1.0:  # stalled (a debugger, a suspended VM): jump, never pile up
                skip = int(behind * FPS)
                self.stats.skipped_frames += skip
                n += skip
                continue
            self.next_out = n
            try:
                last_gen = self._tick(n, silence, last_gen)
            except Exception:  # the clock never stops: this frame is lost, the next one goes out
                self.stats.clock_errors += 1
                if worth_logging(self.stats.clock_errors):
                    log.exception(
                        "channel %s: frame %d failed (error #%d); going on",
                        self.name,
                        n,
                        self.stats.clock_errors,
                    )
                # the stream stays continuous: idle (no output got frame n: _offer never raises,
                # so the error came before it)
                with contextlib.suppress(Exception):
                    self._offer(n, self.avatar.frames[self.avatar.cycle_frame(n)], silence, None)
                with contextlib.suppress(Exception):
                    self._forget_before(n + 1)
            n += 1

    def _tick(self, n: int, silence: np.ndarray, last_gen):
        """Emit frame ``n`` to every output; returns the last generated frame (for fades)."""
        idle = self.avatar.frames[self.avatar.cycle_frame(n)]
        speech = self.is_speech(n)
        weight = self._gate.step(speech)
        frame, gen, fade, late = idle, None, False, False
        if weight <= 0:
            last_gen = None
        else:
            gen = self.generated.pop(n, None)
            if gen is None and not speech and last_gen is not None:
                # fading out after speech: those frames are not generated (not speech);
                # fade the last talking frame out instead of a hard cut to idle
                frame, fade = crossfade(idle, last_gen, weight), True
            elif gen is None:
                self.stats.late_frames += 1
                late = True
                sec = int(time.monotonic())  # the seconds with late frames, for the host hint
                if not self.late_seconds or self.late_seconds[-1] != sec:
                    self.late_seconds.append(sec)
            else:
                last_gen = gen
                self.stats.speech_frames += 1
                frame = crossfade(idle, gen, weight)
                if n in self.arrival:
                    v2f = (time.monotonic() - self.arrival[n]) * 1000.0
                    self.stats.voice_to_frame_ms = [*self.stats.voice_to_frame_ms[-499:], v2f]
        if self.passed_over.shown(n, late):  # settles the worker's mark, if any
            self.stats.shed_frames += 1
        audio = self._audio.pop(n, silence)
        if self.overlay is not None:
            try:
                frame = self.overlay(frame, n / FPS)
            except Exception:  # captions are extras: the frame goes out without them
                self.stats.overlay_errors += 1
                if self.stats.overlay_errors == 1:
                    log.exception("channel %s: caption overlay failed", self.name)
        self.last_frame = frame
        meta = None
        if self.frame_log:
            kind = (
                "idle" if weight <= 0 else "fade" if fade else "late" if gen is None else "speech"
            )
            meta = {
                "ch": self.name,
                "frame": n,
                "kind": kind,
                "speech": speech,
                "arrival": self.arrival.get(n),
                "emitted": time.monotonic(),
            }
        self._offer(n, frame, audio, meta)
        self._forget_before(n + 1)
        return last_gen

    def _offer(self, n: int, frame: np.ndarray, audio: np.ndarray, meta: dict | None) -> None:
        """Hand frame ``n`` to every output; one failing never holds it from the others."""
        for out in self.outputs:
            try:
                out.offer(frame, audio, meta)
            except Exception:
                self.stats.output_errors += 1
                if worth_logging(self.stats.output_errors):
                    log.exception(
                        "channel %s: output %s refused frame %d (error #%d)",
                        self.name,
                        getattr(out, "label", "?"),
                        n,
                        self.stats.output_errors,
                    )
        self.stats.frames_out += 1
        self.emitted_at = time.monotonic()

    def _forget_before(self, m: int) -> None:
        """Drop everything older than frame ``m`` (keeps every map bounded)."""
        for d in (self.windows, self.generated, self._audio, self.arrival):
            # list(d) copies the keys in one step: other threads insert meanwhile
            for k in [k for k in list(d) if k < m]:
                d.pop(k, None)
        with self._lock:
            self._sessions = [
                s
                for s in self._sessions
                if s.end_frame is None or s.end_frame > m or s is self._sessions[-1]
            ]

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self.t0 = time.monotonic()
        if self.frame_log:
            self.frame_log.write(
                ev="start", ch=self.name, t0=self.t0, delay_ms=round(self.delay_s * 1000, 3)
            )
        for t in self._threads:
            t.start()

    def halt(self) -> None:
        """Stop the clock now (no more frames); :meth:`stop` then finishes the outputs."""
        self._stop.set()

    def stop(self, close_outputs: bool = True) -> None:
        """Stop the threads, then finish the outputs (unless the caller closes them itself)."""
        self._stop.set()
        for t in self._threads:
            t.join(5.0)
        if close_outputs:
            close_all(self.outputs)


def close_all(outputs: list) -> None:
    """Finish every output at once.

    Each may wait its full timeout for a dead server or a child's trailer: one after another,
    16 channels' outputs would take minutes, past a service manager's stop timeout, which then
    kills the process and the recordings' ends.
    """
    threads = [
        threading.Thread(target=o.close, name=f"close {getattr(o, 'label', 'output')}", daemon=True)
        for o in outputs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
