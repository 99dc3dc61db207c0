"""The live process end to end on the CPU: a real nginx-rtmp, the real sender, PyAV reading back."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from collections import deque

import av
import cv2
import numpy as np
import pytest
from skimage import data

from musetalk_rt.avatar import prepare_avatar
from musetalk_rt.media import load_audio
from musetalk_rt.testing.rtmp import RtmpServer, free_port, rtmp_available
from musetalk_rt.testing.senders import send_oversized

pytestmark = pytest.mark.skipif(rtmp_available() is not None, reason=str(rtmp_available()))


class _Reader(threading.Thread):
    """Plays an RTMP URL with PyAV and keeps every packet's (stream type, time)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.packets, self.codecs = url, [], {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with av.open(self.url, options={"rtmp_live": "live"}, timeout=5) as c:
                    self.codecs = {s.type: s.codec_context.name for s in c.streams}
                    for p in c.demux():
                        if p.pts is not None:
                            self.packets.append((p.stream.type, float(p.pts * p.time_base)))
                        if self.stop.is_set():
                            return
            except (av.FFmpegError, OSError):
                time.sleep(0.3)  # not published yet, or the server restarted


def _speech_wav(path, fixture_file, seconds=6.0):
    x = load_audio(fixture_file("eng.wav")).to_mono_16k()[: int(16000 * seconds)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.rint(x * 32767).astype("<i2").tobytes())
    return x


