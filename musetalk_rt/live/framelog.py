"""Per-frame timestamps of the live process as JSON lines (``--frame-log FILE``; off by default).

Written for the end-to-end probe (:mod:`musetalk_rt.e2e`), which puts the server's moments next
to its own: every time is ``time.monotonic()`` in seconds, which on Linux is ``CLOCK_MONOTONIC``,
one clock for every process of the host. One line per record, flushed at once (the probe reads
the file while it grows); about 25 lines per second per channel and output.

Records (the key ``ev`` says which):

- ``delay``: how the process chose the playout delay: ``delay_ms``, ``derived`` (false when
  ``--delay-ms`` fixed it), and the start-up figures it was derived from: ``lookahead_ms``,
  ``canvas_ms`` (one whisper encoder call of ``canvases`` canvases), ``batch_ms`` (one batch
  of ``batch`` frames), ``margin_ms``, and ``per_channel_ms`` added for each of ``channels``
  beyond the first.
- ``start``: a channel's clock started: ``ch``, ``t0``, ``delay_ms`` (frame ``n`` is due at
  ``t0 + delay_ms / 1000 + n / 25``).
- ``session``: a sender connected: ``ch``, ``base_frame`` (the media frame of its first sample;
  sample ``s`` of the session belongs to media frame ``base_frame + s // 640`` until a
  ``clock_shift``), ``opened``.
- ``clock_shift``: the session's timeline moved for the sender's drifting clock
  (:mod:`.drift`): from session frame ``session_frame`` on, sample ``s`` belongs to media frame
  ``base_frame + s // 640 + offset``; ``frames``: this move (positive: later).
- ``windows``: the audio path handed a channel the whisper windows of ``n`` frames from
  ``frame`` on, at ``t``; ``lead_ms``: how long before the first one's deadline (negative:
  after), ``late``: how many came after their frame had already left (lost to the worker).
  Where the lead went (not on a session's last, flushed windows): ``ingest_lag_ms`` (when the
  ingest handed over the newest audio, against when the media clock says it was spoken: a
  constant offset plus the ingest's delays), ``queued_ms`` (from then until the feature thread
  took it), ``chunks`` (ingest chunks analysed together), ``vad_ms`` (the voice activity call)
  and ``features_ms`` (the whisper features, the wait for the shared encoder included).
- ``batch``: the GPU worker collected a batch: ``n`` frames, ``launched`` and ``faces`` (when
  it was launched and when its faces reached the host), ``lead_ms`` (its earliest deadline
  minus the launch), ``overlapped`` (launched while another was in flight).
- ``frame``: an output wrote a frame: ``ch``, ``out`` (its target), ``frame`` (media frame),
  ``writer`` (1 for the output's first connection, +1 per reconnect), ``index`` (the frame's
  index in that connection's stream: its video timestamp is ``index / 25`` s before any shift
  the muxer applies to all streams), ``kind`` (``speech``: a generated face shown, ``late``: the
  talk weight was up but no generated frame was ready, so the idle frame went out, ``idle``),
  ``speech`` (the voice activity decision for the frame), ``arrival`` (when the ingest handed the
  frame's last audio sample to the channel; null when no sender fed it), ``emitted`` (when the
  clock handed the frame to the outputs) and ``written`` (when the encoder and muxer returned).
- ``host``: once a second, the host's CPU (:mod:`.hostload`): ``t``, ``busy``, ``iowait``,
  ``steal`` (shares of all cores' time since the last record), ``process_cores`` and
  ``encoder_cores`` (CPU used by this process and by its encoder processes, in cores).

``python -m musetalk_rt.live.framelog FILE [--bin-s 10]`` prints where the time went, one row
per interval (:func:`summarize`): the windows' lead and its parts, the batches, the late frames.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from collections import defaultdict
from pathlib import Path

from musetalk_rt.errors import OneLineParser, UserError

log = logging.getLogger("musetalk_rt.framelog")


class FrameLog:
    """A thread-safe JSON-lines writer (channels and output threads share one).

    Args:
        path: The file (appended to; its folder must exist).

    Raises:
        UserError: The file cannot be opened.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = self.path.open("a", buffering=1)
        except OSError as exc:
            raise UserError(f"cannot write the frame log {path}: {exc}") from None
        self._lock = threading.Lock()

    def write(self, **record) -> None:
        """Append one record (floats are rounded to microseconds).

        Never raises: the clock, feature and GPU worker threads write here, and a diagnostic
        file must not stop the show. The first failure (a full disk, say) is logged and the log
        closes; later records are dropped.
        """
        if self._file.closed:  # closed, or failed before
            return
        try:
            rec = {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}
            line = json.dumps(rec) + "\n"
            with self._lock:
                if not self._file.closed:
                    self._file.write(line)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.error("frame log %s: %s; no more records are written", self.path, exc)
            with self._lock:
                try:
                    self._file.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Close the file; later writes are ignored."""
        with self._lock:
            self._file.close()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[int(q * (len(v) - 1))], 1)


def summarize(path: str | Path, bin_s: float = 10.0, run: int = -1) -> list[dict]:
    """One row per ``bin_s`` seconds of one run in a frame log, from its first channel's start.

    The file is appended to, so it may hold several runs (each begins with its ``delay``
    record); ``run`` picks one, as a list index (the last by default).

    Per row: windows handed over and their groups' lead (p05, p50 ms: a group's first window)
    with its parts (``ingest_lag`` p50/p95, ``queued`` p95, ``vad`` p95, ``features`` p50/p95
    ms); batches, their mean size, launch-to-faces p50/p95 ms and launch lead p05 ms; talking
    frames shown and late (one output per channel is counted: the first seen); the host's CPU
    (``host`` records: mean busy and steal percent, steal in the interval's worst second, this
    process's and its encoders' cores; None in files written before those records existed).

    Raises:
        UserError: The file cannot be read, a record is malformed, ``bin_s`` is not a positive
            number, or the file holds no such run or no channel start.
    """
    if not (math.isfinite(bin_s) and bin_s >= 0.001):
        raise UserError(f"interval {bin_s} s: give a number of seconds, at least 0.001")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the frame log {path}: {exc}") from None
    recs: list[tuple[int, dict]] = []  # (line number, record)
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines):  # the last line may be cut short by a kill: skip it quietly
                raise UserError(f"{path}:{i}: not a frame log record") from None
            continue
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{i}: not a frame log record (a JSON object)")
        recs.append((i, rec))
    firsts = [j for j, (_, r) in enumerate(recs) if r.get("ev") == "delay"] or [0]
    if not -len(firsts) <= run < len(firsts):
        raise UserError(f"{path}: run {run}: the file holds {len(firsts)} run(s)")
    k = run % len(firsts)
    recs = recs[firsts[k] : firsts[k + 1] if k + 1 < len(firsts) else len(recs)]
    try:
        rows = _rows(recs, bin_s)
    except _BadRecord as exc:
        i, what = exc.args
        raise UserError(f"{path}:{i}: a frame log record without a usable {what}") from None
    if rows is None:
        raise UserError(f"{path}: no channel start record; is it a --frame-log file?")
    return rows


def _mean(values: list[float], scale: float = 1.0) -> float | None:
    return round(scale * sum(values) / len(values), 1) if values else None


def _max(values: list[float], scale: float = 1.0) -> float | None:
    return round(scale * max(values), 1) if values else None


class _BadRecord(Exception):
    """(line number, what was missing or wrong) of a record :func:`_rows` cannot use."""


def _rows(recs: list[tuple[int, dict]], bin_s: float) -> list[dict] | None:
    """The rows of :func:`summarize` for one run's ``(line, record)`` pairs (None: no start)."""

    def num(i: int, r: dict, key: str) -> float:
        v = r.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _BadRecord(i, key)
        return float(v)

    starts = [num(i, r, "t0") for i, r in recs if r.get("ev") == "start"]
    if not starts:
        return None
    t0 = min(starts)
    bins: dict[int, dict] = defaultdict(lambda: defaultdict(list))
    first_out: dict[str, str] = {}
    for i, r in recs:
        ev = r.get("ev")
        if ev == "windows":
            b = bins[int((num(i, r, "t") - t0) // bin_s)]
            b["lead"].append(num(i, r, "lead_ms"))
            b["windows"].append(num(i, r, "n"))
            for key in ("ingest_lag_ms", "queued_ms", "vad_ms", "features_ms"):
                if key in r:
                    b[key].append(num(i, r, key))
        elif ev == "batch":
            launched = num(i, r, "launched")
            b = bins[int((launched - t0) // bin_s)]
            b["n"].append(num(i, r, "n"))
            b["batch_ms"].append((num(i, r, "faces") - launched) * 1000.0)
            if r.get("lead_ms") is not None:
                b["launch_lead"].append(num(i, r, "lead_ms"))
        elif ev == "frame" and r.get("kind") in ("speech", "late"):
            if first_out.setdefault(str(r.get("ch")), r.get("out")) != r.get("out"):
                continue
            bins[int((num(i, r, "emitted") - t0) // bin_s)][r["kind"]].append(1)
        elif ev == "host":
            b = bins[int((num(i, r, "t") - t0) // bin_s)]
            for key in ("busy", "steal", "process_cores", "encoder_cores"):
                b[f"host_{key}"].append(num(i, r, key))
    rows = []
    for k in sorted(bins):
        b = bins[k]
        rows.append(
            {
                "t_s": round(k * bin_s, 1),
                "windows": int(sum(b["windows"])),
                "lead_p05_ms": _pct(b["lead"], 0.05),
                "lead_p50_ms": _pct(b["lead"], 0.5),
                "ingest_lag_p50_ms": _pct(b["ingest_lag_ms"], 0.5),
                "ingest_lag_p95_ms": _pct(b["ingest_lag_ms"], 0.95),
                "queued_p95_ms": _pct(b["queued_ms"], 0.95),
                "vad_p95_ms": _pct(b["vad_ms"], 0.95),
                "features_p50_ms": _pct(b["features_ms"], 0.5),
                "features_p95_ms": _pct(b["features_ms"], 0.95),
                "batches": len(b["n"]),
                "mean_batch": round(sum(b["n"]) / len(b["n"]), 1) if b["n"] else None,
                "batch_p50_ms": _pct(b["batch_ms"], 0.5),
                "batch_p95_ms": _pct(b["batch_ms"], 0.95),
                "launch_lead_p05_ms": _pct(b["launch_lead"], 0.05),
                "talking_on_time": len(b["speech"]),
                "late": len(b["late"]),
                "host_busy_pct": _mean(b["host_busy"], 100.0),
                "steal_pct": _mean(b["host_steal"], 100.0),
                "steal_max_pct": _max(b["host_steal"], 100.0),
                "process_cores": _mean(b["host_process_cores"]),
                "encoder_cores": _mean(b["host_encoder_cores"]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m musetalk_rt.live.framelog FILE``: the table of :func:`summarize`."""
    p = OneLineParser(
        prog="python -m musetalk_rt.live.framelog",
        description="Where the time went in a live --frame-log: per interval, the audio "
        "windows' lead and its parts, the GPU batches, the late frames and the host's CPU.",
    )
    p.add_argument("file", help="a file written by the live process's --frame-log")
    p.add_argument("--bin-s", type=float, default=10.0, help="interval, seconds (default 10)")
    p.add_argument(
        "--run", type=int, default=-1, help="which run of the file (0 = first; default: last)"
    )
    p.add_argument("--json", action="store_true", help="one JSON line per interval instead")
    args = p.parse_args(argv)
    try:
        rows = summarize(args.file, args.bin_s, args.run)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    cols = list(rows[0]) if rows else []
    print(" ".join(f"{c:>{max(len(c), 6)}}" for c in cols))
    for r in rows:
        print(" ".join(f"{'-' if r[c] is None else r[c]!s:>{max(len(c), 6)}}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
