"""``python -m musetalk_rt.live``: the event-day process.

One process, one or more channels (each an avatar, an ingest path and outputs), one shared set
of models and one GPU worker. At start it builds (or loads from the engine cache) the engine for
the buckets, measures one batch and one whisper encoder call, derives the playout delay ``D`` and
prints it, then serves ``/ingest/<channel>`` until SIGINT/SIGTERM (or ``--duration-s``), and
shuts down gracefully: senders are closed, the clock stops, recordings get their trailer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import ssl
import sys
import threading
import time
from pathlib import Path

import numpy as np

from musetalk_rt.errors import OneLineParser, UserError, report_unexpected
from musetalk_rt.live.diskwatch import RecordingDisks
from musetalk_rt.live.drift import SHIFT_AT_S, shift_at_for_slack
from musetalk_rt.live.hostload import HostLoad, host_hint, status_part
from musetalk_rt.live.output import check_rtmp_url
from musetalk_rt.media import MP4_SUFFIXES

PROG = "python -m musetalk_rt.live"  # (how the live process is started; no console script)
log = logging.getLogger("musetalk_rt.live")


def _parse_channels(args) -> dict[str, str]:
    chans = {}
    for spec in args.channel or []:
        name, _, avatar = spec.partition("=")
        if not name or not avatar or not all(c.isalnum() or c in "-_." for c in name):
            raise UserError(f"--channel {spec!r}: expected NAME=AVATAR (letters, digits, -_.)")
        chans[name] = avatar
    if args.avatar:
        chans.setdefault(args.avatar, args.avatar)
    if not chans:
        raise UserError("give --avatar ID (one channel) or --channel NAME=AVATAR (repeatable)")
    return chans


def _targets(template: str | None, name: str, several: bool) -> str | None:
    if template is None:
        return None
    if several and "{channel}" not in template:
        from musetalk_rt.live.output import redact_url

        raise UserError(
            f"{redact_url(template)}: with several channels put {{channel}} in the URL or path"
        )
    return template.replace("{channel}", name)


RECORD_SUFFIXES = (*MP4_SUFFIXES, ".mkv", ".flv", ".ts")


def check_record_path(path: str) -> None:
    """Refuse at start a ``--record`` file the output could never write.

    Found later, such a target would only fail in the encoder's process, once per retry, while
    the show ran without its recording.

    Raises:
        UserError: A folder, a missing or read-only folder, or a container not for H.264 + AAC.
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(
            f"--record {path}: that is a folder; name a file in it, e.g. {p / 'show.mp4'}"
        )
    if p.suffix.lower() not in RECORD_SUFFIXES:
        raise UserError(
            f"--record {path}: record to one of {', '.join(RECORD_SUFFIXES)} (MP4 is fragmented, "
            "so a killed run still plays)"
        )
    folder = p.parent
    if not folder.is_dir():
        raise UserError(f"--record {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--record {path}: cannot write in {folder}; choose a folder you can write")


def keep_earlier_file(path: str) -> str:
    """A path for this run's file that never overwrites an earlier run's.

    The crew restarts the same command after a crash: a recording or captions file already at
    ``path`` is the show so far, so this run writes ``NAME.1.mp4`` (the first free number)
    instead and says so. A URL or a missing or empty file is returned as it is.
    """
    from musetalk_rt.live.output import holds_output

    if not holds_output(path):
        return path
    p = Path(path)
    n = 1
    while (alt := p.with_name(f"{p.stem}.{n}{p.suffix}")).exists():
        n += 1
    print(f"{p} holds an earlier run's output; this run writes {alt}", flush=True)
    return str(alt)


CLOCK_STALL_S = 2.0  # a channel clock that handed out no frame for this long is stalled


def live_health(channels, now: float | None = None) -> tuple[bool, dict]:
    """What ``/healthz`` says: serving while every channel's clock hands out frames.

    A channel whose clock has not emitted for ``CLOCK_STALL_S`` makes it 503 ("stalled": the
    screen is frozen; what a restart would fix). An output that is down (the RTMP server went
    away, a recording's writer failed) keeps it 200 but "degraded", with the output named: the
    process is doing what it can, and restarting it would not bring the server back.

    Returns:
        ``(serving, details)``: details per channel (seconds since its last frame, whether
        each output is up) and the overall ``status``.
    """
    now = time.monotonic() if now is None else now
    out: dict = {"status": "ok", "channels": {}}
    serving = True
    for ch in channels:
        emitted = getattr(ch, "emitted_at", None)
        age_s = None if emitted is None else round(now - emitted, 2)
        outputs = {o.label: bool(o.up) for o in ch.outputs}
        out["channels"][ch.name] = {"last_frame_s_ago": age_s, "outputs_up": outputs}
        if age_s is not None and age_s > CLOCK_STALL_S:
            serving = False
        elif not all(outputs.values()) and out["status"] == "ok":
            out["status"] = "degraded"
    if not serving:
        out["status"] = "stalled"
    return serving, out


def check_port(host: str, port: int) -> None:
    """Fail now, with what to do, if the ingest could not listen on ``host:port``.

    Raises:
        UserError: A port out of range, an unknown host, or an address another process holds.
    """
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: choose 1 to 65535 (or 0: any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind(addr)
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror}): another live process may hold "
                "it; stop it, or choose another --port"
            ) from None


