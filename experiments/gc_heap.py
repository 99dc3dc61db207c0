"""What one full garbage collection costs the live process once its models are built.

Loads the models, builds the face generator's engine (as the live process does at start-up),
then times ``gc.collect()`` twice, freezes the survivors (``gc.freeze()``, what the live process
does before serving) and times one more. One JSONL row per run goes to
``<out>/gc_heap.jsonl`` and is printed last.

    python experiments/gc_heap.py --weights tiny --engine compile --out experiments/results/X
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from musetalk_rt.bench import environment, write_rows
from musetalk_rt.live.gcwatch import freeze_startup_heap
from musetalk_rt.pipeline import FaceGenerator
from musetalk_rt.weights import load_models


def _full_collection_ms() -> float:
    t0 = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t0) * 1000.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="tiny", choices=["tiny", "synthetic", "real"])
    p.add_argument("--engine", default="eager")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batch-sizes", default="4", help="comma-separated buckets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("out/gc_heap"))
    args = p.parse_args()
    device = torch.device(args.device)
    buckets = [int(b) for b in args.batch_sizes.split(",")]
    models = load_models(args.weights, args.models_dir, device)
    gen = FaceGenerator(models, args.engine, args.dtype, buckets, None, {}, log=lambda _: None)
    t0 = time.perf_counter()
    gen.prepare()
    build_s = time.perf_counter() - t0
    objects = len(gc.get_objects())
    first_ms = _full_collection_ms()
    frozen, second_ms = freeze_startup_heap()  # what the live process does before serving
    full_ms = [first_ms, second_ms]
    after_ms = _full_collection_ms()
    row = {
        "weights": args.weights,
        "engine": args.engine,
        "dtype": args.dtype,
        "batch_sizes": buckets,
        "build_s": round(build_s, 1),
        "tracked_objects": objects,
        "full_collection_ms": [round(x, 1) for x in full_ms],
        "frozen_objects": frozen,
        "after_freeze_ms": round(after_ms, 3),
        **environment(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_rows([row], args.out, "gc_heap.jsonl")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
