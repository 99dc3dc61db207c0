"""What fp8 (e4m3) would cost in quality, per group of layers, before any fp8 kernel is written.

The issue's list of levers names "fp8 where the gate allows". An fp8 convolution or matmul on
a Hopper card multiplies e4m3 operands and accumulates in fp32; its error is the rounding of
the two operands. This probe simulates exactly that on the CPU in fp32: each chosen layer's
weight is rounded to e4m3 with one scale per output channel, its input to e4m3 with one scale
per tensor (the amax of that very input: the best case for a static, calibrated scale), and the
product is computed in fp32. Everything else stays fp32, so a row's PSNR is the fp8 rounding's
cost alone, measured as the quality gate measures it (decoded uint8 faces against the fp32
reference on the gate's fresh inputs, PSNR >= 40 dB to pass).

Each row also says which share of the reference's FLOPs its layers carry, the most an fp8
kernel could halve. One JSON line per row, then a summary line.

    python experiments/fp8_quality.py --weights synthetic --batch 2 --fp16-row --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

E4M3_MAX = 448.0


def fake_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round ``x / scale`` to float8 e4m3 and back (saturating at +-448)."""
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale


def _weight_scale(w: torch.Tensor) -> torch.Tensor:
    # one scale per output channel: [C_out, 1, ...]
    amax = w.abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    return (amax / E4M3_MAX).view(-1, *([1] * (w.dim() - 1)))


def fake_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (the calibration row: what the fp16 engines' operands lose)."""
    return x.to(torch.float16).to(x.dtype)


def quantize_layers(layers: list[nn.Module], fmt: str = "e4m3") -> list:
    """Round the layers' weights in place and their inputs on every call; returns the hooks.

    Args:
        layers: Conv2d / Linear modules.
        fmt: ``e4m3`` (scaled as the module docstring says) or ``fp16`` (unscaled).
    """
    hooks = []
    for m in layers:
        w = m.weight.data
        m.weight.data = fake_e4m3(w, _weight_scale(w)) if fmt == "e4m3" else fake_fp16(w)

        def pre(_mod, args):
            x = args[0]
            if fmt != "e4m3":
                return (fake_fp16(x), *args[1:])
            s = (x.detach().abs().amax().clamp_min(1e-12) / E4M3_MAX).to(x.dtype)
            return (fake_e4m3(x, s), *args[1:])

        hooks.append(m.register_forward_pre_hook(pre))
    return hooks


def count_flops(module: nn.Module, run) -> dict[str, float]:
    """Multiply-add FLOPs (x2) of every Conv2d / Linear in ``module`` during ``run()``."""
    flops: dict[str, float] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):

            def h(mod, _a, out, name=name):
                k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                flops[name] = flops.get(name, 0.0) + 2.0 * out.numel() * k

            hooks.append(m.register_forward_hook(h))
        elif isinstance(m, nn.Linear):

            def h(mod, a, out, name=name):
                flops[name] = flops.get(name, 0.0) + 2.0 * out.numel() * mod.in_features

            hooks.append(m.register_forward_hook(h))
    run()
    for hk in hooks:
        hk.remove()
    return flops


FORMATS = {
    "e4m3": "e4m3, weight scale per output channel, input scale per tensor (its amax)",
    "fp16": "fp16 operands (no scale), fp32 products",
}


# row name -> (stage, predicate on the layer's qualified name and module)
def _conv(name, m):
    return isinstance(m, nn.Conv2d)


def _linear(name, m):
    return isinstance(m, nn.Linear)


