"""What the end-to-end probe computes from what it captured.

Per-marker delays, summaries, time windows (soak), the GPU-figure substitution and the budget
verdict. Everything here is a pure function of captured data, so it is tested without a server.

Per marker (times on the host's monotonic clock; ``m`` is the media frame holding the voice
onset, ``v`` the first received frame whose mouth left the idle frame):

- ``voice_to_server_ms``: the sender sent the chunk holding the onset → the live process's
  ingest had handed all of frame ``m``'s audio to the channel (network, WebSocket, decoding,
  resampling; includes the 20 ms until the frame's audio is complete);
- ``server_to_encoded_ms``: → the output's encoder and muxer returned frame ``v`` (the playout
  delay ``D`` is most of it; features, voice activity, the worker and the clock run inside);
- ``encoded_to_received_ms``: → the receiver demuxed frame ``v`` (muxer interleaving, RTMP
  server, network, the player's demuxer);
- ``voice_to_encoded_ms``: the first two together, the server-side part;
- ``voice_to_received_ms``: all three, voice to lips on the receiver;
- ``voice_to_heard_ms``: voice to the onset's audio packet at the receiver;
- ``av_offset_ms``: presentation time of frame ``v`` minus that of the audio onset, as a player
  shows them (positive: the lips come after the voice).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musetalk_rt.audio.features import FPS, SAMPLE_RATE
from musetalk_rt.e2e.markers import detect_onsets
from musetalk_rt.live.output import AUDIO_PER_FRAME
from musetalk_rt.workbench.report import DEFAULT_OPTIONS

DELAY_KEYS = (
    "voice_to_server_ms",
    "server_to_encoded_ms",
    "voice_to_encoded_ms",
    "encoded_to_received_ms",
    "voice_to_received_ms",
    "voice_to_heard_ms",
    "av_offset_ms",
)


@dataclass
class SentMarker:
    """A marker as the sender sent it."""

    index: int
    onset_sample: int  # in the sender's session
    t_voice: float  # monotonic: the chunk holding the onset left the sender


@dataclass
class AudioPiece:
    """A decoded audio frame at the receiver."""

    pts_s: float
    samples: np.ndarray  # float32 mono at 16 kHz
    t_arrival: float  # monotonic: its packet came out of the demuxer


@dataclass
class VideoPiece:
    """A decoded video frame at the receiver (only the mouth region, grey, half size)."""

    pts_s: float
    crop: np.ndarray  # uint8
    t_arrival: float


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def stats(values: list[float]) -> dict:
    """``n``, ``p50``, ``p95``, ``max`` and ``min`` (rounded to 0.1)."""
    r = {"n": len(values)}
    for name, v in (
        ("p50", percentile(values, 0.5)),
        ("p95", percentile(values, 0.95)),
        ("max", max(values) if values else None),
        ("min", min(values) if values else None),
    ):
        r[name] = None if v is None else round(v, 1)
    return r


def _audio_onset(
    pieces: list[AudioPiece], t_from: float, t_to: float
) -> tuple[float, float] | None:
    """``(pts_s, t_arrival)`` of the first onset among pieces that arrived in [t_from, t_to]."""
    sel = [p for p in pieces if t_from <= p.t_arrival <= t_to]
    if not sel:
        return None
    x = np.concatenate([p.samples for p in sel])
    starts = np.cumsum([0] + [len(p.samples) for p in sel])
    for onset in detect_onsets(x, min_silence_s=0.5):
        i = int(np.searchsorted(starts, onset, side="right")) - 1
        p = sel[i]
        return p.pts_s + float(onset - starts[i]) / SAMPLE_RATE, p.t_arrival
    return None


def evaluate_marker(
    marker: SentMarker,
    base_frame: int,
    frames: dict[int, dict],
    audio: list[AudioPiece],
    video: list[VideoPiece],
    reference,
    lips_threshold: float,
    period_s: float,
) -> dict:
    """One marker's row (``status`` ``ok``, or what was missing).

    Args:
        marker: The marker as sent.
        base_frame: The sender's session's first media frame.
        frames: Media frame -> its frame-log record (the output read back).
        audio: Received audio pieces (any order).
        video: Received video pieces (any order).
        reference: ``media frame -> crop`` of the idle frame that frame would show.
        lips_threshold: Mean absolute grey difference from the idle crop that counts as moved.
        period_s: Marker period (the audio search ends before the next marker).
    """
    m = base_frame + marker.onset_sample // AUDIO_PER_FRAME
    row: dict = {"marker": marker.index, "frame": m, "t_voice": round(marker.t_voice, 6)}
    rec = frames.get(m)
    if rec is None:
        return {**row, "status": "no frame record (output down, or the log fell behind)"}
    if rec.get("arrival") is None:  # the feature thread stored the audio after the frame left
        return {**row, "status": "voice missing: its audio came after the frame was emitted"}
    found = _audio_onset(audio, rec["written"] - 1.0, rec["written"] + min(5.0, period_s - 0.5))
    if found is None:
        return {**row, "status": "no audio onset received"}
    pts_a, t_heard = found
    shift = pts_a - rec["index"] / FPS  # the muxer's shift of all timestamps (AAC priming)
    idle_diffs, lips = [], None
    for p in sorted(video, key=lambda p: p.pts_s):
        if not pts_a - 0.2 <= p.pts_s <= pts_a + 1.5:
            continue
        n = m + round((p.pts_s - shift) * FPS) - rec["index"]
        diff = float(np.abs(p.crop.astype(np.float32) - reference(n)).mean())
        if diff > lips_threshold:
            lips = (p, n, diff)
            break
        idle_diffs.append(diff)
    row["idle_diff_max"] = round(max(idle_diffs), 2) if idle_diffs else None
    if lips is None:
        return {**row, "status": "lips never left the idle frame"}
    p, n, diff = lips
    rec_v = frames.get(n)
    if rec_v is None:
        return {**row, "status": "no frame record for the lips frame"}
    ms = 1000.0
    row.update(
        status="ok",
        lips_frame=n,
        lips_frames_after_onset=n - m,
        lips_diff=round(diff, 2),
        lips_kind=rec_v.get("kind"),
        voice_to_server_ms=round((rec["arrival"] - marker.t_voice) * ms, 1),
        server_to_encoded_ms=round((rec_v["written"] - rec["arrival"]) * ms, 1),
        voice_to_encoded_ms=round((rec_v["written"] - marker.t_voice) * ms, 1),
        encoded_to_received_ms=round((p.t_arrival - rec_v["written"]) * ms, 1),
        voice_to_received_ms=round((p.t_arrival - marker.t_voice) * ms, 1),
        voice_to_heard_ms=round((t_heard - marker.t_voice) * ms, 1),
        av_offset_ms=round((p.pts_s - pts_a) * ms, 1),
        av_arrival_skew_ms=round((p.t_arrival - t_heard) * ms, 1),
    )
    return row


def summarize(rows: list[dict]) -> dict:
    """Stats of every delay over the markers that were found."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = {"markers": len(rows), "found": len(ok)}
    for key in DELAY_KEYS:
        out[key] = stats([r[key] for r in ok])
    offsets = [abs(r["av_offset_ms"]) for r in ok]
    out["av_offset_abs_max_ms"] = round(max(offsets), 1) if offsets else None
    return out


