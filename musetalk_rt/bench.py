"""Benchmarks: engine x dtype x batch scenarios of the GPU half (UNet + VAE decode).

Each scenario builds the engine for its buckets (build time reported apart), checks parity
against fp32 eager on fresh inputs, then times the steady state: CUDA events on the GPU,
``perf_counter`` on the CPU, median and p95 over many iterations. Rows are JSONL under
``experiments/results/<date>_<gpu>_<sha>/``; the command prints a table for people and ends
with one JSON line for scripts.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

import musetalk_rt
from musetalk_rt.engines import parse_dtype, select_engine
from musetalk_rt.engines.parity import check_parity
from musetalk_rt.stages import UNetStage, VaeDecodeStage, reference_stages
from musetalk_rt.weights import Models

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_state(root: Path = REPO_ROOT) -> tuple[str, bool]:
    """``(short sha, dirty)`` of the checkout, or ``("nogit", False)``.

    ``MUSETALK_RT_GIT_SHA`` overrides it, for copies of a checkout that carry no ``.git``.
    """
    if os.environ.get("MUSETALK_RT_GIT_SHA"):
        return os.environ["MUSETALK_RT_GIT_SHA"], False
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "nogit", False


def environment(device: torch.device) -> dict:
    """Hardware and software facts every row carries."""
    import diffusers

    env = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "musetalk_rt": musetalk_rt.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        try:
            env["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, IndexError, subprocess.TimeoutExpired):
            env["driver"] = "unknown"
    else:
        env["gpu"] = f"cpu ({platform.processor() or platform.machine()})"
        env["driver"] = None
    sha, dirty = git_state()
    env["git_sha"], env["git_dirty"] = sha, dirty
    return env


def results_dir(base: Path, env: dict) -> Path:
    """``<base>/<date>_<gpu>_<sha>/``."""
    gpu = "".join(c if c.isalnum() else "-" for c in env["gpu"].lower()).strip("-")
    while "--" in gpu:
        gpu = gpu.replace("--", "-")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return base / f"{date}_{gpu[:40]}_{env['git_sha']}{'-dirty' if env['git_dirty'] else ''}"


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _time_step(
    step: Callable[[], None], device: torch.device, warmup: int, iters: int
) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _measure(
    unet, vae, batch: int, device: torch.device, warmup: int, iters: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Time the UNet alone, the VAE decode alone, and both chained (ms per call)."""
    g = torch.Generator().manual_seed(batch)
    latents = torch.randn(batch, 8, 32, 32, generator=g).to(device)  # [B, 8, 32, 32]
    audio = torch.randn(batch, 50, 384, generator=g).to(device)  # [B, 50, 384]
    with torch.inference_mode():
        pred = unet.run(latents, audio).clone()  # [B, 4, 32, 32]
        per_stage = {
            "unet": _time_step(lambda: unet.run(latents, audio), device, warmup, iters),
            "vae_decode": _time_step(lambda: vae.run(pred), device, warmup, iters),
        }
        total = _time_step(lambda: vae.run(unet.run(latents, audio)), device, warmup, iters)
    return per_stage, total


def run_bench(
    models: Models,
    engines: list[str],
    dtypes: list[str],
    batch_sizes: list[int],
    warmup: int = 3,
    iters: int = 20,
    engine_options: dict | None = None,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    cache_root: Path | None = None,
) -> list[dict]:
    """Run every engine x dtype x batch scenario; return one row per scenario.

    Args:
        models: Reference models (fp32) on the benchmark device.
        engines: Engine names.
        dtypes: Dtype names.
        batch_sizes: Batch sizes (each one a bucket).
        warmup: Untimed iterations after the build.
        iters: Timed iterations.
        engine_options: Per-engine constructor options, ``{"compile": {"backend": …}}``.
        log: Progress lines.
        on_row: Called with each row as soon as it is measured (so a crash keeps the rows).
        cache_root: ``models_dir`` whose engine cache primes builds (build_s then shows it).
    """
    device = models.device
    env = environment(device)
    ref_unet, ref_vae = reference_stages(models, batch_sizes)
    rows = []
    for engine_name in engines:
        for dtype_name in dtypes:
            dtype = parse_dtype(dtype_name)
            opts = (engine_options or {}).get(engine_name, {})
            engine, reason = select_engine(engine_name, device, dtype, **opts)
            unet = UNetStage(models.unet, engine, dtype, device)
            vae = VaeDecodeStage(models.vae, engine, dtype, device)
            log(f"building {engine_name}/{dtype_name} for batches {batch_sizes} …")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rep_u = unet.prepare(batch_sizes, cache_root, models.fingerprint)
            rep_v = vae.prepare(batch_sizes, cache_root, models.fingerprint)
            for b in batch_sizes:
                quality = check_parity(ref_unet.run, ref_vae.run, unet.run, vae.run, b, device)
                per_stage, total = _measure(unet, vae, b, device, warmup, iters)
                p50 = statistics.median(total)
                row = {
                    "scenario": f"{engine_name}-{dtype_name}-b{b}",
                    "stages": "unet+vae_decode",
                    "engine": engine_name,
                    "engine_reason": f"{reason}; {rep_u.reason}",
                    "dtype": dtype_name,
                    "batch": b,
                    "p50_ms": round(p50, 3),
                    "p95_ms": round(_percentile(total, 0.95), 3),
                    "fps": round(b * 1000.0 / p50, 1),
                    "unet_p50_ms": round(statistics.median(per_stage["unet"]), 3),
                    "vae_decode_p50_ms": round(statistics.median(per_stage["vae_decode"]), 3),
                    "peak_mem_mb": (
                        round(torch.cuda.max_memory_allocated(device) / 2**20)
                        if device.type == "cuda"
                        else None
                    ),
                    "build_s": round(rep_u.build_s.get(b, 0.0) + rep_v.build_s.get(b, 0.0), 2),
                    "engine_cache": rep_u.cache,
                    "quality": quality.as_dict(),
                    "weights": models.kind,
                    "weights_fingerprint": models.fingerprint,
                    "iters": iters,
                    "device": str(device),
                    **env,
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                rows.append(row)
                if on_row:
                    on_row(row)
                log(
                    f"  {row['scenario']}: {row['p50_ms']} ms, {row['fps']} fps, "
                    f"PSNR {quality.psnr_db} dB"
                )
            unet = vae = None  # free this engine's copies before the next one
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def write_rows(rows: list[dict], out_dir: Path, name: str = "bench.jsonl") -> Path:
    """Append rows as JSON lines to ``out_dir/name``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def table(rows: list[dict]) -> str:
    """A human-readable table of bench rows."""
    head = (
        f"{'scenario':<24}{'p50 ms':>9}{'p95 ms':>9}{'fps':>8}{'unet':>8}{'vae':>8}"
        f"{'build s':>9}{'PSNR dB':>9}{'lat err':>10}{'mem MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        q = r["quality"]
        lines.append(
            f"{r['scenario']:<24}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['fps']:>8.1f}"
            f"{r['unet_p50_ms']:>8.2f}{r['vae_decode_p50_ms']:>8.2f}{r['build_s']:>9.1f}"
            f"{q['psnr_db']:>9.2f}{q['latent_rel_err']:>10.2e}{r['peak_mem_mb'] or 0:>8}"
        )
    if rows:
        r = rows[0]
        lines.append(
            f"device {r['gpu']}, torch {r['torch']}, weights {r['weights']} "
            f"(random: speed only), git {r['git_sha']}{'+dirty' if r['git_dirty'] else ''}"
        )
    return "\n".join(lines)
