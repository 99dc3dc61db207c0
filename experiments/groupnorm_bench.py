"""Group norm + SiLU on the VAE decoder's channels-last shapes: inductor against a Triton kernel.

The kernel profile of the compiled VAE decoder at batch 32 on an H200 (experiments/LOG.md,
2026-12-02 night) spent 18.7 ms of 48.3 in group norms and pointwise kernels whose traffic needs
~5.5 ms at the card's bandwidth, and rewriting the norm's statistics as per-channel reductions
(``--channels-last-norm``) did not help under inductor. This experiment measures the candidate
fix on its own before it goes into an engine: a Triton kernel that reads channels-last tiles
(``[pixels, all channels]``, coalesced) and writes per-tile group means and centred second
moments; the tiles merge exactly (Chan's parallel formula) in a few small torch ops, and the
scale-and-shift with SiLU is one compiled pointwise pass.

Variants per shape (``[B, C, H, W]`` fp16 channels-last, 32 groups, as in the decoder):

* ``eager`` — ``F.silu(F.group_norm(x))``;
* ``inductor`` — the same under ``torch.compile`` (what the compile engine runs today);
* ``inductor_channel_stats`` — :class:`~musetalk_rt.engines.rewrites.ChannelsLastGroupNorm`
  + SiLU under ``torch.compile`` (its statistics in the engine's form: since rewrite version 3
  over 256-pixel chunks; the rows of 2026-12-02 had one reduction over all pixels);
* ``triton_tiles`` — the kernel below + a compiled merge and apply (CUDA, or the Triton
  interpreter with ``TRITON_INTERPRET=1`` on the CPU for correctness only).

Each row: median ms per call (CUDA events behind a queued GPU sleep, as ``bench`` times the GPU
alone; wall clock on the CPU), the bandwidth at three passes of the tensor (two
reads, one write: what any two-pass norm needs), and the largest error against fp32 eager. One
JSONL row per (shape, variant) into ``<out>/groupnorm_bench.jsonl``; a table, one JSON line last.

    python experiments/groupnorm_bench.py --batch 32 --out out/gn

Measured on an H200 (experiments/LOG.md, 2026-12-02 afternoon): inductor's norm + SiLU alone
runs at 1.8–2.6 TB/s at batch 32 and this Triton kernel at 0.35–1.3 TB/s — the kernel lost, and
the decoder's slow norms are slow in their context, not alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F  # noqa: N812

from musetalk_rt.bench import _time_step

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU torch wheel brings no triton; the other variants still run
    triton = None

GROUPS = 32
EPS = 1e-6
# (channels, side) of the decoder's group norms at 256x256 output, largest traffic last
VAE_SHAPES = ((512, 32), (512, 64), (512, 128), (256, 128), (256, 256), (128, 256))


if triton is not None:

    @triton.jit
    def _group_tiles(
        x_ptr,  # [B, P, C] (a channels-last [B, C, H, W] tensor, P = H * W)
        mean_ptr,  # [B, T, G] float32 out: each tile's group means
        m2_ptr,  # [B, T, G] float32 out: each tile's centred second moments
        P,
        T,
        G: tl.constexpr,
        CG: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1)
        C: tl.constexpr = G * CG
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, C)
        inside = (p < P)[:, None]
        x = tl.load(x_ptr + b * P * C + p[:, None] * C + c[None, :], mask=inside, other=0.0)
        x = x.to(tl.float32)  # [BLOCK_P, C]
        n = (tl.minimum(P - t * BLOCK_P, BLOCK_P) * CG).to(tl.float32)  # values per group
        mean = tl.sum(tl.reshape(tl.sum(x, axis=0), (G, CG)), axis=1) / n  # [G]
        mean_c = tl.reshape(tl.broadcast_to(mean[:, None], (G, CG)), (C,))  # [C]
        d = tl.where(inside, x - mean_c[None, :], 0.0)
        m2 = tl.sum(tl.reshape(tl.sum(d * d, axis=0), (G, CG)), axis=1)  # [G]
        out = (b * T + t) * G + tl.arange(0, G)
        tl.store(mean_ptr + out, mean)
        tl.store(m2_ptr + out, m2)


def tile_statistics(x: torch.Tensor, groups: int, block_p: int = 32):
    """Per-tile group means and centred second moments of a channels-last ``[B, C, H, W]``.

    Returns:
        ``(mean [B, T, G], m2 [B, T, G], counts [T])`` float32; ``counts`` are values per group
        in each tile.
    """
    b, c, h, w = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("tile_statistics needs a channels-last tensor")
    if c % groups or (c // groups) & (c // groups - 1) or groups & (groups - 1):
        raise ValueError(f"{c} channels in {groups} groups: powers of two only")
    p = h * w
    t = triton.cdiv(p, block_p)
    mean = torch.empty(b, t, groups, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    _group_tiles[(b, t)](x, mean, m2, p, t, G=groups, CG=c // groups, BLOCK_P=block_p)
    counts = torch.full((t,), float(block_p * (c // groups)), device=x.device)
    counts[-1] = (p - (t - 1) * block_p) * (c // groups)
    return mean, m2, counts


def merge_and_apply(x, mean_t, m2_t, counts, weight, bias, eps: float = EPS):
    """Merge tile statistics (Chan's formula), then ``silu(x * scale + shift)`` per channel."""
    b, c = x.shape[:2]
    g = mean_t.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)  # fp16 -> fp32; fp64 stays (tests)
    mean_t, m2_t, counts = mean_t.to(acc), m2_t.to(acc), counts.to(acc)
    total = counts.sum()
    mean = (mean_t * counts[None, :, None]).sum(1) / total  # [B, G]
    m2 = m2_t.sum(1) + (counts[None, :, None] * (mean_t - mean[:, None]).square()).sum(1)
    rstd = torch.rsqrt(m2 / total + eps)  # [B, G]
    scale = rstd[:, :, None] * weight.to(acc).view(g, -1)  # [B, G, C/G]
    shift = bias.to(acc).view(g, -1) - mean[:, :, None] * scale
    y = x.to(acc) * scale.reshape(b, c, 1, 1) + shift.reshape(b, c, 1, 1)
    return F.silu(y).to(x.dtype)