def drift(windows: list[dict], key: str) -> float | None:
    """Last window's value minus the first's (windows without the value are skipped)."""
    vals = [w[key] for w in windows if w.get(key) is not None]
    return round(vals[-1] - vals[0], 1) if len(vals) >= 2 else None


# -- GPU figures ----------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# the engine options of a bench row that change what a batch costs, with their value where a row
# or a preset leaves them out: the README table's defaults, less CUDA graphs and channels-last
# memory (on in every GPU row of the compile engine) and the rewrites' version (a row's, not a
# preset's)
COMPARED_OPTIONS = {
    k: v
    for k, v in DEFAULT_OPTIONS.items()
    if k not in ("cuda_graphs", "channels_last", "rewrites_version")
}


def preset_row_options(preset: str | Path) -> dict:
    """The engine options a preset's bench rows must have: ``{row key: value}``.

    The preset's ``[live]`` table goes through the live options' own types and choices (a bad
    value is one line naming the file) and the same mapping to engine options as a command
    line's; every key of :data:`COMPARED_OPTIONS` is in the result (None: the default), so that
    a row with a rewrite or an inductor setting the preset does not use is not taken for it.

    Raises:
        UserError: A missing or unreadable file, or a bad key or value in it.
    """
    import argparse

    from musetalk_rt.cli import _engine_options
    from musetalk_rt.live.app import build_parser
    from musetalk_rt.live.preset import preset_defaults

    parser = build_parser()
    values = preset_defaults(preset, parser)
    args = argparse.Namespace(**{a.dest: a.default for a in parser._actions if a.dest != "help"})
    vars(args).update(values)
    opts = _engine_options(args)
    return {key: opts.get(key) for key in COMPARED_OPTIONS}


