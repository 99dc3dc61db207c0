"""The live audio path alone, N channels in one process: how much slack do the windows leave?

On an H200 with 8 live channels most speech frames were late although neither the GPU worker
nor the whisper batcher was busy (experiments/LOG.md): the windows reached the channels only
50 ms before their deadline, or after it. This probe runs the same per-channel machinery as the
live process — :class:`~musetalk_rt.live.channel.LiveChannel` (ingest queue, voice activity,
incremental features, the media clock), the shared :class:`BatchedEncoder` — with **no model
cost**: the whisper engine is a stub returning zeros, there is no GPU worker and no output. What
is left is Python: threads, queues, the VAD on the CPU, canvas planning, window cutting, under
one interpreter lock. ``--outputs`` adds each channel's real x264/AAC recording (the other
tenant of the cores and the lock), and every row carries the process's thread wake-up delay
(:mod:`musetalk_rt.live.wakeprobe`). Each channel is fed a WAV in real time (20 ms chunks, as
``send`` does).
``--ms-per-canvas`` gives the stub a service time (a GPU's, lock released) to find where the
shared batcher's queue runs away; ``--engine canvas`` puts the live canvas engine back.

It reports per channel the window lead (time from a window's arrival to its frame's deadline;
the live process's ``window_lead_p05_ms``) and late windows, with ``sys.setswitchinterval`` as
a knob. One JSONL row per (channels, switch interval) into ``<out>/audio_path_probe.jsonl``.

    python experiments/audio_path_probe.py --wav ../shared/fixtures/eng.wav --channels 1,4,8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from musetalk_rt.bench import environment, write_rows


class ZeroEncoder:
    """Whisper engine stand-in: ``[B, 1500, 5, 384]`` zeros after a wait.

    The wait is ``ms_per_canvas`` per canvas, the interpreter lock released (as while a GPU runs).
    """

    def __init__(self, max_batch: int = 16, ms_per_canvas: float = 0.0):
        self.zeros = torch.zeros(max_batch, 1500, 5, 384)
        self.max_batch = max_batch
        self.ms_per_canvas = ms_per_canvas

    def __call__(self, canvases):
        n = len(canvases)
        if self.ms_per_canvas:
            time.sleep(self.ms_per_canvas * n / 1000)
        if n <= self.max_batch:
            return self.zeros[:n]  # a view: the extractor only reads hidden states
        return torch.zeros(n, *self.zeros.shape[1:])


def _avatar(size: int = 64):
    """The least a channel's clock needs of an avatar: one idle frame (a smooth gradient)."""
    ramp = np.broadcast_to(np.linspace(0, 255, size).astype(np.uint8), (size, size))
    frame = np.stack([ramp, ramp.T, np.full((size, size), 128, np.uint8)], -1)  # [S, S, 3]
    return SimpleNamespace(frames=[frame], cycle_frame=lambda n: 0)


