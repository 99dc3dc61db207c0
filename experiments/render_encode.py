"""The render's x264 encoder inline against in a thread of its own, on the machine at hand.

``render`` encodes in a :class:`~musetalk_rt.media.BackgroundWriter` thread when the models run
on a GPU (the encoder works on batch n while the GPU runs batch n+1) and inline on a CPU, where
the two would only take turns for the same cores (2 cores: 81 s threaded against 72 s inline).
This measures the GPU side of that choice: the talking-avatar fixture (704x1216 output frames)
is prepared with the chosen weights, then the same speech is rendered ``--repeat`` times per
engine, inline and threaded in alternation (so a drift of the host's clocks hits both), and each
render's wall time without its engine build is one row (the order of the two modes flips from
one repeat to the next). ``--warmup-s`` renders that many seconds of the speech first, untimed
(its row says ``warmup``): the first render of a process can pay for work the build left undone,
which would land on whichever mode came first. ``--x264-presets`` times several presets in one
process (one build). The encoded video of the two modes is compared by a digest of its packets
(identical on the CPU; on a GPU two runs of the same mode can differ, see the LOG).

    python experiments/render_encode.py --video yongen.mp4 --bbox 250,300,470,560 \
        --audio eng.wav --weights synthetic --engines eager,compile --out experiments/results/X

One JSONL row per render goes to ``<out>/render_encode.jsonl``; after each engine and preset a
summary JSON line is printed (median wall per engine, x264 preset and mode, and the threaded
speed-up, of all rows so far), so a run cut short still ends with one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from musetalk_rt.bench import environment, write_rows


def _video_digest(path: Path) -> tuple[int, str]:
    """Encoded frame count and a digest of the video packets.

    x264 is deterministic for the same frames and settings, and reading packets costs nothing
    beside decoding every 704x1216 frame.
    """
    import hashlib

    import av

    h = hashlib.sha256()
    n = 0
    with av.open(str(path)) as c:
        for packet in c.demux(video=0):
            if packet.size:  # the demuxer's last, empty packet is no frame
                h.update(bytes(packet))
                n += 1
    return n, h.hexdigest()[:16]


def _summary(rows: list[dict], env: dict) -> str:
    """One JSON line: per engine and preset the median render time of each mode."""
    summary = {}
    for engine, preset in sorted({(r["engine"], r["x264_preset"]) for r in rows}):
        timed = [
            r
            for r in rows
            if r["engine"] == engine and r["x264_preset"] == preset and r["mode"] != "warmup"
        ]
        med = {
            m: statistics.median(r["render_s"] for r in timed if r["mode"] == m)
            for m in ("inline", "thread")
            if any(r["mode"] == m for r in timed)
        }
        if len(med) < 2:
            continue
        summary[f"{engine}/{preset}"] = {
            "inline_s": round(med["inline"], 2),
            "thread_s": round(med["thread"], 2),
            "speedup": round(med["inline"] / med["thread"], 3),
            "same_video": len({r["video_digest"] for r in timed}) == 1,
        }
    return json.dumps({"render_encode": summary, "gpu": env["gpu"], "git_sha": env["git_sha"]})


def main() -> int:
    from musetalk_rt.avatar import load_avatar, parse_bbox, prepare_avatar
    from musetalk_rt.media import X264_PRESETS
    from musetalk_rt.pipeline import render
    from musetalk_rt.weights import load_models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, required=True, help="avatar source video")
    p.add_argument("--bbox", required=True, help="face box x1,y1,x2,y2 in the source frames")
    p.add_argument("--audio", type=Path, required=True, help="speech to render")
    p.add_argument("--weights", default="synthetic", choices=["synthetic", "tiny", "real"])
    p.add_argument("--models-dir", default="models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--engines", default="eager,compile", help="comma-separated engine names")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2, help="renders per engine and mode")
    p.add_argument(
        "--x264-presets", default="veryfast", help="comma-separated x264 presets, each timed"
    )
    p.add_argument("--warmup-s", type=float, default=0.0, help="untimed first render's audio")
    p.add_argument("--out", type=Path, default=Path("out/render_encode"))
    args = p.parse_args()
    presets = [x.strip() for x in args.x264_presets.split(",") if x.strip()]
    unknown = [x for x in presets if x not in X264_PRESETS]
    if not presets or unknown:  # before minutes of model loading and builds, not after
        p.error(f"--x264-presets: {unknown or 'none given'}; choose from {', '.join(X264_PRESETS)}")

    device = torch.device(args.device)
    models = load_models(args.weights, args.models_dir, device=device)
    work = Path(tempfile.mkdtemp(prefix="render_encode_"))
    t0 = time.perf_counter()
    prepare_avatar(
        args.video, "avatar", models, work / "avatars", bbox=parse_bbox(args.bbox), log=print
    )
    print(f"avatar prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    avatar = load_avatar("avatar", work / "avatars")
    env = environment(device)
    warmup_audio = None
    if args.warmup_s > 0:
        import wave

        import numpy as np

        from musetalk_rt.media import load_audio

        clip = load_audio(args.audio)
        n = min(clip.num_samples, int(args.warmup_s * clip.sample_rate))
        pcm = (np.clip(clip.samples[:, :n].T, -1.0, 1.0) * 32767.0).astype("<i2")  # [n, C]
        warmup_audio = work / "warmup.wav"
        with wave.open(str(warmup_audio), "wb") as w:
            w.setnchannels(clip.channels)
            w.setsampwidth(2)
            w.setframerate(clip.sample_rate)
            w.writeframes(pcm.tobytes())
    rows = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        digests = {}
        plan = [("warmup", False, -1, presets[0])] if warmup_audio is not None else []
        for preset in presets:
            for i in range(args.repeat):  # inline first, then thread first, and so on
                modes = ("inline", "thread") if i % 2 == 0 else ("thread", "inline")
                plan += [(m, m == "thread", i, preset) for m in modes]
            plan.append(("summary", False, -1, preset))
        for mode, threaded, i, preset in plan:
            if mode == "summary":
                print(_summary(rows, env), flush=True)
                continue
            out = work / f"{engine}_{preset}_{mode}_{i}.mp4"
            rep = render(
                models,
                avatar,
                warmup_audio if mode == "warmup" else args.audio,
                out,
                engine=engine,
                dtype=args.dtype,
                batch_size=args.batch_size,
                log=lambda s: print(s, flush=True),
                encode_thread=threaded,
                x264_preset=preset,
            )
            build_s = rep.stage_ms["prepare(engine build)"] / 1000.0
            frames, digest = _video_digest(out) if mode != "warmup" else (None, None)
            if mode != "warmup":
                digests.setdefault((preset, mode), digest)
            row = {
                "engine": engine,
                "dtype": args.dtype,
                "batch": args.batch_size,
                "weights": args.weights,
                "mode": mode,
                "x264_preset": preset,
                "run": i,
                "frames": rep.frames,
                "encoded_frames": frames,
                "size": f"{avatar.size[0]}x{avatar.size[1]}",
                "wall_s": round(rep.wall_s, 3),
                "build_s": round(build_s, 3),
                "render_s": round(rep.wall_s - build_s, 3),  # the wall without the build
                "render_fps": round(rep.frames / (rep.wall_s - build_s), 1),
                "stage_ms": {k: round(v, 1) for k, v in rep.stage_ms.items()},
                "video_digest": digest,
                "file_mb": round(out.stat().st_size / 1e6, 2),  # the preset's size cost
                **env,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            rows.append(row)
            write_rows([row], args.out, "render_encode.jsonl")
            print(json.dumps(row), flush=True)
            out.unlink()
        for preset in presets:
            pair = {digests.get((preset, m)) for m in ("inline", "thread")}
            if len(pair) > 1:
                print(f"{engine}/{preset}: inline and threaded videos differ: {pair}", flush=True)
    print(_summary(rows, env), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