def _materials(tiny_models, fixture_file, tmp_path):
    """An avatar from skimage's astronaut (tiny weights) and 6 s of speech as a WAV."""
    img = tmp_path / "astro.png"
    cv2.imwrite(str(img), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    avatars = tmp_path / "avatars"
    prepare_avatar(img, "astro", tiny_models, avatars, log=lambda _: None)
    wav = tmp_path / "speech.wav"
    _speech_wav(wav, fixture_file)
    return avatars, wav


@pytest.mark.slow
def test_live_rtmp_send_read_back_sync_and_reconnect(tiny_models, fixture_file, tmp_path):
    avatars, wav = _materials(tiny_models, fixture_file, tmp_path)
    record = tmp_path / "rec.mp4"
    port = free_port()
    with RtmpServer() as rtmp:
        # The tiny models run near real time on 2 CPU cores and, beside the whisper canvases and
        # two encoders, below it while the voice lasts (a batch of 4 took 150-350 ms here): a
        # 6 s playout delay leaves the backlog room, and one torch thread keeps the worker's
        # kernels from waiting on a sibling thread that lost its core (late frames measured on
        # one such host: 25-39 of ~75 at 4 s and two threads, 13 at one thread)
        live, lines, reader = _start_live_to_rtmp(
            avatars, port, rtmp, record, "--delay-ms", "6000", "--cpu-threads", "1"
        )
        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "musetalk_rt",
                "send",
                "--url",
                f"ws://127.0.0.1:{port}/ingest/astro",
                "--wav",
                str(wav),
                "--token",
                "t0ken",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        time.sleep(8)  # the sender has left: the stream goes on with idle frames
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())
        assert health["status"] == "ok", health  # the clock runs, both outputs up
        assert health["channels"]["astro"]["last_frame_s_ago"] < 2.0, health
        jpeg = urllib.request.urlopen(f"http://127.0.0.1:{port}/preview/astro.jpg", timeout=5)
        preview = (jpeg.headers["Content-Type"], jpeg.read())
        before_restart = len(reader.packets)
        assert before_restart > 0, "".join(lines)[-3000:]
        rtmp.restart(down_s=1.0)
        time.sleep(8)
        after_restart = len(reader.packets) - before_restart
        reader.stop.set()
        live.send_signal(signal.SIGTERM)  # graceful: the recording must get its trailer
        deadline = time.monotonic() + 30
        while not any(ln.startswith("stopping") for ln in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        # a second signal while it stops (a supervisor and a time limit both signal; Ctrl-C
        # twice) is acknowledged: the recording still gets its trailer
        live.send_signal(signal.SIGTERM)
        out, _ = live.communicate(timeout=120)
        lines.append(out or "")
    log = "".join(lines)
    assert live.returncode == 0, log[-3000:]
    assert "SIGTERM: already stopping" in log
    summary = json.loads([ln for ln in log.splitlines() if ln.startswith('{"live"')][-1])
    ch = summary["live"][0]
    rtmp_stats = ch["outputs"][rtmp.url("***")]  # the stream key is never shown
    assert rtmp.url("astro") not in log and rtmp.url("astro") not in metrics.decode()

    _assert_rtmp_stream(reader.codecs, reader.packets[:before_restart])
    # the server went away and came back: the live process reconnected by itself
    assert after_restart > 25 and rtmp_stats["reconnects"] >= 1

    _assert_recording(record, ch, log, idle_after=250)
    assert ch["speech_frames"] > 40 and ch["late_frames"] <= 0.1 * ch["speech_frames"]
    # the audio path's slack: most windows came before their frame was due
    assert ch["window_lead_p05_ms"] is not None and ch["late_windows"] < ch["speech_frames"]
    assert preview[0] == "image/jpeg" and preview[1][:2] == b"\xff\xd8"  # operator preview
    text = metrics.decode()
    for name in (
        'musetalk_frames_out_total{channel="astro"}',
        "musetalk_late_frames_total",
        'musetalk_shed_frames_total{channel="astro"}',
        "musetalk_voice_to_frame_p95_ms",
        'musetalk_window_lead_p05_ms{channel="astro"}',
        "musetalk_late_windows_total",
        "musetalk_skipped_windows_total",
        "musetalk_blend_pending",
        "musetalk_output_reconnects_total",
        "musetalk_audio_queue_depth",
        'musetalk_stage_ms_total{stage="unet"}',
        'musetalk_thread_wake_delay_ms{quantile="0.99"}',
        "musetalk_gpu_worker_overlapped_batches_total",
        "musetalk_gpu_worker_idle_seconds_total",
        "musetalk_gpu_worker_blend_wait_seconds_total",
        "musetalk_gpu_worker_fill_wait_seconds_total",
        "musetalk_gpu_worker_shed_frames_total",
        "musetalk_gpu_worker_frame_wait_ms",
        "musetalk_gpu_busy_seconds_total",
        'musetalk_gc_collections_total{generation="0"}',
        'musetalk_gc_pause_ms_max{generation="2"}',
        "musetalk_gc_frozen_objects",
        'musetalk_host_cpu_ratio{state="busy"}',
        'musetalk_cpu_cores{who="encoders"}',
    ):
        assert name in text, name
    assert summary["thread_wake_delay_ms"]["samples"] > 100
    # the host's CPU once a second: this process and its encoder processes (the recording and
    # the RTMP output run as children) both used some
    host = summary["host_cpu"]
    assert host["samples"] > 10 and 0 < host["busy_pct_mean"] <= 100
    assert host["process_cores_mean"] > 0 and host["encoder_cores_mean"] > 0
    # the start-up heap was frozen (torch, the models): later collections do not walk it
    assert "objects frozen after one full garbage collection" in log
    assert summary["gc"]["frozen_objects"] > 10_000 and len(summary["gc"]["collections"]) == 3
    # the crew's terminal: a status line every 2 s, talking frames counted in some of them
    status = [ln for ln in log.splitlines() if "status: 1 channel(s)" in ln]
    assert len(status) >= 5 and any(", talking frames on time 0," not in ln for ln in status)
    assert all(", worker idle " in ln for ln in status)  # a starved worker tells itself apart
    assert all(", host CPU " in ln for ln in status)
    # the worker's own account: every generated frame in a batch, its stage times counted
    assert summary["gpu_frames"] >= ch["speech_frames"] and summary["gpu_batches"] > 0
    assert 1 <= summary["mean_batch"] <= 16 and summary["stage_ms"]["unet"] > 0


def _assert_rtmp_stream(codecs: dict, packets: list) -> None:
    """Read back over RTMP: H.264 + AAC, 25 fps (frames match the span), audio keeps up."""
    assert codecs == {"video": "h264", "audio": "aac"}
    video = [t for kind, t in packets if kind == "video"]
    audio = [t for kind, t in packets if kind == "audio"]
    span = video[-1] - video[0]
    assert abs(len(video) - (span * 25 + 1)) <= max(1, 0.01 * len(video))
    assert abs(audio[-1] - video[-1]) <= 0.04 + 1024 / 16000  # one frame + one AAC packet


def _assert_recording(record, ch: dict, log: str, idle_after: int, onset_frames: int = 4) -> None:
    """All frames at 25 fps, audio as long as video, lips follow the speech, then idle.

    ``idle_after``: frames at the end that must be idle with silent audio (the sender left);
    ``onset_frames``: how far the first talking frame may be from the voice onset.
    """
    with av.open(str(record)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(record)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    # every frame emitted is in the recording, or was dropped by an output's bounded queue and
    # counted (its stated policy: on 2 cores shared with Chromium, a few at times)
    recording = [o for label, o in ch["outputs"].items() if not label.startswith("rtmp")]
    dropped = sum(o.get("dropped_full", 0) + o.get("dropped_down", 0) for o in recording)
    assert abs(len(frames) + dropped - ch["frames_out"]) <= 1, (len(frames), ch)
    assert abs(len(pcm) / 16000 - len(frames) / 25) <= 0.04 + 1024 / 16000
    idle = frames[0].astype(np.float32)
    moving = np.array([np.abs(f.astype(np.float32) - idle).mean() > 3.0 for f in frames])
    rms = np.array(
        [np.sqrt(np.mean(pcm[i * 640 : (i + 1) * 640] ** 2)) for i in range(len(frames))]
    )
    speech = rms > 0.02
    first_voice, first_face = np.argmax(speech), np.argmax(moving)
    assert speech.any() and moving.any(), log[-2000:]
    print(f"voice onset frame {first_voice}, face onset frame {first_face}, channel {ch}")
    assert abs(int(first_face) - int(first_voice)) <= onset_frames
    # the sender left: the stream goes on with idle frames (not a freeze) and silent audio
    assert len(frames) - idle_after > first_face
    assert not moving[-idle_after:].any() and not speech[-idle_after:].any()


def _start_live_to_rtmp(avatars, port, rtmp, record, *more):
    """The live process on channel ``astro`` (RTMP, a recording, status lines) and a reader;
    ``more``: further live options (a later option wins over ``_start_live``'s)."""
    url = rtmp.url("astro")
    args = ("--avatar", "astro", "--rtmp", url, "--record", str(record), "--status-interval-s", "2")
    live, lines = _start_live(avatars, port, *args, *more)
    reader = _Reader(url)
    reader.start()
    return live, lines, reader


def _start_live(avatars, port, *extra):
    live = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "musetalk_rt.live",
            "--avatars-dir",
            str(avatars),
            "--weights",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--batch-sizes",
            "4",
            "--stream-hop",
            "25",
            "--delay-ms",
            "4000",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token",
            "t0ken",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(
        target=lambda: lines.extend(iter(live.stdout.readline, "")), daemon=True
    ).start()
    deadline = time.monotonic() + 240
    while not any("ingest listening" in ln for ln in lines):
        assert live.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.2)
    return live, lines


@pytest.mark.slow
def test_bad_senders_on_one_channel_never_disturb_the_other(tiny_models, fixture_file, tmp_path):
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    avatars, wav = _materials(tiny_models, fixture_file, tmp_path)
    port = free_port()
    live, lines = _start_live(
        avatars,
        port,
        "--log-json",
        "--channel",
        "a=astro",
        "--channel",
        "b=astro",
        "--record",
        str(tmp_path / "{channel}.mp4"),
        "--gpu-wait",  # no effect on the CPU: only the option's path through start-up
        "block",
    )
    good = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "musetalk_rt",
            "send",
            "--url",
            f"ws://127.0.0.1:{port}/ingest/b",
            "--wav",
            str(wav),
            "--token",
            "t0ken",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"ws://127.0.0.1:{port}/ingest/a"
    hello = json.dumps(
        {
            "type": "hello",
            "token": "t0ken",
            "format": "pcm_s16le",
            "sample_rate": 16000,
            "channels": 1,
        }
    )

    async def attack():
        codes = {}
        for name, first, then in (
            ("wrong token", hello.replace("t0ken", "nope"), None),
            ("random bytes", np.random.default_rng(1).bytes(4000), None),
            ("200 kHz", hello.replace("16000", "200000"), None),
            ("torn pcm", hello, b"\x01\x02\x03"),
        ):
            async with connect(base, max_size=2**25) as ws:
                try:
                    await ws.send(first)
                    if then is not None:
                        await ws.recv()  # ready
                        await ws.send(then)
                    while True:
                        await ws.recv()
                except ConnectionClosed:
                    codes[name] = ws.close_code
        codes["10 MB"] = await asyncio.to_thread(send_oversized, base, hello)
        async with connect(base) as flood:  # holds channel a and floods it
            await flood.send(hello)
            await flood.recv()
            async with connect(base) as second:
                await second.send(hello)
                try:
                    while True:
                        await second.recv()
                except ConnectionClosed:
                    codes["second sender"] = second.close_code
            # 8 s of room hiss as fast as possible: paced by the server, and not speech
            noise = (np.random.default_rng(2).standard_normal(16000 * 8) * 20).astype("<i2")
            for i in range(0, noise.size, 1600):
                await flood.send(noise[i : i + 1600].tobytes())
        return codes

    codes = asyncio.run(attack())
    assert good.wait(120) == 0, good.stderr.read()
    time.sleep(6)
    live.send_signal(signal.SIGTERM)
    out, _ = live.communicate(timeout=120)
    lines.append(out or "")
    log = "".join(lines)
    assert live.returncode == 0, log[-3000:]
    assert codes == {
        "wrong token": 4401,
        "random bytes": 4400,
        "200 kHz": 4415,
        "torn pcm": 4422,
        "10 MB": 1009,
        "second sender": 4409,
    }
    summary = json.loads([ln for ln in log.splitlines() if ln.startswith('{"live"')][-1])
    records = [json.loads(ln) for ln in log.splitlines() if ln.startswith('{"time"')]
    assert any("refused a sender" in r["message"] for r in records)  # structured logs
    assert "t0ken" not in log  # the token never appears in the logs
    a, b = (next(c for c in summary["live"] if c["channel"] == n) for n in "ab")
    assert abs(a["frames_out"] - b["frames_out"]) <= 2  # both clocks ran all along
    # b's speech was served, most of its talking frames on time. How many come late on two CPU
    # cores also depends on the host's load (a CI run: 24 late beside 49 on time under this
    # attack, others 0-4); a channel stalled or starved by the attack shows nearly all late
    print(f"channel b: {b['speech_frames']} talking frames on time, {b['late_frames']} late")
    assert b["speech_frames"] > 40 and b["late_frames"] < b["speech_frames"], b
    with av.open(str(tmp_path / "b.mp4")) as c:  # every frame reached b's recording
        assert sum(1 for p in c.demux(video=0) if p.size) >= b["frames_out"] - 1


def test_live_bad_command_lines_one_line_each(tmp_path, capsys):
    from musetalk_rt.live.app import main as live_main

    cases = {
        "no output": (["--avatar", "a"], "nowhere to send video"),
        "bad channel": (["--channel", "=x", "--record", "r.mp4"], "NAME=AVATAR"),
        "no channel": (["--record", "r.mp4"], "give --avatar"),
        "unknown avatar": (
            ["--avatar", "ghost", "--record", "r.mp4", "--avatars-dir", str(tmp_path)],
            "not prepared",
        ),
        "several channels, one URL": (
            [
                "--channel",
                "a=x",
                "--channel",
                "b=x",
                "--rtmp",
                "rtmp://127.0.0.1/live/k",
                "--avatars-dir",
                str(tmp_path),
            ],
            "{channel}",
        ),
        "bad look-ahead": (
            ["--avatar", "a", "--record", "r.mp4", "--stream-lookahead-ms", "7"],
            "multiple of 20",
        ),
        "zero delay": (["--avatar", "a", "--record", "r.mp4", "--delay-ms", "-5"], "positive"),
        "negative margin": (
            ["--avatar", "a", "--record", "r.mp4", "--delay-margin-ms", "-1"],
            "0 or more",
        ),
        "negative per-channel delay": (
            ["--avatar", "a", "--record", "r.mp4", "--delay-per-channel-ms", "-40"],
            "--delay-per-channel-ms -40: must be 0 or more",
        ),
        "no encoder threads": (
            ["--avatar", "a", "--record", "r.mp4", "--encoder-threads", "0"],
            "--encoder-threads 0: must be 1 or more",
        ),
        "no cpu threads": (
            ["--avatar", "a", "--record", "r.mp4", "--cpu-threads", "-2"],
            "--cpu-threads -2: must be 1 or more",
        ),
        "negative status interval": (
            ["--avatar", "a", "--record", "r.mp4", "--status-interval-s", "-1"],
            "--status-interval-s -1.0: give seconds between status lines",
        ),
        "nan status interval": (
            ["--avatar", "a", "--record", "r.mp4", "--status-interval-s", "nan"],
            "(0 turns them off)",
        ),
        "zero switch interval": (
            ["--avatar", "a", "--record", "r.mp4", "--switch-interval-ms", "0"],
            "--switch-interval-ms 0.0: choose 0.05 to 100",
        ),
        "record to a folder": (
            ["--avatar", "a", "--record", str(tmp_path)],
            "that is a folder; name a file in it",
        ),
        "record in a missing folder": (
            ["--avatar", "a", "--record", str(tmp_path / "no" / "show.mp4")],
            f"the folder {tmp_path / 'no'} does not exist; create it first",
        ),
        "record to an unknown container": (
            ["--avatar", "a", "--record", str(tmp_path / "show.txt")],
            "record to one of .mp4",
        ),
        "record of one channel in a missing folder": (
            [
                "--channel",
                "a=x",
                "--channel",
                "b=x",
                "--record",
                str(tmp_path / "{channel}" / "show.mp4"),
            ],
            "/a does not exist",
        ),
    }
    import socket

    held = socket.socket()  # another live process on the port: said before any engine builds
    held.bind(("127.0.0.1", 0))
    held.listen()
    busy = str(held.getsockname()[1])
    rec = ["--avatar", "a", "--record", "r.mp4"]
    cases.update(
        {
            "port out of range": ([*rec, "--port", "70000"], "--port 70000: choose 1 to 65535"),
            "busy port": (
                [*rec, "--host", "127.0.0.1", "--port", busy],
                "another live process may hold it",
            ),
            "unknown host": ([*rec, "--host", "no-such-host.invalid"], "--host no-such-host"),
            "zero duration": ([*rec, "--duration-s", "0"], "give positive seconds"),
            "rtmp typo": (["--avatar", "a", "--rtmp", "rmtp://h/live/s3cret"], "expected rtmp://"),
            "rtmp without a key": (["--avatar", "a", "--rtmp", "rtmp://h/live"], "stream key"),
        }
    )
    try:
        for name, (argv, expect) in cases.items():
            code = live_main(argv)
            err = capsys.readouterr().err.strip()
            assert code == 2, (name, err)
            assert len(err.splitlines()) == 1 and expect in err, (name, err)
    finally:
        held.close()


def test_live_compile_engine_defaults_to_the_manual_graph_capture():
    """Cudagraph trees are per thread and the GPU worker is its own thread: manual by default."""
    from musetalk_rt.live.app import build_parser, live_engine_options

    base = ["--avatar", "a", "--weights", "tiny"]
    p = build_parser()
    assert live_engine_options(p.parse_args([*base, "--engine", "compile"])) == {
        "graph_capture": "manual"
    }
    explicit = [*base, "--engine", "compile", "--compile-graph-capture", "trees"]
    assert "graph_capture" not in live_engine_options(p.parse_args(explicit))
    assert live_engine_options(p.parse_args([*base, "--engine", "eager"])) == {}


def test_live_gpu_wait_spins_unless_told_to_block(capsys, tiny_models):
    """``--gpu-wait`` parses to spin by default, block when asked, and refuses anything else
    (the event it makes blocking exists on CUDA only: measured on a GPU host, not here)."""
    from musetalk_rt.live.app import build_parser
    from musetalk_rt.pipeline import FaceGenerator

    assert FaceGenerator(tiny_models).to_host.blocking is False
    assert FaceGenerator(tiny_models, blocking_wait=True).to_host.blocking is True

    p = build_parser()
    assert p.parse_args(["--avatar", "a"]).gpu_wait == "spin"
    assert p.parse_args(["--avatar", "a", "--gpu-wait", "block"]).gpu_wait == "block"
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["--avatar", "a", "--gpu-wait", "nap"])
    assert exit_.value.code == 2
    assert "--gpu-wait: invalid choice: 'nap'" in capsys.readouterr().err


