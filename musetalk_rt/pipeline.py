"""Offline render: a WAV and a prepared avatar -> an MP4 with the input audio, in sync.

It uses the same stage objects as the live system: audio features -> ``unet`` ->
``vae_decode`` -> ``to_host`` -> ``blend`` -> H.264/AAC encode. Video frame ``f`` shows audio
time ``f / 25`` s; the audio track is the input itself, so sync holds by construction.

With ``streaming`` the clip takes the live path instead: sent in 20 ms chunks through the
streaming resampler, the incremental feature extractor and voice activity, whose speech gate
shows the avatar's own frame in silence (no GPU work) and cross-fades at each switch. Rendering
one clip both ways compares the two paths end to end.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musetalk_rt.audio import FPS, AudioFeatureExtractor, num_frames_for
from musetalk_rt.audio.incremental import StreamingConfig
from musetalk_rt.avatar.store import Avatar
from musetalk_rt.engines import EngineReport, parse_dtype, select_engine
from musetalk_rt.errors import UserError
from musetalk_rt.stages import (
    BlendStage,
    FrameBatch,
    StageClock,
    ToHostStage,
    UNetStage,
    VaeDecodeStage,
    crossfade,
)
from musetalk_rt.weights import Models


class FaceGenerator:
    """The GPU half of the pipeline: ``unet`` -> ``vae_decode`` -> ``to_host``.

    Args:
        models: Reference models.
        engine: Engine name (``eager``, ``compile``, …).
        dtype: ``fp32``, ``fp16`` or ``bf16``.
        batch_sizes: Buckets to prepare.
        fallback: Engine to use when ``engine`` cannot run here.
        engine_options: Passed to the engine constructor.
        log: Progress lines.
        blocking_wait: Wait for a batch's faces asleep in the driver instead of spinning on a
            core (:class:`~musetalk_rt.stages.ToHostStage`'s ``blocking``; CUDA only).
        fallback_options: Defaults for the fallback engine's constructor.
    """

    def __init__(
        self,
        models: Models,
        engine: str = "eager",
        dtype: str = "fp32",
        batch_sizes: list[int] | tuple[int, ...] = (8,),
        fallback: str | None = None,
        engine_options: dict | None = None,
        log: Callable[[str], None] = print,
        blocking_wait: bool = False,
        fallback_options: dict | None = None,
    ):
        self.models = models
        self.device = models.device
        self.log = log
        torch_dtype = parse_dtype(dtype)
        eng, self.reason = select_engine(
            engine,
            self.device,
            torch_dtype,
            fallback=fallback,
            log=log,
            fallback_options=fallback_options,
            **(engine_options or {}),
        )
        self.engine_name, self.dtype_name = eng.name, dtype  # the engine in use (after fallback)
        self.unet = UNetStage(models.unet, eng, torch_dtype, self.device)
        self.vae = VaeDecodeStage(models.vae, eng, torch_dtype, self.device)
        self.to_host = ToHostStage(self.device, blocking=blocking_wait)
        self.batch_sizes = sorted(set(batch_sizes))
        self.reports: list[EngineReport] = []

    def missing_prebuilt(self, cache_root: Path | None) -> dict[str, list[int]]:
        """Buckets of each stage whose ahead-of-time engine (``aoti``, ``trt``) is not cached.

        The cache must match the buckets, dtype, weights and GPU; engines that build at start
        (``eager``, ``compile``) never miss anything. Returns stage -> missing buckets (only
        stages that miss some).
        """
        if not self.unet.engine.prebuilt:
            return {}
        if cache_root is None:
            return {st.name: list(self.batch_sizes) for st in (self.unet, self.vae)}
        fp = self.models.fingerprint
        missing = {
            st.name: st.cache_entries(self.batch_sizes, cache_root, fp)[1]
            for st in (self.unet, self.vae)
        }
        return {name: buckets for name, buckets in missing.items() if buckets}

    def prepare(
        self, cache_root: Path | None = None, build_command: str | None = None
    ) -> list[EngineReport]:
        """Build both model stages for the buckets; returns their engine reports.

        Args:
            cache_root: ``models_dir`` whose engine cache primes the build when it holds a
                matching engine (None: no cache).
            build_command: When given, an ahead-of-time engine missing from the cache is an
                error that prints this command, instead of a build of minutes here.

        Raises:
            UserError: ``build_command`` was given and the prebuilt engine is missing.
        """
        missing = self.missing_prebuilt(cache_root) if build_command else {}
        if missing:

            def at(buckets: list[int]) -> str:
                return f"batch size{'s' if len(buckets) > 1 else ''} {','.join(map(str, buckets))}"

            if len({tuple(b) for b in missing.values()}) == 1:  # the same buckets for each
                what = f"{' and '.join(missing)} at {at(next(iter(missing.values())))}"
            else:
                what = " and ".join(f"{name} at {at(b)}" for name, b in missing.items())
            raise UserError(
                f"no prebuilt {self.engine_name}/{self.dtype_name} engine for {what} in "
                f"{Path(cache_root or '.') / 'engines'} (for these weights and this GPU); "
                f"build it first: {build_command}"
            )
        fp = self.models.fingerprint
        self.reports = []
        for stage in (self.unet, self.vae):
            if self.engine_name != "eager":  # a build of seconds to minutes: say what it is at
                self.log(
                    f"engine: preparing {stage.name} ({self.engine_name}/{self.dtype_name}, "
                    f"buckets {','.join(map(str, self.batch_sizes))}) …"
                )
            self.reports.append(stage.prepare(self.batch_sizes, cache_root, fp))
        for r in self.reports:
            r.reason = f"{r.reason}; chosen: {self.reason}"
        return self.reports

    def report_lines(self) -> list[str]:
        """One line per model stage saying what its engine got (after :meth:`prepare`)."""
        pairs = zip((self.unet, self.vae), self.reports, strict=True)
        return [f"engine ({st.name}): {r.summary()}" for st, r in pairs]

    def launch(self, batch: FrameBatch, clock: StageClock) -> FrameBatch:
        """Queue the batch's GPU work (``unet``, ``vae_decode``, the copy out) without waiting.

        :meth:`finish` collects the faces; at most two batches may be in flight.
        """
        with clock.stage("unet"):
            self.unet(batch)
        with clock.stage("vae_decode"):
            self.vae(batch)
        with clock.stage("to_host", on_host=True):
            self.to_host.start(batch)
        return batch

    def finish(self, batch: FrameBatch, clock: StageClock) -> FrameBatch:
        """Wait for a launched batch; sets ``batch.faces`` (host uint8)."""
        with clock.stage("to_host", on_host=True):
            self.to_host.finish(batch)
        return batch

    def __call__(self, batch: FrameBatch, clock: StageClock) -> FrameBatch:
        return self.finish(self.launch(batch, clock), clock)


@dataclass
class RenderReport:
    """What a render did and where the time went."""

    out: str
    frames: int
    audio_s: float
    wall_s: float
    stage_ms: dict[str, float]
    engines: list[dict]
    weights: str
    batch_size: int
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [
            f"wrote {self.out}: {self.frames} frames at {FPS} fps, audio {self.audio_s:.2f} s",
            self.weights,
            *(
                f"engine {e['engine']}/{e['dtype']} [{name}]: {e['reason']}"
                for name, e in zip(("unet", "vae_decode"), self.engines, strict=False)
            ),
        ]
        w = max([16, *(len(name) + 2 for name in self.stage_ms)])  # ("prepare(engine build)")
        lines.append(f"{'stage':<{w}}{'total ms':>12}{'ms/frame':>12}")
        for name, ms in self.stage_ms.items():
            lines.append(f"{name:<{w}}{ms:>12.1f}{ms / max(self.frames, 1):>12.2f}")
        fps = self.frames / self.wall_s if self.wall_s else 0.0
        lines.append(f"wall {self.wall_s:.2f} s ({fps:.1f} frames/s, batch {self.batch_size})")
        if self.extra.get("streaming"):
            e = self.extra
            lines.append(
                f"streaming path: {e['streaming']}; {e['speech_frames']} speech frames, "
                f"{e['idle_frames']} idle (no GPU); extractor "
                + ", ".join(f"{k} {v}" for k, v in e["extractor"].items())
            )
        return "\n".join(lines)


def render(
    models: Models,
    avatar: Avatar,
    audio_path: str | Path,
    out_path: str | Path,
    engine: str = "eager",
    dtype: str = "fp32",
    batch_size: int = 8,
    fallback: str | None = None,
    engine_options: dict | None = None,
    log: Callable[[str], None] = print,
    streaming: StreamingConfig | None = None,
    engine_cache: Path | None = None,
    build_command: str | None = None,
    encode_thread: bool | None = None,
    x264_preset: str = "veryfast",
) -> RenderReport:
    """Render ``audio_path`` spoken by ``avatar`` into ``out_path`` (H.264 + AAC MP4).

    Args:
        models: Reference models (the engine transforms copies of them).
        avatar: A prepared avatar (made with the same weights).
        audio_path: Speech audio, any rate, mono or stereo.
        out_path: Output MP4.
        engine: Engine name.
        dtype: Compute dtype name.
        batch_size: Frames per GPU step (the one bucket built).
        fallback: Engine used when ``engine`` cannot run here.
        engine_options: Engine constructor options.
        log: Progress lines.
        streaming: Run the audio through the streaming path with this configuration (None:
            the offline extractor, no voice-activity gate).
        engine_cache: ``models_dir`` whose ``engines/`` may hold prebuilt engines.
        build_command: Refuse an ahead-of-time engine missing from ``engine_cache`` and print
            this command (see :meth:`FaceGenerator.prepare`).
        encode_thread: Encode in a thread of its own while the next batch runs
            (:class:`~musetalk_rt.media.BackgroundWriter`); None: when the models run on a GPU.
            The stage table's ``encode_wait`` is the part of the encoding the render waited for.
        x264_preset: x264 speed preset of the video.

    Raises:
        UserError: Bad audio, an avatar prepared with other weights, a bad batch size or x264
            preset, a missing prebuilt engine.
    """
    from musetalk_rt.media import (
        X264_PRESETS,
        BackgroundWriter,
        InlineWriter,
        Mp4Writer,
        load_audio,
    )

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if x264_preset not in X264_PRESETS:  # before minutes of engine build, not after
        raise UserError(
            f"unknown x264 preset {x264_preset!r}; choose one of {', '.join(X264_PRESETS)}"
        )
    if avatar.manifest["weights"]["fingerprint"] != models.fingerprint:
        raise UserError(
            f"avatar {avatar.avatar_id!r} was prepared with {avatar.manifest['weights']['kind']} "
            f"weights ({avatar.manifest['weights']['fingerprint']}), not these "
            f"({models.fingerprint}); re-run `musetalk-rt avatar prepare --id {avatar.avatar_id} "
            f"--weights {models.kind} --force --source …`"
        )
    t_start = time.perf_counter()
    clip = load_audio(audio_path)
    audio_16k = clip.to_mono_16k()
    n_frames = num_frames_for(len(audio_16k))
    if n_frames == 0:
        raise UserError(f"{audio_path} is shorter than one video frame (40 ms)")

    clock = StageClock(models.device)
    gen = FaceGenerator(models, engine, dtype, [batch_size], fallback, engine_options, log)
    t0 = time.perf_counter()
    reports = gen.prepare(engine_cache, build_command)
    prepare_s = time.perf_counter() - t0

    weights = None  # per-frame talk weight (streaming only)
    extra = {}
    with clock.stage("audio_features"):
        if streaming is None:
            windows = AudioFeatureExtractor(models.whisper, models.feature_extractor).windows(
                audio_16k
            )  # [F, 50, 384] on the device
        else:
            windows, weights, extra = _streamed_features(models, clip, streaming)
            if len(windows) != n_frames:
                raise RuntimeError(f"streaming path gave {len(windows)} frames, not {n_frames}")
    latents_all = avatar.latents.to(models.device)  # [N, 8, 32, 32]
    blend = BlendStage(avatar)
    w, h = avatar.size
    meta = {"comment": models.describe(), "encoder": "musetalk_rt"}
    encode_timer = functools.partial(clock.stage, "encode", on_host=True)
    if encode_thread is None:  # a model on the CPU would only take turns with x264 for its cores
        encode_thread = torch.device(models.device).type == "cuda"
    with (
        Mp4Writer(out_path, w, h, fps=FPS, audio=clip, preset=x264_preset, metadata=meta) as mp4,
        (
            BackgroundWriter(mp4, max_frames=max(32, 2 * batch_size), on_encode=encode_timer)
            if encode_thread  # x264 encodes in its own thread while the GPU runs the next batch
            else InlineWriter(mp4, on_encode=encode_timer)
        ) as writer,
    ):
        for start in range(0, n_frames, batch_size):
            ids = list(range(start, min(start + batch_size, n_frames)))
            talk = [f for f in ids if weights is None or weights[f] > 0]
            out = {f: avatar.frames[avatar.cycle_frame(f)] for f in ids}
            if talk:  # silent frames skip the GPU: the avatar's own frame is shown
                cyc = [avatar.cycle_frame(f) for f in talk]
                batch = FrameBatch(talk, cyc, latents=latents_all[cyc], audio=windows[talk])
                gen(batch, clock)
                with clock.stage("blend", on_host=True):
                    blend(batch)
                    for f, frame in zip(talk, batch.frames, strict=True):
                        out[f] = frame if weights is None else crossfade(out[f], frame, weights[f])
            for f in ids:
                writer.write(out[f])
        written = writer.close()
        encode_wait_s = writer.waited_s
    wall = time.perf_counter() - t_start
    return RenderReport(
        out=str(out_path),
        frames=written,
        audio_s=clip.duration_s,
        wall_s=wall,
        stage_ms={
            **clock.totals_ms(),
            "prepare(engine build)": prepare_s * 1000.0,
            "encode_wait": encode_wait_s * 1000.0,  # the part of encode the render waited for
        },
        engines=[r.as_dict() for r in reports],
        weights=models.describe(),
        batch_size=batch_size,
        extra=extra,
    )


def _streamed_features(
    models: Models, clip, config: StreamingConfig
) -> tuple[torch.Tensor, list[float], dict]:
    """The live audio path over a whole clip: windows ``[F, 50, 384]``, talk weights, stats."""
    from musetalk_rt.audio.check import run_streaming_path
    from musetalk_rt.audio.vad import SpeechGate

    run = run_streaming_path(clip, models.whisper, models.feature_extractor, config)
    gate = SpeechGate()
    weights = [
        gate.step(run.vad.is_speech((f + 0.5) * 1000.0 / FPS)) for f in range(len(run.windows))
    ]
    extra = {
        "streaming": config.describe(),
        "speech_frames": sum(w > 0 for w in weights),
        "idle_frames": sum(w == 0 for w in weights),
        "extractor": run.extractor.stats.as_dict(),
        "input": run.input_stats,
    }
    return run.windows, weights, extra
