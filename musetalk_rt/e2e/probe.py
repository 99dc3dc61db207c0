"""``musetalk-rt bench e2e``: voice to screen through a real RTMP server, as a hall player sees it.

The probe starts (or uses) an RTMP server, starts ``python -m musetalk_rt.live`` for one
channel with a frame log (:mod:`musetalk_rt.live.framelog`), reads the channel back from the
RTMP server with PyAV the way a low-latency player would, and streams a sender's audio with
speech markers (:mod:`.markers`) at known samples. For each marker it finds the onset in the
received audio and the first received frame whose mouth left the idle frame, and puts the
sender's, the server's and the receiver's moments on one clock (the host's monotonic clock:
every process runs on this host; only the RTMP server may be elsewhere with ``--rtmp``).

Long runs (``--duration-s`` of hours) report every ``--window-s``: delays, A/V offset, late
frames, output drops and the live process's resident memory, and at the end their drift.

With ``--guard`` the exit status is 5 when the budget breaks (p95 voice-to-received over
``--budget-ms``, any A/V offset over ``--av-limit-ms``, lost markers), also when the recorded
GPU compute figures (``--gpu-figures``) replace the CPU's in the playout delay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from musetalk_rt.e2e.analysis import (
    AudioPiece,
    SentMarker,
    VideoPiece,
    evaluate_marker,
    find_gpu_figures,
    gpu_scenarios,
    gpu_substitute,
    marker_table,
    percentile,
    preset_row_options,
    soak_figures,
    stats,
    summarize,
    summary_table,
    verdict,
    window_table,
)
from musetalk_rt.e2e.markers import MarkerPlan, default_speech, marker_snippet
from musetalk_rt.errors import UserError
from musetalk_rt.live.output import AUDIO_PER_FRAME

EXIT_OVER_BUDGET = 5
EVENT_SCENARIO = "compile-fp16-b4"  # the bench scenario of configs/event.toml
TOKEN = "e2e-probe"
PROBE_AVATAR = "e2e-probe"
PROBE_BBOX = "136,100,376,420"  # the face box of :func:`probe_face_image`
# What a low-latency hall player asks of FFmpeg: no input buffering, a short probe, a 100 ms
# RTMP client buffer, live mode.
LOW_LATENCY_OPTIONS = {
    "rtmp_live": "live",
    "rtmp_buffer": "100",
    "fflags": "nobuffer",
    "flags": "low_delay",
    "probesize": "32768",
    "analyzeduration": "500000",
}


def probe_face_image(path: Path) -> Path:
    """A drawn 512x512 face (the probe's default avatar; its face box is ``PROBE_BBOX``)."""
    import cv2

    img = np.full((512, 512, 3), (70, 90, 120), np.uint8)
    cv2.ellipse(img, (256, 260), (120, 160), 0, 0, 360, (160, 190, 225), -1)
    for x in (206, 306):
        cv2.circle(img, (x, 220), 14, (60, 40, 30), -1)
    cv2.ellipse(img, (256, 340), (45, 10), 0, 0, 360, (70, 70, 170), -1)
    cv2.imwrite(str(path), img)
    return path


# -- the three actors -----------------------------------------------------------------------------


class MarkerSender(threading.Thread):
    """Streams the marker plan to ``/ingest/<channel>`` in real time (20 ms chunks)."""

    def __init__(self, url: str, token: str, plan: MarkerPlan, chunk: int = 320):
        super().__init__(name="e2e sender", daemon=True)
        self.url, self.token, self.plan, self.chunk = url, token, plan, chunk
        self.sent: list[SentMarker] = []
        self.error: str | None = None
        self.started_at: float | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # reported by the probe, never a traceback
            self.error = f"{type(exc).__name__}: {exc}"

    async def _main(self) -> None:
        from websockets.asyncio.client import connect

        hello = {
            "type": "hello",
            "token": self.token,
            "format": "pcm_s16le",
            "sample_rate": 16000,
            "channels": 1,
        }
        at = {self.plan.onset(k) // self.chunk: k for k in range(self.plan.count)}
        async with connect(self.url, open_timeout=10, max_size=2**20) as ws:
            await ws.send(json.dumps(hello))
            first = json.loads(await ws.recv())
            if first.get("type") != "ready":
                raise RuntimeError(f"the live process refused the sender: {first}")

            async def drain():
                with contextlib.suppress(Exception):
                    async for _ in ws:
                        pass

            reader = asyncio.create_task(drain())
            t0 = self.started_at = time.monotonic()
            n = -(-self.plan.total_samples // self.chunk)
            for j in range(n):
                if self.stop_event.is_set():
                    break
                wait = t0 + j * self.chunk / 16000 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                x = self.plan.samples(j * self.chunk, (j + 1) * self.chunk)
                pcm = np.clip(np.rint(x * 32767), -32768, 32767).astype("<i2").tobytes()
                if j in at:
                    k = at[j]
                    self.sent.append(SentMarker(k, self.plan.onset(k), time.monotonic()))
                await ws.send(pcm)
            await ws.send(json.dumps({"type": "flush"}))
            await ws.send(json.dumps({"type": "bye"}))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader, 5)


class Receiver(threading.Thread):
    """Plays the RTMP stream with PyAV and keeps the last ``ring_s`` seconds of it.

    Audio is kept as decoded (16 kHz mono float), video as the grey mouth region at half size;
    each piece carries its presentation time and the moment its packet left the demuxer.
    """

    def __init__(self, url: str, region: tuple[int, int, int, int], ring_s: float):
        super().__init__(name="e2e receiver", daemon=True)
        self.url, self.region = url, region
        self.audio: deque[AudioPiece] = deque(maxlen=int(ring_s * 16000 / 1024) + 1)
        self.video: deque[VideoPiece] = deque(maxlen=int(ring_s * 25) + 1)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.opens = 0
        self.errors: deque[str] = deque(maxlen=5)
        self.video_frames = 0
        self.audio_frames = 0
        self.first_at: float | None = None
        self.codecs: dict[str, str] = {}

    def snapshot(self) -> tuple[list[AudioPiece], list[VideoPiece]]:
        with self.lock:
            return list(self.audio), list(self.video)

    def _crop(self, frame) -> np.ndarray:
        import cv2

        x1, y1, x2, y2 = self.region
        g = frame.to_ndarray(format="gray")[y1:y2, x1:x2]
        return cv2.resize(g, ((x2 - x1) // 2, (y2 - y1) // 2), interpolation=cv2.INTER_AREA)

    def run(self) -> None:
        import av

        while not self.stop_event.is_set():
            try:
                with av.open(self.url, options=LOW_LATENCY_OPTIONS, timeout=(10.0, 5.0)) as c:
                    self.opens += 1
                    self.codecs = {s.type: s.codec_context.name for s in c.streams}
                    for packet in c.demux():
                        if self.stop_event.is_set():
                            return
                        if packet.size == 0:
                            continue
                        t = time.monotonic()
                        if self.first_at is None:
                            self.first_at = t
                        for frame in packet.decode():
                            pts = frame.pts if frame.pts is not None else packet.pts
                            if pts is None:
                                continue
                            pts_s = float(pts * (frame.time_base or packet.time_base))
                            if packet.stream.type == "audio":
                                x = frame.to_ndarray().reshape(frame.layout.nb_channels, -1)[0]
                                piece = AudioPiece(pts_s, x.astype(np.float32), t)
                                with self.lock:
                                    self.audio.append(piece)
                                self.audio_frames += 1
                            elif packet.stream.type == "video":
                                piece = VideoPiece(pts_s, self._crop(frame), t)
                                with self.lock:
                                    self.video.append(piece)
                                self.video_frames += 1
            except (av.FFmpegError, OSError, ValueError) as exc:
                self.errors.append(str(exc)[:200])
                self.stop_event.wait(0.3)


class FrameLogTail(threading.Thread):
    """Follows the live process's frame log: frame records of one output, sessions, delay."""

    def __init__(self, path: Path, target: str, keep_frames: int = 2000):
        super().__init__(name="e2e frame log", daemon=True)
        from musetalk_rt.live.output import redact_url

        # the live process writes outputs under their redacted names (no stream key)
        self.path, self.target, self.keep = path, redact_url(target), keep_frames
        self.frames: dict[int, dict] = {}
        self.delay: dict | None = None
        self.start_rec: dict | None = None
        self.sessions: list[dict] = []
        self.moves: list[dict] = []  # the last session's clock_shift records
        self.counts = {"frames": 0, "speech": 0, "late": 0, "late_speech": 0}
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def snapshot(self) -> dict[int, dict]:
        with self.lock:
            return dict(self.frames)

    def _take(self, rec: dict) -> None:
        ev = rec.get("ev")
        if ev == "frame" and rec.get("out") == self.target:
            with self.lock:
                self.frames[rec["frame"]] = rec
                if len(self.frames) > self.keep * 1.25:
                    cut = max(self.frames) - self.keep
                    self.frames = {k: v for k, v in self.frames.items() if k >= cut}
            self.counts["frames"] += 1
            self.counts["speech"] += rec["kind"] == "speech"
            self.counts["late"] += rec["kind"] == "late"
            self.counts["late_speech"] += rec["kind"] == "late" and bool(rec.get("speech"))
        elif ev == "delay":
            self.delay = rec
        elif ev == "start":
            self.start_rec = rec
        elif ev == "session":
            self.sessions.append(rec)
            self.moves = []
        elif ev == "clock_shift":  # the last session's timeline moved (a drifting sender clock)
            self.moves.append(rec)

    def run(self) -> None:
        while not self.path.exists() and not self.stop_event.wait(0.05):
            pass
        if not self.path.exists():
            return
        with self.path.open() as f:
            buf = ""
            while True:
                line = f.readline()
                if not line:
                    if self.stop_event.is_set():
                        return
                    time.sleep(0.05)
                    continue
                buf += line
                if not buf.endswith("\n"):
                    continue
                with contextlib.suppress(json.JSONDecodeError):
                    self._take(json.loads(buf))
                buf = ""


# -- helpers --------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (Linux ``/proc``; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


METRIC_NAMES = {
    "late_frames": "musetalk_late_frames_total",
    "skipped_frames": "musetalk_skipped_frames_total",
    "dropped_full": "musetalk_output_dropped_full_total",
    "dropped_down": "musetalk_output_dropped_down_total",
    "reconnects": "musetalk_output_reconnects_total",
}


def scrape_metrics(port: int) -> dict[str, float] | None:
    """The live process's counters the soak follows (summed over labels)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return None
    out = dict.fromkeys(METRIC_NAMES, 0.0)
    for line in text.decode().splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[-1]
        for key, metric in METRIC_NAMES.items():
            if name == metric:
                with contextlib.suppress(ValueError):
                    out[key] += float(value)
    return out


def _region(avatar) -> tuple[int, int, int, int]:
    """The lower half of the face box over the idle cycle (x1, y1, x2, y2), even-sized."""
    start, end = avatar.cycle
    boxes = [avatar.boxes[i] for i in range(start, end)]
    w, h = avatar.size
    x1 = max(0, min(b.x1 for b in boxes))
    y1 = max(0, min((b.y1 + b.y2) // 2 for b in boxes))
    x2 = min(w, max(b.x2 for b in boxes))
    y2 = min(h, max(b.y2 for b in boxes))
    return x1, y1, x1 + (x2 - x1) // 2 * 2, y1 + (y2 - y1) // 2 * 2


def _references(avatar, region) -> dict[int, np.ndarray]:
    import cv2

    x1, y1, x2, y2 = region
    out = {}
    start, end = avatar.cycle
    for i in range(start, end):
        g = cv2.cvtColor(avatar.frames[i], cv2.COLOR_RGB2GRAY)[y1:y2, x1:x2]
        out[i] = cv2.resize(
            g, ((x2 - x1) // 2, (y2 - y1) // 2), interpolation=cv2.INTER_AREA
        ).astype(np.float32)
    return out


class _Live:
    """The live process: started, watched, stopped; its output kept in a log file."""

    def __init__(self, cmd: list[str], log_path: Path):
        self.log_path = log_path
        self.lines: deque[str] = deque(maxlen=400)
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.append(line)
            self._log.write(line)
            self._log.flush()

    def wait_until(self, done, timeout_s: float, during: str, late, poll_s: float = 0.2) -> None:
        """Poll ``done()`` until true; one clear error if the process exits or time runs out.

        Args:
            done: The condition.
            timeout_s: How long to wait.
            during: Words for an exit meanwhile ("during start-up").
            late: ``() -> str``, the message when ``timeout_s`` passes.
            poll_s: Polling interval.
        """
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.proc.poll() is not None:
                raise UserError(f"the live process exited {during}: {self.last_error()}", 3)
            if time.monotonic() > deadline:
                raise UserError(late(), 3)
            time.sleep(poll_s)

    def wait_listening(self, timeout_s: float) -> None:
        self.wait_until(
            lambda: any("ingest listening" in ln for ln in list(self.lines)),
            timeout_s,
            "during start-up",
            lambda: (
                f"the live process did not listen within {timeout_s:.0f} s "
                f"(--start-timeout-s); its log: {self.log_path}"
            ),
        )

    def last_error(self) -> str:
        lines = [ln.strip() for ln in list(self.lines) if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()]
        return (errs or lines or ["(no output)"])[-1][:400]

    def stop(self, timeout_s: float = 60.0) -> dict | None:
        """SIGTERM, wait, and return the process's final summary JSON (None if absent)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._thread.join(5)
        self._log.close()
        for line in reversed(list(self.lines)):
            if line.startswith('{"live"'):
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(line)
        return None


# -- the run --------------------------------------------------------------------------------------


def _live_cmd(args, avatars_dir: Path, url: str, port: int, frame_log: Path) -> list[str]:
    from musetalk_rt.cli import compile_argv

    cmd = [
        sys.executable,
        "-m",
        "musetalk_rt.live",
        "--avatar",
        args.avatar or PROBE_AVATAR,
        "--avatars-dir",
        str(avatars_dir),
        "--rtmp",
        url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--weights",
        args.weights,
        "--models-dir",
        str(args.models_dir),
        "--device",
        args.device,
        "--engine",
        args.engine,
        "--dtype",
        args.dtype,
        "--batch-sizes",
        ",".join(map(str, args.batch_sizes)),
        "--stream-lookahead-ms",
        str(args.stream_lookahead_ms),
        "--stream-hop",
        str(args.stream_hop),
        "--frame-log",
        str(frame_log),
        "--log-json",
    ]
    if args.stream_context_ms is not None:
        cmd += ["--stream-context-ms", str(args.stream_context_ms)]
    if args.delay_ms:
        cmd += ["--delay-ms", str(args.delay_ms)]
    if args.delay_margin_ms is not None:
        cmd += ["--delay-margin-ms", str(args.delay_margin_ms)]
    if args.fallback:
        cmd += ["--fallback", args.fallback]
    return cmd + compile_argv(args)


def _prepare_probe_avatar(args, work: Path) -> Path:
    avatars = work / "avatars"
    img = probe_face_image(work / "probe_face.png")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "musetalk_rt",
            "avatar",
            "prepare",
            "--source",
            str(img),
            "--id",
            PROBE_AVATAR,
            "--bbox",
            PROBE_BBOX,
            "--avatars-dir",
            str(avatars),
            "--weights",
            args.weights,
            "--models-dir",
            str(args.models_dir),
            "--device",
            args.device,
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        line = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"preparing the probe's avatar failed: {line}", res.returncode)
    return avatars


def _check_args(args) -> None:
    from musetalk_rt.live.output import RTMP_SCHEMES

    if args.duration_s <= 0 or args.period_s <= 0 or args.window_s <= 0:
        raise UserError("--duration-s, --period-s and --window-s must be positive")
    if args.rtmp and not args.rtmp.startswith(RTMP_SCHEMES):
        raise UserError(f"--rtmp {args.rtmp!r}: expected rtmp://HOST[:PORT]/APP/KEY")
    if args.speech and not Path(args.speech).is_file():
        raise UserError(f"--speech {args.speech}: no such file")
    preset = getattr(args, "gpu_figures_preset", None)
    if preset is not None and not Path(preset).is_file():
        raise UserError(f"--gpu-figures-preset {preset}: no such file (configs/event.toml?)")
    _gpu_preset(args)  # a bad file or value: its one line now, not after the run
    _check_gpu_scenario(args)
    # an engine that cannot run here (fp16 on a CPU): its line now, before nginx and the live
    # process start (which would refuse it the same way)
    from musetalk_rt.cli import _device, _engine_options
    from musetalk_rt.engines import parse_dtype, select_engine

    select_engine(
        args.engine,
        _device(args.device),
        parse_dtype(args.dtype),
        fallback=getattr(args, "fallback", None),
        fix_hint="",
        **_engine_options(args),
    )
    if args.avatar and not (Path(args.avatars_dir) / args.avatar).is_dir():
        raise UserError(
            f"avatar {args.avatar!r} is not prepared under {args.avatars_dir} "
            "(leave --avatar out to let the probe prepare its own)"
        )


def _marker_plan(args) -> tuple[MarkerPlan, str]:
    from musetalk_rt.media import load_audio

    if args.speech:
        speech, source = load_audio(args.speech).to_mono_16k(), str(args.speech)
    else:
        speech, source = default_speech()
    try:
        plan = MarkerPlan(
            marker_snippet(speech, args.marker_s), args.period_s, 2.0, args.duration_s
        )
    except ValueError as exc:
        raise UserError(f"markers: {exc}") from None
    if plan.count == 0:
        raise UserError(
            f"--duration-s {args.duration_s:g} holds no marker (the first starts 2 s in and "
            f"lasts {len(plan.snippet) / 16000:.1f} s)"
        )
    return plan, source


def _window(state: dict, t_start: float, t_end: float, rows: list[dict]) -> dict:
    mine = [r for r in rows if t_start <= r["t_voice"] < t_end]
    ok = [r for r in mine if r.get("status") == "ok"]
    v2r = [r["voice_to_received_ms"] for r in ok]
    av = [r["av_offset_ms"] for r in ok]
    s2e = [r["server_to_encoded_ms"] for r in ok]
    prev, cur = state["prev"], state["cur"]

    def delta(key: str) -> int:
        a, b = (prev["metrics"] or {}).get(key), (cur["metrics"] or {}).get(key)
        return int(b - a) if a is not None and b is not None else 0

    return {
        "kind": "window",
        "t_start_s": round(t_start - state["t0"], 1),
        "t_end_s": round(t_end - state["t0"], 1),
        "markers": len(mine),
        "found": len(ok),
        "voice_to_received_p50_ms": percentile(v2r, 0.5),
        "voice_to_received_p95_ms": percentile(v2r, 0.95),
        "voice_to_received_max_ms": max(v2r) if v2r else None,
        "server_to_encoded_p50_ms": percentile(s2e, 0.5),
        "av_offset_median_ms": percentile(av, 0.5),
        "av_offset_min_ms": min(av) if av else None,
        "av_offset_max_ms": max(av) if av else None,
        "frames": cur["counts"]["frames"] - prev["counts"]["frames"],
        "late_frames": delta("late_frames"),
        "late_speech_frames": cur["counts"]["late_speech"] - prev["counts"]["late_speech"],
        "skipped_frames": delta("skipped_frames"),
        "output_drops": delta("dropped_full") + delta("dropped_down"),
        "reconnects": delta("reconnects"),
        "rss_mb": cur["rss_mb"],
    }


def run_probe(args) -> int:
    """Run the probe (see the module docstring); returns the exit status."""
    # what the summary uses at the end, imported now: an hour's soak must not lose its summary
    # to a checkout edited meanwhile (newer files loaded beside the modules of the start)
    import musetalk_rt.live.app  # noqa: F401
    from musetalk_rt.avatar import load_avatar
    from musetalk_rt.bench import environment, results_dir
    from musetalk_rt.cli import _device
    from musetalk_rt.testing.rtmp import RtmpServer, free_port, rtmp_available

    _check_args(args)
    if not args.rtmp and rtmp_available():
        raise UserError(f"{rtmp_available()}; or give --rtmp URL of a running server", 3)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="e2e-probe-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(_device(args.device))
    plan, source = _marker_plan(args)
    print(
        f"markers: {plan.count} × {len(plan.snippet) / 16000:.2f} s of speech ({source}) every "
        f"{args.period_s:g} s over {args.duration_s:g} s",
        flush=True,
    )
    avatars_dir = Path(args.avatars_dir) if args.avatar else _prepare_probe_avatar(args, work)
    avatar = load_avatar(args.avatar or PROBE_AVATAR, avatars_dir)
    region = _region(avatar)
    refs = _references(avatar, region)

    def reference(n: int) -> np.ndarray:
        return refs[avatar.cycle_frame(n)]

    out_dir = Path(args.out) if args.out else results_dir(Path("experiments/results"), env)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "e2e.jsonl"
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    def write_row(row: dict) -> None:
        with rows_path.open("a") as f:
            f.write(json.dumps({"run": run_id, **row}) + "\n")

    try:
        server = None if args.rtmp else RtmpServer().start()
    except RuntimeError as e:  # nginx missing or refusing to start: say what it said
        raise UserError(f"the probe's RTMP server did not start: {e}", 3) from None
    url = args.rtmp or server.url("e2e")
    print(f"RTMP: {url} ({'external' if args.rtmp else f'{server.nginx} on loopback'})", flush=True)
    port = free_port()
    frame_log = work / "frames.jsonl"
    live = tail = receiver = sender = None
    marker_rows: list[dict] = []
    windows: list[dict] = []
    try:
        t_start = time.monotonic()
        live = _Live(_live_cmd(args, avatars_dir, url, port, frame_log), work / "live.log")
        tail = FrameLogTail(frame_log, url)
        tail.start()
        live.wait_listening(args.start_timeout_s)
        startup_s = time.monotonic() - t_start
        while tail.delay is None and live.proc.poll() is None:
            time.sleep(0.05)
        delay = tail.delay or {}
        delay_s = delay.get("delay_ms", 0) / 1000
        print(
            f"live process up in {startup_s:.1f} s; playout delay D = {delay.get('delay_ms')} ms "
            f"({'derived' if delay.get('derived') else 'fixed'}: look-ahead "
            f"{delay.get('lookahead_ms')} ms, whisper canvas {delay.get('canvas_ms')} ms, batch of "
            f"{delay.get('batch')} {delay.get('batch_ms')} ms)",
            flush=True,
        )
        receiver = Receiver(url, region, ring_s=max(30.0, 2 * delay_s + 20.0))
        receiver.start()
        live.wait_until(
            lambda: receiver.video_frames >= 25,
            30.0 + delay_s,
            "before video came back",
            lambda: (
                f"no video came back from {url} within {30 + delay_s:.0f} s "
                f"(receiver: {list(receiver.errors)[-1:] or 'no error'})"
            ),
            poll_s=0.1,
        )
        # the live process names the channel after the avatar
        sender = MarkerSender(f"ws://127.0.0.1:{port}/ingest/{avatar.avatar_id}", TOKEN, plan)
        sender.start()
        while sender.started_at is None and sender.is_alive():
            time.sleep(0.01)
        if sender.started_at is None:
            raise UserError(f"the sender could not start: {sender.error}", 3)
        t0 = sender.started_at
        settle_s = delay_s + 4.0
        state = {
            "t0": t0,
            "prev": {"metrics": scrape_metrics(port), "counts": dict(tail.counts), "rss_mb": None},
        }
        pending_windows: list[tuple[float, float, dict]] = []
        windows_end: float | None = None
        evaluated = 0
        stream_end = t0 + args.duration_s
        next_window = min(t0 + args.window_s, stream_end)
        end = stream_end + settle_s
        print(
            f"streaming {args.duration_s:g} s; one line per {args.window_s:g} s window", flush=True
        )
        printed_head = False
        while True:
            now = time.monotonic()
            if live.proc.poll() is not None:
                raise UserError(f"the live process stopped: {live.last_error()}", 3)
            ready = [m for m in sender.sent[evaluated:] if m.t_voice + settle_s <= now]
            if ready:
                audio, video = receiver.snapshot()
                frames = tail.snapshot()
                base = tail.sessions[-1]["base_frame"] if tail.sessions else 0
                for m in ready:
                    f = m.onset_sample // AUDIO_PER_FRAME
                    moved = [r["offset"] for r in tail.moves if r["session_frame"] <= f]
                    row = evaluate_marker(
                        m,
                        base + (moved[-1] if moved else 0),
                        frames,
                        audio,
                        video,
                        reference,
                        args.lips_threshold,
                        args.period_s,
                    )
                    row["t_s"] = round(m.t_voice - t0, 3)
                    marker_rows.append(row)
                    write_row({"kind": "marker", **row})
                evaluated += len(ready)
            if next_window is not None and now >= next_window:
                cur = {
                    "metrics": scrape_metrics(port),
                    "counts": dict(tail.counts),
                    "rss_mb": rss_mb(live.proc.pid),
                }
                pending_windows.append((windows_end or t0, next_window, cur))
                windows_end = next_window
                next_window = (
                    None
                    if next_window >= stream_end
                    else min(next_window + args.window_s, stream_end)
                )
            while pending_windows and (pending_windows[0][1] + settle_s <= now or now >= end):
                w0, w1, cur = pending_windows.pop(0)
                state["cur"] = cur
                w = _window(state, w0, w1, marker_rows)
                state["prev"] = cur
                windows.append(w)
                write_row(w)
                if not printed_head:
                    print(window_table([]).splitlines()[0], flush=True)
                    printed_head = True
                print(window_table([w]).splitlines()[-1], flush=True)
            if now >= end and not pending_windows:
                break
            if sender.error:
                raise UserError(f"the sender failed: {sender.error}", 3)
            time.sleep(0.25)
    finally:
        for actor in (sender, receiver):
            if actor is not None:
                actor.stop_event.set()
        live_summary = live.stop() if live is not None else None
        if tail is not None:
            tail.stop_event.set()
        if server is not None:
            server.close()

    return _report(
        args,
        {
            "env": env,
            "delay": delay,
            "markers": marker_rows,
            "windows": windows,
            "live_summary": live_summary,
            "receiver": {"opens": receiver.opens, "codecs": receiver.codecs},
            "source": source,
            "startup_s": startup_s,
            "rows_path": rows_path,
            "work": work,
        },
        write_row,
    )


def _results_root(args) -> Path:
    """``--results-dir``, or this checkout's ``experiments/results``."""
    from musetalk_rt.bench import REPO_ROOT

    return args.results_dir or REPO_ROOT / "experiments" / "results"


def _gpu_scenario(args) -> str:
    """``--gpu-figures``, or the event preset's scenario where it is not given."""
    return getattr(args, "gpu_figures", None) or EVENT_SCENARIO


def _check_gpu_scenario(args) -> None:
    """Refuse a ``--gpu-figures`` scenario given that no recorded GPU row has, where rows are.

    Without any (an install without the results), or without ``--gpu-figures`` (the event
    preset's scenario, which a results folder of other rows need not hold), the run goes on and
    says "not recorded".

    Raises:
        UserError: Rows are recorded, none of this scenario (a typo, or a batch never benched).
    """
    scenario = getattr(args, "gpu_figures", None)
    if scenario in (None, "none"):
        return
    root = _results_root(args)
    known = gpu_scenarios(root)
    if known and scenario not in known:
        shown = difflib.get_close_matches(scenario, sorted(known), n=4, cutoff=0.5)
        shown = shown or sorted(known)[:8]
        more = ", ..." if len(known) > len(shown) else ""
        raise UserError(
            f"--gpu-figures {scenario}: no GPU bench row of that scenario in {root}; "
            f"recorded: {', '.join(shown)}{more} (or --gpu-figures none)"
        )


def _gpu_preset(args) -> tuple[Path | None, dict | None]:
    """The preset whose engine options the recorded GPU rows must have, and those options.

    A given ``--gpu-figures-preset``, or for the event preset's own scenario this checkout's
    event preset (absent from an install: then no filter). Read once, before the run, and kept
    on ``args``: a file edited during an hour's soak changes nothing, and a bad one is its one
    line at the start, not a traceback at the end.

    Raises:
        UserError: the preset does not parse or holds a value the live process would refuse.
    """
    from musetalk_rt.bench import REPO_ROOT

    cached = getattr(args, "_gpu_preset_resolved", None)
    if cached is not None:
        return cached
    preset = getattr(args, "gpu_figures_preset", None)
    if preset is None and _gpu_scenario(args) == EVENT_SCENARIO:
        preset = REPO_ROOT / "configs" / "event.toml"
    options = None
    if preset is not None and Path(preset).is_file():
        try:
            options = preset_row_options(preset)
        except UserError as exc:
            raise UserError(str(exc).replace("--config", "--gpu-figures-preset", 1)) from None
    resolved = (Path(preset) if options is not None else None, options)
    args._gpu_preset_resolved = resolved
    return resolved


def _gpu_estimate(args, delay: dict, marker_rows: list[dict]) -> dict | None:
    """Voice-to-received with the recorded GPU figures in the playout delay (None: not asked).

    The look-ahead and margin are this run's (``--stream-lookahead-ms``, ``--delay-margin-ms``;
    the live defaults otherwise) with one canvas per frame, as on a GPU; batch and canvas times
    come from the recorded rows, or stay the measured ones when none is recorded (and the
    report says so).
    """
    from musetalk_rt.audio.incremental import DEFAULT_CONFIG, MUSETALK_LOOKAHEAD_MS
    from musetalk_rt.bench import REPO_ROOT
    from musetalk_rt.live.app import DEFAULT_DELAY_MARGIN_MS, derive_delay_s

    if _gpu_scenario(args) == "none":
        return None
    preset, options = _gpu_preset(args)
    figs = find_gpu_figures(_results_root(args), _gpu_scenario(args), options)
    if options is not None:
        shown = Path(preset).resolve()
        if shown.is_relative_to(REPO_ROOT.resolve()):
            shown = shown.relative_to(REPO_ROOT.resolve())  # rows name no machine's paths
        figs["preset"] = shown.as_posix()
    else:
        figs["preset"] = None
    batch_ms = figs["batch"]["p95_ms"] if figs["batch"] else delay.get("batch_ms")
    canvas_ms = figs["canvas"]["ms"] if figs["canvas"] else delay.get("canvas_ms")
    extra = getattr(args, "stream_lookahead_ms", None)
    look_ms = MUSETALK_LOOKAHEAD_MS + extra if extra is not None else DEFAULT_CONFIG.lookahead_ms
    margin_ms = getattr(args, "delay_margin_ms", None)
    margin_ms = DEFAULT_DELAY_MARGIN_MS if margin_ms is None else margin_ms
    gpu_delay_ms = 1000 * derive_delay_s(
        look_ms / 1000, canvas_ms / 1000, batch_ms / 1000, margin_ms / 1000
    )
    subst = gpu_substitute(marker_rows, float(delay.get("delay_ms") or 0), gpu_delay_ms)
    return {
        **figs,
        "lookahead_ms": look_ms,
        "margin_ms": margin_ms,
        "delay_ms": round(gpu_delay_ms, 1),
        "cpu_delay_ms": delay.get("delay_ms"),
        "voice_to_received_ms": stats(subst),
    }


def _ms(v: float | None) -> str:
    return "n/a (no marker found)" if v is None else f"{v} ms"


def _mb(v: float | None) -> str:
    return "n/a (run shorter)" if v is None else f"{v:+.1f} MB"


def _report(args, run: dict, write_row) -> int:
    """Print the tables and verdict, write the summary row, end with one JSON line."""
    env, delay, windows, marker_rows = run["env"], run["delay"], run["windows"], run["markers"]
    summary = summarize(marker_rows)
    cpu_delay_ms = float(delay.get("delay_ms") or 0)
    gpu = _gpu_estimate(args, delay, marker_rows)
    gpu_p95 = gpu["voice_to_received_ms"]["p95"] if gpu else None
    soak = soak_figures(windows, args.rss_warmup_s)
    failures = verdict(summary, gpu_p95, args.budget_ms, args.av_limit_ms, soak, args.rss_bound_mb)
    print()
    if len(marker_rows) <= 120:
        print(marker_table(marker_rows))
        print()
    print(f"{summary['found']} of {summary['markers']} markers found; delays in ms:")
    print(summary_table(summary))
    print(
        f"server side: playout delay D {cpu_delay_ms:.0f} ms "
        f"({'derived' if delay.get('derived') else 'fixed by --delay-ms'}; look-ahead "
        f"{delay.get('lookahead_ms')} ms, whisper canvas {delay.get('canvas_ms')} ms, batch of "
        f"{delay.get('batch')} {delay.get('batch_ms')} ms measured at start on {env['gpu']})"
    )
    if len(windows) > 1:
        print(
            f"soak: {soak['windows']} windows, A/V offset drift {soak['av_offset_drift_ms']} ms, "
            f"delay drift {soak['delay_drift_ms']} ms, RSS {soak['rss_first_mb']} -> "
            f"{soak['rss_last_mb']} MB (max {soak['rss_max_mb']}; growth after "
            f"{args.rss_warmup_s:g} s: {_mb(soak['rss_growth_after_warmup_mb'])}, bound "
            f"{args.rss_bound_mb:g} MB), late frames "
            f"{soak['late_frames']} (while speech {soak['late_speech_frames']}), skipped "
            f"{soak['skipped_frames']}, output drops {soak['output_drops']}"
        )
    if gpu is not None:
        b, c = gpu["batch"], gpu["canvas"]
        where = (args.results_dir or Path("experiments/results")).as_posix()
        print(
            f"GPU figures for {_gpu_scenario(args)}"
            + (f" with the engine options of {gpu['preset']}" if gpu.get("preset") else "")
            + ": batch "
            + (
                f"p95 {b['p95_ms']} ms from {where}/{b['file']} ({b['gpu']}, {b['commit']}, "
                f"{b['time']})"
                if b
                else ("no row with those options" if gpu.get("preset") else "not recorded")
                + f": the measured {delay.get('batch_ms')} ms kept"
            )
            + "; whisper canvas "
            + (
                f"{c['ms']} ms from {where}/{c['file']} ({c['gpu']}, {c['commit']})"
                if c
                else f"not recorded: the measured {delay.get('canvas_ms')} ms kept"
            )
        )
        gs = gpu["voice_to_received_ms"]
        print(
            f"with them: D = {gpu['lookahead_ms']} look-ahead + 20 + canvas + 2 × batch + "
            f"{gpu.get('margin_ms', 100)} = "
            f"{gpu['delay_ms']:.0f} ms instead of {cpu_delay_ms:.0f}; "
            + (
                f"voice-to-received p50 {gs['p50']} ms, p95 {gs['p95']} ms, max {gs['max']} ms "
                "(estimate: CPU-measured sender, ingest, encoding and RTMP around the GPU's "
                "playout delay)"
                if gs["n"]
                else "no voice-to-received estimate (no marker was found)"
            )
        )
    v = summary["voice_to_received_ms"]
    budget_line = (
        f"budget: voice-to-received p95 {_ms(v['p95'])} (limit {args.budget_ms:g}), "
        f"|A/V offset| max {_ms(summary['av_offset_abs_max_ms'])} (limit {args.av_limit_ms:g})"
        + (f", GPU-figure p95 {gpu_p95} ms" if gpu_p95 is not None else "")
    )
    print(budget_line + (": PASS" if not failures else ": FAIL — " + "; ".join(failures)))
    result = {
        "kind": "summary",
        "weights": args.weights,
        "engine": args.engine,
        "dtype": args.dtype,
        "batch_sizes": args.batch_sizes,
        "stream_hop": args.stream_hop,
        "stream_lookahead_ms": args.stream_lookahead_ms,
        "duration_s": args.duration_s,
        "period_s": args.period_s,
        "rtmp": "external" if args.rtmp else "nginx-rtmp on loopback",
        "marker_speech": run["source"],
        "startup_s": round(run["startup_s"], 1),
        "delay": delay,
        **summary,
        "gpu_estimate": gpu,
        "soak": soak,
        "live_summary": run["live_summary"],
        "receiver": run["receiver"],
        "budget_ms": args.budget_ms,
        "av_limit_ms": args.av_limit_ms,
        "passed": not failures,
        "failures": failures,
        **env,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_row(result)
    print(f"rows: {run['rows_path']}; live log: {run['work'] / 'live.log'}")
    print(
        json.dumps(
            {
                "bench_e2e": str(run["rows_path"]),
                "markers": summary["markers"],
                "found": summary["found"],
                "voice_to_received_ms": summary["voice_to_received_ms"],
                "breakdown_p50_ms": {
                    k: summary[k]["p50"]
                    for k in (
                        "voice_to_server_ms",
                        "server_to_encoded_ms",
                        "encoded_to_received_ms",
                    )
                },
                "voice_to_encoded_ms": summary["voice_to_encoded_ms"],
                "av_offset_abs_max_ms": summary["av_offset_abs_max_ms"],
                "delay_ms": cpu_delay_ms,
                "gpu_voice_to_received_p95_ms": gpu_p95,
                "soak": {
                    k: soak[k]
                    for k in (
                        "av_offset_drift_ms",
                        "delay_drift_ms",
                        "rss_growth_after_warmup_mb",
                        "late_frames",
                        "late_speech_frames",
                    )
                },
                "passed": not failures,
                "failures": failures,
            }
        )
    )
    return EXIT_OVER_BUDGET if failures and args.guard else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``musetalk-rt bench e2e``."""
    from musetalk_rt.cli import (
        _add_common,
        _add_compile_options,
        _add_streaming_options,
        _csv_ints,
        _results_folder,
    )
    from musetalk_rt.engines import DTYPES

    g = p.add_argument_group("probe")
    g.add_argument(
        "--duration-s",
        "--duration",
        type=float,
        default=60.0,
        help="seconds of sender audio; hours for a soak (default: 60)",
    )
    g.add_argument(
        "--rtmp",
        help="rtmp://HOST[:PORT]/APP/KEY of a running RTMP server to publish to and read back "
        "(default: start nginx-rtmp on loopback)",
    )
    g.add_argument("--avatar", help="a prepared avatar (default: the probe prepares a drawn face)")
    g.add_argument(
        "--speech",
        type=Path,
        help="speech for the markers (default: a bundled espeak-ng sentence)",
    )
    g.add_argument(
        "--period-s", type=float, default=4.0, help="seconds between markers (default: 4)"
    )
    g.add_argument(
        "--marker-s", type=float, default=1.5, help="longest speech per marker, s (default: 1.5)"
    )
    g.add_argument(
        "--window-s", type=float, default=60.0, help="soak report window, s (default: 60)"
    )
    g.add_argument(
        "--lips-threshold",
        type=float,
        default=4.0,
        help="mean grey difference from the idle frame in the mouth region that counts as the "
        "mouth moving (default: 4)",
    )
    g.add_argument(
        "--start-timeout-s",
        type=float,
        default=600.0,
        help="how long the live process may take to start (engine builds) (default: 600)",
    )
    g.add_argument(
        "--out",
        type=_results_folder,
        help="rows folder (default: experiments/results/<date>_<gpu>_<sha>)",
    )
    g.add_argument(
        "--work",
        type=Path,
        help="scratch folder: avatar, frame log, live log (default: a temporary one)",
    )
    b = p.add_argument_group("budget")
    b.add_argument(
        "--guard", action="store_true", help=f"exit {EXIT_OVER_BUDGET} when the budget breaks"
    )
    b.add_argument(
        "--budget-ms",
        type=float,
        default=5000.0,
        help="voice-to-received p95 limit (default: 5000)",
    )
    b.add_argument(
        "--av-limit-ms", type=float, default=80.0, help="|A/V offset| limit (default: 80)"
    )
    b.add_argument(
        "--rss-warmup-s",
        type=float,
        default=300.0,
        help="soak: memory growth is counted from the first window ending after this "
        "(default: 300)",
    )
    b.add_argument(
        "--rss-bound-mb",
        type=float,
        default=16.0,
        help="soak: the live process may grow this much after the warm-up (default: 16)",
    )
    b.add_argument(
        "--gpu-figures",
        help="bench scenario of the event preset whose recorded GPU figures replace the "
        "measured ones in a second verdict, or 'none' (default: compile-fp16-b4)",
    )
    b.add_argument(
        "--gpu-figures-preset",
        type=Path,
        help="the preset whose engine options the recorded rows must have (rewrites, inductor "
        "settings, freezing; default: this checkout's configs/event.toml)",
    )
    b.add_argument(
        "--results-dir",
        type=Path,
        help="where the recorded figures are (default: this checkout's experiments/results)",
    )
    e = p.add_argument_group("live process (passed through)")
    e.add_argument("--engine", default="eager", help="engine (default: eager)")
    e.add_argument(
        "--dtype", default="fp16", choices=list(DTYPES), help="compute dtype (default: fp16)"
    )
    e.add_argument("--fallback", help="engine to use if --engine cannot run here (logged)")
    e.add_argument("--batch-sizes", type=_csv_ints, default=[4], help="worker buckets (default: 4)")
    e.add_argument("--delay-ms", type=int, help="playout delay D (default: derived at start)")
    e.add_argument(
        "--delay-margin-ms",
        type=int,
        help="spare time in the derived D (default: the live process's, 100 ms)",
    )
    _add_streaming_options(p)
    _add_compile_options(p)
    _add_common(p)


def cmd_bench_e2e(args) -> int:
    """``musetalk-rt bench e2e``."""
    return run_probe(args)
