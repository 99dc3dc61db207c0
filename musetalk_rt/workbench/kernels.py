"""Where the GPU time of a model stage goes, kernel by kernel, against the work it does.

The engines issue asks where time goes at batch 1, 4, 16 and 32 before guessing at fixes. Stage
times (:mod:`musetalk_rt.workbench.profile`) say *which* stage; this module says *what kind of
kernel* inside it: convolutions, matrix products, attention, norms (reductions), pointwise,
memory layout changes and copies. Each kind's time is set beside the floating-point work the
stage's reference module does (counted by ``torch.utils.flop_counter`` at batch 1 and scaled by
the batch; an engine rewrite that does less work shows as a higher rate), so a row reads "the
VAE's convolutions run at N TFLOP/s" — the number to compare with the card's matrix peak.
Convolution and matmul kernels are also split by the architecture their names carry (``sm90``
Hopper warp-group kernels against older ``sm80``/``s16816`` ones): a cuDNN heuristic that picks
an Ampere kernel on a Hopper card leaves half the card unused.

On CUDA the kernels come from ``torch.profiler``'s device activity; an engine that replays a
CUDA graph hides its kernels from the profiler on some versions, so profile the compile and
aoti engines with ``cuda_graphs=False`` (same kernels, launched one by one). On the CPU
(tests, tiny weights) the "kernels" are the ATen operators' self times, classified the same way.
"""

from __future__ import annotations

import torch

from musetalk_rt.stages import FrameBatch

KINDS = ("conv", "gemm", "attention", "norm", "pointwise", "layout", "copy", "other")

# (kind, name fragments), checked in order on the lower-cased kernel or operator name
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "scaled_dot_product", "sdpa")),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("copy", ("memcpy", "memset", "direct_copy", "aten::copy_", "aten::clone", "aten::contiguous")),
    ("conv", ("fprop", "conv", "implicit_gemm", "cudnn")),
    (
        "gemm",
        (
            "gemm",
            "nvjet",
            "cutlass",
            "cublas",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "aten::linear",
            "aten::matmul",
        ),
    ),
    ("norm", ("norm", "moments", "softmax", "reduce")),
    (
        "pointwise",
        (
            "elementwise",
            "vectorized",
            "pointwise",
            "aten::silu",
            "aten::relu",
            "aten::add",
            "aten::mul",
            "aten::sub",
            "aten::div",
            "aten::sigmoid",
            "aten::gelu",
            "aten::cat",
            "aten::upsample",
            "upsample",
            "aten::tanh",
            "aten::clamp",
            "aten::pad",
            "aten::fill_",
        ),
    ),
)

