"""Live probe: N channels, N real-time senders, the live process's own counters.

For each channel count it starts ``python -m musetalk_rt.live`` with N channels of one avatar
(recording each to a file, the cheapest real output), sends the same speech WAV to every channel
at once in real time with ``musetalk-rt send``, stops the process with SIGTERM and keeps its
final JSON: frames, speech frames, late frames and voice-to-frame delay per channel. One JSONL
row per channel count goes to ``<out>/live_probe.jsonl``; a table is printed and one JSON line
last. A probe stopped by SIGTERM (a time limit) still stops the live process cleanly and writes
the row of the count it was at from the live's final summary, marked ``cut_short``.

    python experiments/live_probe.py --avatar astro --avatars-dir avatars --wav speech.wav
        --channels 1,8 --weights synthetic --engine eager --dtype fp16 --batch-sizes 8

``--avatar probe`` prepares the end-to-end probe's drawn 512x512 face for the weights first (no
image needed on the host); ``--repeat N`` sends the WAV N times back to back (a 60 s clip five
times for a 5-minute run). Extra options go to the live process; ``{n}`` in them becomes the
channel count.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from musetalk_rt.bench import environment, write_rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(args) -> None:
    """The probe avatar for ``--avatar probe``; the looped WAV for ``--repeat``."""
    import wave

    work = Path(args.work)
    if args.avatar == "probe":
        from musetalk_rt.e2e.probe import PROBE_AVATAR, PROBE_BBOX, probe_face_image

        args.avatar, args.avatars_dir = PROBE_AVATAR, str(work / "avatars")
        img = probe_face_image(work / "probe_face.png")
        cmd = [sys.executable, "-m", "musetalk_rt", "avatar", "prepare", "--source", str(img)]
        cmd += ["--id", PROBE_AVATAR, "--bbox", PROBE_BBOX, "--avatars-dir", args.avatars_dir]
        cmd += ["--weights", args.weights, "--device", args.device, "--force"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if args.repeat > 1:
        with wave.open(args.wav, "rb") as w:
            params, pcm = w.getparams(), w.readframes(w.getnframes())
        looped = work / f"speech_x{args.repeat}.wav"
        with wave.open(str(looped), "wb") as w:
            w.setparams(params)
            w.writeframes(pcm * args.repeat)
        args.wav = str(looped)


_STATUS_FIELDS = {
    "fps": r"([\d.]+) frames/s generated",
    "batches": r"in (\d+) batches",
    "mean_batch": r"\(mean ([\d.]+)\)",
    "on_time": r"on time (\d+)",
    "late": r"late (\d+)",
    "shed": r"\((\d+) of them skipped",
    "late_windows": r"audio windows too late (\d+)",
    "skipped_windows": r"\(and (\d+) skipped\)",
    "worker_idle_s": r"worker idle ([\d.]+) s",
    "host_busy_pct": r"host CPU (\d+)% of",
    "host_busy_max_pct": r"busiest second (\d+)%",
}


def status_series(log: str) -> list[dict]:
    """The live log's status lines (one per interval) as numbers: when the late frames came.

    A field a line leaves out (no shed frames, no late windows) is 0.
    """
    rows = []
    for line in log.splitlines():
        if "status:" not in line:
            continue
        row = {"time": line[11:19]}
        for key, pattern in _STATUS_FIELDS.items():
            m = re.search(pattern, line)
            row[key] = float(m.group(1)) if m else 0
        rows.append(row)
    return rows


def probe(n: int, args, extra: list[str]) -> dict:
    port = _free_port()
    names = [f"c{i}" for i in range(n)]
    cmd = [
        sys.executable,
        "-m",
        "musetalk_rt.live",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--token",
        "probe",
        "--avatars-dir",
        args.avatars_dir,
        "--weights",
        args.weights,
        "--engine",
        args.engine,
        "--dtype",
        args.dtype,
        "--batch-sizes",
        args.batch_sizes,
        "--device",
        args.device,
        "--record",
        str(Path(args.work) / f"n{n}_{{channel}}.mp4"),
        *(x.replace("{n}", str(n)) for x in extra),
    ]
    for name in names:
        cmd += ["--channel", f"{name}={args.avatar}"]
    live = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    log_path = Path(args.work) / f"live_n{n}.log"
    reader = threading.Thread(target=_keep_log, args=(live, lines, log_path), daemon=True)
    reader.start()
    state: dict = {"start_s": None, "senders": [], "failed": []}
    cut_short = False
    _STOP["teardown"] = False
    try:
        _drive(args, live, lines, port, names, state)
    except SystemExit:  # stopped (SIGTERM, a time limit): keep what the live says at its end
        _STOP["teardown"] = True
        if state["start_s"] is None:
            raise  # it never started: nothing to keep
        cut_short = True
        _stop_senders(state)
    finally:  # the live ends cleanly and prints its final summary, which the reader keeps
        _STOP["teardown"] = True  # a stop signal from here on is noted, not raised
        if live.poll() is None:
            live.send_signal(signal.SIGTERM)
            try:  # cut short: inside the 75 s a time limit's `timeout -k 75` leaves
                live.wait(60 if cut_short else 120)
            except subprocess.TimeoutExpired:
                live.kill()
        reader.join(10)  # the output's last lines (the pipe closes with the process)
    row = _row(n, args, extra, "".join(lines), state, cut_short)
    if row is None:
        raise SystemExit("the live process printed no final summary:\n" + "".join(lines)[-3000:])
    return row


# a stop signal (SIGTERM: a time limit) raises SystemExit while a count runs, so the probe
# unwinds to its teardown; during the teardown it is only noted (the row is still written)
_STOP = {"requested": False, "teardown": False}


def _on_stop_signal(*_) -> None:
    _STOP["requested"] = True
    if not _STOP["teardown"]:
        raise SystemExit(143)


def _stop_senders(state: dict) -> None:
    """Kill the senders still running; keep the errors of those that had failed."""
    failed = []
    for sender in state["senders"]:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        elif sender.returncode != 0:
            failed.append(sender.stderr.read())
    state["failed"] = failed


def _keep_log(live: subprocess.Popen, lines: list[str], path: Path) -> None:
    """Collect the live process's output, line by line into ``lines`` and the log file.

    The file is written as the lines come, so a probe cut short by a time limit still leaves
    the log of what happened (the start-up, the status lines, the final summary if any).
    """
    with path.open("w") as f:
        for ln in iter(live.stdout.readline, ""):
            lines.append(ln)
            f.write(ln)
            f.flush()


def _drive(args, live, lines, port, names, state: dict) -> None:
    """Wait for the live process to listen, then run the senders to their end."""
    t0 = time.monotonic()
    while not any("ingest listening" in ln for ln in lines):
        if live.poll() is not None or time.monotonic() - t0 > args.start_timeout_s:
            live.kill()
            raise SystemExit("live did not start:\n" + "".join(lines)[-3000:])
        time.sleep(0.2)
    state["start_s"] = time.monotonic() - t0
    for name in names:
        state["senders"].append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "musetalk_rt",
                    "send",
                    "--url",
                    f"ws://127.0.0.1:{port}/ingest/{name}",
                    "--wav",
                    args.wav,
                    "--token",
                    "probe",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    state["failed"] = [s.stderr.read() for s in state["senders"] if s.wait() != 0]
    time.sleep(args.tail_s)


def _row(n, args, extra, log: str, state: dict, cut_short: bool) -> dict | None:
    """The probe's row from the live process's final summary (None when it printed none).

    ``cut_short``: the probe was stopped before its senders ended; the counters cover the
    speech sent until then (``speech_s`` is what was meant to be sent).
    """
    summaries = [ln for ln in log.splitlines() if ln.startswith('{"live"')]
    if not summaries:
        return None
    summary = json.loads(summaries[-1])
    delay = [ln for ln in log.splitlines() if ln.startswith("playout delay")]
    canvas = [ln for ln in log.splitlines() if ln.startswith("whisper canvases")]
    chans = summary["live"]
    return {
        "channels": n,
        "engine": args.engine,
        "dtype": args.dtype,
        "batch_sizes": args.batch_sizes,
        "weights": args.weights,
        "delay_ms": summary["delay_ms"],
        "delay_line": delay[0] if delay else None,
        "canvas_line": canvas[0] if canvas else None,
        "speech_s": round(args.speech_s, 1),
        "per_channel_late": [c["late_frames"] for c in chans],
        "startup_s": round(state["start_s"], 1),
        "cut_short": cut_short,
        "speech_frames": sum(c["speech_frames"] for c in chans),
        "late_frames": sum(c["late_frames"] for c in chans),
        "skipped_frames": sum(c["skipped_frames"] for c in chans),
        "frames_out": sum(c["frames_out"] for c in chans),
        "voice_to_frame_p95_ms_max": max((c["voice_to_frame_p95_ms"] or 0) for c in chans),
        "late_windows": sum(c.get("late_windows", 0) for c in chans),
        "skipped_windows": sum(c.get("skipped_windows", 0) for c in chans),
        "window_lead_p05_ms_min": min(
            (c["window_lead_p05_ms"] for c in chans if c.get("window_lead_p05_ms") is not None),
            default=None,
        ),
        "gpu_batches": summary["gpu_batches"],
        **{
            k: summary.get(k)
            for k in (
                "gpu_frames",
                "gpu_busy_s",
                "mean_batch",
                "overlapped_batches",
                "worker_idle_s",
                "blend_wait_s",
                "fill_wait_s",
                "gpu_shed_frames",
                "expected_ms",
                "stage_ms",
                "thread_wake_delay_ms",
                "gc",
                "host_cpu",
            )
        },
        "status_series": status_series(log),
        "sender_failures": state["failed"],
        "extra_args": extra,
        **environment(torch.device(args.device)),  # the card, torch, driver, commit
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avatar", required=True, help="avatar id, or 'probe' (prepared here)")
    ap.add_argument("--avatars-dir", default="avatars")
    ap.add_argument("--wav", required=True)
    ap.add_argument("--channels", default="1", help="comma-separated channel counts")
    ap.add_argument("--weights", default="synthetic")
    ap.add_argument("--engine", default="eager")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=1, help="send the WAV this many times")
    ap.add_argument("--tail-s", type=float, default=2.0)
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--work", default="/tmp/live_probe")
    ap.add_argument("--out", type=Path, default=Path("."))
    args, extra = ap.parse_known_args()
    # stopped by a time limit: unwind (the live process gets SIGTERM and writes its summary)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    _prepare(args)
    import wave

    with wave.open(args.wav, "rb") as w:
        args.speech_s = w.getnframes() / w.getframerate()
    rows = []
    for n in (int(x) for x in args.channels.split(",")):
        try:
            rows.append(probe(n, args, extra))
        except SystemExit:
            if not _STOP["requested"]:
                raise  # the live process failed to start: its output says why
            print(f"{n:>3} channels: stopped before the live process started; no row", flush=True)
            break
        r = rows[-1]
        print(
            f"{n:>3} channels: D {r['delay_ms']} ms, speech {r['speech_frames']}, late "
            f"{r['late_frames']}, voice-to-frame p95 {r['voice_to_frame_p95_ms_max']} ms, "
            f"batches {r['gpu_batches']} (GPU busy {r.get('gpu_busy_s')} s), "
            f"window lead p05 {r['window_lead_p05_ms_min']} ms, "
            f"late windows {r['late_windows']}, thread wake-up delay "
            f"{r['thread_wake_delay_ms']}, longest garbage collections "
            f"{(r.get('gc') or {}).get('longest')}, host CPU {r.get('host_cpu')}",
            flush=True,
        )
        write_rows([r], args.out, "live_probe.jsonl")  # each row as soon as it exists
        if _STOP["requested"]:  # (a cut-short row always has it)
            print(f"{n:>3} channels: a stop signal came; no further counts", flush=True)
            break
    ok = [
        r["channels"]
        for r in rows
        if r["late_frames"] == 0 and r["speech_frames"] > 0 and not r["cut_short"]
    ]
    print(
        json.dumps(
            {
                "live_probe": str(args.out / "live_probe.jsonl"),
                "max_channels_zero_late": max(ok) if ok else 0,
                "rows": len(rows),
                "cut_short": sum(r["cut_short"] for r in rows),
            }
        )
    )
    return 143 if _STOP["requested"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