def _speech_setup(args):
    """Check the Groq options before anything heavy loads; returns (speech, config, font)."""
    from musetalk_rt.speech.config import load_config

    cfg = load_config(args.config)
    cfg.validate(args.groq)
    for line in cfg.warnings(args.groq):
        print(f"warning: {line}", flush=True)
    if args.captions and not args.captions.lower().endswith((".srt", ".vtt")):
        raise UserError(f"--captions {args.captions}: use a .srt or .vtt file")
    if args.groq == "off":
        if args.captions or args.burn_captions:
            raise UserError("captions come from Groq: add --groq captions (or --groq voice)")
        return None, cfg, None
    from musetalk_rt.speech.captions import find_cjk_font
    from musetalk_rt.speech.groq_client import GroqSpeech

    font = find_cjk_font(cfg.caption_font) if args.burn_captions else None
    return GroqSpeech(cfg), cfg, font


def _speech_sinks(args, speech, cfg, font, channels, vad_net, several: bool) -> list:
    """One captions or voice sink in front of each channel (with its caption outputs)."""
    from musetalk_rt.speech.captions import CaptionOverlay, CaptionWriter
    from musetalk_rt.speech.live import make_sink

    out = []
    for ch in channels:
        target = _targets(args.captions, ch.name, several)
        writer = CaptionWriter(keep_earlier_file(target)) if target else None
        overlay = None
        if font is not None:
            overlay = CaptionOverlay(font, ch.avatar.size)
            ch.overlay = overlay.apply
        out.append(make_sink(args.groq, ch, speech, cfg, vad_net, writer, overlay))
    return out


def live_engine_options(args) -> dict:
    """The engine options for the live process: the command line's, with the live default.

    The live GPU worker runs the models in its own thread. The compile engine's default CUDA
    graphs (inductor's cudagraph trees) keep their tree managers in thread-local storage, so
    what start-up recorded in the main thread was not the worker's: on an H100 the worker
    started over and served no batch. The compile engine therefore defaults to the manual
    capture here (one ``torch.cuda.CUDAGraph`` per bucket, replayable from any thread);
    measured on an H200: 0 late frames, no recompilation (experiments/LOG.md, 2026-12-01).
    ``--compile-graph-capture trees`` still asks for the other.
    """
    from musetalk_rt.cli import _engine_options, options_not_taken

    opts = _engine_options(args)
    if args.engine == "compile" and getattr(args, "compile_graph_capture", None) is None:
        opts["graph_capture"] = "manual"
    # A preset tuned for one engine, started with another on the command line (``--config
    # configs/channels.toml --engine aoti``): the file's options that engine does not take are
    # left out, with a line; given on the command line, they stay and get the engine's error.
    # (An unknown engine: nothing is left out; selecting it gives the one-line error.)
    preset_only = set(getattr(args, "from_preset", ()))
    dropped = []
    for key, dests in options_not_taken(args.engine).items():
        if key not in opts:
            continue
        given = [d for d in dests if getattr(args, d, None) not in (None, False)]
        if given and set(given) <= preset_only:
            del opts[key]
            dropped += [f"--{d.replace('_', '-')}" for d in given]
    if dropped:
        print(
            f"note: --config {args.config}: {', '.join(dropped)} not used "
            f"(the {args.engine} engine does not take {'it' if len(dropped) == 1 else 'them'})",
            flush=True,
        )
    return opts


def measure_startup(gen, canvas_encoder, canvases: int = 1) -> tuple[float, float]:
    """Seconds for one batch of the largest bucket (incl. blend-size copy) and one encoder call.

    Args:
        gen: The prepared face generator.
        canvas_encoder: ``canvases -> hidden states`` as the live process runs it.
        canvases: Canvases in that call (one per channel that speaks at once, at most 16).
    """
    import torch

    from musetalk_rt.stages import FrameBatch, StageClock

    b = max(gen.batch_sizes)
    g = torch.Generator().manual_seed(0)
    batch = FrameBatch(
        list(range(b)),
        list(range(b)),
        latents=torch.randn(b, 8, 32, 32, generator=g).to(gen.device),
        audio=torch.randn(b, 50, 384, generator=g).to(gen.device),
    )
    clock = StageClock(gen.device)
    gen(batch, clock)  # warm
    t = time.perf_counter()
    gen(batch, clock)
    compute = time.perf_counter() - t
    canvas = [np.zeros(16000, np.float32)] * canvases
    canvas_encoder(canvas)  # warm
    t = time.perf_counter()
    canvas_encoder(canvas)
    return compute, time.perf_counter() - t


def whisper_dtype(serving_dtype: str):
    """The live whisper encoder's dtype: fp32 when serving fp32, otherwise fp16.

    bf16 serving still encodes canvases in fp16: whisper's features have a wide range and
    bf16's 8-bit mantissa is the larger error; fp16 measured 6e-4 relative on the tiny model.
    """
    import torch

    return torch.float32 if serving_dtype == "fp32" else torch.float16


DEFAULT_DELAY_MARGIN_MS = 100
# Each channel beyond the first: the start-up figures come from an idle GPU, and under load the
# batches and the audio path slow down (an H200 at 12 channels: 31% of the talking frames late
# with the idle-GPU D of 352 ms, none at 800 ms; 14 channels: none at 1000 ms; LOG 2026-12-02).
DEFAULT_DELAY_PER_CHANNEL_MS = 40


