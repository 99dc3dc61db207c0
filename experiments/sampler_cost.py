"""What one pass of the live process's stack sampler (``live --profile``) costs.

A pass walks every thread's stack while holding the interpreter lock, so the other threads'
Python waits for it. This starts ``--threads`` threads waiting ``--depth`` frames deep (as the
live process's channel threads wait on queues and events), times ``--passes`` passes of
``StackSampler.sample_once`` and reports the milliseconds per pass and the share of the time
that is at the sampler's 100 Hz. ``--legacy-labels`` names each frame as the sampler did before
its names were cached (``pathlib.Path(filename).stem`` per frame per pass), to compare. One
JSONL row per run goes to ``<out>/sampler_cost.jsonl`` and is printed last.

    python experiments/sampler_cost.py --threads 72 --out experiments/results/X
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

import musetalk_rt.live.sampler as sampler
from musetalk_rt.bench import environment, write_rows


def _legacy_where(frame, depth: int = 3) -> str:
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{Path(code.co_filename).stem}:{code.co_name}")
        frame = frame.f_back
    return " < ".join(parts)


def _wait_deep(depth: int, stop: threading.Event) -> None:
    if depth <= 1:
        stop.wait()
    else:
        _wait_deep(depth - 1, stop)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=72, help="waiting threads (20 channels: 72)")
    p.add_argument("--depth", type=int, default=12, help="frames each one waits under")
    p.add_argument("--passes", type=int, default=300)
    p.add_argument("--legacy-labels", action="store_true", help="name frames the old way")
    p.add_argument("--out", type=Path, default=Path("out/sampler_cost"))
    args = p.parse_args()
    if args.legacy_labels:
        sampler._where = _legacy_where
    stop = threading.Event()
    threads = [
        threading.Thread(target=_wait_deep, args=(args.depth, stop), daemon=True)
        for _ in range(args.threads)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    s = sampler.StackSampler()
    pass_ms = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        s.sample_once()
        pass_ms.append((time.perf_counter() - t0) * 1000.0)
    stop.set()
    for t in threads:
        t.join()
    p50 = statistics.median(pass_ms)
    interval_ms = s.interval_s * 1000.0
    row = {
        "threads": args.threads,
        "depth": args.depth,
        "labels": "legacy (Path.stem per frame)" if args.legacy_labels else "cached per code",
        "passes": args.passes,
        "pass_ms_p50": round(p50, 3),
        "pass_ms_mean": round(statistics.fmean(pass_ms), 3),
        "share_at_interval": round(p50 / (interval_ms + p50), 4),
        "interval_ms": interval_ms,
        **environment(torch.device("cpu")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_rows([row], args.out, "sampler_cost.jsonl")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
