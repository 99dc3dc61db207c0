"""The two model stages: ``unet`` and ``vae_decode``, each run by an engine."""

from __future__ import annotations

from pathlib import Path

import torch

from musetalk_rt.engines import cache
from musetalk_rt.engines.base import Engine, EngineReport, Runner, dtype_name
from musetalk_rt.engines.cache import EngineKey, device_identity
from musetalk_rt.modeling import UNetStep, VaeDecodeStep
from musetalk_rt.modeling.configs import AUDIO_DIM, AUDIO_TOKENS, FACE_SIZE, LATENT_SIZE
from musetalk_rt.stages.base import FrameBatch, Stage


class _ModelStage(Stage):
    def __init__(
        self,
        module: torch.nn.Module,
        engine: Engine,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
    ):
        self.module = module
        self.engine = engine.for_stage(self.name)  # per-stage options (e.g. autotune_stages)
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.runner: Runner | None = None

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError  # abstract: defined by each model stage

    def cache_key(self, batch_sizes: list[int], weights_fingerprint: str) -> EngineKey:
        """The engine-cache key of this stage built for ``batch_sizes``."""
        b = max(batch_sizes)
        return EngineKey(
            stage=self.name,
            engine=self.engine.name,
            dtype=dtype_name(self.dtype),
            buckets=tuple(sorted(set(batch_sizes))),
            weights_fingerprint=weights_fingerprint,
            input_shapes={k: list(v) for k, v in self.spec(b).items()},
            options=self.engine.cache_options(),
            device=device_identity(self.device),
        )

    def cache_entries(
        self, batch_sizes: list[int], cache_root: Path, weights_fingerprint: str
    ) -> tuple[list[Path], list[int]]:
        """The engine-cache folders holding this stage's engine for ``batch_sizes``; the rest.

        Returns the folders found and the buckets none of them holds.

        An engine whose buckets are separate files (``aoti``, ``trt``) is stored one entry per
        bucket, so buckets built apart (in parallel processes, or a bucket added later) serve
        together; an entry of exactly the set asked for (how they were stored before) counts too.
        Other engines have one entry per bucket set.
        """
        buckets = sorted(set(batch_sizes))
        sets = [[b] for b in buckets] if self.engine.per_bucket_cache else []
        if [buckets] not in sets:
            sets.append(buckets)
        folders, covered = [], set()
        for bucket_set in sets:
            if covered >= set(bucket_set):
                continue
            folder = cache.find(cache_root, self.cache_key(bucket_set, weights_fingerprint))
            if folder is not None:
                folders.append(folder)
                covered |= set(bucket_set)
        return folders, [b for b in buckets if b not in covered]

    def prepare(
        self,
        batch_sizes: list[int],
        cache_root: Path | None = None,
        weights_fingerprint: str | None = None,
    ) -> EngineReport:
        """Build the stage's engine for the buckets, primed from the engine cache when given.

        Args:
            batch_sizes: Buckets.
            cache_root: ``models_dir`` holding ``engines/``; None = no cache.
            weights_fingerprint: The weights' fingerprint (part of the key).
        """
        loaded = 0
        if cache_root is not None and weights_fingerprint is not None:
            folders, _ = self.cache_entries(batch_sizes, cache_root, weights_fingerprint)
            loaded = sum(self.engine.load_cache(folder) for folder in folders)
        self.runner = self.engine.build(
            self.module, self.example_inputs, batch_sizes, self.dtype, self.device
        )
        if cache_root is not None:
            status = "hit" if loaded else "miss"
            if loaded and self.engine.per_bucket_cache and self.runner.artifacts:
                status = "partial"  # some buckets loaded, the others built here
            self.runner.report.cache = status
        return self.runner.report

    def store_cache(
        self, cache_root: Path, batch_sizes: list[int], weights_fingerprint: str, report: dict
    ) -> list[Path]:
        """Save the built engine to the cache (call only after it passed the quality gate).

        Returns the folders written: one per bucket built here for an engine cached per bucket
        (:meth:`cache_entries`), else one for the set; none when the engine leaves no files.
        """
        files = self.engine.cache_files(self.runner)
        if not files:
            return []
        if not self.engine.per_bucket_cache:
            key = self.cache_key(batch_sizes, weights_fingerprint)
            return [cache.store(cache_root, key, files, report)]
        folders = []
        quality = report.get("quality") or {}  # bucket -> the gate's figures
        for b in sorted(set(batch_sizes)):
            name = self.engine.file_name(b)
            if name not in files:  # loaded from the cache: already stored
                continue
            entry = report | ({"quality": {b: quality[b]}} if b in quality else {})
            key = self.cache_key([b], weights_fingerprint)
            folders.append(cache.store(cache_root, key, {name: files[name]}, entry))
        return folders

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.runner is None:
            raise RuntimeError(f"stage {self.name!r} used before prepare()")
        return self.runner(*inputs)


class UNetStage(_ModelStage):
    """``[B, 8, 32, 32]`` latents + ``[B, 50, 384]`` audio -> ``[B, 4, 32, 32]`` latents."""

    name = "unet"

    def __init__(
        self, unet: torch.nn.Module, engine: Engine, dtype: torch.dtype, device: torch.device
    ):
        super().__init__(UNetStep(unet), engine, dtype, device)

    def spec(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {
            "in:latents": (batch, 8, LATENT_SIZE, LATENT_SIZE),
            "in:audio": (batch, AUDIO_TOKENS, AUDIO_DIM),
            "out:pred_latents": (batch, 4, LATENT_SIZE, LATENT_SIZE),
        }

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(self.seed + batch)
        shapes = self.spec(batch)
        return (
            torch.randn(shapes["in:latents"], generator=g).to(self.device),
            torch.randn(shapes["in:audio"], generator=g).to(self.device),
        )

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        batch.pred_latents = self.run(batch.latents, batch.audio)
        return batch


class VaeDecodeStage(_ModelStage):
    """``[B, 4, 32, 32]`` latents -> ``[B, 3, 256, 256]`` images in about [-1, 1]."""

    name = "vae_decode"

    def __init__(
        self, vae: torch.nn.Module, engine: Engine, dtype: torch.dtype, device: torch.device
    ):
        super().__init__(VaeDecodeStep(vae), engine, dtype, device)

    def spec(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {
            "in:pred_latents": (batch, 4, LATENT_SIZE, LATENT_SIZE),
            "out:images": (batch, 3, FACE_SIZE, FACE_SIZE),
        }

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(self.seed + 1000 + batch)
        return (torch.randn(self.spec(batch)["in:pred_latents"], generator=g).to(self.device),)

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        batch.images = self.run(batch.pred_latents)
        return batch


def reference_stages(models, batch_sizes: list[int]) -> tuple[UNetStage, VaeDecodeStage]:
    """The fp32 eager ``unet`` and ``vae_decode`` stages every engine is checked against."""
    from musetalk_rt.engines.base import get_engine, parse_dtype

    eager, fp32 = get_engine("eager"), parse_dtype("fp32")
    unet = UNetStage(models.unet, eager, fp32, models.device)
    vae = VaeDecodeStage(models.vae, eager, fp32, models.device)
    unet.prepare(batch_sizes)
    vae.prepare(batch_sizes)
    return unet, vae
