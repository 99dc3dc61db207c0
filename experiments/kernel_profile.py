"""Kernel time by kind (convolution, matmul, attention, norm, pointwise, ...) per stage and batch.

For each engine and batch size: build the stages, profile ``--iters`` calls of the UNet and of
the VAE decoder, and classify every kernel (:mod:`musetalk_rt.workbench.kernels`). Each kind's
time is set beside the stage's counted work, so the rows say how fast the convolutions run
against the card's matrix peak and how much time goes to everything that is not matrix work.
One JSONL row per (engine, batch) into ``<out>/kernel_profile.jsonl``, written as each is done;
a table, then one JSON line last.

    python experiments/kernel_profile.py --engines eager,compile --batch-sizes 1,4,16,32 \
        --weights synthetic --device cuda --dtype fp16 --compile-freezing

The engine options are the CLI's (``--compile-freezing``, ``--phase-upsample``,
``--channels-last-norm``, ...); the GFLOP and TFLOP/s columns stay the reference's work (a
rewrite that does less work shows as a higher rate). The compile engine is profiled without
CUDA graphs (the same kernels, visible to the profiler). ``--gpu-turns DIR --gpu-peers N`` lets
N processes build at once and profile one at a time after all have built, as ``bench`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from musetalk_rt.bench import GpuTurns, building, environment, write_rows
from musetalk_rt.cli import _engine_options, add_probe_options
from musetalk_rt.engines.base import check_autotune_stages
from musetalk_rt.weights import load_models
from musetalk_rt.workbench.kernels import format_breakdown, kernel_breakdown
from musetalk_rt.workbench.profile import make_generator

REWRITES = ("phase_upsample", "channels_last_norm")


def rewrite_tag(opts: dict) -> str:
    """The rewrites and tuned stages in ``opts`` for a scenario name, e.g. ``_phase_upsample``.

    A rewrite recorded as ``True`` (the upsampler's first form, or the norm rewrite) is its name
    alone; another value follows it. Stages in ``autotune_stages`` end it (``_autotune_unet``).
    """
    tag = "".join(
        f"_{k}" + ("" if opts[k] is True else f"_{opts[k]}") for k in REWRITES if opts.get(k)
    )
    stages = check_autotune_stages(opts.get("autotune_stages") or ())
    return tag + ("_autotune_" + "+".join(stages) if stages else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="eager,compile", help="comma-separated engine names")
    p.add_argument("--batch-sizes", default="1,4,16,32")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--iters", type=int, default=10, help="profiled calls per stage")
    add_probe_options(p, out="out/kernel_profile")
    args = p.parse_args(argv)
    import torch

    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    models = load_models(args.weights, args.models_dir, torch.device(args.device))
    env = environment(models.device)
    turns = GpuTurns(Path(args.gpu_turns), args.gpu_peers) if args.gpu_turns else None
    if turns is not None:
        turns.limit_memory(models.device)
    rows = []
    for engine in args.engines.split(","):
        opts = {} if engine == "eager" else _engine_options(args)
        if engine != "eager":  # (compile, and aoti since it captures by default)
            opts["cuda_graphs"] = False  # the same kernels, each visible to the profiler
        tag = rewrite_tag(opts)
        t0 = time.perf_counter()
        with building(turns):  # a failed build marks this process ready for its peers
            gen = make_generator(models, engine, args.dtype, batches, opts, log=lambda _: None)
            build_s = time.perf_counter() - t0
            print(f"{engine}: built {len(batches)} bucket(s) in {build_s:.0f} s", flush=True)
        for b in batches:
            with turns.turn() if turns is not None else contextlib.nullcontext():
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
                    "gpu_turns": turns.as_dict() if turns is not None else None,
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    **env,
                }
            )
            write_rows(rows[-1:], Path(args.out), "kernel_profile.jsonl")
        del gen
        if models.device.type == "cuda":
            torch.cuda.empty_cache()
    summary = {
        "kernel_profile": str(Path(args.out) / "kernel_profile.jsonl"),
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