@pytest.mark.slow
def test_browser_page_in_chromium_through_live_to_rtmp(tiny_models, fixture_file, tmp_path):
    """The event-day browser sender: Chromium's fake microphone plays speech into the page,
    the live process serves it, and the RTMP stream read back is checked like the CLI's."""
    import soxr

    from musetalk_rt.testing.browser import find_chromium, open_page

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("needs chromium (CI installs it)")
    avatars, _ = _materials(tiny_models, fixture_file, tmp_path)
    speech = load_audio(fixture_file("eng.wav")).to_mono_16k()[16000 * 2 : 16000 * 8]
    mic = tmp_path / "mic48k.wav"
    with wave.open(str(mic), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        x48 = np.clip(soxr.resample(speech, 16000, 48000), -1, 1)
        w.writeframes(np.rint(x48 * 32767).astype("<i2").tobytes())
    record = tmp_path / "rec.mp4"
    port = free_port()
    with RtmpServer() as rtmp:
        live, lines, reader = _start_live_to_rtmp(avatars, port, rtmp, record)
        page = f"http://127.0.0.1:{port}/?channel=astro&token=t0ken&autostart=1"
        browser = open_page(chromium, tmp_path / "profile", mic, page)
        try:
            deadline = time.monotonic() + 90
            sessions = 0
            while time.monotonic() < deadline and sessions < 1:
                assert browser.poll() is None, "chromium exited"
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                m = [ln for ln in text.decode().splitlines() if ln.startswith("musetalk_sessions")]
                sessions = int(float(m[0].rsplit(" ", 1)[1])) if m else 0
                time.sleep(0.5)
            assert sessions == 1, "the page never connected"
            time.sleep(10)  # the page plays the WAV (Chromium loops it) for 10 s
        finally:
            browser.terminate()  # the sender leaves
            browser.wait(10)
        time.sleep(10)  # D = 4 s of the page's audio still to play, then idle frames
        reader.stop.set()
        live.send_signal(signal.SIGTERM)
        out, _ = live.communicate(timeout=120)
        lines.append(out or "")
    log = "".join(lines)
    assert live.returncode == 0, log[-3000:]
    ch = json.loads([ln for ln in log.splitlines() if ln.startswith('{"live"')][-1])["live"][0]
    assert ch["sessions"] == 1 and ch["speech_frames"] > 40, ch
    _assert_rtmp_stream(reader.codecs, reader.packets)
    # Chromium shares the 2 CPU cores with the live process here, so its first talking frames
    # can be late (idle shown); the CLI test above holds the 4-frame bound (VAD + cross-fade)
    _assert_recording(record, ch, log, idle_after=120, onset_frames=25)


def test_stream_keys_and_passwords_are_redacted_for_logs_and_metrics():
    from musetalk_rt.live.output import redact_url

    assert redact_url("rtmp://h:1935/live/s3cretKey") == "rtmp://h:1935/live/***"
    assert redact_url("rtmps://u:pw@h/app/key?x=1") == "rtmps://***@h/app/***?***"
    assert redact_url("rtmp://h/live/") == "rtmp://h/live/"
    assert redact_url("/rec/show.mp4") == "/rec/show.mp4"
    assert redact_url("rtmp://h/live/s3cret/") == "rtmp://h/live/***/"  # a trailing slash
    assert redact_url("RTMP://h/live/s3cret") == "RTMP://h/live/***"
    assert redact_url("rtmp://h/live?streamkey=s3cret") == "rtmp://h/live?***"


def test_a_full_audio_queue_drops_chunks_but_keeps_the_timeline_and_the_session():
    """Bounded in seconds of audio, not items (a sender's chunks may be 8 ms or 100 ms); a
    dropped chunk's place is filled with silence before the next one that fits, so the
    sender's later audio is not shifted earlier; a session's open and close always get in."""
    from musetalk_rt.audio.audioqueue import AudioQueue
    from musetalk_rt.live.channel import ChannelStats, LiveChannel

    ch = LiveChannel.__new__(LiveChannel)  # the ingest side only
    ch.audio_q, ch.stats = AudioQueue(1.0, 16000, fill_drops=True), ChannelStats()
    ch.open_session()
    for _ in range(12):  # 12 x 1600 samples in a 16,000-sample queue: the last two do not fit
        ch.push(np.ones(1600, np.float32))
    ch.close_session()
    assert ch.stats.dropped_audio_chunks == 2 and ch.audio_q.gap_samples == 3200
    assert ch.audio_q.get_nowait()[0] == "open"
    assert ch.audio_q.get_nowait()[0] == "audio"  # the feature thread took a chunk: room for one
    ch.open_session()  # a new session owes the last one nothing
    ch.push(np.ones(800, np.float32))
    kinds = [k for k, _ in ch.audio_q.items()]
    assert kinds == [*["audio"] * 9, "close", "open", "audio"]
    assert ch.audio_q.queued_samples == 9 * 1600 + 800
    for _ in range(3):  # dropped within one session: the next chunk that fits is preceded
        ch.push(np.ones(1600, np.float32))  # by their silence
    assert ch.stats.dropped_audio_chunks == 5 and ch.audio_q.gap_samples == 4800
    for _ in range(4):
        ch.audio_q.get_nowait()
    ch.push(np.full(160, 2.0, np.float32))
    (_, (gap, _)), (_, (last, _)) = ch.audio_q.items()[-2:]
    assert gap.size == 4800 and not gap.any() and last[0] == 2.0
    assert ch.audio_q.queued_samples == 5 * 1600 + 800 + 4800 + 160  # silence counts too


def test_an_audio_queue_without_fill_forgets_drops_and_rejects_a_bad_bound():
    import queue as queue_mod

    from musetalk_rt.audio.audioqueue import AudioQueue

    q = AudioQueue(0.01, 16000)  # 160 samples
    assert q.put_audio(np.zeros(100, np.float32), lambda a: a)
    assert not q.put_audio(np.zeros(100, np.float32), lambda a: a)
    assert q.get(timeout=0.1).size == 100 and q.queued_samples == 0
    assert q.put_audio(np.zeros(160, np.float32), lambda a: a)  # no silence owed
    assert q.get_nowait().size == 160 and q.dropped_chunks == 1 and q.gap_samples == 0
    with pytest.raises(queue_mod.Empty):
        q.get(timeout=0.01)
    with pytest.raises(ValueError, match="positive"):
        AudioQueue(0, 16000)


def test_healthz_is_503_when_a_clock_stalls_and_degraded_when_an_output_is_down():
    from types import SimpleNamespace

    from musetalk_rt.live.app import live_health

    def ch(name, emitted_at, *ups):
        outs = [SimpleNamespace(label=f"o{i}", up=u) for i, u in enumerate(ups)]
        return SimpleNamespace(name=name, emitted_at=emitted_at, outputs=outs)

    ok, d = live_health([ch("a", 99.5, True, True)], now=100.0)
    assert ok and d["status"] == "ok" and d["channels"]["a"]["last_frame_s_ago"] == 0.5
    ok, d = live_health([ch("a", 99.5, True, False), ch("b", None, True)], now=100.0)
    assert ok and d["status"] == "degraded" and d["channels"]["a"]["outputs_up"]["o1"] is False
    ok, d = live_health([ch("a", 99.5, True), ch("b", 95.0, True)], now=100.0)
    assert not ok and d["status"] == "stalled"

    async def serve_health(health):  # through the ingest's HTTP: the status code
        import urllib.error

        from musetalk_rt.live.ingest import IngestConfig, IngestServer

        async with IngestServer({}, IngestConfig(port=0), health=health) as srv:
            url = f"http://127.0.0.1:{srv.port}/healthz"

            def get():
                try:
                    r = urllib.request.urlopen(url, timeout=5)
                    return r.status, json.loads(r.read())
                except urllib.error.HTTPError as err:
                    return err.code, json.loads(err.read())

            return await asyncio.to_thread(get)

    assert asyncio.run(serve_health(lambda: (False, {"status": "stalled"}))) == (
        503,
        {"status": "stalled"},
    )

    def broken():
        raise RuntimeError("a bug in the check")

    assert asyncio.run(serve_health(broken))[0] == 503


def test_rtmp_urls_are_checked_before_the_show():
    """A typo in --rtmp is one line at start, not an output thread that dies at the first
    frame while the show runs without its stream (and the line hides the key)."""
    from musetalk_rt.live.output import check_rtmp_url

    check_rtmp_url("rtmp://127.0.0.1:1935/live/key")
    check_rtmp_url("rtmps://a.rtmp.youtube.com/live2/abcd-efgh")
    for bad, said in (
        ("rmtp://h/live/s3cret", "expected rtmp://"),
        ("RTMP://h/live/s3cret", "lower case"),
        ("h/live/s3cret", "expected rtmp://"),
        ("rtmp://h/s3cret", "the stream key"),
        ("rtmp:///live/s3cret", "the server"),
    ):
        with pytest.raises(ValueError, match=said) as err:
            check_rtmp_url(bad)
        assert "s3cret" not in str(err.value), bad


def test_a_stuck_rtmp_server_gets_its_output_process_restarted(monkeypatch):
    """A server that accepts the connection and never answers: FFmpeg's RTMP handshake waits
    for good (PyAV sets no timeout on an output) with the child's interpreter held. The parent
    sees the child fall silent, kills it and starts another (the show's stream comes back when
    the server does)."""
    import socket

    from musetalk_rt.live import outproc

    monkeypatch.setattr(outproc, "SILENT_STALL_S", 1.5)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts (the kernel does), never reads or writes
    port = server.getsockname()[1]
    out = outproc.ProcessOutput(f"rtmp://127.0.0.1:{port}/live/key", 64, 48, encoder_threads=1)
    try:
        assert out.wait_ready(30.0)
        first = out._proc
        deadline = time.monotonic() + 20.0
        while out.stats["stalls"] < 1 and time.monotonic() < deadline:
            _offer_frames(out, 5, 64, 48)
        assert out.stats["stalls"] >= 1, out.stats
        while out._proc is first and time.monotonic() < deadline:  # restarted after backoff
            _offer_frames(out, 5, 64, 48)
        assert out._proc is not first and out.stats["written"] == 0
    finally:
        out.close(timeout_s=1.0)
        server.close()


def test_gpu_worker_skips_frames_whose_window_the_clock_dropped():
    """A frame taken for a batch whose window the clock forgot meanwhile (its deadline passed)
    is skipped; the batch does not fail for it (on the GPU host it failed with a KeyError)."""
    from types import SimpleNamespace

    import torch

    from musetalk_rt.live.worker import GpuWorker

    calls = []
    gen = SimpleNamespace(batch_sizes=[2], device=torch.device("cpu"))  # never called
    ch = SimpleNamespace(
        name="a",
        windows={},
        pending=set(),
        avatar=SimpleNamespace(latents=torch.zeros(3, 8, 32, 32), cycle_frame=calls.append),
    )
    worker = GpuWorker(gen, [ch], horizon_s=0.2, blend_threads=1)
    assert worker._launch([(ch, 5), (ch, 6)]) is None
    assert worker.batches == 0 and not ch.pending and not calls
    worker.stop()


def test_gpu_worker_overlaps_two_batches_only_when_a_full_one_waits(tmp_path):
    """A full batch waiting while one runs is launched before the running one is collected; a
    partial one waits for the collection (launched at once it would be padded to a full
    bucket). Every frame is generated once and blended; the frame log gets a record per
    batch."""
    from types import SimpleNamespace

    import torch

    from musetalk_rt.live.channel import ChannelStats, PassedOver
    from musetalk_rt.live.framelog import FrameLog
    from musetalk_rt.live.worker import GpuWorker

    events = []

    class Gen:
        batch_sizes = [4]
        device = torch.device("cpu")

        def launch(self, batch, clock):
            events.append(("launch", len(batch)))
            # each frame got its avatar cycle frame's reference latents (row k holds k)
            assert batch.latents[:, 0, 0, 0].tolist() == [float(c) for c in batch.cycle_ids]
            batch.faces = np.zeros((len(batch), 256, 256, 3), np.uint8)
            return batch

        def finish(self, batch, clock):
            events.append(("finish", len(batch)))
            return batch

    class Channel:
        name = "a"

        def __init__(self):
            self.windows = {m: torch.zeros(50, 384) for m in range(10)}  # 10 frames due at once
            self.pending, self.generated = set(), {}
            self.stats, self.passed_over = ChannelStats(), PassedOver()
            self.avatar = SimpleNamespace(
                latents=torch.arange(3.0).view(3, 1, 1, 1).expand(3, 8, 32, 32).contiguous(),
                cycle_frame=lambda m: m % 3,
            )

        def due_jobs(self, now, horizon_s):
            return [
                (base + m * 0.04, m)
                for m in self.windows
                if m not in self.generated and m not in self.pending
            ]

    class Worker(GpuWorker):
        def _blend(self, ch, m, c, face):
            ch.generated[m] = c
            ch.pending.discard(m)
            self._blend_slots.release()

    base = time.monotonic() + 60  # deadlines a minute away: nothing to shed
    ch = Channel()
    log = FrameLog(tmp_path / "frames.jsonl")
    worker = Worker(
        Gen(), [ch], horizon_s=1.0, blend_threads=1, overlap=True, frame_log=log
    )  # as on CUDA
    worker.start()
    deadline = time.monotonic() + 20
    while len(ch.generated) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    assert sorted(ch.generated) == list(range(10)) and not ch.pending
    assert events == [
        ("launch", 4),
        ("launch", 4),  # a full batch waited: launched before the first is collected
        ("finish", 4),
        ("finish", 4),  # two frames left: collect first, then launch them
        ("launch", 2),
        ("finish", 2),
    ]
    st = worker.stats_dict()
    assert (st["gpu_batches"], st["gpu_frames"], st["overlapped_batches"]) == (3, 10, 1)
    assert st["gpu_shed_frames"] == 0
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "frames.jsonl").read_text().splitlines()]
    assert [(r["ev"], r["n"], r["overlapped"]) for r in recs] == [
        ("batch", 4, False),
        ("batch", 4, True),
        ("batch", 2, False),
    ]
    for r, m0 in zip(recs, (0, 4, 8), strict=True):  # each batch's earliest frame
        assert r["faces"] >= r["launched"]
        assert r["lead_ms"] == pytest.approx((base + m0 * 0.04 - r["launched"]) * 1000, abs=0.01)


