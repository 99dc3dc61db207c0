"""Where a batch of frames spends its time: features, UNet, VAE decode, to_host, blend, encode.

``stage_profile`` runs the real stages in the order the live worker and output run them, on the
probe's drawn face (any prepared avatar will do), and times each with CUDA events on the GPU and
the wall clock on the host. ``features`` is the whisper canvases a batch needs with the
streaming settings (one canvas per ``hop_frames`` frames), ``encode`` is H.264 zerolatency +
AAC as the live output encodes (to a null muxer, so no disk time). ``profile_trace`` saves a
``torch.profiler`` Chrome trace of one stage for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from musetalk_rt.stages import FrameBatch, StageClock

STAGES = ("features", "unet", "vae_decode", "to_host", "blend", "encode")


def probe_avatar(models, work: str | Path, avatar_id: str = "probe"):
    """Prepare (or reuse) the end-to-end probe's drawn 512x512 face under ``work``."""
    from musetalk_rt.avatar import load_avatar, parse_bbox, prepare_avatar
    from musetalk_rt.e2e.probe import PROBE_BBOX, probe_face_image

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    image = probe_face_image(work / "probe_face.png")
    box = parse_bbox(PROBE_BBOX)
    prepare_avatar(image, avatar_id, models, work / "avatars", bbox=box, log=lambda _: None)
    return load_avatar(avatar_id, work / "avatars")


def _null_writer(width: int, height: int):
    """The live output's encoder (H.264 zerolatency + AAC) muxing to FFmpeg's null muxer."""
    from musetalk_rt.live.output import AVStreamWriter

    return AVStreamWriter("null", width, height, container_format="null")


def stage_profile(
    gen,
    avatar,
    batch_sizes: tuple[int, ...] | None = None,
    iters: int = 10,
    warmup: int = 2,
    hop_frames: int = 1,
    log=print,
) -> list[dict]:
    """One row per batch size: p50 milliseconds of each stage for one batch, and frames/s.

    Args:
        gen: A prepared :class:`~musetalk_rt.pipeline.FaceGenerator` (``make_generator``).
        avatar: A loaded avatar (``probe_avatar`` makes one).
        batch_sizes: Buckets to profile (default: all of ``gen``'s).
        iters: Timed repetitions per batch size.
        warmup: Untimed repetitions first.
        hop_frames: Frames per whisper canvas (``--stream-hop``).
        log: Progress lines.
    """
    from musetalk_rt.audio.incremental import encode_canvases
    from musetalk_rt.bench import environment
    from musetalk_rt.stages.blend import BlendStage

    models, device = gen.models, gen.device
    engine, dtype = gen.engine_name, gen.dtype_name
    batch_sizes = batch_sizes or gen.batch_sizes
    blend = BlendStage(avatar)
    w, h = avatar.size
    writer = _null_writer(w, h)
    n_cycle = len(avatar.frames)
    latents_all = avatar.latents.to(device)  # [N, 8, 32, 32]
    g = torch.Generator().manual_seed(0)
    env = environment(device)
    rows = []
    for b in batch_sizes:
        canvases = [np.zeros(16000, np.float32)] * math.ceil(b / hop_frames)
        ids = [i % n_cycle for i in range(b)]
        times: dict[str, list[float]] = {s: [] for s in STAGES}
        for it in range(warmup + iters):
            t0 = time.perf_counter()
            with torch.inference_mode():
                # fp32, as the live process's shared encoder runs it
                encode_canvases(models.whisper, models.feature_extractor, canvases, torch.float32)
            feat_ms = (time.perf_counter() - t0) * 1000  # ends with a device sync
            batch = FrameBatch(
                list(range(b)),
                ids,
                latents=latents_all[ids],
                audio=torch.randn(b, 50, 384, generator=g).to(device),
            )
            clock = StageClock(device)
            with torch.inference_mode():
                gen(batch, clock)
            t0 = time.perf_counter()
            blend(batch)
            blend_ms = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            silence = np.zeros(640, np.float32)
            for frame in batch.frames:
                writer.write(frame, silence)
            enc_ms = (time.perf_counter() - t0) * 1000
            if it < warmup:
                continue
            got = clock.totals_ms()
            times["features"].append(feat_ms)
            for s in ("unet", "vae_decode", "to_host"):
                times[s].append(got.get(s, 0.0))
            times["blend"].append(blend_ms)
            times["encode"].append(enc_ms)
        p50 = {s: round(statistics.median(v), 3) for s, v in times.items()}
        total = sum(p50.values())
        row = {
            "scenario": f"stages-{engine}-{dtype}-b{b}",
            "kind": "stage_profile",
            "engine": engine,
            "dtype": dtype,
            "batch": b,
            "hop_frames": hop_frames,
            "stage_p50_ms": p50,
            "total_ms": round(total, 3),
            "fps_serial": round(b * 1000 / total, 1),
            "frame_size": [w, h],
            "weights": models.kind,
            "iters": iters,
            **env,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        }
        rows.append(row)
        log(f"  b{b}: " + ", ".join(f"{s} {v:.2f}" for s, v in p50.items()) + " ms")
    writer.close()
    return rows


def heaviest_stage(row: dict) -> str:
    """The stage with the largest p50 in a ``stage_profile`` row."""
    return max(row["stage_p50_ms"], key=row["stage_p50_ms"].get)


def make_generator(
    models,
    engine: str = "eager",
    dtype: str = "fp16",
    batch_sizes: tuple[int, ...] = (1, 4, 16),
    engine_options: dict | None = None,
    log=print,
):
    """A prepared :class:`~musetalk_rt.pipeline.FaceGenerator` (built once, profiled often)."""
    from musetalk_rt.pipeline import FaceGenerator

    gen = FaceGenerator(
        models, engine, dtype, list(batch_sizes), engine_options=engine_options, log=log
    )
    gen.prepare()
    for line in gen.report_lines():
        log(line)
    return gen


def profile_trace(gen, stage: str, path: str | Path, batch: int | None = None) -> Path:
    """Save a Chrome trace of ``unet`` or ``vae_decode`` (3 calls) at one of ``gen``'s buckets.

    Host stages (features, blend, encode) are not what the CUDA profiler is for: they trace the
    UNet instead, and the file name says which stage it holds.
    """
    from musetalk_rt.workbench.kernels import profile_calls, random_batch

    model_stage = stage if stage in ("unet", "vae_decode") else "unet"
    batch = batch or max(gen.batch_sizes)
    run = gen.unet if model_stage == "unet" else gen.vae
    prof = profile_calls(run, random_batch(batch, gen.device), 3, gen.device)
    path = Path(path)
    path = path.with_name(f"{path.stem}_{model_stage}{path.suffix or '.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return path
