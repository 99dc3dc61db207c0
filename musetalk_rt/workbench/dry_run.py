"""The live pipeline in this process with WAV senders: its frames and its metrics over time.

``dry_run`` starts ``musetalk_rt.live`` in a thread of this process (its own event loop; no
signal handlers outside the main thread), one or more channels recording to MP4, sends a WAV to
every channel in real time from another thread, reads ``/metrics`` once a second while it runs,
and returns the snapshots, the recordings' frame counts and a few frames. ``controls`` builds
the notebook's ipywidgets panel (engine, batch size, channel count) around it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOKEN = "dry-run"


@dataclass
class DryRunResult:
    """What a dry run produced.

    Attributes:
        exit_code: The live process's exit status (0: clean stop).
        metrics: ``[(t_s, {series: value})]`` snapshots of ``/metrics``.
        recordings: ``{channel: path}``.
        frames: ``{channel: frame count}`` read back from the recordings.
        samples: ``{channel: [H, W, 3] uint8 frames}`` (a few, evenly spaced).
        sends: ``{channel: error or None}``.
    """

    exit_code: int | None = None
    metrics: list[tuple[float, dict]] = field(default_factory=list)
    recordings: dict = field(default_factory=dict)
    frames: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    sends: dict = field(default_factory=dict)

    def summary(self) -> str:
        """Per channel: frames recorded, then the last ``/metrics`` read (~1 s before the end)."""
        last = self.metrics[-1][1] if self.metrics else {}
        lines = [f"live exit status {self.exit_code}"]
        for ch in sorted(self.recordings):
            lab = f'{{channel="{ch}"}}'
            lines.append(
                f"{ch}: {self.frames.get(ch, 0)} frames recorded; at the last metrics read "
                f"{last.get('musetalk_speech_frames_total' + lab, 0):.0f} speech, "
                f"{last.get('musetalk_late_frames_total' + lab, 0):.0f} late, voice-to-frame p95 "
                f"{last.get('musetalk_voice_to_frame_p95_ms' + lab, 0):.0f} ms"
                + (f", sender: {self.sends[ch]}" if self.sends.get(ch) else "")
            )
        busy = self.gpu_busy_share()
        if busy is not None:
            lines.append(
                f"GPU worker: {last.get('musetalk_gpu_batches_total{}', 0):.0f} batches; their GPU "
                f"time {busy:.0%} of the time between the first and last metrics reads (near "
                "100%: the GPU is the limit; far below with late frames: the host side is)"
            )
        return "\n".join(lines)

    def gpu_busy_share(self) -> float | None:
        """The GPU worker's batch time on the GPU over the metrics span (None: not measured).

        From ``musetalk_gpu_busy_seconds_total`` (CUDA events; 0 on the CPU, where it is None).
        """
        ts, vs = self.series("musetalk_gpu_busy_seconds_total")
        if len(ts) < 2 or ts[-1] <= ts[0] or vs[-1] <= 0:
            return None
        return (vs[-1] - vs[0]) / (ts[-1] - ts[0])

    def series(self, name: str, channel: str | None = None) -> tuple[list[float], list[float]]:
        """Times and values of one metric (one channel's, when labelled by channel)."""
        ts, vs = [], []
        for t, snap in self.metrics:
            for key, v in snap.items():
                base, _, labels = key.partition("{")
                if base == name and (channel is None or f'channel="{channel}"' in labels):
                    ts.append(t)
                    vs.append(v)
                    break
        return ts, vs


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format to ``{"name{labels}": value}`` (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout_s: float, alive) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the live pipeline stopped during start-up (see its output)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the live pipeline did not listen within {timeout_s:.0f} s")


def dry_run(
    avatar_id: str,
    avatars_dir: str | Path,
    wav: str | Path,
    weights: str = "tiny",
    device: str = "cpu",
    engine: str = "eager",
    dtype: str = "fp32",
    batch_size: int = 4,
    channels: int = 1,
    duration_s: float = 20.0,
    work: str | Path = "out/dry_run",
    extra_args: tuple[str, ...] = (),
    start_timeout_s: float = 300.0,
    samples: int = 4,
) -> DryRunResult:
    """Run the live pipeline for ``duration_s`` seconds with ``channels`` WAV senders.

    Args:
        avatar_id: A prepared avatar (``workbench.profile.probe_avatar`` makes one).
        avatars_dir: Where it is.
        wav: Speech sent to every channel in real time.
        weights: ``real``, ``synthetic`` or ``tiny``.
        device: ``cpu`` or ``cuda``.
        engine: Engine of the GPU worker.
        dtype: Its dtype.
        batch_size: The worker's bucket.
        channels: Channels (each gets the same WAV).
        duration_s: Seconds the pipeline serves after it listens.
        work: Recordings go here.
        extra_args: More ``musetalk_rt.live`` options (e.g. ``("--stream-hop", "25")``).
        start_timeout_s: Model loading and engine builds must finish within this.
        samples: Frames kept per channel for display.
    """
    from musetalk_rt.live.app import main as live_main
    from musetalk_rt.live.send import send_clip
    from musetalk_rt.media import load_audio

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    names = [f"c{i}" for i in range(channels)]
    port = _free_port()
    argv = [
        *(x for n in names for x in ("--channel", f"{n}={avatar_id}")),
        *("--avatars-dir", str(avatars_dir), "--host", "127.0.0.1", "--port", str(port)),
        *("--token", TOKEN, "--weights", weights, "--device", device),
        *("--engine", engine, "--dtype", dtype, "--batch-sizes", str(batch_size)),
        *("--record", str(work / ("{channel}.mp4" if channels > 1 else f"{names[0]}.mp4"))),
        *("--duration-s", str(duration_s)),
        *extra_args,
    ]
    res = DryRunResult(recordings={n: work / f"{n}.mp4" for n in names})
    live = threading.Thread(
        target=lambda: setattr(res, "exit_code", live_main(argv)), name="live", daemon=True
    )
    live.start()
    _wait_listening(port, start_timeout_s, live.is_alive)
    t0 = time.monotonic()
    clip = load_audio(wav)

    def send(name: str) -> None:
        url = f"ws://127.0.0.1:{port}/ingest/{name}"
        try:
            rep = asyncio.run(send_clip(url, clip, token=TOKEN))
            res.sends[name] = rep.error
        except Exception as exc:  # reported in the result, the run goes on
            res.sends[name] = f"{type(exc).__name__}: {exc}"

    senders = [threading.Thread(target=send, args=(n,), daemon=True) for n in names]
    for s in senders:
        s.start()
    while live.is_alive():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            res.metrics.append((round(time.monotonic() - t0, 2), parse_metrics(text.decode())))
        except OSError:
            pass  # stopping
        live.join(1.0)
    for s in senders:
        s.join(5.0)
    for n, path in res.recordings.items():
        res.frames[n], res.samples[n] = _read_back(path, samples)
    return res


def _read_back(path: Path, keep: int) -> tuple[int, list[np.ndarray]]:
    import av

    if not path.exists():
        return 0, []
    with av.open(str(path)) as c:  # a fragmented MP4's header counts no frames: the packets do
        total = sum(1 for p in c.demux(video=0) if p.size)
    want = set(np.linspace(0, max(total - 1, 0), num=min(keep, total)).round().astype(int))
    kept, n = [], 0
    with av.open(str(path)) as c:
        for n, f in enumerate(c.decode(video=0), 1):
            if n - 1 in want:
                kept.append(f.to_ndarray(format="rgb24"))
    return n, kept


def controls(run, engine: str = "eager", batch_size: int = 4, channels: int = 1):
    """An ipywidgets panel: engine, batch size, channel count and a Run button.

    Args:
        run: Called as ``run(engine=…, batch_size=…, channels=…)`` when Run is pressed; what
            it returns is displayed under the panel.
        engine: Initial engine.
        batch_size: Initial batch size.
        channels: Initial channel count.
    """
    import ipywidgets as w
    from IPython.display import display

    engines = ["eager", "compile", "aoti", "trt"]
    eng = w.Dropdown(options=engines, value=engine, description="engine")
    bs = w.Dropdown(options=[1, 2, 4, 8, 16, 32], value=batch_size, description="batch")
    ch = w.IntSlider(value=channels, min=1, max=32, description="channels")
    button = w.Button(description="Run")
    out = w.Output()

    def clicked(_):
        with out:
            out.clear_output()
            display(run(engine=eng.value, batch_size=bs.value, channels=ch.value))

    button.on_click(clicked)
    return w.VBox([w.HBox([eng, bs, ch, button]), out])
