"""Groq in the live audio path: captions and voice mode, as audio sinks in front of a channel.

Both sit between the ingest and a :class:`~musetalk_rt.live.channel.LiveChannel` and follow
the ingest's rule: ``push`` only enqueues. Each has a **segment thread** (VAD and utterance
cuts, :mod:`.utterances`) and a **request thread** that calls Groq for one utterance at a time,
in order. Nothing waits on Groq except the request thread, so the video never stalls.

Captions (:class:`CaptionsSink`): the MC's audio goes to the channel untouched; each utterance's
transcript becomes a caption (SRT/VTT with the utterance's times on the output clock, a
``caption`` message to the sender, and optionally burned into the video from the moment it
arrives, for its reading time). When Groq fails, captions pause (the breaker opens) and resume
by themselves after a trial succeeds.

Voice mode (:class:`VoiceSink`): the MC's audio does *not* go out. Each utterance is
transcribed (or translated), optionally rewritten, spoken by Groq's text-to-speech, and that
speech drives the avatar and is the output audio. Utterances play in order: each one is a channel
session that starts when the previous one has finished, so nothing is cut mid-word. Fallbacks:
an utterance whose calls fail within the budget plays the MC's own recording of it; while the
breaker is open the MC's live voice goes straight through (switching only at pauses), and after
the cool-down the next utterance is a trial that, if it succeeds, brings voice mode back.

Queues: audio to the segment thread (30 s of audio; full: the chunk is dropped and counted;
the session's open and close always get in), utterances to the request thread (64; full:
dropped and counted; so that a backlog drains instead of growing, in voice mode an utterance
older than twice the budget skips Groq and plays as recorded, and in captions mode one that
waited more than ``max_behind_s`` for the request thread gets no caption). In voice mode the
spoken sessions themselves can run behind: speech longer than the MC's words (a translation, a
slow voice) starts after the one before ends, so over a long show the avatar would fall further
and further behind the MC in the hall. While the speech already queued reaches more than
``max_behind_s`` (10 s) past now, the next utterance is skipped — counted
(``musetalk_groq_skipped_behind_total``) and logged — until it has caught up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from musetalk_rt.audio.audioqueue import AudioQueue
from musetalk_rt.audio.features import FPS
from musetalk_rt.speech.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from musetalk_rt.speech.captions import CaptionOverlay, CaptionWriter, Cue
from musetalk_rt.speech.config import GroqConfig
from musetalk_rt.speech.groq_client import GroqSpeech, GroqUnavailable, Timings
from musetalk_rt.speech.utterances import SR, Utterance, UtteranceSegmenter

log = logging.getLogger("musetalk_rt.speech")
_SILENT_DBFS = -40.0


@dataclass
class SpeechStats:
    """Counters of one channel's speech path (for metrics and the live summary)."""

    utterances: int = 0
    captions: int = 0
    spoken: int = 0  # voice mode: utterances played as synthesized speech
    fallbacks: int = 0  # utterances played as the MC's own recording
    passthrough_s: float = 0.0  # MC's live voice sent through while the breaker was open
    failures: int = 0
    dropped_audio_chunks: int = 0
    dropped_utterances: int = 0
    skipped_behind: int = 0  # voice mode: utterances skipped while the speech ran too far behind
    skipped_stale: int = 0  # captions: utterances too old for a caption (Groq slow, not failing)
    breaker_opens: int = 0
    breaker_state: str = CLOSED
    delays_ms: list[float] = field(default_factory=list)  # voice: utterance end -> speech frame
    last: dict = field(default_factory=dict)  # the last utterance's breakdown

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "delays_ms"}
        v = sorted(self.delays_ms)
        d["utterance_to_speech_ms"] = {
            "n": len(v),
            "p50": round(v[len(v) // 2], 1) if v else None,
            "p95": round(v[int(0.95 * (len(v) - 1))], 1) if v else None,
            "max": round(v[-1], 1) if v else None,
        }
        return d


def first_voiced_s(audio: np.ndarray, window: int = 320) -> float:
    """Seconds to the first 20 ms window louder than -40 dBFS (0 when none is)."""
    n = audio.size // window
    if n == 0:
        return 0.0
    rms = np.sqrt((audio[: n * window].reshape(n, window) ** 2).mean(1) + 1e-12)
    loud = np.nonzero(20 * np.log10(rms) > _SILENT_DBFS)[0]
    return float(loud[0] * window / SR) if loud.size else 0.0


class _SpeechSink:
    """Shared plumbing: the two threads, the breaker, captions outputs, sender messages."""

    mode = "off"

    def __init__(
        self,
        channel,
        speech: GroqSpeech,
        config: GroqConfig,
        vad_net,
        writer: CaptionWriter | None = None,
        overlay: CaptionOverlay | None = None,
    ):
        self.channel, self.speech, self.config, self.vad_net = channel, speech, config, vad_net
        self.writer, self.overlay = writer, overlay
        self.stats = SpeechStats()
        self.breaker = CircuitBreaker(
            config.breaker_failures, config.breaker_cooldown_s, on_change=self._breaker_changed
        )
        # bounded in seconds of audio (whatever the chunk size); the session's open and close
        # always get in (a lost close leaves an utterance unflushed)
        self.audio_q = AudioQueue(AUDIO_QUEUE_S, SR)
        # utterances queued or in hand: put() counts one, task_done() after handling uncounts
        # it, so "none queued and none in hand" is one reading (unfinished_tasks), no gap
        self.utt_q: queue.Queue = queue.Queue(maxsize=64)
        self._messages: deque = deque(maxlen=100)
        # sessions closed whose close the segment thread has not handled yet (their last
        # utterance is cut there); with utt_q's unfinished tasks, messages_pending's reading
        self._closes = 0
        self._promised = 0  # voice mode: spoken captions queued to play, not yet published
        self._pending_lock = threading.Lock()
        self._last_failure = ""  # the last failed utterance's reason (for the breaker's line)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._segment_loop, name=f"utterances {channel.name}"),
            threading.Thread(target=self._request_loop, name=f"groq {channel.name}"),
        ]
        for t in self._threads:
            t.daemon = True

    # -- the AudioSink interface (ingest side; never blocks) --------------------------------------

    def open_session(self) -> None:
        self._messages.clear()  # captions of a session before are not this sender's
        with self._pending_lock:
            self._promised = 0  # (nor are those still to come)
        self.audio_q.put_control(("open", time.monotonic(), None), new_session=True)

    def push(self, audio_16k: np.ndarray) -> None:
        if audio_16k.size:
            t = time.monotonic()
            if not self.audio_q.put_audio(audio_16k, lambda a: ("audio", t, a)):
                self.stats.dropped_audio_chunks = self.audio_q.dropped_chunks

    def close_session(self) -> None:
        with self._pending_lock:
            self._closes += 1
        self.audio_q.put_control(("close", time.monotonic(), None))

    def messages_pending(self) -> bool:
        """Whether a closed session may still give a message (its last utterance's caption).

        True from :meth:`close_session` until the segment thread has cut that session's last
        utterance, the request thread has handled every utterance queued and (voice mode) the
        channel has started playing each speech whose caption is published then. The ingest
        waits on it after a sender's ``bye`` (bounded), so the sender gets its last caption.
        """
        with self._pending_lock:
            waiting = self._closes > 0 or self._promised > 0
        return waiting or self.utt_q.unfinished_tasks > 0

    def sender_stats(self) -> dict:
        return {
            **self.channel.sender_stats(),
            "groq": self.mode,
            "groq_state": self.breaker.state,
        }

    def take_messages(self) -> list[dict]:
        """Messages for the connected sender (``caption``), oldest first."""
        out = []
        while self._messages:
            out.append(self._messages.popleft())
        return out

    def stats_dict(self) -> dict:
        self.stats.breaker_state = self.breaker.state
        self.stats.breaker_opens = self.breaker.opens
        return {"mode": self.mode, **self.stats.as_dict(), "calls": dict(self.speech.calls)}

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5.0)
        if self.writer is not None:
            self.writer.close()

    # -- shared -----------------------------------------------------------------------------------

    def _breaker_changed(self, old: str, new: str) -> None:
        what = {
            OPEN: "Groq is failing: "
            + ("captions paused" if self.mode == "captions" else "the MC's own voice goes out"),
            HALF_OPEN: "trying Groq again",
            CLOSED: "Groq is back: " + ("captions resumed" if self.mode == "captions" else "voice"),
        }[new]
        if new == OPEN and self._last_failure:
            what += f"; last failure: {self._last_failure}{_fix_hint(self._last_failure)}"
        log.warning("channel %s: %s (circuit %s -> %s)", self.channel.name, what, old, new)

    def _publish(self, cue: Cue, kind: str, extra: dict | None = None) -> None:
        """Send a caption everywhere it goes."""
        self.stats.captions += 1
        if self.writer is not None:
            self.writer.add(cue)
        if self.overlay is not None:
            show = cue
            if kind == "transcript":  # it arrives after the words: show it now, for reading time
                now_s = self.channel.next_out / FPS + 0.2
                read_s = max(cue.end_s - cue.start_s, 1.5 + 0.06 * len(cue.text))
                show = Cue(
                    cue.index, max(now_s, cue.start_s), max(now_s, cue.start_s) + read_s, cue.text
                )
            self.overlay.add(show)
        self._messages.append(
            {
                "type": "caption",
                "channel": self.channel.name,
                "index": cue.index,
                "start_s": round(cue.start_s, 3),
                "end_s": round(cue.end_s, 3),
                "text": cue.text,
                "kind": kind,
                **(extra or {}),
            }
        )

    def _take_utterance(self, u: Utterance, base_s: float | None, t_end: float) -> None:
        self.stats.utterances += 1
        try:
            self.utt_q.put_nowait((u, base_s, t_end, time.monotonic()))
        except queue.Full:
            self.stats.dropped_utterances += 1
            log.warning("channel %s: utterance queue full, utterance dropped", self.channel.name)

    def _segment_loop(self) -> None:
        seg: UtteranceSegmenter | None = None
        pushed = 0
        while not self._stop.is_set():
            try:
                kind, t, payload = self.audio_q.get(timeout=0.1)
            except queue.Empty:
                self._idle_tick(seg)
                continue
            try:
                if kind == "open":
                    seg = UtteranceSegmenter(
                        self.vad_net, self.config.min_pause_ms, self.config.max_utterance_s
                    )
                    pushed = 0
                    self._on_open()
                elif kind == "audio" and seg is not None:
                    pushed += payload.size
                    self._on_audio(payload)
                    for u in seg.push(payload):
                        self._take_utterance(u, self._base_s, _t_end(t, pushed, u))
                    self._idle_tick(seg)
                elif kind == "close" and seg is not None:
                    for u in seg.flush():
                        self._take_utterance(u, self._base_s, _t_end(t, pushed, u))
                    self._on_close()
                    seg = None
            except Exception:  # a bug here must not end captions/voice for the whole show
                log.exception("channel %s: utterance segmentation failed", self.channel.name)
            finally:
                if kind == "close":  # (its utterances are in utt_q by now)
                    with self._pending_lock:
                        self._closes -= 1

    def _request_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.utt_q.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._handle(*item)
            except Exception:
                log.exception("channel %s: an utterance failed", self.channel.name)
            finally:
                self.utt_q.task_done()

    # hooks
    _base_s: float | None = None

    def _on_open(self) -> None: ...

    def _on_audio(self, pcm: np.ndarray) -> None: ...

    def _on_close(self) -> None: ...

    def _idle_tick(self, seg: UtteranceSegmenter | None) -> None: ...

    def _handle(self, u: Utterance, base_s, t_end: float, t_queued: float) -> None: ...


