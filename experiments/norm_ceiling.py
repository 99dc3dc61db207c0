"""How much of the VAE decoder's time could a group-norm prologue in its convolutions save?

On an H100 batch 32 is bound by the card's 700 W and batch 4 by the decoder's 5.4 ms: only less
work per frame moves either. A kernel profile (experiments/LOG.md, 2026-12-02 night) put 39% of
the decoder's time in group norms and pointwise kernels, most of it memory traffic: each norm
reads its input for the statistics, reads it again to normalise, and writes the result that
SiLU and then cuDNN's convolution read once more. A convolution that normalised and activated
its input as it loads it (a prologue) would keep the statistics pass and drop the rest; cuDNN's
convolutions are outside inductor's fusions, so that needs a kernel of our own. Before writing
one, this probe bounds what it could give. It builds the decoder with the engine's options four
times and times each at every batch size:

- ``as_is``: the decoder as the engine builds it;
- ``affine_only``: every group norm's statistics dropped (``x * weight + bias`` per channel):
  the statistics' share;
- ``no_norm``: every group norm gone: statistics and the normalising pass;
- ``no_norm_no_silu``: the SiLUs gone too: everything a prologue would take in.

The variants compute nothing meaningful (speed only, no quality gate): the prologue would save
at most ``affine_only`` minus ``no_norm_no_silu`` (the statistics stay) and at least nothing.

On an H100 (LOG.md, 2026-12-05 18:40) the statistics were most of it, the prologue's share
almost nothing. Four more variants (not in the default set) time forms of the statistics,
each the same function up to rounding (``engines.rewrites.channel_stats``, tested against
``nn.GroupNorm``): every group norm becomes the channels-last norm with its statistics reduced
as ``stats_welford`` (one Welford reduction over all pixels: the engine's form until rewrite
version 3), ``stats_sums`` (sum and sum of squares, shifted), ``stats_split`` (Welford over
chunks of ``--split-pixels`` pixels, default 256, then merged: the engine's form since) or
``stats_split_sums``. With ``--channels-last-norm`` (the default ``NC_ARGS``), ``as_is`` is
the engine's form.
Ends with one JSON line; rows go to ``<out>/norm_ceiling.jsonl``. ``--gpu-turns DIR --gpu-peers
N`` lets N processes (a variant each, ``--variants``) build at once and time one at a time, as
``bench`` does (``gpu_runs.sh norm-ceiling``).

    python experiments/norm_ceiling.py --batch-sizes 4,32 --weights synthetic --device cuda \
        --compile-freezing --compile-graph-capture manual --phase-upsample transpose \
        --channels-last-norm
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from musetalk_rt.engines.rewrites import SPLIT_PIXELS, STATS_FORMS

CEILINGS = ("as_is", "affine_only", "no_norm", "no_norm_no_silu")  # the default set
STATS = {f"stats_{form}": form for form in STATS_FORMS}  # variant -> channel_stats form
VARIANTS = CEILINGS + tuple(STATS)


def norm_stats(variant: str, channels_last_norm: bool, split_pixels: int) -> dict:
    """How ``variant``'s group norms reduce their statistics, for its row.

    ``as_is`` keeps the engine's: its channels-last norm's form with ``--channels-last-norm``,
    the library's group norm without; the other ceilings have no statistics.
    """
    if variant in STATS:
        form = STATS[variant]
    elif variant == "as_is":
        form, split_pixels = ("split" if channels_last_norm else "library"), SPLIT_PIXELS
    else:
        form = None
    split = form is not None and form.startswith("split")
    return {"norm_stats": form, "split_pixels": split_pixels if split else None}


def strip(vae, variant: str, split_pixels: int = SPLIT_PIXELS) -> int:
    """Rewrite ``vae``'s decoder in place for ``variant``; returns how many modules changed."""
    from torch import nn

    from musetalk_rt.engines.rewrites import ChannelsLastGroupNorm

    class Affine(nn.Module):
        """A group norm's per-channel scale and shift without its statistics."""

        def __init__(self, norm: nn.GroupNorm):
            super().__init__()
            self.weight, self.bias = norm.weight, norm.bias

        def forward(self, x):  # [B, C, H, W] (or [B, C, L])
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return x * self.weight.view(shape) + self.bias.view(shape)

    changed = 0
    if variant == "as_is":
        return changed
    for parent in list(vae.decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm and variant in STATS:
                setattr(parent, name, ChannelsLastGroupNorm(child, STATS[variant], split_pixels))
                changed += 1
            elif type(child) is nn.GroupNorm:
                setattr(parent, name, Affine(child) if variant == "affine_only" else nn.Identity())
                changed += 1
            elif type(child) is nn.SiLU and variant == "no_norm_no_silu":
                setattr(parent, name, nn.Identity())
                changed += 1
    return changed


def main(argv: list[str] | None = None) -> int:
    from musetalk_rt.cli import add_probe_options

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", default="compile", choices=("compile", "eager"))
    p.add_argument("--batch-sizes", default="4,32")
    p.add_argument("--dtype", default="fp16")
    p.add_argument(
        "--variants", default=",".join(CEILINGS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    p.add_argument("--iters", type=int, default=50)
    p.add_argument(
        "--split-pixels",
        type=int,
        default=SPLIT_PIXELS,
        help="pixels per chunk of the stats_split* variants",
    )
    add_probe_options(p, out="out/norm_ceiling")
    args = p.parse_args(argv)
    if args.split_pixels < 1:
        p.error(f"--split-pixels must be at least 1, not {args.split_pixels}")
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    from musetalk_rt.errors import UserError

    try:
        return _run(args, variants)
    except UserError as e:
        print(f"norm_ceiling: {e}", file=sys.stderr)
        return e.exit_code


def _run(args, variants: list[str]) -> int:
    import torch

    from musetalk_rt.bench import GpuTurns, building, environment, write_rows
    from musetalk_rt.cli import _engine_options
    from musetalk_rt.engines import parse_dtype, select_engine
    from musetalk_rt.stages import VaeDecodeStage
    from musetalk_rt.weights import load_models

    device = torch.device(args.device)
    batches = sorted({int(b) for b in args.batch_sizes.split(",")})
    models = load_models(args.weights, args.models_dir, device)
    dtype = parse_dtype(args.dtype)
    opts = _engine_options(args) if args.engine == "compile" else {}
    env = environment(device)
    turns = GpuTurns(Path(args.gpu_turns), args.gpu_peers) if args.gpu_turns else None
    if turns is not None:
        turns.limit_memory(device)
    rows = []
    for variant in variants:
        vae = copy.deepcopy(models.vae)
        changed = strip(vae, variant, args.split_pixels)
        engine, _ = select_engine(args.engine, device, dtype, fix_hint="", **opts)
        stage = VaeDecodeStage(vae, engine, dtype, device)
        with building(turns):
            report = stage.prepare(batches)
        for b in batches:
            with turns.turn() if turns is not None else contextlib.nullcontext():
                step_ms, gpu_ms = _time_decode(stage.run, b, device, args.iters)
            row = {
                "probe": "norm_ceiling",
                "variant": variant,
                "modules_changed": changed,
                **norm_stats(variant, bool(opts.get("channels_last_norm")), args.split_pixels),
                "engine": args.engine,
                "engine_options": engine.row_options(device),
                "dtype": args.dtype,
                "batch": b,
                "vae_decode_p50_ms": round(statistics.median(step_ms), 3),
                "vae_decode_gpu_p50_ms": round(statistics.median(gpu_ms), 3),
                "build_s": report.build_s.get(b),
                "gpu_turns": turns.as_dict() if turns is not None else None,
                "weights": models.kind,
                **env,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            rows.append(row)
            bound = (
                f" (GPU-bound {row['vae_decode_gpu_p50_ms']:.3f})" if device.type == "cuda" else ""
            )
            print(
                f"{variant:<16} B{b:<3} {row['vae_decode_p50_ms']:>8.3f} ms{bound}, "
                f"{changed} modules changed",
                flush=True,
            )
        stage = vae = None  # this variant's engine and copy go before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_rows(rows, Path(args.out), "norm_ceiling.jsonl")
    print(
        json.dumps(
            {
                "norm_ceiling": {
                    f"{r['variant']}_b{r['batch']}": r["vae_decode_gpu_p50_ms"] for r in rows
                },
                "device": str(device),
            }
        )
    )
    return 0


def _time_decode(run, batch: int, device, iters: int) -> tuple[list[float], list[float]]:
    """Milliseconds of ``run`` on one fresh batch of latents: each step, and GPU-bound (CUDA)."""
    import torch

    from musetalk_rt.bench import _time_step

    g = torch.Generator().manual_seed(batch)
    latents = torch.randn(batch, 4, 32, 32, generator=g).to(device)  # [B, 4, 32, 32]
    with torch.inference_mode():
        step_ms = _time_step(lambda: run(latents), device, 5, iters)
        if device.type != "cuda":
            return step_ms, step_ms
        return step_ms, _time_step(lambda: run(latents), device, 2, iters, gpu_bound=True)


if __name__ == "__main__":
    sys.exit(main())
