"""Cut a live 16 kHz stream into utterances for speech-to-text (and voice mode).

The VAD (:class:`~musetalk_rt.audio.vad.VoiceActivity`) finds speech; segments closer than
``min_pause_ms`` belong to one utterance, and a pause at least that long ends it. An utterance
that reaches ``max_utterance_s`` is split at its longest inner pause in the second half (a
breath between phrases), or, in speech without pauses, at the quietest 20 ms there — never in
the middle of a loud syllable if a quieter moment exists. Each utterance keeps ``pad_ms`` of
audio either side so the recogniser hears whole words.

Times are seconds since the stream's first sample. Memory is bounded: only the audio of the
open utterance (at most ``max_utterance_s`` plus the pad) is kept.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import numpy as np

from musetalk_rt.audio.vad import VoiceActivity

SR = 16000


def wav_bytes(audio: np.ndarray, sample_rate: int = SR) -> bytes:
    """Mono float audio as a 16-bit PCM WAV file (how an utterance is uploaded)."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


@dataclass
class Utterance:
    """One utterance: ``audio`` from ``start_s`` to ``end_s`` of the stream (16 kHz mono)."""

    index: int
    start_s: float
    end_s: float
    audio: np.ndarray
    split: bool = False  # cut at max length rather than at a full pause

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class UtteranceSegmenter:
    """Streaming utterance segmentation.

    Args:
        vad_net: The silero-vad network (shared; holds no state).
        min_pause_ms: A pause at least this long ends an utterance.
        max_utterance_s: Longer speech is split.
        pad_ms: Audio kept before the first and after the last speech.
        min_utterance_ms: Shorter speech (a cough, a click) is dropped.
    """

    def __init__(
        self,
        vad_net,
        min_pause_ms: int = 400,
        max_utterance_s: float = 8.0,
        pad_ms: int = 100,
        min_utterance_ms: int = 250,
    ):
        self.vad = VoiceActivity(vad_net)
        self.vad.keep_probs = False
        self.min_pause_s = min_pause_ms / 1000
        self.max_s = max_utterance_s
        self.pad_s = pad_ms / 1000
        self.min_s = min_utterance_ms / 1000
        self._buf = np.zeros(0, np.float32)  # audio from sample self._buf_start on
        self._buf_start = 0
        self._n = 0  # samples pushed
        self._start_s: float | None = None  # open utterance's first speech
        self._seg_i = 0  # first VAD segment not yet part of an emitted utterance
        self._count = 0
        self._last_end = 0.0
        self.dropped_short = 0

    @property
    def open(self) -> bool:
        """Whether an utterance is in progress (speech since the last emitted one)."""
        return self._start_s is not None or self.vad.speaking

    def push(self, audio_16k: np.ndarray) -> list[Utterance]:
        """Add audio; return the utterances completed by it."""
        a = np.asarray(audio_16k, np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, a])
        self._n += a.size
        self.vad.push(a)
        out = self._scan(final=False)
        self._trim()
        return out

    def flush(self) -> list[Utterance]:
        """End of stream: close and return what is open."""
        self.vad.finish()
        return self._scan(final=True)

    # -- internals --------------------------------------------------------------------------------

    def _segments(self):
        return self.vad.segments[self._seg_i :]

    def _scan(self, final: bool) -> list[Utterance]:
        out = []
        now_s = self._n / SR
        heard_s = now_s if final else self.vad.decided_ms / 1000  # VAD decisions are final here
        while segs := self._segments():
            start = segs[0].start_ms / 1000
            end = None  # (time, segments used): the first closed segment followed by a pause
            for i, s in enumerate(segs):
                if s.end_ms is None:
                    break
                nxt = segs[i + 1].start_ms / 1000 if i + 1 < len(segs) else heard_s
                if nxt - s.end_ms / 1000 >= self.min_pause_s or (final and i + 1 == len(segs)):
                    end = (s.end_ms / 1000, i + 1)
                    break
            if end is not None and end[0] - start <= self.max_s:
                out += self._emit(start, end[0], end[1], pause=True)
            elif end is not None or now_s - start > self.max_s:
                cut, used, pause = self._split_point(start, segs)
                out += self._emit(start, cut, used, pause=pause, split=True)
            elif final:
                out += self._emit(start, now_s, len(segs), pause=True)
                break
            else:
                break
        return out

    def _split_point(self, start: float, segs) -> tuple[float, int, bool]:
        """A cut in [start + max/2, start + max]: the longest pause, else the quietest 20 ms.

        Returns the cut time, the number of segments wholly before it, and whether it is a pause.
        """
        lo, hi = start + self.max_s / 2, start + self.max_s
        best, used = None, 0
        for i in range(len(segs) - 1):
            a, b = segs[i].end_ms, segs[i + 1].start_ms
            if a is None:
                break
            a, b = a / 1000, b / 1000
            if lo <= a and b <= hi and (best is None or b - a > best[1] - best[0]):
                best, used = (a, b), i + 1
        if best is not None:
            return best[0], used, True
        i0 = max(int(lo * SR) - self._buf_start, 0)
        i1 = min(int(hi * SR) - self._buf_start, self._buf.size)
        frames = (i1 - i0) // 320
        if frames <= 0:
            cut = hi
        else:
            e = (self._buf[i0 : i0 + frames * 320].reshape(frames, 320) ** 2).mean(1)
            cut = (self._buf_start + i0 + int(np.argmin(e)) * 320 + 160) / SR
        for i, s in enumerate(segs):  # the segment running through the cut resumes after it
            if s.end_ms is None or s.end_ms / 1000 > cut:
                s.start_ms = max(s.start_ms, cut * 1000)
                return cut, i, False
        return cut, len(segs), False

    def _emit(
        self, start: float, end: float, used_segs: int, pause: bool, split: bool = False
    ) -> list[Utterance]:
        self._seg_i += used_segs
        a = max(start - self.pad_s, self._last_end, 0.0)
        b = min(end + self.pad_s if pause else end, self._n / SR)  # a cut in speech: no pad
        if end - start < self.min_s:
            self.dropped_short += 1
            return []
        i0 = min(max(int(a * SR) - self._buf_start, 0), self._buf.size)
        i1 = max(min(int(b * SR) - self._buf_start, self._buf.size), i0)
        self._last_end = b
        u = Utterance(self._count, a, b, self._buf[i0:i1].copy(), split)
        self._count += 1
        return [u]

    def _trim(self) -> None:
        """Keep audio from the open utterance's start (or the last pad) on."""
        segs = self._segments()
        # a speech start is decided up to ~100 ms after it happens and then dated back: keep more
        margin_s = self.pad_s + self.vad.config.decision_delay_ms / 1000 + 0.1
        keep_from = segs[0].start_ms / 1000 - self.pad_s if segs else self._n / SR - margin_s
        drop = int(max(0.0, keep_from) * SR) - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
