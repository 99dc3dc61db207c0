"""Streaming-versus-offline feature parity: per-frame errors and the curve over settings.

The error of frame ``f`` is ``‖stream_f − offline_f‖ / ‖offline_f‖`` over its ``[50, 384]``
window (positional encoding included, as the UNet sees it). Only a trained encoder makes this
number meaningful; with random weights it measures nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from musetalk_rt.audio.features import AudioFeatureExtractor
from musetalk_rt.audio.incremental import IncrementalFeatureExtractor, StreamingConfig


def stream_windows(
    whisper: torch.nn.Module,
    feature_extractor,
    audio_16k: np.ndarray,
    config: StreamingConfig,
    chunk_samples: int = 320,
) -> tuple[torch.Tensor, IncrementalFeatureExtractor]:
    """Run a clip through the incremental extractor in fixed chunks.

    Returns:
        ``[F, 50, 384]`` windows (checked to arrive in order with no gap) and the extractor.
    """
    ex = IncrementalFeatureExtractor(whisper, feature_extractor, config)
    parts, expected = [], 0
    chunks = [audio_16k[i : i + chunk_samples] for i in range(0, len(audio_16k), chunk_samples)]
    for chunk in [*chunks, None]:
        out = ex.push(chunk) if chunk is not None else ex.flush()
        if out is None:
            continue
        if out.start_frame != expected:
            raise AssertionError(f"frame {out.start_frame} emitted, {expected} expected")
        expected += len(out)
        parts.append(out.windows)
    return torch.cat(parts) if parts else torch.zeros(0, 50, 384), ex


def frame_errors(stream: torch.Tensor, offline: torch.Tensor) -> np.ndarray:
    """Per-frame relative L2 error, ``[F]``."""
    s, o = stream.flatten(1).float().cpu(), offline.flatten(1).float().cpu()
    return ((s - o).norm(dim=1) / o.norm(dim=1).clamp_min(1e-12)).numpy()


def summarize(errors: np.ndarray) -> dict:
    """Median, 90th and 99th percentile and maximum of per-frame errors."""
    if errors.size == 0:
        return {"frames": 0}
    return {
        "frames": int(errors.size),
        "median": round(float(np.median(errors)), 5),
        "p90": round(float(np.percentile(errors, 90)), 5),
        "p99": round(float(np.percentile(errors, 99)), 5),
        "max": round(float(errors.max()), 5),
    }


def parity_curve(
    whisper: torch.nn.Module,
    feature_extractor,
    clips: dict[str, np.ndarray],
    configs: Iterable[StreamingConfig],
    chunk_samples: int = 320,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Errors of every config on every clip, one row each (plus each config over all clips)."""
    offline = AudioFeatureExtractor(whisper, feature_extractor)
    refs = {name: offline.windows(audio) for name, audio in clips.items()}
    rows = []
    for cfg in configs:
        all_err = []
        for name, audio in clips.items():
            got, ex = stream_windows(whisper, feature_extractor, audio, cfg, chunk_samples)
            err = frame_errors(got, refs[name])
            all_err.append(err)
            rows.append(_row(cfg, name, err, ex))
            log(f"  {name:<10} {cfg.describe()}: {rows[-1]['error']}")
        rows.append(_row(cfg, "all", np.concatenate(all_err), None))
    return rows


def _row(cfg: StreamingConfig, clip: str, err: np.ndarray, ex) -> dict:
    return {
        "clip": clip,
        "canvas": cfg.canvas,
        "context_ms": cfg.context_ms,
        "extra_lookahead_ms": cfg.extra_lookahead_ms,
        "hop_frames": cfg.hop_frames,
        "added_delay_ms": cfg.added_delay_ms,
        "error": summarize(err),
        "cost": ex.stats.as_dict() if ex is not None else None,
    }
