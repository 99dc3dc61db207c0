"""Markers for the end-to-end probe: speech bursts after silence, at known samples.

A marker is a short stretch of speech cut so that it starts on its first loud 2.5 ms block,
placed after seconds of silence with that first block on a video frame boundary of the sender's
stream. The same detector (:func:`detect_onsets`) finds the onset in the received audio, so
codec effects on the shape of the onset largely cancel. Speech rather than tone bursts: the live
process shows lips only where its voice activity detector hears speech.

The default speech is ``marker_speech.wav`` next to this module: "Hello, and welcome to the
show." spoken by espeak-ng 1.51, cut by :func:`marker_snippet` to 1.5 s, stored as 16 kHz 16-bit
PCM, so every host probes with the same signal whether or not it has espeak-ng.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musetalk_rt.audio.features import SAMPLE_RATE
from musetalk_rt.live.output import AUDIO_PER_FRAME

BLOCK = 40  # samples per detector block: 2.5 ms at 16 kHz
ONSET_RMS = 0.02  # a block louder than this is sound, a quieter one silence (AAC's pre-echo
# before an onset stays below it)


def block_rms(x: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """RMS of consecutive ``block``-sample blocks (a partial last block is dropped)."""
    n = len(x) // block
    if n == 0:
        return np.zeros(0, np.float32)
    b = np.asarray(x[: n * block], np.float32).reshape(n, block)
    return np.sqrt(np.mean(b * b, axis=1))


def detect_onsets(
    x: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    min_silence_s: float = 0.5,
    onset_rms: float = ONSET_RMS,
) -> list[int]:
    """Sample indices where sound starts after at least ``min_silence_s`` of silence.

    The signal is cut into 2.5 ms blocks (at 16 kHz; ``BLOCK`` samples at other rates too);
    an onset is the first sample of a block with an RMS of at least ``onset_rms`` whose
    preceding ``min_silence_s`` holds only quieter blocks. The start of the signal counts as
    silence only after ``min_silence_s`` of it.
    """
    rms = block_rms(x)
    need = max(1, int(round(min_silence_s * sample_rate / BLOCK)))
    quiet = 0
    onsets = []
    for i, r in enumerate(rms):
        if r >= onset_rms and quiet >= need:
            onsets.append(i * BLOCK)
        quiet = quiet + 1 if r < onset_rms else 0
    return onsets


def marker_snippet(speech: np.ndarray, max_s: float = 1.5, fade_ms: float = 10.0) -> np.ndarray:
    """Cut speech (16 kHz mono float) into a marker: from its first loud block, at most ``max_s``.

    The level is normalised to a peak of 0.5; the end fades out over ``fade_ms`` (no click).

    Raises:
        ValueError: The clip holds no block louder than the onset threshold.
    """
    x = np.asarray(speech, np.float32)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak <= 0:
        raise ValueError("the marker speech is silent")
    x = 0.5 * x / peak
    loud = np.flatnonzero(block_rms(x) >= ONSET_RMS)
    if loud.size == 0:
        raise ValueError("the marker speech has no onset louder than the detector's threshold")
    x = x[loud[0] * BLOCK : loud[0] * BLOCK + int(max_s * SAMPLE_RATE)].copy()
    fade = min(len(x), int(fade_ms * SAMPLE_RATE / 1000))
    if fade:
        x[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return x


BUNDLED_SPEECH = Path(__file__).with_name("marker_speech.wav")


def default_speech() -> tuple[np.ndarray, str]:
    """The bundled marker speech (16 kHz mono float) and its name.

    A synthetic voice will not do: the voice activity detector hears only a few frames of it.
    """
    from musetalk_rt.media import load_audio

    return load_audio(BUNDLED_SPEECH).to_mono_16k(), "espeak-ng sentence (bundled)"


@dataclass
class MarkerPlan:
    """Where markers sit in the sender's stream (sample 0 is the session's first sample).

    Marker ``k`` starts at sample ``onset(k)`` (a multiple of 640, so on a video frame
    boundary of the live channel), ``lead_s + k * period_s`` seconds in, rounded to a frame.

    Args:
        snippet: The marker's samples (see :func:`marker_snippet`).
        period_s: Seconds from one marker's onset to the next.
        lead_s: Silence before the first marker.
        duration_s: Length of the whole stream; markers that would not end inside it are left out.
    """

    snippet: np.ndarray
    period_s: float
    lead_s: float
    duration_s: float

    def __post_init__(self) -> None:
        if len(self.snippet) / SAMPLE_RATE + 1.0 > self.period_s:
            raise ValueError(
                f"a marker lasts {len(self.snippet) / SAMPLE_RATE:.2f} s; the period must leave "
                "at least 1 s of silence after it"
            )
        n = 0
        while self.onset(n) + len(self.snippet) <= self.total_samples:
            n += 1
        self._count = n

    @property
    def total_samples(self) -> int:
        return int(round(self.duration_s * SAMPLE_RATE))

    def onset(self, k: int) -> int:
        """First sample of marker ``k``."""
        return AUDIO_PER_FRAME * int(round((self.lead_s + k * self.period_s) * 25))

    @property
    def count(self) -> int:
        """How many markers fit in the stream."""
        return self._count

    def samples(self, start: int, stop: int) -> np.ndarray:
        """The stream's samples ``[start, stop)`` as float32 (silence outside markers)."""
        out = np.zeros(max(0, stop - start), np.float32)
        size = len(self.snippet)
        spacing = self.period_s * SAMPLE_RATE
        first = max(0, int((start - size - self.lead_s * SAMPLE_RATE) // spacing) - 1)
        for k in range(first, self.count):
            a = self.onset(k)
            if a >= stop:
                break
            lo, hi = max(a, start), min(a + size, stop)
            if lo < hi:
                out[lo - start : hi - start] = self.snippet[lo - a : hi - a]
        return out
