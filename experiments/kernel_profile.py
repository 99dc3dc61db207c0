"""Kernel time by kind (convolution, matmul, attention, norm, pointwise, ...) per stage and batch.

For each engine and batch size: build the stages, profile ``--iters`` calls of the UNet and of
the VAE decoder, and classify every kernel (:mod:`musetalk_rt.workbench.kernels`). Each kind's
time is set beside the stage's counted work, so the rows say how fast the convolutions run
against the card's matrix peak and how much time goes to everything that is not matrix work.
One JSONL row per (engine, batch) into ``<out>/kernel_profile.jsonl``; a table, then one JSON
line last.

    python experiments/kernel_profile.py --engines eager,compile --batch-sizes 1,4,16,32 \
        --weights synthetic --device cuda --dtype fp16

``--phase-upsample`` and ``--channels-last-norm`` add the engine rewrites
(:mod:`musetalk_rt.engines.rewrites`); the GFLOP and TFLOP/s columns stay the reference's work
(a rewrite that does less work shows as a higher rate). The compile engine is profiled without
CUDA graphs (``cuda_graphs=False``: the same kernels,
visible to the profiler); its freezing and channels-last settings are the bench defaults unless
``--no-freezing``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from musetalk_rt.bench import environment, write_rows
from musetalk_rt.weights import load_models
from musetalk_rt.workbench.kernels import format_breakdown, kernel_breakdown
from musetalk_rt.workbench.profile import make_generator


@contextlib.contextmanager
def _turn(lock_path: str | None):
    """Hold an exclusive lock on ``lock_path`` (no lock when None)."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="eager,compile", help="comma-separated engine names")
    p.add_argument("--batch-sizes", default="1,4,16,32")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--iters", type=int, default=10, help="profiled calls per stage")
    p.add_argument("--weights", default="synthetic", choices=("real", "synthetic", "tiny"))
    p.add_argument("--models-dir", default="models")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-freezing", action="store_true", help="compile without freezing")
    p.add_argument("--phase-upsample", action="store_true", help="compile/aoti rewrite")
    p.add_argument("--channels-last-norm", action="store_true", help="compile rewrite")
    p.add_argument("--out", default="out/kernel_profile")
    p.add_argument(
        "--lock",
        metavar="FILE",
        help="profile and write while holding this file's lock (processes that build at once "
        "then take turns on the GPU, so no kernel shares the card with another process's)",
    )
    args = p.parse_args(argv)
    import torch

    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    models = load_models(args.weights, args.models_dir, torch.device(args.device))
    env = environment(models.device)
    rows = []
    for engine in args.engines.split(","):
        opts = {}
        if engine == "compile":
            opts = {"cuda_graphs": False, "freezing": not args.no_freezing}
            opts |= {"channels_last_norm": True} if args.channels_last_norm else {}
        if engine in ("compile", "aoti") and args.phase_upsample:
            opts["phase_upsample"] = True
        tag = "".join(f"_{k}" for k in ("phase_upsample", "channels_last_norm") if opts.get(k))
        t0 = time.perf_counter()
        gen = make_generator(models, engine, args.dtype, batches, opts, log=lambda _: None)
        build_s = time.perf_counter() - t0
        print(f"{engine}: built {len(batches)} bucket(s) in {build_s:.0f} s", flush=True)
        for b in batches:
            with _turn(args.lock):
                stages = kernel_breakdown(gen, b, args.iters)
            print(format_breakdown(f"{engine} {args.dtype} B{b}", stages), flush=True)
            rows.append(
                {
                    "scenario": f"kernels_{engine}{tag}_{args.dtype}_b{b}",
                    "engine": engine,
                    "engine_options": opts,
                    "build_s": round(build_s, 1),
                    "dtype": args.dtype,
                    "batch": b,
                    "weights": models.kind,
                    "iters": args.iters,
                    "stages": stages,
                    "kernel_ms": round(sum(s["ms"] for s in stages.values()), 4),
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **env,
                }
            )
        del gen
        if models.device.type == "cuda":
            torch.cuda.empty_cache()
    with _turn(args.lock):
        path = write_rows(rows, Path(args.out), "kernel_profile.jsonl")
    summary = {
        "kernel_profile": str(path),
        "rows": [
            {
                "scenario": r["scenario"],
                "batch": r["batch"],
                "kernel_ms": r["kernel_ms"],
                "fps_kernels_only": round(r["batch"] / r["kernel_ms"] * 1000.0, 1),
                "conv_tflops": {
                    st: s["kinds"].get("conv", {}).get("tflops") for st, s in r["stages"].items()
                },
            }
            for r in rows
        ],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