AUDIO_QUEUE_S = 30.0  # audio queued before the segment thread at most


def _fix_hint(reason: str) -> str:
    """What to check for a refusal that retrying will not cure."""
    if "401" in reason:
        return " (check GROQ_API_KEY)"
    if "404" in reason or "400" in reason:
        return " (check the model names and the voice in the [groq] table of --config)"
    return ""


def _t_end(t_chunk: float, pushed: int, u: Utterance) -> float:
    """Wall time (monotonic) at which the utterance's last sample arrived."""
    return t_chunk - max(0.0, pushed / SR - u.end_s)


class CaptionsSink(_SpeechSink):
    """Live captions: the audio goes to the channel as is; transcripts become captions."""

    mode = "captions"

    def open_session(self) -> None:
        self._base_s = None  # until this session starts: never the session before's start
        self.channel.open_session(on_start=self._started)
        super().open_session()

    def push(self, audio_16k: np.ndarray) -> None:
        self.channel.push(audio_16k)
        super().push(audio_16k)

    def close_session(self) -> None:
        self.channel.close_session()
        super().close_session()

    def _started(self, base_frame: int) -> None:
        self._base_s = base_frame / FPS

    def _handle(self, u: Utterance, base_s, t_end: float, t_queued: float) -> None:
        waited_s = time.monotonic() - t_queued
        if waited_s > self.config.max_behind_s:
            # Groq slow but not failing: the queue grows, and a caption this late would be shown
            # over other words; skipping drains it
            self.stats.skipped_stale += 1
            log.info(
                "channel %s: caption %d skipped: it waited %.1f s for Groq ([groq] max_behind_s)",
                self.channel.name,
                u.index,
                waited_s,
            )
            return
        if not self.breaker.allow():  # paused while Groq fails; not counted as a failure
            return
        timings = Timings()
        deadline = time.monotonic() + self.config.utterance_deadline_s
        try:
            text = self.speech.transcribe(u.audio, deadline, timings)
        except GroqUnavailable as exc:
            self.stats.failures += 1
            self._last_failure = str(exc)
            self.breaker.failure()
            log.info("channel %s: caption %d skipped: %s", self.channel.name, u.index, exc)
            return
        self.breaker.success()
        base = base_s if base_s is not None else (self._base_s or 0.0)
        cue = Cue(u.index, base + u.start_s, base + u.end_s, text)
        lag_ms = round((time.monotonic() - t_end) * 1000, 1)
        self.stats.last = {"stt_ms": round(timings.stt_s * 1000, 1), "caption_lag_ms": lag_ms}
        if text:
            self._publish(cue, "transcript", {"lag_ms": lag_ms})


