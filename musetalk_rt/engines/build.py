"""``musetalk-rt engines build|list``: build the model stages once, gate them, cache them.

A build compiles (or primes from the cache) the ``unet`` and ``vae_decode`` stages for every
bucket, checks each bucket against fp32 eager on fresh inputs (the 40 dB PSNR gate), and stores
the engine files under ``<models_dir>/engines/`` only when every bucket passes. ``render`` and
``bench`` then find them by key and skip the slow part of the build.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musetalk_rt.engines.base import parse_dtype, select_engine
from musetalk_rt.engines.parity import check_parity
from musetalk_rt.errors import UserError
from musetalk_rt.stages import UNetStage, VaeDecodeStage, reference_stages

STAGES = ("unet", "vae_decode")


def check_batch_sizes(batch_sizes: list[int]) -> list[int]:
    """``batch_sizes`` if there is one and each is positive; else one clear error."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("--batch-sizes needs positive integers")
    return batch_sizes


def check_stages(stages: tuple[str, ...]) -> tuple[str, ...]:
    """``stages`` if each is one of :data:`STAGES` (and there is one); else one clear error."""
    if not stages or set(stages) - set(STAGES):
        raise UserError(f"--stages {','.join(stages)}: choose from {', '.join(STAGES)}")
    return stages


@dataclass
class BuildResult:
    """What ``engines build`` did."""

    engine: str
    dtype: str
    buckets: list[int]
    cache: dict[str, str | None]  # stage -> hit | partial | miss
    build_s: dict[str, float]  # stage -> seconds over all buckets
    quality: dict[int, dict]  # bucket -> parity
    # stage -> engine-cache folders written (one per bucket for aoti/trt; none: all loaded)
    stored: dict[str, list[str]] = field(default_factory=dict)
    first_frame_s: float = 0.0  # from the start of the build to the first frame out

    @property
    def passed(self) -> bool:
        return all(q["passed"] for q in self.quality.values())


def build_engines(
    models,
    engine: str,
    dtype: str,
    batch_sizes: list[int],
    engine_options: dict | None = None,
    cache_root: Path | None = None,
    log: Callable[[str], None] = print,
    stages: tuple[str, ...] = STAGES,
) -> BuildResult:
    """Build, gate and cache the model stages (see the module docstring).

    ``stages``: which to build (default both). A stage left out runs as the fp32 reference in
    the gate, so one stage can be built (and gated) alone — e.g. the UNet and the VAE decoder
    in two processes at once, when each build takes minutes.
    """
    check_batch_sizes(batch_sizes)
    check_stages(stages)
    device = models.device
    torch_dtype = parse_dtype(dtype)
    eng, reason = select_engine(engine, device, torch_dtype, fix_hint="", **(engine_options or {}))
    log(f"engine {engine}/{dtype}: {reason}")
    t0 = time.perf_counter()
    every = {  # (a stage object only wraps its module: nothing is built until prepare)
        "unet": UNetStage(models.unet, eng, torch_dtype, device),
        "vae_decode": VaeDecodeStage(models.vae, eng, torch_dtype, device),
    }
    built = {name: st for name, st in every.items() if name in stages}
    reports = {
        name: st.prepare(batch_sizes, cache_root=cache_root, weights_fingerprint=models.fingerprint)
        for name, st in built.items()
    }
    first_frame_s = 0.0
    ref_unet, ref_vae = reference_stages(models, batch_sizes)
    cand = {"unet": ref_unet, "vae_decode": ref_vae, **built}  # left out: the reference
    quality = {}
    for b in sorted(set(batch_sizes)):
        q = check_parity(
            ref_unet.run, ref_vae.run, cand["unet"].run, cand["vae_decode"].run, b, device
        )
        if not first_frame_s:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_frame_s = time.perf_counter() - t0
        quality[b] = q.as_dict()
        log(
            f"  bucket {b}: PSNR {q.psnr_db} dB, latent error {q.latent_rel_err:.2e}"
            f" ({'pass' if q.passed else 'FAIL'})"
        )
    result = BuildResult(
        engine=eng.name,
        dtype=dtype,
        buckets=sorted(set(batch_sizes)),
        cache={n: r.cache for n, r in reports.items()},
        build_s={n: round(sum(r.build_s.values()), 2) for n, r in reports.items()},
        quality=quality,
        first_frame_s=round(first_frame_s, 2),
    )
    if cache_root is None:
        return result
    if not result.passed:
        log("quality gate failed: nothing stored in the engine cache")
        return result
    for name, st in built.items():
        if reports[name].cache == "hit":
            result.stored[name] = []
            continue
        folders = st.store_cache(
            cache_root,
            batch_sizes,
            models.fingerprint,
            {"build_s": result.build_s[name], "quality": quality, "reason": reason},
        )
        result.stored[name] = [str(f) for f in folders]
        if not folders:
            log(f"  {name}: this engine/backend leaves nothing to cache")
    return result