def run(n: int, audio: np.ndarray, args, vad_net, fe) -> dict:
    from musetalk_rt.audio.incremental import BatchedEncoder, StreamingConfig
    from musetalk_rt.audio.vad import VadBatcher
    from musetalk_rt.live.channel import LiveChannel
    from musetalk_rt.live.outproc import ProcessOutput
    from musetalk_rt.live.output import Output
    from musetalk_rt.live.wakeprobe import WakeProbe

    cfg = StreamingConfig(extra_lookahead_ms=args.lookahead_ms, hop_frames=args.hop)
    if args.engine == "stub":
        engine, device_of = ZeroEncoder(ms_per_canvas=args.ms_per_canvas), torch.nn.Linear(1, 1)
    else:  # the live canvas engine with the given weights (synthetic on a GPU host)
        from musetalk_rt.audio.canvas_engine import CanvasEncoder
        from musetalk_rt.live.app import whisper_dtype
        from musetalk_rt.weights import load_models

        models = load_models(args.weights, "models", args.device)
        fe = models.feature_extractor
        engine = CanvasEncoder(models.whisper, fe, whisper_dtype(args.dtype))
        device_of = models.whisper
    encoder = BatchedEncoder(device_of, fe, max_batch=16, engine=engine)
    # as the live process: several channels share one voice-activity thread
    shared_vad = n > 1 and args.vad == "shared"
    vad = VadBatcher(vad_net, streams=n) if shared_vad else vad_net
    size = args.output_size
    chans = [
        LiveChannel(
            f"c{i}",
            _avatar(size),
            device_of,
            fe,
            vad,
            cfg,
            args.delay_ms / 1000,
            [
                (ProcessOutput if args.output_mode == "process" else Output)(
                    str(Path(args.work) / f"c{i}.mp4"),
                    size,
                    size,
                    encoder_threads=args.encoder_threads,
                )
            ]
            if args.outputs
            else [],
            encoder,
        )
        for i in range(n)
    ]
    wake = WakeProbe().start()
    cpu0 = time.process_time()
    for ch in chans:
        ch.start()
    chunk = 320  # 20 ms

    def feed(ch):
        ch.open_session()
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(audio), chunk)):
            wait = t0 + k * 0.02 - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            ch.push(audio[i : i + chunk])
        ch.close_session()

    feeders = [threading.Thread(target=feed, args=(ch,)) for ch in chans]
    for f in feeders:
        f.start()
    for f in feeders:
        f.join()
    time.sleep(args.delay_ms / 1000 + 0.5)
    for ch in chans:
        ch.halt()
    for ch in chans:
        ch.stop()
    encoder.close()
    if shared_vad:
        vad.close()
    wake.stop()
    leads = [ch.stats.window_lead_ms for ch in chans]
    p05 = [sorted(x)[int(0.05 * (len(x) - 1))] for x in leads if x]
    p50 = [statistics.median(x) for x in leads if x]
    return {
        "channels": n,
        "engine": args.engine,
        "ms_per_canvas": args.ms_per_canvas if args.engine == "stub" else None,
        "switch_interval_ms": args.switch_ms,
        "hop": args.hop,
        "vad": "shared" if shared_vad else "per channel",
        "cpu_s": round(time.process_time() - cpu0, 2),
        "lookahead_ms": cfg.lookahead_ms,
        "delay_ms": args.delay_ms,
        "speech_s": round(len(audio) / 16000, 1),
        "window_lead_p05_ms_min": round(min(p05), 1) if p05 else None,
        "window_lead_p50_ms_median": round(statistics.median(p50), 1) if p50 else None,
        "late_windows": sum(ch.stats.late_windows for ch in chans),
        "encoder_calls": encoder.calls,
        "canvases": encoder.canvases,
        "outputs": f"x264 {size}x{size}, {args.encoder_threads or 'default'} threads, "
        f"{args.output_mode}"
        if args.outputs
        else None,
        "thread_wake_delay_ms": wake.summary(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wav", required=True)
    ap.add_argument("--seconds", type=float, default=20.0, help="speech per channel")
    ap.add_argument("--channels", default="1,4,8")
    ap.add_argument("--switch-ms", type=float, default=5.0, help="sys.setswitchinterval, ms")
    ap.add_argument("--delay-ms", type=int, default=350)
    ap.add_argument("--lookahead-ms", type=int, default=80, help="extra look-ahead")
    ap.add_argument("--hop", type=int, default=1)
    ap.add_argument(
        "--vad",
        choices=("shared", "per-channel"),
        default="shared",
        help="one voice-activity thread for all channels (the live default) or one per channel",
    )
    ap.add_argument(
        "--engine",
        choices=["stub", "canvas"],
        default="stub",
        help="stub: zeros after --ms-per-canvas; canvas: the live canvas engine",
    )
    ap.add_argument("--ms-per-canvas", type=float, default=0.0)
    ap.add_argument("--weights", default="synthetic", help="for --engine canvas")
    ap.add_argument("--device", default="cuda", help="for --engine canvas")
    ap.add_argument("--dtype", default="fp16", help="serving dtype, for --engine canvas")
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads (the VAD's pool)")
    ap.add_argument(
        "--outputs", action="store_true", help="one real x264/AAC recording per channel"
    )
    ap.add_argument("--output-size", type=int, default=512, help="frame side with --outputs")
    ap.add_argument("--encoder-threads", type=int, help="x264 threads per output")
    ap.add_argument(
        "--output-mode",
        choices=("process", "thread"),
        default="process",
        help="each output in its own process (the live default) or a thread here",
    )
    ap.add_argument("--work", default="/tmp/audio_path_probe", help="recordings go here")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from transformers import WhisperFeatureExtractor

    from musetalk_rt.audio.vad import load_silero_vad
    from musetalk_rt.media import load_audio

    sys.setswitchinterval(args.switch_ms / 1000)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    audio = load_audio(args.wav).to_mono_16k()[: int(args.seconds * 16000)]
    vad_net, fe = load_silero_vad(), WhisperFeatureExtractor()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(x) for x in args.channels.split(",")):
        r = run(n, audio, args, vad_net, fe)
        r.update(environment(torch.device(args.device)))  # the card, torch, driver, commit
        rows.append(r)
        print(
            f"{n:>3} channels, {args.engine} {args.ms_per_canvas} ms/canvas, switch "
            f"{args.switch_ms} ms, vad {r['vad']}: window lead p05 "
            f"{r['window_lead_p05_ms_min']} ms (p50 {r['window_lead_p50_ms_median']}), "
            f"late windows {r['late_windows']}, encoder calls {r['encoder_calls']}, "
            f"wake-up delay {r['thread_wake_delay_ms']}, CPU {r['cpu_s']} s",
            flush=True,
        )
        write_rows([r], args.out, "audio_path_probe.jsonl")  # each row as soon as it exists
    print(json.dumps({"audio_path_probe": str(args.out / "audio_path_probe.jsonl"), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
