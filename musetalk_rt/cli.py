"""The ``musetalk-rt`` command line (also ``python -m musetalk_rt``).

Every command exits non-zero with one clear line on bad input. Report commands print a table for
people and end with one JSON line for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from musetalk_rt.errors import OneLineParser, UserError, report_unexpected
from musetalk_rt.inductor_options import check_syntax as check_inductor_syntax


def _csv_ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return vals


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _int_at_least(low: int, text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < low:
        said = "at least 1" if low == 1 else f"{low} or more"
        raise argparse.ArgumentTypeError(f"must be {said}, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):  # NaN fails the first test
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return v


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def _non_negative_int(text: str) -> int:
    return _int_at_least(0, text)


def _results_folder(text: str) -> Path:
    """A folder for result rows, refused at once when it is a file or under one.

    Rows are appended there as each is measured; a bench would otherwise fail after its work.
    """
    path = Path(text)
    first = next((q for q in (path, *path.parents) if q.exists()), None)  # (made if missing)
    if first is not None and not first.is_dir():
        raise argparse.ArgumentTypeError(f"{first} is a file; give a folder for the rows")
    return path


def _add_common(
    p: argparse.ArgumentParser, weights_default: str = "real", test_encoder: bool = False
) -> None:
    g = p.add_argument_group("common options")
    g.add_argument(
        "--weights",
        choices=["real", "synthetic", "tiny", *(["tiny.en-test"] if test_encoder else [])],
        default=weights_default,
        help="real: the files under --models-dir; synthetic: full-size random weights "
        "(speed only, output is noise); tiny: small random model for tests"
        + (
            "; tiny.en-test: a trained English whisper (a test stand-in, not MuseTalk's)"
            if test_encoder
            else ""
        )
        + f" (default: {weights_default})",
    )
    g.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models"),
        help="root of the weights layout (default: models)",
    )
    g.add_argument(
        "--avatars-dir",
        type=Path,
        default=Path("avatars"),
        help="where prepared avatars live (default: avatars)",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1",
    )


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (try cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported; use cpu or cuda")
    return dev


def _models(args):
    from musetalk_rt.weights import load_models

    models = load_models(args.weights, args.models_dir, _device(args.device))
    print(models.describe())
    return models


# engine option key (as the engines take it) -> the options that set it (tests check that every
# key _engine_options can produce is here)
ENGINE_OPTION_DESTS: dict[str, tuple[str, ...]] = {
    "backend": ("compile_backend",),
    "mode": ("compile_mode",),
    "cuda_graphs": ("no_cuda_graphs", "aoti_cuda_graphs"),
    "channels_last": ("no_channels_last", "aoti_channels_last"),
    "freezing": ("compile_freezing",),
    "coordinate_descent": ("compile_cd_tuning",),
    "fuse_qkv": ("compile_fuse_qkv",),
    "cudnn_benchmark": ("compile_cudnn_benchmark",),
    "graph_capture": ("compile_graph_capture",),
    "weights": ("aoti_weights",),
    "max_autotune": ("aoti_max_autotune",),
    "autotune_stages": ("autotune_stages",),
    "phase_upsample": ("phase_upsample",),
    "channels_last_norm": ("channels_last_norm",),
    "inductor_config": ("inductor_config",),
}


def options_not_taken(engine: str) -> dict[str, tuple[str, ...]]:
    """The entries of :data:`ENGINE_OPTION_DESTS` that ``engine`` does not take.

    Empty for an unknown engine: selecting it is the error that names the engines.
    """
    from musetalk_rt.engines.base import available_engines, engine_parameters

    if engine not in available_engines():
        return {}
    taken = engine_parameters(engine)
    return {k: dests for k, dests in ENGINE_OPTION_DESTS.items() if k not in taken}


def _engine_options(args) -> dict:
    opts = {}
    if getattr(args, "compile_backend", None):
        opts["backend"] = args.compile_backend
    if getattr(args, "compile_mode", None) not in (None, "default"):
        opts["mode"] = args.compile_mode
    if getattr(args, "no_cuda_graphs", False):
        opts["cuda_graphs"] = False
    if getattr(args, "no_channels_last", False):
        opts["channels_last"] = False
    if getattr(args, "compile_freezing", False):
        opts["freezing"] = True
    if getattr(args, "compile_cd_tuning", False):
        opts["coordinate_descent"] = True
    if getattr(args, "compile_fuse_qkv", False):
        opts["fuse_qkv"] = True
    if getattr(args, "compile_cudnn_benchmark", False):
        opts["cudnn_benchmark"] = True
    if getattr(args, "compile_graph_capture", None) not in (None, "trees"):
        opts["graph_capture"] = args.compile_graph_capture
    if getattr(args, "aoti_weights", None):
        opts["weights"] = args.aoti_weights
    if getattr(args, "aoti_max_autotune", False):
        opts["max_autotune"] = True
    if getattr(args, "autotune_stages", None):
        opts["autotune_stages"] = args.autotune_stages
    if getattr(args, "phase_upsample", None):  # True: the first form, as rows recorded it
        opts["phase_upsample"] = args.phase_upsample == "interleave" or args.phase_upsample
    if getattr(args, "channels_last_norm", False):
        opts["channels_last_norm"] = True
    if getattr(args, "inductor_config", None):
        opts["inductor_config"] = args.inductor_config
    if getattr(args, "aoti_channels_last", False) and not getattr(args, "no_channels_last", False):
        opts["channels_last"] = True
    if getattr(args, "aoti_cuda_graphs", False) and not getattr(args, "no_cuda_graphs", False):
        opts["cuda_graphs"] = True
    return opts


def per_engine_options(engines: list[str], options: dict) -> dict[str, dict]:
    """Split the engine options among several engines (``bench --engine eager,compile,aoti``).

    Each engine gets the options its constructor takes (eager none, aoti ``freezing`` as
    compile does); an option that none of them takes is an error, never silently dropped.
    """
    from musetalk_rt.engines import get_engine
    from musetalk_rt.engines.base import engine_parameters

    per = {}
    for name in engines:
        get_engine(name)  # an unknown name: its one line listing the engines
        taken = engine_parameters(name)
        per[name] = {k: v for k, v in options.items() if k in taken}
    unused = sorted(set(options) - {k for o in per.values() for k in o})
    if unused:
        raise UserError(
            f"the engine options {', '.join(unused)} do not apply to {', '.join(engines)} "
            "(they are compile or aoti options: see --help)"
        )
    return per


def add_probe_options(p: argparse.ArgumentParser, out: str) -> None:
    """The options every GPU probe script shares: weights, device, output, GPU turns.

    Args:
        p: The script's parser.
        out: Its default output folder.
    """
    p.add_argument("--weights", default="synthetic", choices=("real", "synthetic", "tiny"))
    p.add_argument("--models-dir", default="models")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=out, type=_results_folder)
    p.add_argument("--gpu-turns", metavar="DIR", help="share the GPU with peer processes")
    p.add_argument("--gpu-peers", type=int, default=1, help="processes sharing --gpu-turns")
    _add_compile_options(p)


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compile engine options")
    g.add_argument("--compile-backend", help="torch.compile backend (default: inductor)")
    g.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode (default: reduce-overhead on CUDA, i.e. inductor's CUDA "
        "graphs, unless --no-cuda-graphs; the plain default on CPU)",
    )
    g.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="compile, aoti and trt: do not capture the compiled step (compile) or the loaded "
        "engine's call (aoti, trt) in a CUDA graph",
    )
    g.add_argument(
        "--aoti-weights",
        choices=["blob", "so"],
        help="aoti only: where a package keeps the weights — blob: one file beside a small "
        "shared object (default), so: inside the shared object",
    )
    g.add_argument(
        "--aoti-max-autotune",
        action="store_true",
        help="aoti only: let inductor time Triton templates against cuDNN/cuBLAS for every "
        "convolution and matmul while building (many minutes per bucket, paid once)",
    )
    g.add_argument(
        "--autotune-stages",
        metavar="STAGES",
        help="compile and aoti: autotune the matmuls and convolutions of these stages only, "
        "comma-separated from unet, vae_decode (compile: inductor's max_autotune_gemm, without "
        "the coordinate-descent tuning that --compile-mode max-autotune adds; aoti: its "
        "max-autotune). Measure first: at batch 4 on an H200 the UNet's templates won inductor's "
        "per-operation timings, yet the tuned UNet was slower (5.1 against 4.2 ms), after ~14 "
        "minutes of tuning that the engine cache keeps",
    )
    g.add_argument(
        "--aoti-cuda-graphs",
        action="store_true",
        help="aoti: capture each loaded package's call in a CUDA graph — the default on CUDA "
        "since the capture was fixed (2026-12-04); kept for earlier command lines, "
        "--no-cuda-graphs turns the capture off",
    )
    g.add_argument(
        "--aoti-channels-last",
        action="store_true",
        help="aoti only: weights and 4-D inputs in channels-last memory, 1x1 convolutions as "
        "matmuls (what the compile engine does on CUDA by default)",
    )
    g.add_argument(
        "--no-channels-last", action="store_true", help="keep the contiguous memory format on CUDA"
    )
    g.add_argument(
        "--compile-freezing",
        action="store_true",
        help="compile and aoti: inductor freezing — the weights folded as constants and the "
        "convolutions' weights re-laid out once at build time (inference only)",
    )
    g.add_argument(
        "--compile-cd-tuning",
        action="store_true",
        help="compile and aoti: inductor coordinate-descent tuning of every generated kernel's "
        "launch config: "
        "a first build of 6-7 min per bucket instead of 1-1.5 with three builds sharing 16 "
        "cores, 2 min again on a host with inductor's caches (H200: batch 32 "
        "+5.7%%, batch 4 +2.3%%); --compile-mode max-autotune turns it on by itself",
    )
    g.add_argument(
        "--compile-fuse-qkv",
        action="store_true",
        help="fuse each attention's q/k/v projections into one linear layer (engine's copy)",
    )
    g.add_argument(
        "--compile-cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its convolution algorithms during the build (process-wide)",
    )
    g.add_argument(
        "--phase-upsample",
        nargs="?",
        const="interleave",
        choices=["interleave", "transpose"],  # engines.rewrites.UPSAMPLE_FORMS (torch-free here)
        metavar="FORM",
        help="compile and aoti: compute each nearest-2x upsample + 3x3 conv from the small "
        "input (exact; 2.25x less work in the upsamplers, checked by the gate) — interleave "
        "(default): one 2x2 conv for the four output phases, then an interleave; transpose: "
        "one stride-2 transposed conv that writes them interleaved (before a subcommand such as "
        "e2e, write --phase-upsample=FORM)",
    )
    g.add_argument(
        "--channels-last-norm",
        action="store_true",
        help="compile and aoti: group norms reduce per channel over 256-pixel chunks, then merge "
        "into group statistics (checked by the gate; on an H100 with the chunks the VAE decoder "
        "-4-5%% at batch 32 against the unchunked form)",
    )
    g.add_argument(
        "--inductor-config",
        type=check_inductor_syntax,
        metavar="KEY=VALUE[,...]",
        help="compile and aoti: more inductor settings (torch._inductor.config keys, checked "
        "against the installed torch and part of the engine cache key), e.g. "
        "triton.enable_pdl=true (programmatic dependent launch, Hopper) or combo_kernels=true; "
        "settings an engine flag owns (freezing, ...) are refused with that flag's name",
    )
    g.add_argument(
        "--compile-graph-capture",
        choices=["trees", "manual"],
        help="CUDA graphs by inductor's cudagraph trees (default; the live process defaults to "
        "manual: its GPU worker is its own thread and the trees are per thread) or one manual "
        "torch.cuda.CUDAGraph capture per bucket around the compiled call",
    )


def engines_build_command(args, batch_sizes: list[int]) -> str:
    """The ``engines build`` command that makes the engine ``args`` asks for.

    ``render`` and ``live`` print it when an ahead-of-time engine (``aoti``, ``trt``) is missing
    from the engine cache: same engine, dtype, buckets, weights, models folder and options.
    """
    return shlex.join(engines_build_words(args, batch_sizes))  # pastable: values quoted


def engines_build_words(args, batch_sizes: list[int]) -> list[str]:
    """:func:`engines_build_command` as a list of words (for a child process)."""
    words = ["musetalk-rt", "engines", "build", "--engine", args.engine, "--dtype", args.dtype]
    words += ["--batch-sizes", ",".join(map(str, sorted(set(batch_sizes))))]
    words += ["--weights", args.weights, "--models-dir", str(args.models_dir)]
    if getattr(args, "device", None) not in (None, "auto"):
        words += ["--device", args.device]
    return words + compile_argv(args, engine=args.engine)


def compile_argv(args, engine: str | None = None) -> list[str]:
    """The compile-engine options of ``args`` as command-line words (for a child process).

    The inverse of :func:`_add_compile_options`: every option it defines that is set in
    ``args`` comes back, so a tool that starts ``musetalk_rt.live`` forwards all of them.

    Args:
        args: Parsed options.
        engine: Leave out the options this engine does not take (a live preset's compile
            capture under ``--engine aoti``, which the live process left out too).
    """
    options = argparse.ArgumentParser(add_help=False)
    _add_compile_options(options)
    foreign = options_not_taken(engine) if engine is not None else {}
    not_taken = {d for dests in foreign.values() for d in dests}
    argv: list[str] = []
    for action in options._actions:
        if action.dest in not_taken:
            continue
        value = getattr(args, action.dest, None)
        if action.nargs == 0:  # a flag
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


# ---------------------------------------------------------------------------------------------
# commands


def cmd_weights(args) -> int:
    from musetalk_rt import weights

    if args.action == "download":
        results = weights.download(args.models_dir)
    else:
        results = weights.check(args.models_dir, deep=args.deep)
    width = max(len(r.path) for r in results)
    for r in results:
        size = f"{r.size_bytes / 2**20:9.1f} MB" if r.size_bytes else " " * 12
        print(f"{r.path:<{width}}  {r.status:<8}{size}  {r.detail}")
    bad = [r for r in results if r.status != "ok"]
    print(
        json.dumps(
            {
                "weights": args.action,
                "models_dir": str(args.models_dir),
                "ok": not bad,
                "problems": [r.__dict__ for r in bad],
            }
        )
    )
    if bad:
        first = bad[0]
        print(f"error: {first.path} is {first.status}: {first.detail}", file=sys.stderr)
        return 3
    return 0


def cmd_avatar(args) -> int:
    from musetalk_rt.avatar import load_avatar, parse_bbox, prepare_avatar

    if args.action == "prepare":
        from musetalk_rt.avatar.prepare import check_prepare_inputs

        bbox = parse_bbox(args.bbox) if args.bbox else None
        # a bad id or source is its one line before the models load (seconds to minutes)
        check_prepare_inputs(args.source, args.id, bbox, args.idle)
        models = _models(args)
        path = prepare_avatar(
            args.source,
            args.id,
            models,
            args.avatars_dir,
            bbox=bbox,
            extra_margin=args.extra_margin,
            max_frames=args.max_frames,
            force=args.force,
            idle=args.idle,
        )
        print(json.dumps({"avatar": args.id, "path": str(path)}))
        return 0
    avatar = load_avatar(args.id, args.avatars_dir)
    if args.action == "check":
        from musetalk_rt.avatar.check import check_avatar

        if args.sheet and args.sheet.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            raise UserError(f"--sheet {args.sheet}: give a .png or .jpg file")
        sheet = args.sheet or Path(args.avatars_dir) / args.id / "check.png"
        rep = check_avatar(avatar, sheet)
        print(
            f"avatar {args.id}: {avatar.num_frames} frames, cycle frames "
            f"{avatar.cycle[0]}..{avatar.cycle[1] - 1}, box from {avatar.manifest['box_source']}"
        )
        print(f"box jitter: median {rep.jitter_median_px} px, max {rep.jitter_max_px} px")
        print(
            f"identity round trip: min {rep.identity_psnr_min_db} dB, "
            f"median {rep.identity_psnr_median_db} dB"
        )
        if rep.openness_p90 is not None:
            print(
                f"mouth openness: p10 {rep.openness_p10}, p90 {rep.openness_p90} "
                f"({'the source talks' if rep.source_talks else 'mouth mostly still'})"
            )
        for w in rep.warnings:
            print(f"warning: {w}")
        print(f"contact sheet: {rep.sheet}")
        print(json.dumps({"avatar_check": args.id, **rep.as_dict()}))
        return 0
    m = avatar.manifest
    print(
        f"avatar {args.id}: {avatar.num_frames} frames {m['width']}x{m['height']}, "
        f"box {avatar.boxes[0].as_list()} ({m['box_source']}), weights {m['weights']['kind']}"
    )
    print(
        json.dumps(
            {
                "avatar": args.id,
                "frames": avatar.num_frames,
                "weights": m["weights"],
                "box_source": m["box_source"],
            }
        )
    )
    return 0


def cmd_render(args) -> int:
    from musetalk_rt.avatar import load_avatar
    from musetalk_rt.media import check_mp4_path
    from musetalk_rt.pipeline import render

    if not Path(args.audio).exists():
        raise UserError(f"audio file {args.audio} does not exist")
    check_mp4_path(args.out, "--out")  # before the models load and the frames are made
    avatar = load_avatar(args.avatar, args.avatars_dir)
    models = _models(args)
    report = render(
        models,
        avatar,
        args.audio,
        args.out,
        engine=args.engine,
        dtype=args.dtype,
        batch_size=args.batch_size,
        fallback=args.fallback,
        engine_options=_engine_options(args),
        streaming=_streaming_config(args) if args.streaming else None,
        engine_cache=args.models_dir,
        build_command=engines_build_command(args, [args.batch_size]),
        x264_preset=args.x264_preset,
    )
    print(report.table())
    print(
        json.dumps(
            {
                "render": report.out,
                "frames": report.frames,
                "audio_s": report.audio_s,
                "wall_s": round(report.wall_s, 3),
                "weights": models.kind,
                "stage_ms": {k: round(v, 1) for k, v in report.stage_ms.items()},
                **({"streaming": report.extra} if report.extra else {}),
            }
        )
    )
    return 0


def _streaming_config(args):
    from musetalk_rt.audio.incremental import StreamingConfig

    try:
        return StreamingConfig(
            context_ms=args.stream_context_ms,
            extra_lookahead_ms=args.stream_lookahead_ms,
            hop_frames=args.stream_hop,
        )
    except ValueError as exc:
        raise UserError(f"streaming settings: {exc}") from None


def _add_streaming_options(p: argparse.ArgumentParser) -> None:
    from musetalk_rt.audio.incremental import DEFAULT_CONFIG

    g = p.add_argument_group("streaming audio options")
    g.add_argument(
        "--stream-context-ms",
        type=int,
        default=DEFAULT_CONFIG.context_ms,
        help="past audio on each encoder canvas, multiple of 20 "
        "(default: all of the current 30 s segment)",
    )
    g.add_argument(
        "--stream-lookahead-ms",
        type=int,
        default=DEFAULT_CONFIG.extra_lookahead_ms,
        help="look-ahead beyond MuseTalk's own 80 ms, multiple of 20 "
        f"(default: {DEFAULT_CONFIG.extra_lookahead_ms})",
    )
    g.add_argument(
        "--stream-hop",
        type=_positive_int,
        default=DEFAULT_CONFIG.hop_frames,
        help=f"frames per encoder canvas (default: {DEFAULT_CONFIG.hop_frames})",
    )


def cmd_audio(args) -> int:
    from musetalk_rt.audio.check import check_audio, plot_report
    from musetalk_rt.media import load_audio
    from musetalk_rt.weights import load_whisper

    cfg = _streaming_config(args)
    clip = load_audio(args.audio)
    if clip.num_samples == 0:
        raise UserError(f"{args.audio} holds no audio samples")
    whisper, fe, desc = load_whisper(args.weights, args.models_dir, _device(args.device))
    print(desc)
    report = check_audio(clip, whisper, fe, cfg, chunk_ms=args.chunk_ms)
    s = report.summary()
    print(f"audio {args.audio}: {s['duration_s']} s, {s['frames']} frames")
    print(f"voice activity (decision delay <= {s['vad_decision_delay_ms']} ms):")
    for a, b in s["speech_segments"]:
        print(f"  speech {a:8.3f} s .. {b:8.3f} s")
    if not s["speech_segments"]:
        print("  no speech found")
    e = s["feature_error"]
    print(f"streaming: {s['streaming']}")
    if e.get("frames"):
        print(
            f"feature error vs offline (relative L2 per frame): median {e['median']:.4f}, "
            f"p90 {e['p90']:.4f}, p99 {e['p99']:.4f}, max {e['max']:.4f}"
        )
    c = s["extractor_cost"]
    print(
        f"extractor: {c['encoder_calls']} encoder calls, {c['canvases']} canvases, "
        f"{c['ms_per_frame']} ms per frame on {whisper.embed_positions.weight.device}"
    )
    if args.plot:
        print(f"plot: {plot_report(report, args.plot)}")
    print(json.dumps({"audio_check": str(args.audio), "weights": args.weights, **s}))
    return 0


def cmd_engines(args) -> int:
    from musetalk_rt.engines.cache import list_engines

    if args.action == "list":
        rows = list_engines(args.models_dir)
        for r in rows:
            k = r["key"]
            print(
                f"{k['stage']:<11} {k['engine']}/{k['dtype']} buckets {k['buckets']} "
                f"on {k['device'].get('gpu') or k['device'].get('device')} "
                f"torch {k['torch_version']} weights {k['weights_fingerprint']}  {r['folder']}"
            )
        if not rows:
            print(f"no engines cached under {args.models_dir / 'engines'}")
        print(json.dumps({"engines": len(rows), "models_dir": str(args.models_dir)}))
        return 0
    from musetalk_rt.engines.build import build_engines, check_batch_sizes, check_stages

    stages = check_stages(tuple(args.stages.split(",")))  # before loading any weights
    check_batch_sizes(args.batch_sizes)
    if args.jobs > 1:
        return _engines_build_parallel(args, stages)
    models = _models(args)
    res = build_engines(
        models,
        args.engine,
        args.dtype,
        args.batch_sizes,
        engine_options=_engine_options(args),
        cache_root=args.models_dir,
        stages=stages,
    )
    for stage in res.cache:
        stored = res.stored.get(stage)
        where = ", ".join(stored) if stored else "-"
        where = "already cached" if res.cache[stage] == "hit" else where
        print(
            f"{stage:<11} cache {res.cache[stage]}, build {res.build_s[stage]} s, stored: {where}"
        )
    print(f"first frame {res.first_frame_s} s after the start of the build")
    print(
        json.dumps(
            {
                "engines_build": res.engine,
                "dtype": res.dtype,
                "buckets": res.buckets,
                "cache": res.cache,
                "build_s": res.build_s,
                "first_frame_s": res.first_frame_s,
                "passed": res.passed,
                "stored": res.stored,
                "weights": models.kind,
            }
        )
    )
    return 0 if res.passed else 4


def _engines_build_parallel(args, stages: tuple[str, ...]) -> int:
    """``engines build --jobs N``: one child per stage (and bucket, for aoti/trt), N at once."""
    import time

    from musetalk_rt.engines import parallel as par
    from musetalk_rt.engines import parse_dtype, select_engine

    # the engine's checks (installed, usable on this device) once here, not in every child
    eng, reason = select_engine(
        args.engine, _device(args.device), parse_dtype(args.dtype), **_engine_options(args)
    )
    tasks = par.split_tasks(stages, args.batch_sizes, eng.per_bucket_cache)
    print(f"engine {args.engine}/{args.dtype}: {reason}")
    at_once = min(args.jobs, len(tasks))
    print(f"{len(tasks)} builds, {at_once} at once (each gates and stores its own)")
    t0 = time.perf_counter()
    folder = par.run_tasks(
        tasks,
        lambda t: par.child_argv(engines_build_words(args, t.buckets) + ["--stages", t.stage]),
        args.jobs,
    )
    res = par.summary(tasks, eng.name, args.dtype, args.jobs, time.perf_counter() - t0)
    print(f"logs: {folder}")
    print(json.dumps(res))
    if res["passed"]:
        return 0
    failed = [t for t in tasks if not t.passed]
    print(
        f"musetalk-rt: error: {len(failed)} of {len(tasks)} builds failed "
        f"({', '.join(t.label for t in failed)}); the others are stored. Their lines above say "
        "why; run one of them without --jobs to see it here",
        file=sys.stderr,
    )
    return 4


def cmd_send(args) -> int:
    import asyncio

    from musetalk_rt.live.send import send_clip, send_microphone

    token = args.token or os.environ.get("MUSETALK_RT_TOKEN")

    def show(message: dict) -> None:
        if message.get("type") == "stats":
            print(f"  server: received {message['received_s']} s, ahead {message['ahead_s']} s")
        elif message.get("type") == "caption":
            print(f"  caption {message.get('start_s')} s: {message.get('text')}")

    if args.wav:
        from musetalk_rt.media import load_audio

        clip = load_audio(args.wav)
        if clip.num_samples == 0:
            raise UserError(f"{args.wav} holds no audio samples")
        print(
            f"sending {args.wav}: {clip.duration_s:.2f} s at {clip.sample_rate} Hz, "
            f"{clip.channels} channel(s), {'real time' if args.realtime else 'unpaced'}"
        )

        rep = asyncio.run(
            send_clip(
                args.url,
                clip,
                token,
                args.chunk_ms,
                args.realtime,
                on_message=show,
                cafile=args.cafile,
            )
        )
    else:
        if not args.realtime:
            raise UserError("--no-realtime applies to --wav (a microphone is real time)")
        print(f"sending the microphone to {args.url} (Ctrl-C ends with a flush)")
        rep = asyncio.run(
            send_microphone(args.url, token, args.chunk_ms, on_message=show, cafile=args.cafile)
        )
    print(
        json.dumps(
            {
                "send": args.url,
                "chunks": rep.chunks,
                "seconds": rep.seconds,
                "stats_messages": len(rep.stats),
                "captions": len(rep.captions),
                "close_code": rep.close_code,
                **(
                    {"dropped_chunks": rep.dropped, "interrupted": rep.interrupted}
                    if args.mic
                    else {}
                ),
            }
        )
    )
    return 0


def cmd_bench(args) -> int:
    from musetalk_rt.bench import GpuTurns, environment, results_dir, run_bench, table, write_rows

    opts = per_engine_options(args.engine, _engine_options(args))
    models = _models(args)
    turns = (
        GpuTurns(args.gpu_turns, args.gpu_peers, args.gpu_peers_deadline_s)
        if args.gpu_turns
        else None
    )
    out_dir = args.out or results_dir(Path("experiments/results"), environment(models.device))
    path = out_dir / "bench.jsonl"
    rows = run_bench(
        models,
        args.engine,
        args.dtype,
        args.batch_sizes,
        warmup=args.warmup,
        iters=args.iters,
        engine_options=opts,
        on_row=lambda row: write_rows([row], out_dir),  # each as measured: a crash keeps them
        cache_root=args.models_dir,
        fuse_stages=args.fuse_stages,
        turns=turns,
    )
    print(table(rows))
    best = max(rows, key=lambda r: r["fps"]) if rows else None
    print(
        json.dumps(
            {
                "bench": str(path) if rows else None,  # (no row: no file)
                "rows": len(rows),
                "weights": models.kind,
                "best": best and {k: best[k] for k in ("scenario", "fps", "p50_ms")},
                "all_pass_quality": all(r["quality"]["passed"] for r in rows),
            }
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    from musetalk_rt.engines import DTYPES, available_engines
    from musetalk_rt.media import X264_PRESETS

    parser = OneLineParser(
        prog="musetalk-rt",
        description="MuseTalk v1.5 avatars: weights, avatar preparation, offline render, "
        "benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("weights", help="download or verify the MuseTalk v1.5 weights")
    p.add_argument("action", choices=["download", "check"])
    p.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models"),
        help="root of the weights layout (default: models)",
    )
    p.add_argument(
        "--deep",
        action="store_true",
        help="check: also compare SHA-256 hashes with weights.lock.json (a file it does not "
        "list is 'unverified')",
    )
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("avatar", help="prepare or inspect an avatar")
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pp = asub.add_parser("prepare", help="prepare an avatar from a video or an image")
    pp.add_argument("--source", required=True, type=Path, help="video or image of the avatar")
    pp.add_argument("--id", required=True, help="avatar name (folder under --avatars-dir)")
    pp.add_argument(
        "--bbox",
        help="face box x1,y1,x2,y2 in source pixels (default: found from face landmarks)",
    )
    pp.add_argument(
        "--idle",
        choices=["all", "closed"],
        default="all",
        help="idle cycle: all frames, or the longest closed-mouth stretch (default: all; "
        "closed reads the mouth from face landmarks, so it does not go with --bbox)",
    )
    pp.add_argument(
        "--extra-margin",
        type=_non_negative_int,
        default=10,
        help="px added below the face box, as MuseTalk v1.5 does (default: 10)",
    )
    pp.add_argument("--max-frames", type=_positive_int, help="use at most N frames of a video")
    pp.add_argument("--force", action="store_true", help="rebuild even if up to date")
    _add_common(pp)
    pp.set_defaults(func=cmd_avatar)
    for name, text in (
        ("info", "print what a prepared avatar holds"),
        ("check", "box jitter, identity round trip, mouth openness and a contact sheet"),
    ):
        pc = asub.add_parser(name, help=text)
        pc.add_argument("id", help="avatar name")
        pc.add_argument(
            "--avatars-dir",
            type=Path,
            default=Path("avatars"),
            help="where prepared avatars live (default: avatars)",
        )
        if name == "check":
            pc.add_argument(
                "--sheet", type=Path, help="contact sheet PNG (default: <avatar>/check.png)"
            )
        pc.set_defaults(func=cmd_avatar)

    engines_help = f"engine: {', '.join(available_engines())} (default: eager)"
    p = sub.add_parser("render", help="render a WAV spoken by an avatar into an MP4")
    p.add_argument("--avatar", required=True, help="prepared avatar name")
    p.add_argument("--audio", required=True, type=Path, help="speech audio (any rate, mono/stereo)")
    p.add_argument("--out", required=True, type=Path, help="output .mp4 (H.264 + AAC)")
    p.add_argument("--engine", default="eager", help=engines_help)
    p.add_argument(
        "--dtype", default="fp32", choices=list(DTYPES), help="compute dtype (default: fp32)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="frames per GPU step (default: 8)"
    )
    p.add_argument("--fallback", help="engine to use if --engine cannot run here (logged)")
    _add_compile_options(p)  # (an aoti engine's options are part of its cache key)
    p.add_argument(
        "--x264-preset",
        default="veryfast",
        choices=X264_PRESETS,
        help="x264 speed preset of the video (default: veryfast); on a GPU host the encoder "
        "sets a compiled render's pace at large frame sizes, and a faster preset trades file "
        "size for speed at the same quality setting",
    )
    _add_common(p)
    p.set_defaults(func=cmd_render)

    p.add_argument(
        "--streaming",
        action="store_true",
        help="take the live audio path: 20 ms chunks, incremental features, voice activity "
        "(idle frames in silence)",
    )
    _add_streaming_options(p)

    p = sub.add_parser("audio", help="check what the streaming audio path makes of a clip")
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pa = asub.add_parser(
        "check",
        help="voice activity, streaming-vs-offline feature error, delay and cost of a clip",
    )
    pa.add_argument("--audio", required=True, type=Path, help="audio file (any rate, mono/stereo)")
    pa.add_argument("--plot", type=Path, help="write waveform, VAD and error over time to a PNG")
    pa.add_argument(
        "--chunk-ms", type=_positive_int, default=20, help="sender chunk size (default: 20)"
    )
    _add_streaming_options(pa)
    _add_common(pa, test_encoder=True)
    pa.set_defaults(func=cmd_audio)

    p = sub.add_parser("engines", help="build, gate and cache engines; list the cache")
    esub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pb = esub.add_parser(
        "build", help="build unet + vae_decode for buckets, check the 40 dB gate, cache them"
    )
    pb.add_argument("--engine", default="compile", help=engines_help.replace("eager)", "compile)"))
    pb.add_argument(
        "--dtype", default="fp16", choices=list(DTYPES), help="compute dtype (default: fp16)"
    )
    pb.add_argument(
        "--batch-sizes", type=_csv_ints, default=[4], help="comma-separated buckets (default: 4)"
    )
    pb.add_argument(
        "--stages",
        default="unet,vae_decode",
        help="stages to build (default: unet,vae_decode); a stage left out runs as the fp32 "
        "reference in the gate, so slow builds can run one stage per process",
    )
    pb.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="build in this many child processes at once: one per stage, and per bucket for "
        "aoti/trt; each gates and stores its own cache entry (six aoti builds at once finished "
        "in 223 s on a 16-core H200 host, each taking 122-186 s; default: 1, in this process)",
    )
    _add_compile_options(pb)
    _add_common(pb)
    pb.set_defaults(func=cmd_engines)
    pl = esub.add_parser("list", help="list cached engines")
    pl.add_argument(
        "--models-dir", type=Path, default=Path("models"), help="weights root (default: models)"
    )
    pl.set_defaults(func=cmd_engines)

    p = sub.add_parser("send", help="stream a WAV or the microphone to a live channel")
    p.add_argument("--url", required=True, help="ws://HOST:PORT/ingest/CHANNEL (or wss://)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wav", type=Path, help="audio file (any rate, mono or stereo)")
    src.add_argument("--mic", action="store_true", help="the default microphone (sounddevice)")
    p.add_argument("--token", help="ingest token (default: $MUSETALK_RT_TOKEN)")
    p.add_argument("--cafile", help="trust this CA or self-signed certificate (PEM) for wss://")
    p.add_argument("--chunk-ms", type=_positive_int, default=20, help="chunk size (default: 20)")
    p.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        help="--wav only: send as fast as the server takes it (it paces senders ahead of real "
        "time)",
    )
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "bench",
        help="time engine x dtype x batch scenarios of UNet + VAE decode; bench e2e: the "
        "voice-to-screen probe",
    )
    p.add_argument(
        "--engine",
        type=_csv,
        default=["eager"],
        help=f"comma-separated engines from {', '.join(available_engines())} (default: eager)",
    )
    p.add_argument(
        "--dtype",
        type=_csv,
        default=["fp16"],
        help="comma-separated dtypes from fp32,fp16,bf16 (default: fp16)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_csv_ints,
        default=[1, 4, 20],
        help="comma-separated batch sizes (default: 1,4,20)",
    )
    p.add_argument("--iters", type=_positive_int, default=20, help="timed iterations (default 20)")
    p.add_argument(
        "--warmup", type=_non_negative_int, default=3, help="untimed iterations (default 3)"
    )
    p.add_argument(
        "--out",
        type=_results_folder,
        help="results folder (default: experiments/results/<date>_<gpu>_<sha>)",
    )
    p.add_argument(
        "--fuse-stages",
        action="store_true",
        help="build UNet + VAE decode as one module: one graph per step (no per-stage times, "
        "no engine cache)",
    )
    p.add_argument(
        "--gpu-turns",
        type=Path,
        metavar="DIR",
        help="share the GPU with concurrent bench processes using the same DIR: build together, "
        "time one at a time after all have built",
    )
    p.add_argument(
        "--gpu-peers",
        type=_positive_int,
        default=1,
        help="bench processes sharing --gpu-turns (default 1)",
    )
    p.add_argument(
        "--gpu-peers-deadline-s",
        type=_non_negative_float,
        default=420.0,
        help="stop waiting for peers this many seconds after start (default 420)",
    )
    _add_compile_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_bench)
    from musetalk_rt.e2e.probe import add_arguments as add_e2e_arguments
    from musetalk_rt.e2e.probe import cmd_bench_e2e

    bsub = p.add_subparsers(dest="scenario", metavar="[e2e]")
    pe = bsub.add_parser(
        "e2e",
        help="voice-to-screen probe through a real RTMP server: delays per speech marker, A/V "
        "offset, soak drift; the budget guard (see bench e2e --help)",
        description="Stream speech markers to a live process, read its output back from an RTMP "
        "server like a hall player, and report per marker: voice->server, server->encoded, "
        "encoded->received, A/V offset; p50/p95/max, rows in experiments/results, one JSON "
        "line last.",
    )
    add_e2e_arguments(pe)
    pe.set_defaults(func=cmd_bench_e2e)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"musetalk-rt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("musetalk-rt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("MUSETALK_RT_DEBUG"):
            raise
        return report_unexpected("musetalk-rt", exc)


if __name__ == "__main__":
    raise SystemExit(main())
