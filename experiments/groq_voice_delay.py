"""Voice mode's delay: end of an utterance -> its synthesized speech on the output clock.

Runs the live process (tiny weights on this host's CPU, voice mode) against the Groq stand-in
with ``TYPICAL_LATENCY`` (the figures we assume for Groq; see the stand-in's module) and
scripted transcripts (so the host spends no time on a recogniser; text-to-speech is real
espeak-ng). A sender streams phrases separated by pauses, several times. The live summary gives,
per spoken utterance, the time from the utterance's last sample arriving to the first voiced
frame of its synthesized speech being emitted (``t0 + D + frame / 25``), and the breakdown of
the last one. Writes one JSON row to ``--out`` and prints it.

    python experiments/groq_voice_delay.py --out experiments/results/<date>_cpu_<sha>/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import wave
from datetime import date
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from musetalk_rt.avatar import prepare_avatar
from musetalk_rt.testing.groq_standin import TYPICAL_LATENCY, GroqStandin, StandinConfig, speak
from musetalk_rt.testing.rtmp import free_port

PHRASES = [
    "Good evening, everyone, and welcome.",
    "Tonight we have three speakers for you.",
    "Please take your seats.",
    "Our first guest needs no introduction.",
    "Let us give her a warm welcome.",
]
KEY = "gsk_delay_probe_not_a_real_key"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for groq_voice_delay.jsonl")
    p.add_argument("--rounds", type=int, default=2, help="times the phrases are sent")
    p.add_argument("--delay-ms", type=int, help="playout delay D (default: derived at start)")
    p.add_argument(
        "--stream-hop", type=int, default=1, help="whisper hop in frames (CPU hosts: 25)"
    )
    p.add_argument("--chat-model", help="also rewrite each transcript with this chat model")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="groq-delay-"))
    from musetalk_rt.weights import load_models

    models = load_models("tiny", device="cpu")
    img = tmp / "astro.png"
    cv2.imwrite(str(img), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    prepare_avatar(img, "astro", models, tmp / "avatars", log=lambda _: None)
    sr = 16000
    gap = np.zeros(int(1.0 * sr), np.float32)
    mc = np.concatenate([gap] + [x for t in PHRASES for x in (speak(t, sr), gap)])
    with wave.open(str(tmp / "mc.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes(np.rint(mc * 32767).astype("<i2").tobytes())
    cfg = StandinConfig(latency=dict(TYPICAL_LATENCY), transcripts=list(PHRASES))
    with GroqStandin(config=cfg) as standin:
        (tmp / "groq.toml").write_text(
            f'[groq]\nbase_url = "{standin.base_url}"\ntts_model = "tts"\ntts_voice = "v"\n'
            + (f'chat_model = "{args.chat_model}"\n' if args.chat_model else "")
        )
        port = free_port()
        cmd = [
            sys.executable, "-m", "musetalk_rt.live", "--avatars-dir", str(tmp / "avatars"),
            "--weights", "tiny", "--device", "cpu", "--dtype",
            "fp32", "--batch-sizes", "4", "--host", "127.0.0.1", "--port", str(port),
            "--avatar", "astro", "--record", str(tmp / "rec.mp4"), "--groq", "voice",
            "--config", str(tmp / "groq.toml"), "--stream-hop", str(args.stream_hop),
        ]  # fmt: skip
        if args.delay_ms:
            cmd += ["--delay-ms", str(args.delay_ms)]
        live = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "GROQ_API_KEY": KEY},
        )
        lines: list[str] = []
        threading.Thread(
            target=lambda: lines.extend(iter(live.stdout.readline, "")), daemon=True
        ).start()
        while not any("ingest listening" in ln for ln in lines):
            if live.poll() is not None:
                print("".join(lines)[-3000:])
                return 1
            time.sleep(0.2)
        for _ in range(args.rounds):
            subprocess.run(
                [sys.executable, "-m", "musetalk_rt", "send", "--url",
                 f"ws://127.0.0.1:{port}/ingest/astro", "--wav", str(tmp / "mc.wav")],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
        time.sleep(8)
        live.send_signal(signal.SIGTERM)
        out, _ = live.communicate(timeout=120)
        lines.append(out or "")
    log = "".join(lines)
    summary = json.loads([ln for ln in log.splitlines() if ln.startswith('{"live"')][-1])
    sp, ch = summary["speech"][0], summary["live"][0]
    row = {
        "probe": "groq_voice_delay",
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "weights": "tiny",
        "device": "cpu",
        "groq": "stand-in, TYPICAL_LATENCY, scripted transcripts, espeak-ng speech",
        "latency_model": {k: vars(v) for k, v in TYPICAL_LATENCY.items()},
        "delay_ms": summary["delay_ms"],
        "stream_hop": args.stream_hop,
        "chat_rewrite": bool(args.chat_model),
        "utterances": sp["utterances"],
        "spoken": sp["spoken"],
        "fallbacks": sp["fallbacks"],
        "utterance_to_speech_ms": sp["utterance_to_speech_ms"],
        "last_breakdown": sp["last"],
        "late_frames": ch["late_frames"],
        "speech_frames": ch["speech_frames"],
        "date": date.today().isoformat(),
        "commit": os.environ.get("MUSETALK_RT_GIT_SHA")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "groq_voice_delay.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    d = sp["utterance_to_speech_ms"]
    print(
        f"D {summary['delay_ms']} ms; utterance end -> synthesized speech on the output clock: "
        f"p50 {d['p50']} / p95 {d['p95']} / max {d['max']} ms over {d['n']} utterances; "
        f"last: {sp['last']}"
    )
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
