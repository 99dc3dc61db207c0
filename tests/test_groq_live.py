"""Voice mode and captions in the live process, end to end on the CPU with tiny weights.

The live process runs as users run it (``python -m musetalk_rt.live --groq voice …``) with the
real ``groq`` client pointed at our stand-in (in this test process, so the test can take Groq
down and bring it back), the real sender and a recording read back with PyAV.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import wave

import av
import cv2
import numpy as np
import pytest
from skimage import data

pytest.importorskip("groq", reason="the groq client is in the dev extra")

from musetalk_rt.avatar import prepare_avatar  # noqa: E402
from musetalk_rt.speech.captions import parse_srt  # noqa: E402
from musetalk_rt.speech.groq_client import _read_wav  # noqa: E402
from musetalk_rt.testing.groq_standin import (  # noqa: E402
    TYPICAL_LATENCY,
    GroqStandin,
    StandinConfig,
    speak,
    wav_bytes,
)
from musetalk_rt.testing.rtmp import free_port  # noqa: E402

KEY = "gsk_live_" + "0c6b2f8e4a1d3b5c7e9f1a3c5e7b9d1f"
SR = 16000
TEXTS = ["Good evening everyone.", "Welcome to the show tonight."]


def _wav(path, audio):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
        w.writeframes(np.rint(np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def _send(port, wav):
    return subprocess.run(
        [sys.executable, "-m", "musetalk_rt", "send", "--url",
         f"ws://127.0.0.1:{port}/ingest/astro", "--wav", str(wav), "--token", "t0ken"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _talks(frame, idle) -> bool:
    """Whether the frame above the caption band differs from the idle frame.

    The generated (tiny-weights) face differs by ~3.7 grey levels on average; H.264 drift of the
    still idle frame stays under ~2.
    """
    h = frame.shape[0] * 3 // 4
    return np.abs(frame[:h].astype(int) - idle[:h]).mean() > 2.8


@pytest.mark.slow
def test_live_voice_mode_with_captions_fallback_and_recovery(tiny_models, tmp_path):
    img = tmp_path / "astro.png"
    cv2.imwrite(str(img), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    avatars = tmp_path / "avatars"
    prepare_avatar(img, "astro", tiny_models, avatars, log=lambda _: None)
    gap = np.zeros(int(0.8 * SR), np.float32)
    mc = np.concatenate([gap, speak(TEXTS[0], SR), gap, speak(TEXTS[1], SR), gap])
    _wav(tmp_path / "mc.wav", mc)
    record, srt = tmp_path / "rec.mp4", tmp_path / "live.srt"
    cfg = StandinConfig(latency=dict(TYPICAL_LATENCY), api_key=KEY, transcripts=list(TEXTS))
    with GroqStandin(config=cfg) as standin:
        (tmp_path / "live.toml").write_text(
            f'[groq]\nbase_url = "{standin.base_url}"\ntts_model = "tts-test"\n'
            'tts_voice = "narrator"\nbreaker_failures = 1\nbreaker_cooldown_s = 2.0\n'
        )
        port = free_port()
        live = subprocess.Popen(
            [sys.executable, "-m", "musetalk_rt.live", "--avatars-dir", str(avatars),
             "--weights", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch-sizes", "4",
             "--stream-hop", "25", "--delay-ms", "4000", "--host", "127.0.0.1", "--port",
             str(port), "--token", "t0ken", "--avatar", "astro", "--record", str(record),
             "--groq", "voice", "--config", str(tmp_path / "live.toml"), "--captions", str(srt),
             "--burn-captions"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "GROQ_API_KEY": KEY},
        )  # fmt: skip
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(live.stdout.readline, "")), daemon=True)\
            .start()  # fmt: skip
        deadline = time.monotonic() + 240
        while not any("ingest listening" in ln for ln in lines):
            assert live.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        try:
            assert _send(port, tmp_path / "mc.wav").returncode == 0  # 1: Groq speaks
            time.sleep(3)
            standin.config.down = True  # 2: Groq is down: the MC's own voice goes out
            assert _send(port, tmp_path / "mc.wav").returncode == 0
            time.sleep(3)
            standin.config.down = False  # 3: back after the cool-down
            time.sleep(2.5)
            assert _send(port, tmp_path / "mc.wav").returncode == 0
            time.sleep(8)  # the last synthesized utterance plays out (D = 4 s here)
        finally:
            live.send_signal(signal.SIGTERM)
            out, _ = live.communicate(timeout=120)
            lines.append(out or "")
    log = "".join(lines)
    assert live.returncode == 0, log[-3000:]
    assert KEY not in log
    summary = json.loads([ln for ln in log.splitlines() if ln.startswith('{"live"')][-1])
    ch, sp = summary["live"][0], summary["speech"][0]
    print(json.dumps(sp, indent=1))
    assert sp["spoken"] == 4 and sp["fallbacks"] >= 1 and sp["breaker_opens"] >= 1
    assert sp["utterance_to_speech_ms"]["n"] == 4
    assert ch["skipped_frames"] == 0 and ch["overlay_errors"] == 0

    # the video never stalled: every frame of the stream is in the recording
    with av.open(str(record)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(record)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    # (a recording's queue drops its oldest frame when the writer falls behind, counted: on a
    # 2-core host beside other work that happens; a frame neither written nor counted fails)
    dropped = sum(o.get("dropped_full", 0) + o.get("dropped_down", 0)
                  for o in ch["outputs"].values())  # fmt: skip
    assert abs(len(frames) + dropped - ch["frames_out"]) <= 1, (len(frames), dropped, ch)

    # captions: one per spoken utterance, in order, with the spoken text
    cues = parse_srt(srt.read_text(encoding="utf-8"))
    assert [c.text for c in cues] == TEXTS + TEXTS
    assert all(a.end_s <= b.start_s for a, b in zip(cues, cues[1:], strict=False))

    # the output audio is Groq's speech where the captions say, and the caption is burned in
    for cue in cues:
        tts = _read_wav(wav_bytes(speak(cue.text, 24000), 24000))
        i0 = int(cue.start_s * SR)
        seg = pcm[max(0, i0 - SR // 2) : i0 + tts.size + SR // 2]
        corr = np.correlate(seg, tts, "valid") / (np.linalg.norm(tts) * np.linalg.norm(seg) + 1e-9)
        assert corr.max() > 0.5, (cue, corr.max())
        f = int((cue.start_s + cue.end_s) / 2 * 25)
        band = frames[f][-len(frames[f]) // 4 :].astype(int)
        clean = frames[5][-len(frames[5]) // 4 :].astype(int)  # before anyone spoke
        assert np.abs(band - clean).mean() > 5, cue
        # ... and the face talks while Groq's speech plays (the frames follow that audio)
        talking = [
            _talks(frames[k], frames[5])
            for k in range(int(cue.start_s * 25) + 5, int(cue.end_s * 25) - 5)
        ]
        assert np.mean(talking) > 0.5, (cue, np.mean(talking))
    assert not any(_talks(frames[k], frames[5]) for k in range(6, 20))  # silence before: idle
    assert ch["speech_frames"] > 0
    # the MC's own voice went out while Groq was down (second sender)
    assert sp["passthrough_s"] > 0 or sp["fallbacks"] >= 1