def delay_slack_s(
    delay_s: float,
    lookahead_s: float,
    canvas_s: float,
    compute_s: float,
    channels: int = 1,
    per_channel_s: float = DEFAULT_DELAY_PER_CHANNEL_MS / 1000,
) -> float:
    """What ``D`` holds beyond its parts (:func:`derive_delay_s` without the margin), seconds.

    The margin of a derived ``D``, more or less for a fixed one; to the millisecond, so that a
    derived ``D`` gives back its margin exactly (the two float sums differ in the last bits).
    """
    parts_s = derive_delay_s(lookahead_s, canvas_s, compute_s, 0.0, channels, per_channel_s)
    return round((delay_s - parts_s) * 1000) / 1000


def derive_delay_s(
    lookahead_s: float,
    canvas_s: float,
    compute_s: float,
    margin_s: float = DEFAULT_DELAY_MARGIN_MS / 1000,
    channels: int = 1,
    per_channel_s: float = DEFAULT_DELAY_PER_CHANNEL_MS / 1000,
) -> float:
    """The playout delay ``D`` the process picks when ``--delay-ms`` is not given.

    The look-ahead (the audio a frame's window needs after its end, hop included), one 20 ms
    chunk, one whisper encoder call, two batches (the one running when the frame's window
    arrives and its own), a margin (``--delay-margin-ms``, 100 ms by default) for thread
    scheduling and jitter, and ``per_channel_s`` (``--delay-per-channel-ms``, 40 ms by default)
    for each channel beyond the first: measured alone on an idle GPU, the batches and the audio
    path are slower when many channels share it. The end-to-end probe uses it to put recorded
    GPU figures in place of measured ones.

    Args:
        lookahead_s: Audio needed after a frame's end before its window exists, seconds.
        canvas_s: One whisper encoder call (a canvas from every channel), seconds.
        compute_s: One batch of the largest bucket (UNet + VAE decode + copy), seconds.
        margin_s: Spare time for scheduling and jitter, seconds.
        channels: Channels served by the process.
        per_channel_s: Added for each channel beyond the first, seconds.
    """
    extra_s = max(0, channels - 1) * per_channel_s
    return lookahead_s + 0.02 + canvas_s + 2 * compute_s + margin_s + extra_s


def drift_threshold_line(
    slack_s: float, drift_shift_s: float, channels: int, per_channel_ms: float
) -> str | None:
    """The start line that says a drifting sender clock is corrected at one frame (else None).

    A fixed ``D`` under its derived parts (negative slack: the per-channel allowance counts) is
    said as such, not as "negative slack", with where to look if frames come late.
    """
    if drift_shift_s >= SHIFT_AT_S:
        return None
    room = (
        f"D leaves {slack_s * 1000:.0f} ms of slack"
        if slack_s >= 0
        else f"the fixed D is {-slack_s * 1000:.0f} ms under its derived parts (look-ahead, "
        "a whisper call, two batches"
        + (f", {per_channel_ms:g} ms for each more channel" if channels > 1 else "")
        + "; the status line names a longer --delay-ms if frames come late)"
    )
    return (
        f"{room}: a drifting sender clock moves the timeline at "
        f"{drift_shift_s * 1000:.0f} ms of drift (1 frame), not {SHIFT_AT_S * 1000:.0f}"
    )


def status_line(
    channels: list,
    worker,
    prev: dict | None,
    elapsed_s: float,
    gc_watch=None,
    host: dict | None = None,
    disks=None,
) -> tuple[str, dict]:
    """One line on how the show goes since the last one, for the crew's terminal and the logs.

    It tells apart where late frames come from: the GPU (frames skipped, or not back in time)
    or the audio path (windows that reached their channel after the frame had left); the
    worker's idle seconds tell a starved worker from a saturated one, and the batches' share of
    GPU time (CUDA only) a saturated GPU from a host side that cannot feed it.

    Args:
        channels: The live channels.
        worker: The GPU worker.
        prev: The snapshot the last line returned (None for the first).
        elapsed_s: Seconds since that snapshot (or since the start).
        gc_watch: The process's :class:`~.gcwatch.GcWatch`: full garbage collections since the
            last line are named (every thread stopped for them).
        host: The host's CPU load since the last line (:meth:`.hostload.HostLoad.take`), or
            None: with late frames and saturated cores, the line says so.
        disks: The recordings' :class:`~.diskwatch.RecordingDisks`: a disk with less than an
            hour (or 1 GB) left is named.

    Returns:
        The line and the snapshot to pass next time.
    """
    shed = worker.shed_frames  # before the late counts: a clock adds to late, then to shed
    st = [ch.stats.as_dict() for ch in channels]
    snap = {
        "shed": shed,
        "frames": worker.frames,
        "late": sum(s["late_frames"] for s in st),
        "speech": sum(s["speech_frames"] for s in st),
        "batches": worker.batches,
        "late_windows": sum(s["late_windows"] for s in st),
        "skipped_windows": sum(s["skipped_windows"] for s in st),
        "audio_errors": sum(s["audio_errors"] for s in st),
        "clock_shifts": sum(s["clock_shifts"] for s in st),
        "idle_s": worker.idle_s,
        "gpu_busy_s": worker.gpu_busy_s,
        "gc_full": gc_watch.collections[2] if gc_watch is not None else 0,
    }
    d = {k: v - (prev or {}).get(k, 0) for k, v in snap.items()}
    p95 = [s["voice_to_frame_p95_ms"] for s in st if s["voice_to_frame_p95_ms"] is not None]
    outs_down = sum(1 for ch in channels for o in ch.outputs if not o.up)
    line = (
        f"status: {len(channels)} channel(s), {d['frames'] / max(elapsed_s, 1e-9):.0f} frames/s "
        f"generated in {d['batches']} batches"
        + (f" (mean {d['frames'] / d['batches']:.1f})" if d["batches"] else "")
        + f", talking frames on time {d['speech']}, late {d['late']}"
        + (f" ({d['shed']} of them skipped: no time left)" if d["shed"] else "")
        + (
            f", audio windows too late {d['late_windows']}"
            + (f" (and {d['skipped_windows']} skipped)" if d["skipped_windows"] else "")
            if d["late_windows"] or d["skipped_windows"]
            else ""
        )
        + (f", audio path errors {d['audio_errors']} (see the log)" if d["audio_errors"] else "")
        + (
            f", sender clock drift corrected {d['clock_shifts']} time(s) (timelines moved in "
            "pauses; see the log)"
            if d["clock_shifts"]
            else ""
        )
        + f", worker idle {d['idle_s']:.1f} s"
        # the batches' GPU time (CUDA events; none on the CPU): near 100% the GPU is the limit
        + (f", GPU busy {d['gpu_busy_s'] / max(elapsed_s, 1e-9):.0%}" if d["gpu_busy_s"] else "")
        + (f", voice-to-frame p95 {max(p95):.0f} ms" if p95 else "")
        + (f", outputs down {outs_down}" if outs_down else "")
        + (
            f", full garbage collections {d['gc_full']} (longest so far "
            f"{gc_watch.pause_ms_max[2]:.0f} ms)"
            if d["gc_full"]
            else ""
        )
        + status_part(host)
        + (disks.status_part() if disks is not None else "")
        + (
            delay_hint(channels, worker, st) + host_hint(host, late_seconds(channels, elapsed_s))
            if d["late"]
            else ""
        )
    )
    return line, snap