def _flat(table: dict, prefix: str = ""):
    for k, v in table.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _norm(key: str, value):
    """One option's value in a form that rows and presets share (the default when absent)."""
    from musetalk_rt.engines.rewrites import upsample_form
    from musetalk_rt.errors import UserError
    from musetalk_rt.inductor_options import _FALSE, _TRUE, split_items

    default = COMPARED_OPTIONS.get(key)
    if value is None:
        value = default
    try:
        if key == "phase_upsample":  # rows say True for the interleave form
            return upsample_form(value or None)
        if key == "inductor_config":  # rows hold the typed dict, a preset the command line's text
            if not value:
                return None
            items = _flat(value) if isinstance(value, dict) else split_items(str(value))
            low = [(k, str(v).lower()) for k, v in items]
            spelled = [(k, "true" if v in _TRUE else "false" if v in _FALSE else v) for k, v in low]
            return ",".join(sorted(f"{k}={v}" for k, v in spelled))
    except UserError:
        return ("not understood", str(value))  # a value of another version: matches nothing
    if key == "mode" and value == "default":
        return None
    if isinstance(default, bool):
        return bool(value)
    return value


def _options_match(row: dict, options: dict) -> bool:
    have = row.get("engine_options") or {}
    return all(_norm(k, have.get(k)) == _norm(k, v) for k, v in options.items())


def _gpu_rows(root: Path) -> list[tuple[Path, dict]]:
    """``(file, row)`` of ``root``'s bench rows measured on a GPU, without errata, gate passed."""
    return [
        (path, r)
        for path in sorted(root.glob("*/bench.jsonl"))
        for r in _rows(path)
        if not str(r.get("gpu", "cpu")).lower().startswith("cpu")
        and "errata" not in r
        and r.get("quality", {}).get("passed", False)
    ]


def gpu_scenarios(results_dir: str | Path) -> set[str]:
    """The scenarios (``compile-fp16-b4``, ...) of the usable GPU rows in ``results_dir``."""
    return {str(r["scenario"]) for _, r in _gpu_rows(Path(results_dir)) if r.get("scenario")}


