"""Whisper canvas encoding: the reference path against the live canvas engine, per batch.

The reference is ``encode_canvases`` (transformers' feature extractor + the fp32 encoder); the
engine is ``CanvasEncoder`` (device log-mel, fp32 or fp16, CUDA graphs per bucket). For each
batch size it times ``--iters`` calls after a warm-up (each call ends synchronised, as in the
live process) and compares the engine with the reference on the same canvases. One JSONL row per
(variant, batch) goes to ``<out>/canvas_bench.jsonl``; the last line printed is one JSON summary.

    python experiments/canvas_bench.py --weights synthetic --device cuda --out results/x
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from musetalk_rt.audio.canvas_engine import CanvasEncoder
from musetalk_rt.audio.incremental import encode_canvases
from musetalk_rt.bench import write_rows
from musetalk_rt.weights import load_models


def _time(fn, canvases, iters: int) -> float:
    fn(canvases)  # warm
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(canvases)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="synthetic")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--canvas-s", type=float, default=8.0, help="audio per canvas, seconds")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = load_models(args.weights, "models", args.device)
    whisper, fe = models.whisper, models.feature_extractor
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    variants = {
        "reference fp32": lambda c: encode_canvases(whisper, fe, c, torch.float32),
        "engine fp32 eager": CanvasEncoder(whisper, fe, torch.float32, cuda_graphs=False),
        "engine fp32 graphs": CanvasEncoder(whisper, fe, torch.float32),
        "engine fp16 eager": CanvasEncoder(whisper, fe, torch.float16, cuda_graphs=False),
        "engine fp16 graphs": CanvasEncoder(whisper, fe, torch.float16),
    }
    rows = []
    for b in batches:
        canvases = [
            (rng.standard_normal(int(16000 * args.canvas_s)) * 0.1).astype(np.float32)
            for _ in range(b)
        ]
        ref = variants["reference fp32"](canvases)
        for name, fn in variants.items():
            ms = _time(fn, canvases, args.iters)
            got = fn(canvases)
            rel = float(((got - ref).norm() / ref.norm()).item())
            row = {
                "bench": "canvas",
                "variant": name,
                "batch": b,
                "ms_per_call": round(ms, 3),
                "ms_per_canvas": round(ms / b, 3),
                "rel_err_vs_reference": rel,
                "canvas_s": args.canvas_s,
                "gpu": gpu,
                "weights": args.weights,
                "torch": torch.__version__,
                "notes": getattr(fn, "notes", []),
            }
            rows.append(row)
            print(f"B={b:>2} {name:<20} {ms:8.2f} ms/call {ms / b:7.3f} ms/canvas rel {rel:.1e}")
    write_rows(rows, args.out, "canvas_bench.jsonl")
    best = min((r for r in rows if r["batch"] == max(batches)), key=lambda r: r["ms_per_canvas"])
    print(json.dumps({"canvas_bench": str(args.out / "canvas_bench.jsonl"), "best": best}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