def late_seconds(channels: list, elapsed_s: float) -> set[int]:
    """The seconds of the last ``elapsed_s`` in which any channel showed a late frame."""
    since = time.monotonic() - elapsed_s - 1.0
    out: set[int] = set()
    for ch in channels:
        # a copy first: the clock thread appends meanwhile (deque.copy does not yield)
        out.update(s for s in ch.late_seconds.copy() if s >= since)
    return out


def delay_hint(channels: list, worker, stats: list[dict]) -> str:
    """A hint for the status line when frames come late because ``D`` leaves too little time.

    A frame can be generated only once its audio window exists; under load it may wait for the
    batch running when its window arrives and then ride in the next one
    (:meth:`~.worker.GpuWorker.frame_wait_s`). When the windows' lead over their frames (the
    5th percentile of the last ones, the worst channel) is shorter than that, frames come late
    however fast the GPU is, and a longer playout delay is the remedy: the hint names one (the
    shortfall plus 50 ms, rounded up to 50 ms). On an H200 at 12 channels the windows' lead fell
    from ~170 ms idle to ~100 ms (p50) under load while a batch cycle took ~55 ms.

    Returns:
        ``", hint: …"`` or ``""`` when the lead is enough or nothing was measured yet.
    """
    leads = [s["window_lead_p05_ms"] for s in stats if s["window_lead_p05_ms"] is not None]
    wait_s = worker.frame_wait_s()
    if not leads or wait_s is None or not channels:
        return ""
    lead_ms, wait_ms = min(leads), wait_s * 1000
    if lead_ms >= wait_ms:
        return ""
    delay_ms = max(ch.delay_s for ch in channels) * 1000
    suggest_ms = math.ceil((delay_ms + wait_ms - lead_ms + 50) / 50) * 50
    return (
        f", hint: audio windows come {lead_ms:.0f} ms before their frame (p05) but a frame may"
        f" need {wait_ms:.0f} ms (two batches and a blend): restart with --delay-ms {suggest_ms}"
    )


async def _report_status(
    channels, worker, interval_s: float, gc_watch=None, host_load=None, disks=None
) -> None:
    prev, t = None, time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        host = host_load.take() if host_load is not None else None
        line, prev = status_line(channels, worker, prev, now - t, gc_watch, host, disks)
        t = now
        log.info("%s", line)