def test_gpu_worker_sheds_only_frames_that_cannot_be_ready_in_time():
    """With a measured 50 ms from launch to faces and 5 ms per blend, a frame due sooner than
    55 ms is skipped and marked on its channel; with no measurement yet, or when no frame could
    make it, nothing is skipped. A marked frame counts as shed only if its channel shows it late
    (one taken a pass later, or no longer speech at its deadline, shows on time)."""
    from types import SimpleNamespace

    import torch

    from musetalk_rt.live.channel import ChannelStats, PassedOver
    from musetalk_rt.live.worker import GpuWorker

    gen = SimpleNamespace(batch_sizes=[2], device=torch.device("cpu"))
    chans = [SimpleNamespace(passed_over=PassedOver(), stats=ChannelStats()) for _ in range(2)]
    worker = GpuWorker(gen, [], horizon_s=1.0, blend_threads=1)
    worker.channels = chans  # stand-ins: only what the selection and the count read
    now = 1000.0
    jobs = [(now + 0.01, 0, 1), (now + 0.054, 1, 7), (now + 0.056, 0, 2), (now + 0.2, 1, 8)]
    assert worker._select(jobs, now) == jobs  # nothing measured yet
    assert not chans[0].passed_over.marked() and not chans[1].passed_over.marked()
    worker._batch_s.extend([0.04, 0.05, 0.05, 0.9])  # median 50 ms: one slow batch is ignored
    worker._blend_s.extend([0.005, 0.005, 0.2])
    assert worker.expected_s() == pytest.approx(0.055)
    assert worker._select(jobs, now) == jobs[2:]
    assert worker._select(jobs, now) == jobs[2:]  # marked twice: still one frame each
    assert chans[0].passed_over.marked() == {1} and chans[1].passed_over.marked() == {7}
    # the channels' clocks: frame 1 shows late (shed), frame 7 was taken later and shows in time
    assert chans[0].passed_over.shown(1, late=True) is True
    assert chans[1].passed_over.shown(7, late=False) is False
    assert chans[0].passed_over.shown(1, late=True) is False  # settled: never counted twice
    assert chans[0].passed_over.shown(5, late=True) is False  # late, but never passed over
    hopeless = [(now + 0.01, 0, 3), (now + 0.02, 0, 4), (now + 0.03, 1, 9)]
    assert worker._select(hopeless, now) == hopeless[-2:]  # the latest, one bucket's worth
    assert not chans[0].passed_over.marked()  # taken as the freshest there are: not marked
    chans[1].passed_over.mark(9)
    chans[1].passed_over.taken(9)  # taken a pass later (``_run`` does this): unmarked
    assert chans[1].passed_over.shown(9, late=True) is False
    chans[1].stats.shed_frames = 2
    assert worker.shed_frames == 2  # the channels' counts, summed
    assert GpuWorker(gen, [], horizon_s=1.0, shed=False)._select(jobs, now) == jobs
    worker.stop()


def test_passed_over_frames_are_forgotten_when_a_clock_jump_skips_them():
    """Frames a stalled clock jumped over are never shown; the set stays bounded."""
    from musetalk_rt.live.channel import PassedOver

    p = PassedOver()
    for m in range(PassedOver._KEEP + 10):
        p.mark(m)
    p.mark(10**6)
    assert p.shown(10**6 - 1, late=False) is False  # not marked: nothing settled
    p.mark(10**6 - 1)
    assert p.shown(10**6 - 1, late=True) is True  # the set was over its bound: older ones go
    assert p.marked() == {10**6}


