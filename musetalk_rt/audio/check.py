"""``musetalk-rt audio check``: what the streaming path makes of one clip.

The clip is streamed exactly as a live sender would (fixed chunks at its own rate and channels,
through :class:`AudioInput`), then voice activity, the incremental features and their error
against the offline features of the same 16 kHz audio are reported, with an optional picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from musetalk_rt.audio.features import SAMPLE_RATE, AudioFeatureExtractor
from musetalk_rt.audio.incremental import IncrementalFeatureExtractor, StreamingConfig
from musetalk_rt.audio.parity import frame_errors, stream_windows, summarize
from musetalk_rt.audio.stream import AudioInput
from musetalk_rt.audio.vad import WINDOW_MS, Segment, VadConfig, VoiceActivity, load_silero_vad
from musetalk_rt.media import AudioClip


@dataclass
class AudioReport:
    """Everything ``audio check`` measured."""

    duration_s: float
    frames: int
    segments: list[Segment]
    vad_probs: np.ndarray  # one per 32 ms window
    errors: np.ndarray  # per frame
    config: StreamingConfig
    vad_config: VadConfig
    cost: dict
    input_stats: dict
    audio_16k: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        return {
            "duration_s": round(self.duration_s, 3),
            "frames": self.frames,
            "speech_segments": [
                [round(s.start_ms / 1000, 3), round((s.end_ms or 0) / 1000, 3)]
                for s in self.segments
            ],
            "speech_s": round(sum(((s.end_ms or 0) - s.start_ms) for s in self.segments) / 1e3, 3),
            "feature_error": summarize(self.errors),
            "streaming": self.config.describe(),
            "lookahead_ms": self.config.lookahead_ms,
            "added_delay_ms": self.config.added_delay_ms,
            "vad_decision_delay_ms": self.vad_config.decision_delay_ms,
            "extractor_cost": self.cost,
            "input": self.input_stats,
        }


def stream_clip(clip: AudioClip, chunk_ms: int = 20) -> tuple[np.ndarray, dict]:
    """Send a clip through :class:`AudioInput` in ``chunk_ms`` chunks; return 16 kHz mono."""
    ai = AudioInput(clip.sample_rate, clip.channels)
    step = max(1, clip.sample_rate * chunk_ms // 1000)
    x = clip.samples.T  # [N, C]
    parts = [ai.push(x[i : i + step]) for i in range(0, x.shape[0], step)]
    parts.append(ai.flush())
    return np.concatenate(parts), ai.stats.as_dict()


@dataclass
class StreamedClip:
    """A clip after the live audio path: 16 kHz audio, windows, voice activity, counters."""

    audio_16k: np.ndarray
    input_stats: dict
    windows: torch.Tensor  # [F, 50, 384]
    extractor: IncrementalFeatureExtractor
    vad: VoiceActivity


def run_streaming_path(
    clip: AudioClip,
    whisper: torch.nn.Module,
    feature_extractor,
    config: StreamingConfig,
    vad_config: VadConfig | None = None,
    chunk_ms: int = 20,
) -> StreamedClip:
    """Send a clip through resampler, incremental features and VAD in ``chunk_ms`` chunks."""
    audio, input_stats = stream_clip(clip, chunk_ms)
    vad = VoiceActivity(load_silero_vad(), vad_config or VadConfig())
    vad.push(audio)
    vad.finish()
    chunk = SAMPLE_RATE * chunk_ms // 1000
    windows, ex = stream_windows(whisper, feature_extractor, audio, config, chunk)
    return StreamedClip(audio, input_stats, windows, ex, vad)


def check_audio(
    clip: AudioClip,
    whisper: torch.nn.Module,
    feature_extractor,
    config: StreamingConfig,
    vad_config: VadConfig | None = None,
    chunk_ms: int = 20,
) -> AudioReport:
    """Stream ``clip`` and measure VAD, features, error against offline and cost."""
    vad_config = vad_config or VadConfig()
    run = run_streaming_path(clip, whisper, feature_extractor, config, vad_config, chunk_ms)
    audio = run.audio_16k
    ref = AudioFeatureExtractor(whisper, feature_extractor).windows(audio)
    return AudioReport(
        duration_s=audio.size / SAMPLE_RATE,
        frames=int(run.windows.shape[0]),
        segments=run.vad.segments,
        vad_probs=np.asarray(run.vad.probs, np.float32),
        errors=frame_errors(run.windows, ref),
        config=config,
        vad_config=vad_config,
        cost=run.extractor.stats.as_dict(),
        input_stats=run.input_stats,
        audio_16k=audio,
    )


def plot_report(report: AudioReport, path: Path, width: int = 1400) -> Path:
    """Draw waveform, VAD probability and segments, and per-frame feature error to a PNG."""
    from PIL import Image, ImageDraw

    rows, h, pad = 3, 160, 30
    img = Image.new("RGB", (width, rows * h + pad), "white")
    d = ImageDraw.Draw(img)
    dur = max(report.duration_s, 1e-3)

    def x_of(t_s: float) -> int:
        return int(round(t_s / dur * (width - 1)))

    # 1: waveform envelope (min/max per pixel column)
    a = report.audio_16k
    cols = np.array_split(a, width) if a.size >= width else [a]
    for i, c in enumerate(cols):
        if c.size:
            y0, y1 = h / 2 - c.max() * h * 0.45, h / 2 - c.min() * h * 0.45
            d.line([(i, y0), (i, y1)], fill=(60, 60, 60))
    # 2: VAD probability and decided segments
    y = h
    for s in report.segments:
        x0, x1 = x_of(s.start_ms / 1e3), x_of((s.end_ms or 0) / 1e3)
        d.rectangle([x0, y, x1, y + h], fill=(200, 235, 200))
    pts = [
        (x_of(i * WINDOW_MS / 1e3), y + h - p * (h - 10)) for i, p in enumerate(report.vad_probs)
    ]
    if len(pts) > 1:
        d.line(pts, fill=(0, 120, 0))
    thr = y + h - report.vad_config.threshold * (h - 10)
    d.line([(0, thr), (width, thr)], fill=(180, 0, 0))
    # 3: per-frame relative error (0..max(0.5, max error))
    y = 2 * h
    top = max(0.5, float(report.errors.max()) if report.errors.size else 0.5)
    pts = [(x_of((f + 0.5) / 25), y + h - e / top * (h - 10)) for f, e in enumerate(report.errors)]
    if len(pts) > 1:
        d.line(pts, fill=(0, 0, 180))
    for i, label in enumerate(
        [
            "waveform",
            "VAD probability (green: speech segments, red: threshold)",
            f"streaming vs offline feature error (top = {top:.2f})",
        ]
    ):
        d.text((5, i * h + 3), label, fill=(0, 0, 0))
    d.text((5, rows * h + 8), f"0 .. {dur:.2f} s   {report.config.describe()}", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