async def _serve(
    server,
    channels,
    worker,
    duration_s: float | None,
    status_interval_s: float = 0,
    gc_watch=None,
    host_load=None,
    disks=None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():  # a second signal before the shutdown's own handler is set
                _acknowledge(sig.name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    print(
        f"ingest listening on port {server.port}: "
        + ", ".join(f"/ingest/{ch.name}" for ch in channels),
        flush=True,
    )
    status = (
        asyncio.create_task(
            _report_status(channels, worker, status_interval_s, gc_watch, host_load, disks)
        )
        if status_interval_s > 0
        else None
    )
    try:
        if duration_s:
            await asyncio.wait_for(stop.wait(), duration_s)
        else:
            await stop.wait()
    except TimeoutError:
        pass
    if status is not None:
        status.cancel()
    print("stopping …", flush=True)
    await server.stop()


def _acknowledge(name: str) -> None:
    sys.stderr.write(f"{name}: already stopping, finishing the recordings (again: abort)\n")
    sys.stderr.flush()


def _shield_shutdown() -> None:
    """Let the shutdown finish when SIGTERM or SIGINT comes again (recordings need trailers).

    A second signal is common: a supervisor and a time limit signal the whole process group,
    an operator presses Ctrl-C twice. Without this, Python's default handler (or a
    KeyboardInterrupt in the middle of closing the outputs) would end the process before the
    recordings got their trailers. The next signal is acknowledged; a third one in a row
    aborts at once, for a shutdown that hangs.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    repeats = 0

    def again(signum, _frame) -> None:
        nonlocal repeats
        repeats += 1
        name = signal.Signals(signum).name
        if repeats >= 2:
            sys.stderr.write(f"{name} again: aborting; recordings may lack their trailer\n")
            sys.stderr.flush()
            os._exit(130)
        _acknowledge(name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, again)


def run(args) -> int:
    """Start everything, serve, stop; returns the exit status."""
    import torch

    from musetalk_rt.audio.canvas_engine import CanvasEncoder
    from musetalk_rt.audio.incremental import BatchedEncoder, StreamingConfig, encode_canvases
    from musetalk_rt.audio.vad import VadBatcher, load_silero_vad
    from musetalk_rt.avatar import load_avatar
    from musetalk_rt.cli import _device, engines_build_command
    from musetalk_rt.live.channel import LiveChannel, close_all
    from musetalk_rt.live.framelog import FrameLog
    from musetalk_rt.live.gcwatch import GcWatch, freeze_startup_heap
    from musetalk_rt.live.ingest import IngestConfig, IngestServer
    from musetalk_rt.live.metrics import metrics_text
    from musetalk_rt.live.outproc import ProcessOutput
    from musetalk_rt.live.output import Output
    from musetalk_rt.live.wakeprobe import WakeProbe
    from musetalk_rt.live.worker import GpuWorker
    from musetalk_rt.pipeline import FaceGenerator
    from musetalk_rt.weights import load_models

    chans = _parse_channels(args)
    if not args.rtmp and not args.record:
        raise UserError("give --rtmp URL and/or --record FILE.mp4: there is nowhere to send video")
    if args.delay_ms is not None and args.delay_ms <= 0:
        raise UserError(f"--delay-ms {args.delay_ms}: the playout delay must be positive")
    if args.delay_margin_ms < 0:
        raise UserError(f"--delay-margin-ms {args.delay_margin_ms}: must be 0 or more")
    if args.delay_per_channel_ms < 0:
        raise UserError(f"--delay-per-channel-ms {args.delay_per_channel_ms}: must be 0 or more")
    if not 0 <= args.status_interval_s <= 86400:
        raise UserError(
            f"--status-interval-s {args.status_interval_s}: give seconds between status lines "
            "(0 turns them off)"
        )
    for flag, value in (
        ("--encoder-threads", args.encoder_threads),
        ("--cpu-threads", args.cpu_threads),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be 1 or more")
    if args.switch_interval_ms is not None and not 0.05 <= args.switch_interval_ms <= 100:
        raise UserError(
            f"--switch-interval-ms {args.switch_interval_ms}: choose 0.05 to 100 (Python's is 5)"
        )
    if args.duration_s is not None and args.duration_s <= 0:
        raise UserError(f"--duration-s {args.duration_s}: give positive seconds (or leave it out)")
    check_port(args.host, args.port)  # before the engines build: minutes, then a busy port
    several = len(chans) > 1
    for name in chans:  # check the output templates before loading anything
        if (url := _targets(args.rtmp, name, several)) is not None:
            try:
                check_rtmp_url(url)
            except ValueError as exc:
                raise UserError(f"--rtmp {exc}") from None
        _targets(args.captions, name, several)
        if (record := _targets(args.record, name, several)) is not None:
            check_record_path(record)
    speech, groq_cfg, font = _speech_setup(args)
    token = args.token or os.environ.get("MUSETALK_RT_TOKEN")
    if token is None:
        print("warning: no --token or MUSETALK_RT_TOKEN: any sender can connect", flush=True)
    try:
        stream_cfg = StreamingConfig(
            context_ms=args.stream_context_ms,
            extra_lookahead_ms=args.stream_lookahead_ms,
            hop_frames=args.stream_hop,
        )
    except ValueError as exc:
        raise UserError(f"streaming settings: {exc}") from None
    ssl_ctx = None
    if args.cert:
        ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ssl_ctx.load_cert_chain(args.cert, args.key)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"cannot load the TLS certificate {args.cert}: {exc}") from None
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    avatars = {name: load_avatar(av, args.avatars_dir) for name, av in chans.items()}
    frame_log = FrameLog(args.frame_log) if args.frame_log else None
    models = load_models(args.weights, args.models_dir, _device(args.device))
    print(models.describe(), flush=True)
    for name, a in avatars.items():
        if a.manifest["weights"]["fingerprint"] != models.fingerprint:
            raise UserError(
                f"avatar {chans[name]!r} was prepared with other weights; re-run "
                f"avatar prepare --weights {models.kind} --force"
            )
    gen = FaceGenerator(
        models,
        args.engine,
        args.dtype,
        args.batch_sizes,
        args.fallback,
        live_engine_options(args),
        log=lambda line: print(line, flush=True),
        blocking_wait=args.gpu_wait == "block",
        # a compile fallback in the worker thread needs the same capture as a compile engine
        fallback_options=(
            {"graph_capture": "manual"}
            if getattr(args, "compile_graph_capture", None) is None
            else {}
        ),
    )
    gen.prepare(args.models_dir, engines_build_command(args, args.batch_sizes))
    for line in gen.report_lines():
        print(line, flush=True)
    canvas_enc = CanvasEncoder(models.whisper, models.feature_extractor, whisper_dtype(args.dtype))
    canvas_err = canvas_enc.check(
        lambda c: encode_canvases(models.whisper, models.feature_extractor, c, torch.float32)
    )
    print(f"{canvas_enc.describe()}; relative error vs fp32 reference {canvas_err:.1e}", flush=True)
    per_call = min(len(chans), canvas_enc.max_batch)
    compute_s, canvas_s = measure_startup(gen, canvas_enc, per_call)
    lookahead_s = (stream_cfg.lookahead_ms + (stream_cfg.hop_frames - 1) * 40) / 1000
    margin_s = args.delay_margin_ms / 1000
    per_channel_s = args.delay_per_channel_ms / 1000
    delay_s = (
        args.delay_ms / 1000
        if args.delay_ms
        else derive_delay_s(lookahead_s, canvas_s, compute_s, margin_s, len(chans), per_channel_s)
    )
    # what D holds beyond its parts (the margin of a derived D): sets how soon a drifting
    # sender clock moves the timeline (musetalk_rt.live.drift)
    slack_s = delay_slack_s(delay_s, lookahead_s, canvas_s, compute_s, len(chans), per_channel_s)
    drift_shift_s = shift_at_for_slack(slack_s)
    if frame_log:
        frame_log.write(
            ev="delay",
            drift_shift_ms=round(drift_shift_s * 1000, 3),
            delay_ms=round(delay_s * 1000, 3),
            derived=not args.delay_ms,
            lookahead_ms=round(lookahead_s * 1000, 3),
            canvas_ms=round(canvas_s * 1000, 3),
            canvases=per_call,
            batch_ms=round(compute_s * 1000, 3),
            batch=max(args.batch_sizes),
            margin_ms=args.delay_margin_ms,
            channels=len(chans),
            per_channel_ms=args.delay_per_channel_ms,
        )
    print(
        f"playout delay D = {delay_s * 1000:.0f} ms (look-ahead {lookahead_s * 1000:.0f} ms, "
        f"whisper call of {per_call} canvas(es) {canvas_s * 1000:.0f} ms, "
        f"batch of {max(args.batch_sizes)} {compute_s * 1000:.0f} ms"
        + (
            "; fixed)"
            if args.delay_ms
            else f", margin {args.delay_margin_ms} ms"
            + (
                f", {args.delay_per_channel_ms} ms for each of {len(chans) - 1} more channel(s))"
                if len(chans) > 1
                else ")"
            )
        ),
        flush=True,
    )
    line = drift_threshold_line(slack_s, drift_shift_s, len(chans), args.delay_per_channel_ms)
    if line:
        print(line, flush=True)
    vad_net = load_silero_vad()
    # several channels share one voice-activity thread, their windows batched (a channel's own
    # network calls cost each feature thread ~20 interpreter-lock round trips per 32 ms window)
    vad = VadBatcher(vad_net, streams=len(avatars)) if len(avatars) > 1 else vad_net
    encoder = BatchedEncoder(
        models.whisper, models.feature_extractor, max_batch=canvas_enc.max_batch, engine=canvas_enc
    )
    channels, recordings = [], []
    for name, a in avatars.items():
        w, h = a.size
        output_cls = ProcessOutput if args.output_mode == "process" else Output
        record = _targets(args.record, name, several)
        record = record and keep_earlier_file(record)
        recordings.append(record)
        outs = [
            output_cls(t, w, h, frame_log=frame_log, encoder_threads=args.encoder_threads)
            for t in (_targets(args.rtmp, name, several), record)
            if t
        ]
        channels.append(
            LiveChannel(
                name,
                a,
                models.whisper,
                models.feature_extractor,
                vad,
                stream_cfg,
                delay_s,
                outs,
                encoder,
                frame_log,
                drift_shift_s=drift_shift_s,
            )
        )
    disks = RecordingDisks(recordings)
    if disks.folders:
        print(disks.start_line(), flush=True)
        disks.start()
    for o in (o for ch in channels for o in ch.outputs):  # started together, awaited together
        if not o.wait_ready(30.0):
            print(f"warning: output {o.label} is not ready after 30 s; starting anyway", flush=True)
    worker = GpuWorker(
        gen,
        channels,
        horizon_s=max(0.2, delay_s - lookahead_s),
        shed=not args.no_load_shedding,
        fill=False if args.no_batch_fill else None,
        frame_log=frame_log,
        full_batch_s=compute_s,
    )
    sinks = {ch.name: ch for ch in channels}
    speech_sinks = []
    if speech is not None:
        speech_sinks = _speech_sinks(args, speech, groq_cfg, font, channels, vad_net, several)
        sinks.update({s.channel.name: s for s in speech_sinks})
        budget_s = groq_cfg.min_pause_ms / 1000 + groq_cfg.utterance_deadline_s + delay_s
        print(
            f"groq {args.groq}: {groq_cfg.utterance_deadline_s:g} s per utterance (timeouts "
            f"stt {groq_cfg.stt_timeout_s:g} / chat {groq_cfg.chat_timeout_s:g} / tts "
            f"{groq_cfg.tts_timeout_s:g} s, {groq_cfg.max_retries} retry); after a speaker "
            f"stops, the pause ({groq_cfg.min_pause_ms} ms) + that budget + D = at most "
            f"{budget_s:.1f} s before "
            + (
                "the fallback speaks"
                if args.groq == "voice"
                else "its caption is given up (its audio is never held back)"
            ),
            flush=True,
        )
    if not args.no_gc_freeze:  # everything built so far lives as long as the process
        frozen, collect_ms = freeze_startup_heap()
        print(
            f"start-up heap: {frozen} objects frozen after one full garbage collection "
            f"({collect_ms:.0f} ms, what each later full collection would have stopped every "
            "thread for)",
            flush=True,
        )
    gc_watch = GcWatch().start()
    wake = WakeProbe().start()
    host_load = HostLoad(frame_log=frame_log).start()
    server = IngestServer(
        sinks,
        IngestConfig(host=args.host, port=args.port, token=token, ssl_context=ssl_ctx),
        metrics=lambda: metrics_text(
            channels, worker, speech_sinks, wake, gc_watch, host_load, disks
        ),
        preview=lambda name: next((ch.preview_jpeg() for ch in channels if ch.name == name), None),
        health=lambda: live_health(channels),
    )
    sampler = None
    if args.profile:
        from musetalk_rt.live.sampler import StackSampler

        sampler = StackSampler().start()
    for ch in channels:
        ch.start()
    for sp in speech_sinks:
        sp.start()
    worker.start()
    try:
        asyncio.run(
            _serve(
                server,
                channels,
                worker,
                args.duration_s,
                args.status_interval_s,
                gc_watch,
                host_load,
                disks,
            )
        )
    finally:
        _shield_shutdown()

        def step(what: str, fn) -> None:
            # one failing step (a profile on a full disk) must not keep the recordings from
            # their trailers: each is tried, its failure logged, and the next one runs
            try:
                fn()
            except Exception:
                log.exception("shutdown: %s failed", what)

        for what, fn in (("wake probe", wake.stop), ("host meter", host_load.stop)):
            step(what, fn)
        step("disk watch", disks.stop)
        step("collector watch", gc_watch.stop)
        if sampler is not None:

            def write_profile() -> None:
                sampler.stop()
                sampler.write(args.profile)
                print(f"thread profile written to {args.profile}", flush=True)

            step("thread profile", write_profile)
        for sp in speech_sinks:
            step(f"speech {sp.channel.name}", sp.stop)
        for ch in channels:  # every clock stops at the same moment, then outputs finish
            step(f"clock {ch.name}", ch.halt)
        step("GPU worker", worker.stop)
        for ch in channels:
            step(f"channel {ch.name}", lambda ch=ch: ch.stop(close_outputs=False))
        step("outputs", lambda: close_all([o for ch in channels for o in ch.outputs]))
        if isinstance(vad, VadBatcher):
            step("voice activity", vad.close)
        if frame_log:
            step("frame log", frame_log.close)
    result = {
        "live": [ch.stats_dict() for ch in channels],
        "delay_ms": round(delay_s * 1000),
        **worker.stats_dict(),
        "thread_wake_delay_ms": wake.summary(),
        "gc": gc_watch.summary(),
        "host_cpu": host_load.summary(),
    }
    if speech_sinks:
        result["speech"] = [{"channel": sp.channel.name, **sp.stats_dict()} for sp in speech_sinks]
    summary = json.dumps(result)
    # one write, on a line of its own: log lines from other threads share the terminal or pipe
    sys.stdout.write(f"\n{summary}\n")
    sys.stdout.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from musetalk_rt.cli import (
        _add_common,
        _add_compile_options,
        _add_streaming_options,
        _csv_ints,
    )
    from musetalk_rt.engines import DTYPES, available_engines

    p = OneLineParser(
        prog=PROG,
        description="serve live channels: ingest audio, stream video",
    )
    p.add_argument("--avatar", help="one channel named after this prepared avatar")
    p.add_argument(
        "--channel", action="append", metavar="NAME=AVATAR", help="a channel (repeatable)"
    )
    p.add_argument(
        "--rtmp",
        help="rtmp[s]://HOST[:PORT]/APP/KEY, checked at start (use {channel} with several "
        "channels)",
    )
    p.add_argument(
        "--record",
        help="also record to FILE.mp4 (or .m4v .mov .mkv .flv .ts; use {channel} with "
        "several; fragmented MP4: a run killed mid-show leaves a file that plays up to its last "
        "2 s; a FILE that holds an earlier run's recording is kept and this run writes "
        "FILE.1.mp4; after a failed writer the recording goes on in FILE.part2.mp4)",
    )
    p.add_argument("--host", default="0.0.0.0", help="ingest address (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=8765, help="ingest port (default: 8765)")
    p.add_argument("--token", help="sender token (default: $MUSETALK_RT_TOKEN)")
    p.add_argument("--cert", help="TLS certificate (PEM) for wss://")
    p.add_argument("--key", help="TLS private key (PEM), if not inside --cert")
    p.add_argument(
        "--engine",
        default="eager",
        help=f"engine: {', '.join(available_engines())} (default: eager; the engine cache "
        "under --models-dir is used when it holds a matching build)",
    )
    p.add_argument(
        "--dtype", default="fp16", choices=list(DTYPES), help="compute dtype (default: fp16)"
    )
    p.add_argument("--fallback", help="engine to use if --engine cannot run here (logged)")
    p.add_argument(
        "--batch-sizes",
        type=_csv_ints,
        default=[4],
        help="buckets the GPU worker batches into (default: 4)",
    )
    p.add_argument(
        "--delay-ms",
        type=int,
        help="playout delay D (default: derived at start from an idle GPU, plus "
        "--delay-per-channel-ms for each channel beyond the first; the status line names a "
        "longer one when frames come late for want of it)",
    )
    p.add_argument(
        "--delay-margin-ms",
        type=int,
        default=DEFAULT_DELAY_MARGIN_MS,
        help="spare time in the derived D for scheduling and jitter (default: "
        f"{DEFAULT_DELAY_MARGIN_MS}; less lowers the delay and risks late frames)",
    )
    p.add_argument(
        "--delay-per-channel-ms",
        type=int,
        default=DEFAULT_DELAY_PER_CHANNEL_MS,
        help="added to the derived D for each channel beyond the first: the batches and the "
        f"audio path slow down under load (default: {DEFAULT_DELAY_PER_CHANNEL_MS}; 12 channels "
        "on an H200 had 31%% of their talking frames late without it, none at D 800 ms)",
    )
    p.add_argument(
        "--encoder-threads",
        type=int,
        help="x264 threads per output (default: x264's own, 1.5 per core; with many channels "
        "the outputs together oversubscribe the host)",
    )
    p.add_argument(
        "--output-mode",
        choices=("process", "thread"),
        default="process",
        help="where each output's encoder runs: its own process (default; keeps x264 and the "
        "muxer off the live process's interpreter lock, and a process stuck on an RTMP server "
        "that stopped answering is restarted) or a thread of the live process (no such "
        "watchdog)",
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        help="torch's CPU thread pool (default: torch's, one per core; on a GPU host only the "
        "voice activity runs there: one shared thread for several channels, else the channel's)",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        help="how long a Python thread may hold the interpreter lock while another waits "
        "(default: Python's, 5 ms; /metrics' thread_wake_delay_ms shows what waiting costs)",
    )
    p.add_argument(
        "--gpu-wait",
        choices=("spin", "block"),
        default="spin",
        help="how the GPU worker waits for a batch's faces (CUDA): spin on a core (default, "
        "CUDA's own; at 16 channels on an H200 the worker used 56%% of a core, most of it "
        "there) or sleep until the GPU is done. Measured twice at 20 channels on an H200, "
        "both worse than spinning: with --profile on, 31%% of the talking frames late (the "
        "profiler's own passes took up to ~31%% of the time); without it, 8.4%% late, in the "
        "first minute and one host-wide slowdown, against 3 frames spinning on the same host "
        "just before. Spin stays the default; use block only where a core matters more than "
        "the margin, and measure",
    )
    p.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the objects built at start-up to Python's garbage collector (by default they "
        "are frozen after one collection: a full collection walks them all, hundreds of ms with "
        "every thread stopped; /metrics' gc_pause_ms_max shows the pauses either way)",
    )
    p.add_argument("--duration-s", type=float, help="stop after this long (dry runs, tests)")
    p.add_argument(
        "--no-load-shedding",
        action="store_true",
        help="generate every due speech frame, also those that cannot be ready by their "
        "deadline (by default they are skipped, shown idle and counted late, so that an "
        "overloaded GPU keeps the other frames on time)",
    )
    p.add_argument(
        "--no-batch-fill",
        action="store_true",
        help="launch a partial batch as soon as the GPU can take it (by default, on CUDA, it "
        "waits for more frames while its earliest deadline allows: a batch is padded to its "
        "bucket, so fuller batches serve more frames per GPU second)",
    )
    p.add_argument(
        "--status-interval-s",
        type=float,
        default=30.0,
        help="log a status line this often: frames/s, mean batch, late frames, voice-to-frame "
        "p95, outputs down (default: 30; 0: off)",
    )
    p.add_argument("--log-json", action="store_true", help="structured logs: one JSON per line")
    p.add_argument(
        "--frame-log",
        help="append per-frame timestamps (audio arrival, emission, encoding) to this JSONL "
        "file, for the end-to-end probe (default: off)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE.json",
        help="sample every thread's stack; write where each thread was (share of samples) and "
        "its CPU seconds. Each pass holds the interpreter lock (the file's sampler_share says "
        "how long: ~2%% with 72 waiting threads on a 2-core host, more in a busy process), so "
        "profile with margin to spare",
    )
    g = p.add_argument_group("Groq speech (key from $GROQ_API_KEY; settings in --config [groq])")
    g.add_argument(
        "--groq",
        default="off",
        choices=("off", "captions", "voice"),
        help="captions: live transcripts; voice: the avatar speaks Groq's speech of the MC's "
        "words (default: off)",
    )
    g.add_argument(
        "--captions",
        help="write captions to FILE.srt or FILE.vtt ({channel} ok; an earlier run's file is kept "
        "as --record's is)",
    )
    g.add_argument(
        "--burn-captions", action="store_true", help="draw captions into the video (CJK font)"
    )
    g.add_argument(
        "--config",
        help="TOML file: its [live] table is an event preset (defaults for these options; "
        "configs/event.toml for one channel, configs/channels.toml for many; with another "
        "--engine, its options that engine does not take are left out), its [groq] table "
        "sets models, voice, timeouts",
    )
    _add_streaming_options(p)
    _add_compile_options(p)
    _add_common(p)
    return p


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line (for log shippers)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point; one clear line on bad input."""
    from musetalk_rt.live.preset import parse_with_preset

    try:
        args = parse_with_preset(build_parser(), argv)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    handler = logging.StreamHandler()
    plain = logging.Formatter("%(asctime)s %(name)s %(message)s")
    handler.setFormatter(JsonLogFormatter() if args.log_json else plain)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        return run(args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if os.environ.get("MUSETALK_RT_DEBUG"):
            raise
        return report_unexpected(PROG, exc)