def test_channel_clock_counts_a_shed_frame_only_when_it_shows_late():
    """The clock settles the worker's marks: a passed-over frame shown late is shed (and late),
    one generated after all is neither, a late frame never passed over is late only, and one
    that stopped being speech fades out: neither late nor shed. Every mark is settled."""
    import threading
    from types import SimpleNamespace

    from musetalk_rt.audio.vad import SpeechGate
    from musetalk_rt.live.channel import ChannelStats, LiveChannel, PassedOver

    speech = {0: True, 1: True, 2: True, 3: False, 4: False}
    shown = []

    class Out:
        def offer(self, frame, audio, meta):
            shown.append(int(frame[0, 0, 0]))
            if len(shown) == len(speech):
                ch._stop.set()

    ch = LiveChannel.__new__(LiveChannel)  # the clock's state only: no models, no threads
    ch.name, ch.delay_s, ch.next_out = "c", 0.0, 0
    ch.stats, ch.passed_over, ch._gate = ChannelStats(), PassedOver(), SpeechGate(2)
    ch._stop, ch._lock, ch._sessions = threading.Event(), threading.Lock(), []
    ch.avatar = SimpleNamespace(frames=[np.zeros((2, 2, 3), np.uint8)], cycle_frame=lambda n: 0)
    ch.is_speech = lambda n: speech[n]
    ch.generated = {0: np.full((2, 2, 3), 200, np.uint8)}  # frame 0 came back in time
    ch.windows, ch.arrival, ch._audio = {}, {}, {}
    ch.overlay, ch.frame_log, ch.outputs = None, None, [Out()]
    for m in (0, 1, 3):  # passed over once; frame 0 was taken a pass later all the same
        ch.passed_over.mark(m)
    ch.t0, ch.late_seconds = time.monotonic(), deque()
    ch._clock_loop()
    # talking (fading in), idle (late), idle (late), the last talking frame fading out, idle
    assert shown == [100, 0, 0, 100, 0]
    st = ch.stats
    assert (st.speech_frames, st.late_frames, st.shed_frames) == (1, 2, 1)
    assert not ch.passed_over.marked()


def test_a_failing_frame_never_stops_the_channel_clock(caplog):
    """An error while making a frame (here: the speech decision raises for frame 2) costs that
    frame only: the idle frame and silence go out in its place, it is counted, and the clock
    goes on with the next one."""
    import threading
    from types import SimpleNamespace

    from musetalk_rt.audio.vad import SpeechGate
    from musetalk_rt.live.channel import ChannelStats, LiveChannel, PassedOver

    shown = []

    class Out:
        def offer(self, frame, audio, meta):
            shown.append((int(frame[0, 0, 0]), float(np.abs(audio).max())))
            if len(shown) == 5:
                ch._stop.set()

    def is_speech(n):
        if n == 2:
            raise RuntimeError("a bug in the speech decision")
        return False

    ch = LiveChannel.__new__(LiveChannel)  # the clock's state only: no models, no threads
    ch.name, ch.delay_s, ch.next_out = "c", 0.0, 0
    ch.stats, ch.passed_over, ch._gate = ChannelStats(), PassedOver(), SpeechGate(2)
    ch._stop, ch._lock, ch._sessions = threading.Event(), threading.Lock(), []
    ch.avatar = SimpleNamespace(frames=[np.full((2, 2, 3), 7, np.uint8)], cycle_frame=lambda n: 0)
    ch.is_speech = is_speech
    ch.generated, ch.windows, ch.arrival = {}, {}, {}
    ch._audio = {m: np.full(640, 0.5, np.float32) for m in range(5)}
    ch.overlay, ch.frame_log, ch.outputs = None, None, [Out()]
    ch.t0, ch.late_seconds = time.monotonic(), deque()
    with caplog.at_level("ERROR"):
        ch._clock_loop()
    assert [f for f, _ in shown] == [7] * 5  # five frames, none missing
    assert [a for _, a in shown] == [0.5, 0.5, 0.0, 0.5, 0.5]  # frame 2's audio: silence
    assert ch.stats.clock_errors == 1 and ch.stats.frames_out == 5
    assert "frame 2 failed (error #1); going on" in caplog.text
    assert 2 not in ch._audio  # forgotten all the same

    # an output whose offer raises (its process cannot be restarted) costs only itself: the
    # others get each frame once, in order
    class Broken:
        label = "broken"

        def offer(self, frame, audio, meta):
            raise OSError(24, "Too many open files")

    shown.clear()
    ch.is_speech = lambda n: False
    ch.outputs, ch.stats, ch.next_out = [Broken(), Out()], ChannelStats(), 0
    ch._stop, ch.t0 = threading.Event(), time.monotonic()
    ch._clock_loop()
    assert len(shown) == 5 and ch.stats.output_errors == 5 and ch.stats.clock_errors == 0


def test_gpu_worker_lets_a_partial_batch_fill_while_its_deadline_allows():
    """A batch costs its bucket's GPU time however few frames it has: a partial batch waits for
    company while its earliest deadline is further away than the slowest recent batch, a blend
    and the guard; a full one, an unmeasured worker or ``fill=False`` never waits."""
    from types import SimpleNamespace

    import torch

    from musetalk_rt.live.worker import GpuWorker

    gen = SimpleNamespace(batch_sizes=[4], device=torch.device("cpu"))
    worker = GpuWorker(gen, [], horizon_s=1.0, blend_threads=1, fill=True, fill_guard_s=0.02)
    assert GpuWorker(gen, [], horizon_s=1.0, blend_threads=1).fill is False  # CPU default
    now = 1000.0
    jobs = [(now + 0.2, 0, 1), (now + 0.3, 0, 2)]
    assert not worker._can_wait(jobs, now)  # no batch measured yet
    for s in (0.05, 0.08, 0.06):  # the slowest counts: 80 ms
        worker._note_batch(2, s)
    worker._blend_s.extend([0.01, 0.01])
    assert worker._can_wait(jobs, now)  # 200 ms left > 80 + 10 + 20 ms
    assert not worker._can_wait(jobs, now + 0.095)  # 105 ms left: launch now
    full = [(now + 0.2, 0, m) for m in range(4)]
    assert not worker._can_wait(full, now)  # a full bucket never waits
    worker.fill = False
    assert not worker._can_wait(jobs, now)
    worker.stop()


def test_a_filling_batch_counts_the_largest_buckets_time_not_only_a_smaller_ones():
    """A partial batch may grow into the largest bucket while it waits, so the fill wait counts
    that bucket's time: twice the start-up measurement (taken on an idle GPU) until a batch of it
    has been collected, and no wait at all with neither. (On an H200 at 20 channels a batch of
    29 waited on the figure of one batch of bucket 16, 34 ms, then took bucket 32's 56 ms.)"""
    from types import SimpleNamespace

    import torch

    from musetalk_rt.live.worker import GpuWorker

    gen = SimpleNamespace(batch_sizes=[32, 16], device=torch.device("cpu"))
    now = 1000.0
    jobs = [(now + 0.07, 0, m) for m in range(29)]  # 70 ms before the earliest deadline
    bare = GpuWorker(gen, [], horizon_s=1.0, blend_threads=1, fill=True, fill_guard_s=0.02)
    bare._note_batch(1, 0.034)  # bucket 16 only
    assert not bare._can_wait(jobs, now)  # bucket 32 never measured: no waiting on a guess
    assert not bare._can_wait(jobs, now - 1.0)
    bare.stop()
    worker = GpuWorker(
        gen, [], horizon_s=1.0, blend_threads=1, fill=True, fill_guard_s=0.02, full_batch_s=0.055
    )
    worker._note_batch(1, 0.034)
    assert not worker._can_wait(jobs, now - 0.05)  # 120 ms < 2 x 55 + 20 ms: launch now
    assert worker._can_wait(jobs, now - 0.07)  # 140 ms left: may wait
    worker._note_batch(17, 0.065)  # bucket 32 measured: its figure replaces the start-up one
    assert not worker._can_wait(jobs, now - 0.01)  # 80 ms < 65 + 20 ms
    assert worker._can_wait(jobs, now - 0.03)  # 100 ms left
    worker.stop()


def test_wake_probe_sees_a_thread_that_holds_the_interpreter_lock():
    """A pure-Python thread holding the lock delays every other thread's wake-up by up to the
    switch interval: the probe reports it (and reports little without it)."""
    import threading

    from musetalk_rt.live.wakeprobe import WakeProbe

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.02)  # 20 ms: far above any scheduler noise of a loaded host
    try:
        probe = WakeProbe(period_s=0.005).start()
        stop = threading.Event()

        def hog():
            while not stop.is_set():
                sum(range(1000))  # pure Python: releases the lock only when asked

        t = threading.Thread(target=hog, daemon=True)
        t.start()
        time.sleep(1.0)
        stop.set()
        t.join()
        probe.stop()
    finally:
        sys.setswitchinterval(old)
    s = probe.summary()
    assert s["samples"] > 10 and s["p50_ms"] >= 5.0, s  # waited for the hog's interval
    assert set(s) == {"p50_ms", "p99_ms", "max_ms", "samples"}
    assert WakeProbe().summary() == {"p50_ms": None, "p99_ms": None, "max_ms": None, "samples": 0}