def find_gpu_figures(results_dir: str | Path, scenario: str, options: dict | None = None) -> dict:
    """The recorded GPU compute figures for an event preset, newest usable rows first.

    The batch figure is the newest ``bench.jsonl`` row of ``scenario`` (e.g.
    ``compile-fp16-b4``) measured on a GPU, without ``errata``, with its quality gate passed
    and, given ``options`` (:func:`preset_row_options`), with those engine options; the whisper
    canvas figure is the newest ``stream_parity.jsonl`` encoder-cost row at float32, batch 1
    (what the live process times at start). Missing figures are None.

    Returns:
        ``{"batch": {...} | None, "canvas": {...} | None}``, each with its value and file
        (relative to ``results_dir``).
    """
    root = Path(results_dir)
    batch, canvas = [], []
    for path, r in _gpu_rows(root):
        if r.get("scenario") == scenario and (options is None or _options_match(r, options)):
            batch.append((str(r.get("time", "")), path.relative_to(root).as_posix(), r))
    for path in sorted(root.glob("*/stream_parity.jsonl")):
        for r in _rows(path):
            if (
                r.get("kind") == "encoder_cost"
                and r.get("dtype") == "float32"
                and r.get("batch") == 1
            ):
                canvas.append((str(r.get("time", "")), path.relative_to(root).as_posix(), r))
    out: dict = {"scenario": scenario, "batch": None, "canvas": None}
    if batch:
        t, path, r = max(batch, key=lambda x: (x[0], x[1]))
        out["batch"] = {
            "p50_ms": r["p50_ms"],
            "p95_ms": r["p95_ms"],
            "file": path,
            "gpu": r.get("gpu"),
            "commit": r.get("commit") or r.get("git_sha"),
            "variant": r.get("variant"),
            "time": t,
        }
    if canvas:
        t, path, r = max(canvas, key=lambda x: (x[0], x[1]))
        out["canvas"] = {
            "ms": r["ms_per_canvas"],
            "file": path,
            "gpu": r.get("gpu") or r.get("device"),
            "commit": r.get("commit"),
            "time": t,
        }
    return out


def gpu_substitute(rows: list[dict], cpu_delay_ms: float, gpu_delay_ms: float) -> list[float]:
    """Voice-to-received of every found marker with the playout delay ``D`` swapped.

    On the CPU, the server's share is ``D`` (derived from the CPU's whisper canvas and batch
    times, or fixed) plus the encoding and queueing around it; with the GPU's ``D`` instead,
    everything else measured stays: sender, ingest, encoder, RTMP server, receiver.
    """
    return [
        round(r["voice_to_received_ms"] - cpu_delay_ms + gpu_delay_ms, 1)
        for r in rows
        if r.get("status") == "ok"
    ]


def soak_figures(windows: list[dict], warmup_s: float) -> dict:
    """Drift and memory over the windows of a run.

    ``rss_growth_after_warmup_mb`` is the live process's resident memory at the last window
    minus that at the first window ending at or after ``warmup_s`` (None without two such
    windows): allocator arenas, caches and the encoder settle during the first minutes.
    """
    rss = [w["rss_mb"] for w in windows if w.get("rss_mb") is not None]
    settled = [w["rss_mb"] for w in windows if w["t_end_s"] >= warmup_s and w.get("rss_mb")]
    return {
        "windows": len(windows),
        "av_offset_drift_ms": drift(windows, "av_offset_median_ms"),
        "delay_drift_ms": drift(windows, "voice_to_received_p50_ms"),
        "rss_first_mb": rss[0] if rss else None,
        "rss_last_mb": rss[-1] if rss else None,
        "rss_max_mb": max(rss) if rss else None,
        "rss_growth_mb": round(rss[-1] - rss[0], 1) if len(rss) >= 2 else None,
        "rss_warmup_s": warmup_s,
        "rss_growth_after_warmup_mb": (
            round(settled[-1] - settled[0], 1) if len(settled) >= 2 else None
        ),
        "late_frames": sum(w["late_frames"] for w in windows),
        "late_speech_frames": sum(w["late_speech_frames"] for w in windows),
        "skipped_frames": sum(w["skipped_frames"] for w in windows),
        "output_drops": sum(w["output_drops"] for w in windows),
        "frames": sum(w["frames"] for w in windows),
    }