class VoiceSink(_SpeechSink):
    """Voice mode: Groq's speech of the MC's words drives the avatar (see the module doc)."""

    mode = "voice"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._passthrough = False
        self._queued_until = 0.0  # when the speech queued so far ends (monotonic, without D)

    def behind_s(self) -> float:
        """How far past now the speech queued so far reaches (0: none is waiting)."""
        return max(0.0, self._queued_until - time.monotonic())

    # segment thread --------------------------------------------------------------------------

    def _on_audio(self, pcm: np.ndarray) -> None:
        if self._passthrough:
            self.channel.push(pcm)
            self.stats.passthrough_s += pcm.size / SR

    def _on_close(self) -> None:
        if self._passthrough:
            self.channel.close_session()
            self._passthrough = False

    def _take_utterance(self, u: Utterance, base_s, t_end: float) -> None:
        if self._passthrough:  # already heard live
            self.stats.utterances += 1
            return
        super()._take_utterance(u, base_s, t_end)

    def _idle_tick(self, seg: UtteranceSegmenter | None) -> None:
        """Switch between voice and the MC's live voice, only at a pause."""
        if seg is None or seg.open:
            return
        state = self.breaker.state
        if not self._passthrough and state == OPEN:
            if self.utt_q.unfinished_tasks == 0:  # none queued, none in the request thread
                self._passthrough = True
                self.channel.open_session()
                log.warning("channel %s: the MC's own voice goes out live", self.channel.name)
        elif self._passthrough and state != OPEN:
            self._passthrough = False
            self.channel.close_session()
            log.warning("channel %s: voice mode: next utterance is a trial", self.channel.name)

    # request thread --------------------------------------------------------------------------

    def _play(self, audio: np.ndarray, text: str | None, u: Utterance, t_end: float, info: dict):
        """Queue ``audio`` as one channel session (it starts after the previous one ends)."""
        lead_s = first_voiced_s(audio)
        ch = self.channel

        def started(base_frame: int) -> None:
            on_screen = ch.t0 + ch.delay_s + base_frame / FPS + lead_s
            delay_ms = (on_screen - t_end) * 1000.0
            if text is not None:  # synthesized speech (fallbacks are reported in `last`)
                self.stats.delays_ms = [*self.stats.delays_ms[-499:], delay_ms]
            self.stats.last = {**info, "utterance_to_speech_ms": round(delay_ms, 1)}
            if text:
                start_s = base_frame / FPS + lead_s
                self._publish(
                    Cue(u.index, start_s, base_frame / FPS + audio.size / SR, text), "spoken"
                )
                with self._pending_lock:
                    self._promised = max(0, self._promised - 1)

        # the channel starts a session at the later of now and the previous one's end
        self._queued_until = max(time.monotonic(), self._queued_until) + audio.size / SR
        if text:  # its caption comes when it starts (messages_pending counts it till then)
            with self._pending_lock:
                self._promised += 1
        ch.open_session(on_start=started)
        for i in range(0, audio.size, SR // 5):  # 200 ms pieces, like an ingest would
            ch.push(audio[i : i + SR // 5])
        ch.close_session()

    def _handle(self, u: Utterance, base_s, t_end: float, t_queued: float) -> None:
        t0 = time.monotonic()
        behind_s = self.behind_s()
        if behind_s > self.config.max_behind_s:  # no Groq call: this one would play even later
            self.stats.skipped_behind += 1
            log.warning(
                "channel %s: voice mode runs %.1f s behind the MC; utterance %d skipped so it "
                "catches up ([groq] max_behind_s = %g)",
                self.channel.name,
                behind_s,
                u.index,
                self.config.max_behind_s,
            )
            return
        info = {"segment_ms": round((t_queued - t_end) * 1000, 1)}
        stale = t0 - t_end > 2 * self.config.utterance_deadline_s
        if stale or not self.breaker.allow():
            self.stats.fallbacks += 1
            info["fallback"] = "stale" if stale else "circuit open"
            return self._play(u.audio, None, u, t_end, info)
        timings = Timings()
        deadline = t0 + self.config.utterance_deadline_s
        try:
            text = self.speech.transcribe(u.audio, deadline, timings)
            if not text:
                self.breaker.success()
                return  # nothing was said (a cough the VAD took for speech)
            text = self.speech.rewrite(text, deadline, timings)
            audio = self.speech.speak(text, deadline, timings)
        except GroqUnavailable as exc:
            self.stats.failures += 1
            self.stats.fallbacks += 1
            self._last_failure = str(exc)
            self.breaker.failure()
            log.warning(
                "channel %s: utterance %d plays in the MC's voice: %s",
                self.channel.name,
                u.index,
                exc,
            )
            info["fallback"] = str(exc)
            return self._play(u.audio, None, u, t_end, info)
        self.breaker.success()
        self.stats.spoken += 1
        for k in ("stt_s", "chat_s", "tts_s"):
            v = getattr(timings, k)
            if v is not None:
                info[k.replace("_s", "_ms")] = round(v * 1000, 1)
        info["retries"] = timings.retries
        self._play(audio, text, u, t_end, info)


def make_sink(mode: str, channel, speech, config, vad_net, writer=None, overlay=None):
    """The sink for ``--groq MODE`` (``captions`` or ``voice``)."""
    cls = {"captions": CaptionsSink, "voice": VoiceSink}[mode]
    return cls(channel, speech, config, vad_net, writer=writer, overlay=overlay)