def variants(weight, bias, device: torch.device) -> dict:
    """The variants as ``x -> y`` callables (those this host can run)."""
    from musetalk_rt.engines.rewrites import ChannelsLastGroupNorm

    def eager(x):
        return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))

    norm = torch.nn.GroupNorm(GROUPS, weight.numel(), eps=EPS).to(device, weight.dtype)
    norm.weight.data.copy_(weight)
    norm.bias.data.copy_(bias)
    channel_stats = ChannelsLastGroupNorm(norm)
    out = {
        "eager": eager,
        "inductor": torch.compile(eager, fullgraph=True, dynamic=False),
        "inductor_channel_stats": torch.compile(
            lambda x: F.silu(channel_stats(x)), fullgraph=True, dynamic=False
        ),
    }
    if triton is not None:
        apply = torch.compile(merge_and_apply, fullgraph=True, dynamic=False)

        def triton_tiles(x):
            return apply(x, *tile_statistics(x, GROUPS), weight, bias)

        out["triton_tiles"] = triton_tiles
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--shapes", help="C:side,... (default: the VAE decoder's)")
    p.add_argument("--variants", help="comma-separated subset of the variant names")
    p.add_argument("--out", default="out/groupnorm_bench")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shapes = (
        [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
        if args.shapes
        else VAE_SHAPES
    )
    rows = []
    for c, side in shapes:
        g = torch.Generator().manual_seed(c + side)
        x = (torch.randn(args.batch, c, side, side, generator=g) * 2 + 0.5).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = (torch.rand(c, generator=g) + 0.5).to(device, dtype)
        bias = torch.randn(c, generator=g).to(device, dtype)
        ref = F.silu(F.group_norm(x.float(), GROUPS, weight.float(), bias.float(), EPS))
        fns = variants(weight, bias, device)
        for name, fn in fns.items():
            if args.variants and name not in args.variants.split(","):
                continue
            with torch.inference_mode():
                err = (fn(x).float() - ref).abs().max().item()
                # GPU time: a queued GPU sleep hides the host's launches (bench's timing)
                step = functools.partial(fn, x)
                ms = statistics.median(_time_step(step, device, 5, args.iters, gpu_bound=True))
            gbs = 3 * x.numel() * x.element_size() / (ms / 1000.0) / 1e9
            rows.append(
                {
                    "scenario": f"groupnorm_silu_{name}",
                    "variant": name,
                    "shape": [args.batch, c, side, side],
                    "dtype": args.dtype,
                    "ms": round(ms, 4),
                    "gb_s_at_3_passes": round(gbs, 1),
                    "max_abs_err_vs_fp32": err,
                    "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__,
                }
            )
            r = rows[-1]
            print(
                f"{str(r['shape']):>22} {name:<24} {ms:8.3f} ms {gbs:8.1f} GB/s  err {err:.2e}",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "groupnorm_bench.jsonl").open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    totals: dict[str, float] = {}
    for r in rows:
        totals[r["variant"]] = totals.get(r["variant"], 0.0) + r["ms"]
    print(
        json.dumps(
            {
                "groupnorm_bench": str(out / "groupnorm_bench.jsonl"),
                "ms_all_shapes": {k: round(v, 3) for k, v in totals.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