def verdict(
    summary: dict,
    gpu_p95_ms: float | None,
    budget_ms: float,
    av_limit_ms: float,
    soak: dict | None = None,
    rss_bound_mb: float | None = None,
    drift_limit_ms: float = 40.0,
) -> list[str]:
    """Why the run breaks the budget (an empty list: it holds).

    With ``soak`` figures, also an A/V offset drift over ``drift_limit_ms`` (one frame) and a
    memory growth after the warm-up over ``rss_bound_mb``.
    """
    fails = []
    if soak:
        d = soak.get("av_offset_drift_ms")
        if d is not None and abs(d) > drift_limit_ms:
            fails.append(f"A/V offset drifted {d:.0f} ms (limit {drift_limit_ms:.0f})")
        g = soak.get("rss_growth_after_warmup_mb")
        if rss_bound_mb is not None and g is not None and g > rss_bound_mb:
            fails.append(
                f"the live process grew {g:.0f} MB after its warm-up (bound {rss_bound_mb:g} MB)"
            )
    if summary["found"] == 0:
        return [*fails, "no marker was found in the received stream"]
    if summary["found"] < summary["markers"]:
        fails.append(
            f"{summary['markers'] - summary['found']} of {summary['markers']} markers lost"
        )
    p95 = summary["voice_to_received_ms"]["p95"]
    if p95 > budget_ms:
        fails.append(f"voice-to-received p95 {p95:.0f} ms > budget {budget_ms:.0f} ms")
    if summary["av_offset_abs_max_ms"] > av_limit_ms:
        fails.append(
            f"A/V offset up to {summary['av_offset_abs_max_ms']:.0f} ms > {av_limit_ms:.0f} ms"
        )
    if gpu_p95_ms is not None and gpu_p95_ms > budget_ms:
        fails.append(
            f"with the GPU figures, voice-to-received p95 {gpu_p95_ms:.0f} ms > budget "
            f"{budget_ms:.0f} ms"
        )
    return fails


# -- tables ---------------------------------------------------------------------------------------

_SHORT = {
    "voice_to_server_ms": "voice→server",
    "server_to_encoded_ms": "server→encoded",
    "voice_to_encoded_ms": "voice→encoded",
    "encoded_to_received_ms": "encoded→received",
    "voice_to_received_ms": "voice→received",
    "voice_to_heard_ms": "voice→heard",
    "av_offset_ms": "A/V offset",
}


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(round(v)))


def marker_table(rows: list[dict]) -> str:
    """One line per marker (ms)."""
    keys = [k for k in DELAY_KEYS if k != "voice_to_encoded_ms"]
    head = f"{'marker':>6} {'frame':>7}" + "".join(f"{_SHORT[k]:>17}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['marker']:>6} {r['frame']:>7}  {r['status']}")
            continue
        lines.append(
            f"{r['marker']:>6} {r['frame']:>7}" + "".join(f"{_fmt(r[k]):>17}" for k in keys)
        )
    return "\n".join(lines)


def summary_table(summary: dict) -> str:
    """p50 / p95 / max of every delay (ms)."""
    head = f"{'':<18}{'p50':>8}{'p95':>8}{'max':>8}{'min':>8}"
    lines = [head, "-" * len(head)]
    for k in DELAY_KEYS:
        s = summary[k]
        lines.append(
            f"{_SHORT[k]:<18}{_fmt(s['p50']):>8}{_fmt(s['p95']):>8}{_fmt(s['max']):>8}"
            f"{_fmt(s['min']):>8}"
        )
    return "\n".join(lines)


def window_table(windows: list[dict]) -> str:
    """One line per soak window."""
    head = (
        f"{'end s':>7}{'markers':>8}{'v→rcv p50':>11}{'p95':>7}{'A/V med':>9}{'late':>6}"
        f"{'late spch':>10}{'skipped':>8}{'drops':>7}{'RSS MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for w in windows:
        lines.append(
            f"{w['t_end_s']:>7.0f}{w['found']:>4}/{w['markers']:<3}"
            f"{_fmt(w['voice_to_received_p50_ms']):>11}{_fmt(w['voice_to_received_p95_ms']):>7}"
            f"{_fmt(w['av_offset_median_ms']):>9}{w['late_frames']:>6}{w['late_speech_frames']:>10}"
            f"{w['skipped_frames']:>8}{w['output_drops']:>7}{_fmt(w['rss_mb']):>8}"
        )
    return "\n".join(lines)