def test_channel_stats_report_the_window_lead_percentile():
    from musetalk_rt.live.channel import ChannelStats

    st = ChannelStats(window_lead_ms=[float(x) for x in range(100, 0, -1)], late_windows=2)
    d = st.as_dict()
    assert d["window_lead_p05_ms"] == 5.0 and d["late_windows"] == 2
    assert "window_lead_ms" not in d and d["voice_to_frame_p95_ms"] is None


def test_windows_reaching_a_channel_are_counted_and_logged_when_late(tmp_path):
    """A window whose frame has already left is lost to the worker: counted, and the frame log
    says when each group of windows came and how early (when the audio path fell behind)."""
    import time
    from types import SimpleNamespace

    from musetalk_rt.live.channel import ChannelStats, LiveChannel, _Session
    from musetalk_rt.live.framelog import FrameLog

    log = FrameLog(tmp_path / "frames.jsonl")
    ch = SimpleNamespace(
        name="c0", t0=time.monotonic(), delay_s=0.2, next_out=11, windows={},
        stats=ChannelStats(), frame_log=log,
    )  # fmt: skip
    session = _Session(base_frame=10, extractor=None, vad=None)

    class Chunk:  # what the feature extractor hands over: frames from start_frame on
        start_frame, windows = 0, ["w10", "w11"]  # frame 10 has left already

        def __len__(self):
            return len(self.windows)

    chunk = Chunk()
    LiveChannel._take(ch, session, chunk)
    log.close()
    assert ch.windows == {11: "w11"} and ch.stats.late_windows == 1
    rec = json.loads((tmp_path / "frames.jsonl").read_text())
    assert rec["ev"] == "windows" and (rec["ch"], rec["frame"], rec["n"], rec["late"]) == (
        "c0", 10, 2, 1,
    )  # fmt: skip
    assert 0 < rec["lead_ms"] <= 200 + 400  # frame 10 is due 0.2 s + 10/25 s after t0


def test_a_channel_behind_its_clock_skips_the_windows_of_frames_already_shown(
    tiny_models, fixture_file, tmp_path
):
    """The feature thread, handed audio after the clock has shown its frames, computes windows
    only from the frame after the one on screen: earlier ones are counted as skipped, never
    encoded, and never reach the worker. The frame log's ``windows`` record says where the time
    went (ingest lag against the media clock, queue, voice activity, features)."""
    from types import SimpleNamespace

    from musetalk_rt.audio.incremental import IncrementalFeatureExtractor, StreamingConfig
    from musetalk_rt.live.channel import ChannelStats, LiveChannel, _Session
    from musetalk_rt.live.framelog import FrameLog
    from musetalk_rt.media import load_audio

    audio = load_audio(fixture_file("eng.wav")).to_mono_16k()[: 16000 * 2]  # 50 frames
    ex = IncrementalFeatureExtractor(
        tiny_models.whisper, tiny_models.feature_extractor, StreamingConfig(hop_frames=1)
    )
    session = _Session(base_frame=100, extractor=ex, vad=SimpleNamespace(push=lambda pcm: None))
    log = FrameLog(tmp_path / "frames.jsonl")
    t0 = time.monotonic() - 6.0  # frame 100 started 2 s ago, its 2 s of audio arrive now
    ch = SimpleNamespace(
        name="c0", t0=t0, delay_s=10.0, next_out=130, windows={}, arrival={},
        _audio={}, stats=ChannelStats(), frame_log=log,
    )  # fmt: skip
    ch._take = lambda *a: LiveChannel._take(ch, *a)
    ch._follow_sender_clock = lambda s: LiveChannel._follow_sender_clock(ch, s)
    arrived = time.monotonic()
    LiveChannel._add_audio(ch, session, [(audio, arrived)])
    log.close()
    assert ch.stats.skipped_windows == 31  # frames 100..130 of the clock: on screen or gone
    assert min(ch.windows) == 131 and ch.stats.late_windows == 0
    assert ex.stats.skipped_frames == 31 and len(ch._audio) == 50  # the audio stays whole
    rec = json.loads((tmp_path / "frames.jsonl").read_text().splitlines()[0])
    assert rec["ev"] == "windows" and rec["frame"] == 131 and rec["chunks"] == 1
    # its last sample was spoken at t0 + 150/25 s = arrived: no ingest lag
    assert rec["ingest_lag_ms"] == pytest.approx((arrived - (t0 + 6.0)) * 1000, abs=0.01)
    assert rec["queued_ms"] >= 0 and rec["vad_ms"] >= 0 and rec["features_ms"] > 0


def test_writer_with_few_encoder_threads_makes_a_playable_file(tmp_path):
    """``--encoder-threads`` reaches x264: one thread still gives H.264 + AAC at 25 fps."""
    from musetalk_rt.live.output import AVStreamWriter

    out = tmp_path / "t.mp4"
    w = AVStreamWriter(str(out), 64, 48, threads=1)
    assert w.video.codec_context.thread_count == 1  # 0 = the encoder's automatic choice
    rng = np.random.default_rng(0)
    for _ in range(25):
        w.write(rng.integers(0, 256, (48, 64, 3), np.uint8), np.zeros(640, np.float32))
    w.close()
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(v))
        assert v.codec_context.name == "h264" and c.streams.audio[0].codec_context.name == "aac"
    assert frames == 25


def _offer_frames(out, n: int, w: int, h: int, start: int = 0) -> None:
    """Frames whose mean level encodes their index, with a 440 Hz tone, at 25 fps pace."""
    t0 = time.monotonic()
    for i in range(start, start + n):
        frame = np.full((h, w, 3), (i * 7) % 200 + 20, np.uint8)
        tone = 0.3 * np.sin(2 * np.pi * 440 * (np.arange(640) + 640 * i) / 16000)
        # NumPy scalars in the metadata, as the VAD may give them
        out.offer(frame, tone.astype(np.float32), {"frame": i, "speech": np.bool_(i % 2)})
        wait = t0 + (i - start + 1) / 25 - time.monotonic()
        if wait > 0:
            time.sleep(wait)