ROWS = {
    "vae: every conv": ("vae", _conv),
    "vae: up blocks 2-3 (128 and 256 px)": (
        "vae",
        lambda n, m: _conv(n, m) and n.startswith(("decoder.up_blocks.2.", "decoder.up_blocks.3.")),
    ),
    "vae: up block 3 (256 px)": (
        "vae",
        lambda n, m: _conv(n, m) and n.startswith("decoder.up_blocks.3."),
    ),
    "vae: up blocks 0-1 and mid (32-64 px)": (
        "vae",
        lambda n, m: (
            _conv(n, m)
            and n.startswith(("decoder.up_blocks.0.", "decoder.up_blocks.1.", "decoder.mid_block."))
        ),
    ),
    "unet: every linear": ("unet", _linear),
    "unet: every conv": ("unet", _conv),
    "unet: linear + conv": ("unet", lambda n, m: _conv(n, m) or _linear(n, m)),
    "both: every conv and linear": ("both", lambda n, m: _conv(n, m) or _linear(n, m)),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="synthetic", choices=("synthetic", "tiny"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234, help="the fresh inputs' seed (the gate's)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    p.add_argument("--out", help="also append the rows to OUT/fp8_quality.jsonl")
    p.add_argument(
        "--fp16-row",
        action="store_true",
        help="first a row rounding every conv and linear to fp16 (calibrates the figures)",
    )
    args = p.parse_args(argv)
    wanted = [(r, "e4m3") for r in args.rows.split(",") if r]
    for row, _ in wanted:
        if row not in ROWS:
            p.error(f"unknown row {row!r}; choose from: {', '.join(ROWS)}")

    from musetalk_rt.bench import environment, write_rows
    from musetalk_rt.engines.parity import PSNR_GATE_DB, psnr_u8, relative_error
    from musetalk_rt.modeling.networks import UNetStep, VaeDecodeStep
    from musetalk_rt.stages.to_host import images_to_uint8
    from musetalk_rt.weights import load_models

    torch.set_grad_enabled(False)
    models = load_models(args.weights, device="cpu")
    unet, vae = UNetStep(models.unet), VaeDecodeStep(models.vae)
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.batch, 8, 32, 32, generator=g)  # [B, 8, 32, 32]
    audio = torch.randn(args.batch, 50, 384, generator=g)  # [B, 50, 384]

    t0 = time.perf_counter()
    ref_lat = unet(latents, audio)  # [B, 4, 32, 32]
    ref_img = images_to_uint8(vae(ref_lat))  # [B, 256, 256, 3] uint8
    ref_s = time.perf_counter() - t0
    flops_u = count_flops(models.unet, lambda: unet(latents, audio))
    flops_v = count_flops(models.vae, lambda: vae(ref_lat))
    total = sum(flops_u.values()) + sum(flops_v.values())
    print(
        f"reference: {args.weights}, batch {args.batch}, {ref_s:.1f} s, "
        f"conv+linear GFLOP per frame: unet {sum(flops_u.values()) / args.batch / 1e9:.1f}, "
        f"vae {sum(flops_v.values()) / args.batch / 1e9:.1f}",
        file=sys.stderr,
    )

    env = environment(torch.device("cpu"))
    results = []
    if args.fp16_row:
        wanted.insert(0, ("both: every conv and linear", "fp16"))
    for row, fmt in wanted:
        stage, pick = ROWS[row]
        # fresh fp32 copies for every row: the rounding edits weights in place
        m = load_models(args.weights, device="cpu")
        chosen, share = [], 0.0
        for st, mod, fl in (("unet", m.unet, flops_u), ("vae", m.vae, flops_v)):
            if stage not in (st, "both"):
                continue
            for name, layer in mod.named_modules():
                # only layers a frame runs through (the VAE's encoder is not one of them)
                if pick(name, layer) and fl.get(name, 0.0) > 0:
                    chosen.append(layer)
                    share += fl.get(name, 0.0)
        quantize_layers(chosen, fmt)
        lat = UNetStep(m.unet)(latents, audio)
        img = images_to_uint8(VaeDecodeStep(m.vae)(lat))
        res = {
            "row": row if fmt == "e4m3" else f"{row} ({fmt})",
            "layers": len(chosen),
            "flop_share": round(share / total, 4),
            "latent_rel_err": round(relative_error(ref_lat, lat), 6),
            "psnr_db": round(psnr_u8(ref_img, img), 2),
            "weights": args.weights,
            "batch": args.batch,
            "format": FORMATS[fmt],
        }
        res["passed"] = math.isfinite(res["latent_rel_err"]) and res["psnr_db"] >= PSNR_GATE_DB
        res.update(env)
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.out:
        write_rows(results, Path(args.out), "fp8_quality.jsonl")
    best = max(
        (r for r in results if r["passed"] and r["format"] == FORMATS["e4m3"]),
        key=lambda r: r["flop_share"],
        default=None,
    )
    print(
        json.dumps(
            {
                "fp8_quality": len(results),
                "gate_db": PSNR_GATE_DB,
                "largest_passing_share": best and best["flop_share"],
                "largest_passing_row": best and best["row"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
