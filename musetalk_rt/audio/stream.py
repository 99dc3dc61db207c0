"""Streaming audio: a clean 16 kHz mono stream from PCM chunks of any rate, size and layout.

A live MC arrives as chunks of a few ms to seconds, at 8–48 kHz, mono or stereo, int16 or
float. :class:`AudioInput` turns them into one 16 kHz float32 stream with a *streaming*
resampler (soxr's ``ResampleStream`` keeps its filter state across chunks, so chunk borders
leave no clicks and the result does not depend on the chunk size). It also makes bad input
harmless: NaN and infinite samples become silence, samples beyond full scale are clipped, empty
chunks are ignored, and a change of sample rate or channel count in mid-stream flushes the old
resampler and starts a new one. Each of these is counted in :class:`InputStats`, never raised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import soxr

from musetalk_rt.audio.features import SAMPLE_RATE

MIN_RATE = 8_000
MAX_RATE = 48_000
FORMATS = ("pcm_s16le", "f32le")


@dataclass
class InputStats:
    """What :class:`AudioInput` received and repaired (all counts since the start)."""

    chunks: int = 0
    empty_chunks: int = 0
    samples_in: int = 0  # per channel, at the input rate
    samples_out: int = 0  # 16 kHz mono
    non_finite: int = 0  # NaN or infinite samples replaced by 0
    clipped: int = 0  # samples beyond full scale, clipped
    format_changes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def pcm_to_float(data: bytes | np.ndarray, fmt: str, channels: int) -> np.ndarray:
    """Decode raw PCM to ``[N, channels]`` float32 (not yet sanitised).

    Args:
        data: Little-endian interleaved PCM bytes, or an array (int16 or float).
        fmt: ``pcm_s16le`` or ``f32le`` (ignored for arrays, whose dtype says it).
        channels: Interleaved channels (1 or 2).

    Raises:
        ValueError: Unknown format, or a byte count that is not a whole number of frames.
    """
    if isinstance(data, np.ndarray):
        arr = data
        if arr.dtype == np.int16:
            arr = arr.astype(np.float32) / 32768.0
        arr = np.asarray(arr, dtype=np.float32)
    else:
        if fmt not in FORMATS:
            raise ValueError(f"unknown PCM format {fmt!r}; use one of {', '.join(FORMATS)}")
        width = 2 if fmt == "pcm_s16le" else 4
        if len(data) % (width * channels):
            raise ValueError(
                f"{len(data)} bytes is not a whole number of {fmt} frames of {channels} channel(s)"
            )
        if fmt == "pcm_s16le":
            arr = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        else:
            arr = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if arr.ndim == 1:
        if arr.size % channels:
            raise ValueError(f"{arr.size} samples do not split into {channels} channels")
        arr = arr.reshape(-1, channels)
    return arr  # [N, C]


class AudioInput:
    """PCM chunks in, a 16 kHz mono float32 stream out.

    Args:
        sample_rate: Initial input rate (8–48 kHz).
        channels: Initial channel count (1 or 2; stereo is averaged to mono).
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, channels: int = 1):
        self.stats = InputStats()
        self.sample_rate = 0
        self.channels = 0
        self._resampler: soxr.ResampleStream | None = None
        self._set_format(sample_rate, channels)

    @staticmethod
    def check_format(sample_rate: int, channels: int) -> None:
        """Raise ``ValueError`` naming the accepted range when a format is not accepted."""
        if not (MIN_RATE <= int(sample_rate) <= MAX_RATE):
            raise ValueError(f"sample rate {sample_rate} Hz is outside {MIN_RATE}–{MAX_RATE} Hz")
        if int(channels) not in (1, 2):
            raise ValueError(f"{channels} channels: send mono or stereo")

    def _set_format(self, sample_rate: int, channels: int) -> None:
        self.check_format(sample_rate, channels)
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self._resampler = (
            None
            if self.sample_rate == SAMPLE_RATE
            else soxr.ResampleStream(
                self.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"
            )
        )

    def _drain(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)

    def push(
        self,
        data: bytes | np.ndarray,
        sample_rate: int | None = None,
        channels: int | None = None,
        fmt: str = "pcm_s16le",
    ) -> np.ndarray:
        """Add one chunk; return the 16 kHz mono samples it completes (``[n]`` float32).

        Args:
            data: PCM bytes (``fmt``) or an array ``[N]``/``[N, C]`` (int16 or float in [-1, 1]).
            sample_rate: The chunk's rate; a change from the previous one restarts the resampler.
            channels: The chunk's channel count (same rule).
            fmt: Byte format when ``data`` is bytes.

        Raises:
            ValueError: A format outside 8–48 kHz / 1–2 channels, or bytes that do not split
                into whole frames (the caller reports it; the stream itself is unharmed).
        """
        rate = self.sample_rate if sample_rate is None else int(sample_rate)
        ch = self.channels if channels is None else int(channels)
        arr = pcm_to_float(data, fmt, ch)  # [N, C]
        self.stats.chunks += 1
        if arr.shape[0] == 0:  # no samples carry no format: never a reason to restart
            self.stats.empty_chunks += 1
            return np.zeros(0, np.float32)
        head = np.zeros(0, np.float32)
        if (rate, ch) != (self.sample_rate, self.channels):
            self.check_format(rate, ch)
            head = self._drain()  # the old rate's tail belongs before the new audio
            self._set_format(rate, ch)
            self.stats.format_changes += 1
        bad = ~np.isfinite(arr)
        if bad.any():
            self.stats.non_finite += int(bad.sum())
            arr = np.where(bad, 0.0, arr).astype(np.float32)
        over = np.abs(arr) > 1.0
        if over.any():
            self.stats.clipped += int(over.sum())
            arr = np.clip(arr, -1.0, 1.0)
        self.stats.samples_in += arr.shape[0]
        mono = arr.mean(axis=1, dtype=np.float32) if arr.shape[1] > 1 else arr[:, 0]  # [N]
        out = mono if self._resampler is None else self._resampler.resample_chunk(mono)
        if head.size:
            out = np.concatenate([head, out])
        self.stats.samples_out += out.size
        return np.ascontiguousarray(out, dtype=np.float32)

    def flush(self) -> np.ndarray:
        """End of stream: the resampler's remaining samples (the stream can go on after it)."""
        tail = self._drain()
        self._set_format(self.sample_rate, self.channels)
        self.stats.samples_out += tail.size
        return tail