def test_process_output_records_every_frame_and_its_audio_in_order(tmp_path):
    """An output in its own process: every frame offered reaches the file, in order, with
    its audio; the frame log records come back to the parent; close() finalises the file."""
    from musetalk_rt.live.framelog import FrameLog
    from musetalk_rt.live.outproc import ProcessOutput

    rec, flog = tmp_path / "p.mp4", tmp_path / "frames.jsonl"
    fl = FrameLog(flog)
    out = ProcessOutput(str(rec), 64, 48, frame_log=fl, encoder_threads=1)
    assert out.wait_ready(30.0)
    _offer_frames(out, 50, 64, 48)
    out.offer(np.zeros((10, 10, 3), np.uint8), np.zeros(640, np.float32))  # wrong size
    out.close()
    fl.close()
    s = out.stats
    assert s["written"] == 50 and s["errors"] == 1 and s["dropped_full"] == 0, s
    assert out.depth() == 0 and not out.up
    with av.open(str(rec)) as c:
        levels = [float(f.to_ndarray(format="rgb24").mean()) for f in c.decode(video=0)]
    with av.open(str(rec)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert len(levels) == 50
    assert np.allclose(levels, [(i * 7) % 200 + 20 for i in range(50)], atol=2.0)
    assert abs(len(pcm) / 16000 - 2.0) <= 0.04 + 1024 / 16000 and np.abs(pcm).max() > 0.2
    records = [json.loads(ln) for ln in flog.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(50)) and all("written" in r for r in records)
    assert [r["speech"] for r in records[:3]] == [False, True, False]


def test_process_output_survives_its_encoder_process_dying(tmp_path):
    """The child is killed mid-stream: frames are dropped and counted while it is down, a new
    one starts after the backoff, and the stream goes on (the show does not stop). The killed
    child's MP4 recording stays playable (fragmented: only its last fragment is lost), and an
    earlier run's ``.part2`` file beside it is not overwritten."""
    from musetalk_rt.live.outproc import ProcessOutput

    rec = tmp_path / "k.mp4"
    (tmp_path / "k.part2.mp4").write_bytes(b"an earlier run's continuation")
    out = ProcessOutput(str(rec), 64, 48, encoder_threads=1)
    assert out.wait_ready(30.0)
    _offer_frames(out, 75, 64, 48)
    deadline = time.monotonic() + 10.0
    while out.stats["written"] < 75 and time.monotonic() < deadline:
        time.sleep(0.05)
    first = out._proc
    first.kill()
    first.wait(5)
    with av.open(str(rec)) as c:  # no trailer was written, yet it plays up to the kill
        killed = [float(f.to_ndarray(format="rgb24").mean()) for f in c.decode(video=0)]
    assert 50 <= len(killed) <= 75, len(killed)  # at least the first 2 s fragment
    assert np.allclose(killed, [(i * 7) % 200 + 20 for i in range(len(killed))], atol=2.0)
    _offer_frames(out, 75, 64, 48, start=75)
    out.close()
    s = out.stats
    assert out._proc is not first and s["reconnects"] >= 1 and s["errors"] >= 1, s
    assert s["dropped_down"] >= 1 and s["written"] > 75, s  # the new child wrote frames
    assert s["written"] + s["dropped_down"] + s["dropped_full"] <= 150
    assert (tmp_path / "k.part2.mp4").read_bytes() == b"an earlier run's continuation"
    with av.open(str(tmp_path / "k.part3.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) > 25


def test_thread_output_keeps_a_recording_whose_writer_failed(tmp_path, monkeypatch):
    """A recording's writer fails mid-show (a full disk, an I/O error): the output reopens,
    as it does for a server that went away, but never over the file it was writing — the
    frames so far stay playable there and the rest goes to ``NAME.part2.mp4``; a file that
    holds nothing yet is reopened rather than left empty beside a new part."""
    from musetalk_rt.live import output as output_mod

    real_write = output_mod.AVStreamWriter.write
    calls = {"n": 0}

    def write(self, frame, audio):  # the 60th frame of the first file fails
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError(28, "No space left on device")
        real_write(self, frame, audio)

    monkeypatch.setattr(output_mod.AVStreamWriter, "write", write)
    rec = tmp_path / "t.mp4"
    out = output_mod.Output(str(rec), 64, 48, encoder_threads=1)
    _offer_frames(out, 120, 64, 48)
    out.close()
    s = out.stats
    assert s["errors"] == 1 and s["reconnects"] == 1, s
    with av.open(str(rec)) as c:  # closed after the failure: the frames before it are there
        first = [float(f.to_ndarray(format="rgb24").mean()) for f in c.decode(video=0)]
    assert len(first) == 59
    assert np.allclose(first, [(i * 7) % 200 + 20 for i in range(59)], atol=2.0)
    with av.open(str(tmp_path / "t.part2.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == s["written"] - 59

    # a writer that fails before its first fragment left an empty file: that one is reopened
    # (a full disk must not leave a new empty part at every retry)
    real_close = output_mod.AVStreamWriter.close

    def close_on_a_full_disk(self):
        real_close(self)
        if self.frames < 10:  # the failed file: the disk took none of it
            with open(self.target, "wb"):
                pass

    monkeypatch.setattr(output_mod.AVStreamWriter, "close", close_on_a_full_disk)
    calls["n"], rec = 50, tmp_path / "u.mp4"  # fails at its 10th frame
    out = output_mod.Output(str(rec), 64, 48, encoder_threads=1)
    _offer_frames(out, 80, 64, 48)
    out.close()
    assert out.stats["errors"] == 1 and out.stats["reconnects"] == 1, out.stats
    assert not (tmp_path / "u.part2.mp4").exists()
    with av.open(str(rec)) as c:
        assert sum(1 for _ in c.decode(video=0)) == out.stats["written"] - 9


def test_next_part_never_names_a_file_that_exists(tmp_path):
    from musetalk_rt.live.output import next_part

    rec = tmp_path / "show.mp4"
    assert next_part(str(rec), 2) == str(tmp_path / "show.part2.mp4")
    (tmp_path / "show.part2.mp4").write_bytes(b"x")
    (tmp_path / "show.part3.mp4").write_bytes(b"x")
    assert next_part(str(rec), 2) == str(tmp_path / "show.part4.mp4")
    # a part whose writer failed goes on in the next part, not in a nested name
    assert next_part(str(tmp_path / "show.part4.mp4"), 2) == str(tmp_path / "show.part5.mp4")


def test_backoff_doubles_for_the_same_fault_and_starts_over_after_a_stable_run():
    """Writers and output processes share one rule: each failure waits the current delay and
    doubles the next, up to 8 s; a failure after a minute of running waits 0.5 s again."""
    from musetalk_rt.live.output import STABLE_S, Backoff

    b = Backoff()
    assert b.ready(0.0)
    waits = [b.failed(10.0 * i, ran_s=0.1) for i in range(7)]  # fails at once, every time
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert not b.ready(60.0 + 7.9) and b.ready(60.0 + 8.0)  # the last failure was at 60 s
    assert b.failed(100.0) == 8.0  # could not open at all: still the same fault
    assert b.failed(200.0, ran_s=STABLE_S) == 0.5  # it had run a minute: a new fault
    assert b.failed(201.0, ran_s=0.2) == 1.0


def test_derived_delay_grows_with_the_channels_beyond_the_first():
    """One channel keeps the idle-GPU figure (the low-latency setting); each further channel
    adds the per-channel allowance: 12 channels at the start-up figures of an H200 run land
    near the 800 ms that had no late frame there (352 ms had 31% late)."""
    from musetalk_rt.live.app import derive_delay_s

    one = derive_delay_s(0.16, 0.005, 0.0335, 0.1)
    assert one == pytest.approx(0.16 + 0.02 + 0.005 + 0.067 + 0.1)
    assert derive_delay_s(0.16, 0.005, 0.0335, 0.1, channels=1) == one
    assert derive_delay_s(0.16, 0.005, 0.0335, 0.1, channels=12) == pytest.approx(one + 0.44)
    assert derive_delay_s(0.16, 0.005, 0.0335, 0.1, 12, per_channel_s=0.0) == one


def test_status_line_names_a_longer_delay_when_windows_come_too_close_to_their_frames():
    """Late frames whose audio windows arrive less than two batches and a blend before their
    deadline: the status line says so and names a ``--delay-ms`` that covers the shortfall; with
    enough lead, or nothing late, it stays quiet."""
    from musetalk_rt.live.app import status_line
    from musetalk_rt.testing.live import idle_worker, stats_channel

    def channel(lead_p05_ms, late):
        return stats_channel(late, 100, 0.352, 300.0, lead_p05_ms)

    worker = idle_worker((16,))
    worker._batch_s.extend([0.05, 0.055, 0.06])  # median 55 ms
    worker._blend_s.extend([0.002, 0.002])
    assert worker.frame_wait_s() == pytest.approx(0.112)
    line, _ = status_line([channel(120.0, 0), channel(60.0, 30)], worker, None, 30.0)
    # 352 ms + (112 - 60) ms + 50 ms = 454 ms -> 500 ms
    assert "audio windows come 60 ms before their frame" in line
    assert "need 112 ms" in line and line.endswith("restart with --delay-ms 500")
    assert "GPU busy" not in line  # not measured (on the CPU): not shown
    worker.gpu_busy_s = 18.0  # the batches' GPU time in these 30 s (CUDA events)
    assert ", GPU busy 60%" in status_line([channel(120.0, 0)], worker, None, 30.0)[0]
    failing = channel(120.0, 0)
    failing.stats.as_dict()["audio_errors"] = 2  # failed VAD/feature calls since the last line
    assert ", audio path errors 2 (see the log)" in status_line([failing], worker, None, 30.0)[0]
    assert "audio path errors" not in line
    assert "hint" not in status_line([channel(150.0, 30)], worker, None, 30.0)[0]  # lead enough
    assert "hint" not in status_line([channel(60.0, 0)], worker, None, 30.0)[0]  # nothing late
    idle = idle_worker((16,))  # no batch measured yet
    assert "hint" not in status_line([channel(60.0, 30)], idle, None, 30.0)[0]
    worker.stop()
    idle.stop()


def test_frame_log_summary_tells_where_the_time_went(tmp_path, capsys):
    """``python -m musetalk_rt.live.framelog``: per interval the windows' lead and its parts,
    the batches and the late frames of the file's last run (the file is appended to); bad
    files get one line and exit 2."""
    from musetalk_rt.live.framelog import FrameLog, main, summarize

    path = tmp_path / "frames.jsonl"
    log = FrameLog(path)
    for run, t0 in enumerate((100.0, 500.0)):  # two runs in one file: the last one counts
        log.write(ev="delay", delay_ms=350.0, derived=True)
        log.write(ev="start", ch="c0", t0=t0, delay_ms=350.0)
        parts = {"ingest_lag_ms": 5.0, "queued_ms": 1.0, "chunks": 1, "vad_ms": 2.0}
        log.write(
            ev="windows", ch="c0", frame=1, n=2, t=t0 + 1.0, lead_ms=150.0, late=0,
            features_ms=8.0, **parts,
        )  # fmt: skip
        log.write(ev="windows", ch="c0", frame=260, n=1, t=t0 + 11.0, lead_ms=40.0 + run, late=0)
        log.write(ev="batch", n=4, launched=t0 + 11.0, faces=t0 + 11.05, lead_ms=90.0,
                  overlapped=False)  # fmt: skip
        for kind, out in (("speech", "a.mp4"), ("late", "a.mp4"), ("late", "b.mp4")):
            log.write(ev="frame", ch="c0", out=out, frame=260, kind=kind, emitted=t0 + 12.0)
    log.close()
    rows = summarize(path, bin_s=10.0)
    assert [r["t_s"] for r in rows] == [0.0, 10.0]
    first, second = rows
    assert (first["windows"], first["lead_p50_ms"], first["features_p50_ms"]) == (2, 150.0, 8.0)
    assert (first["ingest_lag_p50_ms"], first["queued_p95_ms"], first["vad_p95_ms"]) == (
        5.0, 1.0, 2.0,
    )  # fmt: skip
    assert second["lead_p05_ms"] == 41.0  # the last run's
    assert (second["batches"], second["mean_batch"], second["batch_p50_ms"]) == (1, 4.0, 50.0)
    assert (second["talking_on_time"], second["late"]) == (1, 1)  # one output per channel
    assert summarize(path, run=0)[1]["lead_p05_ms"] == 40.0

    assert main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[1])["t_s"] == 10.0
    assert main([str(path)]) == 0 and "lead_p05_ms" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    start = '{"ev": "start", "ch": "c0", "t0": 1.0}\n'
    for text, msg in (
        ('{"ev": "start"\n{"ev": "frame"}\n', ":1: not a frame log record"),
        ("[1]\n", ":1: not a frame log record (a JSON object)"),
        ('{"ev": "frame"}\n', "no channel start record"),
        ('{"ev": "start", "ch": "c0"}\n', ":1: a frame log record without a usable t0"),
        (start + '{"ev": "windows", "t": 2.0, "n": 1}\n', ":2: a frame log record without a "
         "usable lead_ms"),
        (start + '{"ev": "batch", "n": 1, "launched": "x"}\n', ":2: a frame log record "
         "without a usable launched"),
        (start + '{"ev": "start", "ch": "c1", "t0": null}\n', ":2: a frame log record "
         "without a usable t0"),
    ):  # fmt: skip
        bad.write_text(text)
        assert main([str(bad)]) == 2 and msg in capsys.readouterr().err, text
    bad.write_bytes(b"\xff\xfe\x00binary")
    assert main([str(bad)]) == 2 and "cannot read the frame log" in capsys.readouterr().err
    bad.write_text(start + '{"ev": "frame", "ch": "c0", "kind": "late", "emitted": 2.0}\n{"ev')
    assert main([str(bad)]) == 0  # the last line, cut short by a kill, is skipped
    capsys.readouterr()
    assert main([str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read the frame log" in capsys.readouterr().err
    assert main([str(path), "--run", "2"]) == 2 and "holds 2 run(s)" in capsys.readouterr().err
    for bin_s in ("0", "nan", "inf", "1e-320", "-5"):
        assert main([str(path), "--bin-s", bin_s]) == 2
        assert "give a number of seconds" in capsys.readouterr().err


def test_a_frame_log_that_cannot_be_written_never_stops_its_writers(tmp_path, caplog):
    """A full disk under ``--frame-log``: the first failed record is logged, the file closed,
    and every later write (from the clock, feature and GPU worker threads) returns quietly."""
    from musetalk_rt.live.framelog import FrameLog

    log = FrameLog(tmp_path / "frames.jsonl")

    class FullDisk:
        closed = False

        def write(self, line):
            raise OSError(28, "No space left on device")

        def close(self):
            self.closed = True

    log._file = FullDisk()
    with caplog.at_level("ERROR", logger="musetalk_rt.framelog"):
        log.write(ev="frame", ch="c0", frame=1)
        log.write(ev="frame", ch="c0", frame=2)
    assert log._file.closed
    assert [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()] == [
        f"frame log {tmp_path / 'frames.jsonl'}: [Errno 28] No space left on device; no more "
        "records are written"
    ]
    fresh = FrameLog(tmp_path / "other.jsonl")
    with caplog.at_level("ERROR", logger="musetalk_rt.framelog"):
        fresh.write(ev="frame", bad=object())  # not JSON-serialisable: logged, no raise
    assert fresh._file.closed and "not JSON serializable" in caplog.text


def test_feature_thread_survives_failing_calls_and_keeps_the_timeline(
    tiny_models, fixture_file, monkeypatch
):
    """One failed voice-activity batch and one failed feature call: the channel's feature thread
    logs and counts them (``audio_errors``) and goes on. The failed VAD windows count as silence,
    so the speech decisions after them sit at the times a clean run gives; the extractor that
    failed is replaced by one starting at the frame the audio had reached, so every later frame
    gets its window on its own frame."""
    import threading

    from musetalk_rt.audio.audioqueue import AudioQueue
    from musetalk_rt.audio.incremental import IncrementalFeatureExtractor, StreamingConfig
    from musetalk_rt.audio.vad import VoiceActivity, load_silero_vad
    from musetalk_rt.live.channel import ChannelStats, LiveChannel
    from musetalk_rt.live.drift import SHIFT_AT_S
    from musetalk_rt.media import load_audio

    net = load_silero_vad()
    audio = load_audio(fixture_file("eng.wav")).to_mono_16k()[: 16000 * 6]
    clean = VoiceActivity(net)
    clean.push(audio)
    clean_segments = [(s.start_ms, s.end_ms) for s in clean.finish()]
    assert clean_segments

    class FlakyNet:  # fails its 2nd call, in the silence before the first word
        def __init__(self):
            self.calls = 0

        def run(self, x, state):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("simulated VAD failure")
            return net.run(x, state)

    ch = LiveChannel.__new__(LiveChannel)  # the feature thread's state only: no outputs, no clock
    ch.name, ch.t0, ch.delay_s, ch.next_out = "c0", time.monotonic(), 30.0, 0
    ch.whisper, ch.fe, ch.encoder = tiny_models.whisper, tiny_models.feature_extractor, None
    ch.vad_net, ch.stream_config = FlakyNet(), StreamingConfig(hop_frames=5)
    ch.audio_q = AudioQueue(600.0, 16000, fill_drops=True)
    ch._stop, ch._lock = threading.Event(), threading.Lock()
    ch._sessions, ch.stats, ch.frame_log = [], ChannelStats(), None
    ch.windows, ch.arrival, ch._audio = {}, {}, {}
    ch.drift_shift_s = SHIFT_AT_S
    real_push = IncrementalFeatureExtractor.push
    fed = {}

    def push(self, pcm):  # the feature call that reaches 4 s of a session fails, once
        n = fed.get(id(self), 0)
        fed[id(self)] = n + pcm.size
        if n < 4 * 16000 <= n + pcm.size and not fed.get("failed"):
            fed["failed"] = True
            raise RuntimeError("simulated feature failure")
        return real_push(self, pcm)

    monkeypatch.setattr(IncrementalFeatureExtractor, "push", push)
    thread = threading.Thread(target=ch._feature_loop, daemon=True)
    thread.start()
    ch.audio_q.put_control(("open", (ch.t0, None)), new_session=True)
    for i in range(0, len(audio), 320):
        ch.audio_q.put_audio(audio[i : i + 320], lambda a: ("audio", (a, time.monotonic())))
        time.sleep(0.001)  # chunk by chunk, so the failures hit single chunks
    ch.audio_q.put_control(("close", None))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not ch._sessions or ch._sessions[0].end_frame is None):
        time.sleep(0.05)
    ch._stop.set()
    thread.join(5)
    assert ch.stats.audio_errors == 2 and ch.stats.sessions == 1
    s = ch._sessions[0]
    assert s.end_frame == -(-len(audio) // 640)  # every sample on its frame
    got = [(x.start_ms, x.end_ms) for x in s.vad.segments]
    assert got == clean_segments  # the failed windows (silence) moved no decision
    # the extractor restarted at the frame boundary after the audio of its failed call (in the
    # 5th second, after the audio of that call, at most 1 s); from there every frame of the
    # session got its window, on its own frame
    assert 100 <= s.first_frame <= 126 and s.drop_samples == 0
    assert set(range(s.first_frame, s.end_frame)) <= set(ch.windows)
    assert max(ch.windows) == s.end_frame - 1


def test_gpu_worker_gathers_each_channels_own_avatar_latents():
    """The worker keeps every avatar's reference latents in one tensor (an avatar shared by two
    channels once) and gathers a batch's rows with one index: each frame gets its own channel's
    avatar at its cycle frame."""
    from types import SimpleNamespace

    import torch

    from musetalk_rt.live.worker import GpuWorker

    def avatar(base, n):  # row k of this avatar holds base + k
        lat = (base + torch.arange(float(n))).view(n, 1, 1, 1).expand(n, 8, 32, 32).contiguous()
        return SimpleNamespace(latents=lat, cycle_frame=lambda m: m % n)

    a, b = avatar(100, 3), avatar(200, 5)
    chans = [SimpleNamespace(name=n, avatar=av) for n, av in (("x", a), ("y", b), ("z", a))]
    seen = []

    class Gen:
        batch_sizes = [8]
        device = torch.device("cpu")

        def launch(self, batch, clock):
            seen.append(batch.latents[:, 0, 0, 0].tolist())
            batch.faces = np.zeros((len(batch), 256, 256, 3), np.uint8)

    worker = GpuWorker(Gen(), chans, horizon_s=1.0, blend_threads=1)
    assert worker._latents.shape[0] == 3 + 5  # the shared avatar once
    for ch in chans:
        ch.windows = {m: torch.zeros(50, 384) for m in range(5)}
        ch.pending = set()
    work = [(chans[0], 1), (chans[1], 4), (chans[2], 2), (chans[1], 0), (chans[0], 3)]
    launched = worker._launch(work)
    assert launched is not None and len(launched.wins) == 5  # held until collected
    assert seen == [[101.0, 204.0, 102.0, 200.0, 100.0]]
    worker.stop()


def test_a_restarted_show_never_overwrites_the_earlier_recording(tmp_path, capsys):
    """The crew restarts the same command after a crash: the recording (or captions file)
    already there is the show so far, so the new run writes NAME.1.mp4, then NAME.2.mp4, and
    says so; an empty file (a run that wrote nothing) and URLs are used as given."""
    from musetalk_rt.live.app import keep_earlier_file

    rec = tmp_path / "show.mp4"
    assert keep_earlier_file(str(rec)) == str(rec)  # nothing there yet
    rec.write_bytes(b"")
    assert keep_earlier_file(str(rec)) == str(rec)  # an empty file holds no show
    rec.write_bytes(b"\x00" * 10)
    assert keep_earlier_file(str(rec)) == str(tmp_path / "show.1.mp4")
    assert f"{rec} holds an earlier run's output; this run writes" in capsys.readouterr().out
    (tmp_path / "show.1.mp4").write_bytes(b"x")
    assert keep_earlier_file(str(rec)) == str(tmp_path / "show.2.mp4")
    assert rec.read_bytes() == b"\x00" * 10  # untouched
    url = "rtmp://127.0.0.1/live/hall"
    assert keep_earlier_file(url) == url
    srt = tmp_path / "hall.srt"
    srt.write_text("1\n")
    assert keep_earlier_file(str(srt)) == str(tmp_path / "hall.1.srt")


def test_shutdown_finishes_every_output_at_once():
    """Each output's close may wait for a dead server or a trailer: they run side by side (all
    four closes meet at a barrier, which one-after-another closes never would)."""
    import threading

    from musetalk_rt.live.channel import close_all

    barrier, met = threading.Barrier(4, timeout=20.0), []

    class Out:
        label = "o"

        def close(self):
            barrier.wait()
            met.append(True)

    close_all([Out() for _ in range(4)])
    assert met == [True] * 4 and not barrier.broken