# the flop counter's operators by kind (everything it counts is one of these)
_FLOP_KINDS = {"convolution": "conv", "scaled_dot_product": "attention"}


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel or ATen operator name (one of :data:`KINDS`).

    Inductor's generated kernels are named by their template: ``triton_poi_*`` pointwise,
    ``triton_red_*``/``triton_per_*`` reductions (group norms, softmax), ``triton_tem_*``
    templates (a convolution or a matmul chosen by max-autotune). Their names also list the
    fused ops (``triton_poi_fused_convolution_0`` adds a convolution's bias), so the prefix
    decides before any fragment does.
    """
    n = name.lower()
    if n.startswith("triton_poi"):
        return "pointwise"
    if n.startswith(("triton_red", "triton_per")):
        return "norm"
    if n.startswith("triton_tem"):
        return "conv" if "conv" in n else "gemm"
    for kind, frags in _RULES:
        if any(f in n for f in frags):
            return kind
    return "other"


def kernel_arch(name: str) -> str | None:
    """``sm90`` for a Hopper (warp-group) kernel, ``sm80`` for an Ampere-style one, else None."""
    n = name.lower()
    if "sm90" in n or "wgmma" in n or "warpgroup" in n:
        return "sm90"
    if "sm80" in n or "s16816" in n or "ampere" in n or "sm86" in n:
        return "sm80"
    return None


def flops_per_frame(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Floating-point operations of one call of ``module`` by kind, per batch item.

    Args:
        module: A reference stage module (``UNetStep``, ``VaeDecodeStep``) on any device.
        inputs: Its inputs at batch 1.

    Returns:
        ``{"conv": n, "gemm": n, "attention": n}`` (kinds the counter knows; missing = 0).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(*inputs)
    out: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        name = str(op)
        kind = next((k for frag, k in _FLOP_KINDS.items() if frag in name), "gemm")
        out[kind] = out.get(kind, 0) + int(n)
    return out


def random_batch(batch_size: int, device: torch.device) -> FrameBatch:
    """A batch of random model-stage inputs (the GPU stages' shapes; no avatar needed)."""
    return FrameBatch(
        list(range(batch_size)),
        list(range(batch_size)),
        latents=torch.randn(batch_size, 8, 32, 32).to(device),  # [B, 8, 32, 32]
        audio=torch.randn(batch_size, 50, 384).to(device),  # [B, 50, 384]
        pred_latents=torch.randn(batch_size, 4, 32, 32).to(device),  # [B, 4, 32, 32]
    )


def profile_calls(run, batch: FrameBatch, iters: int, device: torch.device):
    """``torch.profiler`` (CPU, and CUDA on a GPU) over ``iters`` calls after one warm call."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode():
        run(batch)  # warm
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(iters):
                run(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    return prof


def _kernel_times_us(prof, device: torch.device) -> dict[str, float]:
    """Total time by kernel name: device kernels on CUDA, ATen self times on the CPU."""
    from torch.autograd import DeviceType

    times: dict[str, float] = {}
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            t = e.device_time_total
        else:
            if not e.name.startswith("aten::"):
                continue
            t = e.self_cpu_time_total
        times[e.name] = times.get(e.name, 0.0) + t
    return times


def stage_breakdown(stage, run, batch: FrameBatch, iters: int, device: torch.device) -> dict:
    """One stage's kernel time by kind, per call, with achieved TFLOP/s where work is counted.

    Args:
        stage: The model stage (its reference ``module`` and ``example_inputs`` give the FLOPs).
        run: ``FrameBatch -> FrameBatch`` running the stage's engine.
        batch: Inputs at the batch size to profile.
        iters: Profiled calls (after one warm call).
        device: Where it runs.

    Returns:
        ``{"ms": total, "kinds": {kind: {"ms", "share", "gflop", "tflops"}}, "top": [...],
        "sm90_share": {...}}`` — milliseconds per call, FLOPs per call.
    """
    b = len(batch.frame_ids)
    times = _kernel_times_us(profile_calls(run, batch, iters, device), device)
    total_us = sum(times.values()) or 1.0
    flops = flops_per_frame(stage.module, stage.example_inputs(1))
    kinds: dict[str, dict] = {}
    arch_us: dict[str, dict[str, float]] = {"conv": {}, "gemm": {}}
    for name, us in times.items():
        kind = kernel_kind(name)
        k = kinds.setdefault(kind, {"ms": 0.0})
        k["ms"] += us / 1000.0 / iters
        if kind in arch_us:
            a = kernel_arch(name) or "unknown"
            arch_us[kind][a] = arch_us[kind].get(a, 0.0) + us
    for kind, k in kinds.items():
        k["share"] = round(k["ms"] * 1000.0 * iters / total_us, 4)
        if kind in flops:
            k["gflop"] = round(flops[kind] * b / 1e9, 3)
            k["tflops"] = round(flops[kind] * b / (k["ms"] / 1000.0) / 1e12, 2) if k["ms"] else None
        k["ms"] = round(k["ms"], 4)
    top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
    return {
        "ms": round(total_us / 1000.0 / iters, 4),
        "gflop": round(sum(flops.values()) * b / 1e9, 3),
        "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["ms"])),
        # None where no kernel of that kind names an architecture (the CPU, say)
        "sm90_share": {
            kind: round(a.get("sm90", 0.0) / sum(a.values()), 4) if set(a) - {"unknown"} else None
            for kind, a in arch_us.items()
        },
        "top": [
            {"kernel": name[:160], "kind": kernel_kind(name), "ms": round(us / 1000.0 / iters, 4)}
            for name, us in top
        ],
    }


def kernel_breakdown(gen, batch_size: int, iters: int = 10) -> dict[str, dict]:
    """:func:`stage_breakdown` of ``gen``'s UNet and VAE decode at one of its buckets.

    Args:
        gen: A prepared :class:`~musetalk_rt.pipeline.FaceGenerator`.
        batch_size: One of ``gen.batch_sizes``.
        iters: Profiled calls per stage.

    Returns:
        ``{"unet": ..., "vae_decode": ...}``.
    """
    device = gen.device
    b = random_batch(batch_size, device)
    return {
        "unet": stage_breakdown(gen.unet, gen.unet, b, iters, device),
        "vae_decode": stage_breakdown(gen.vae, gen.vae, b, iters, device),
    }


def format_breakdown(label: str, stages: dict[str, dict]) -> str:
    """A few lines per stage: kinds by time, with share and TFLOP/s; the top three kernels."""
    lines = []
    for name, s in stages.items():
        lines.append(f"{label} {name}: {s['ms']:.3f} ms kernel time, {s['gflop']:.1f} GFLOP")
        for kind, k in s["kinds"].items():
            rate = f", {k['tflops']:.3g} TFLOP/s" if k.get("tflops") else ""
            lines.append(f"  {kind:<10} {k['ms']:8.3f} ms {100 * k['share']:5.1f}%{rate}")
        arch = ", ".join(f"{k} {v:.0%}" for k, v in s["sm90_share"].items() if v is not None)
        if arch:
            lines.append(f"  Hopper (sm90) kernels' share of time: {arch}")
        for t in s["top"][:3]:
            lines.append(f"  top: {t['ms']:.3f} ms {t['kind']:<9} {t['kernel'][:90]}")
    return "\n".join(lines)
