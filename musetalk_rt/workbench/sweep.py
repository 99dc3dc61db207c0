"""Engines x dtypes x batch sizes as bench rows, and the bucket set they recommend.

``engine_sweep`` is ``musetalk-rt bench`` as a function (one row per scenario, written as it is
measured, so a crash keeps what was done); an engine that cannot run here (``trt`` without
torch-tensorrt, ``aoti`` on an old torch) gives one ``skipped`` row with the reason instead of
stopping the sweep. ``recommend_buckets`` turns rows into the buckets for N channels.
"""

from __future__ import annotations

from pathlib import Path

from musetalk_rt.errors import UserError

FPS = 25


def parse_scenarios(specs: list[str]) -> list[tuple[str, str]]:
    """``["eager:fp32", "compile:fp16"]`` -> ``[("eager", "fp32"), ("compile", "fp16")]``."""
    out = []
    for spec in specs:
        engine, sep, dtype = spec.partition(":")
        if not sep or not engine or dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"scenario {spec!r}: expected ENGINE:DTYPE, DTYPE fp32|fp16|bf16")
        out.append((engine, dtype))
    return out


def engine_sweep(
    models,
    scenarios: list[str],
    batch_sizes: list[int],
    out_root: str | Path | None = None,
    iters: int = 20,
    warmup: int = 3,
    engine_options: dict | None = None,
    log=print,
    on_built=None,
) -> list[dict]:
    """Bench each ``ENGINE:DTYPE`` scenario at every batch size (rows, also saved if asked).

    Args:
        models: Loaded reference models (fp32) on the benchmark device.
        scenarios: ``ENGINE:DTYPE`` strings, e.g. ``["eager:fp32", "compile:fp16"]``.
        batch_sizes: Buckets.
        out_root: Results root (rows go to ``<root>/<date>_<gpu>_<sha>/bench.jsonl``).
        iters: Timed iterations per scenario.
        warmup: Untimed iterations per scenario.
        engine_options: ``{"compile": {...}}`` per engine.
        log: Progress lines.
        on_built: Passed to ``run_bench`` (called with each built engine's runners).
    """
    from musetalk_rt.bench import run_bench, write_rows
    from musetalk_rt.workbench.results import run_folder

    rows: list[dict] = []
    folder = run_folder(out_root, models.device) if out_root is not None else None

    def keep(row: dict) -> None:
        rows.append(row)
        if folder is not None:
            write_rows([row], folder)

    for engine, dtype in parse_scenarios(scenarios):
        try:
            run_bench(
                models,
                [engine],
                [dtype],
                batch_sizes,
                warmup=warmup,
                iters=iters,
                engine_options=engine_options,
                log=log,
                on_row=keep,
                on_built=on_built,
            )
        except UserError as exc:  # the engine cannot run here: say why, go on
            log(f"  {engine}/{dtype}: skipped: {exc}")
            rows.append(
                {"scenario": f"{engine}-{dtype}", "engine": engine, "dtype": dtype,
                 "skipped": str(exc)}
            )  # fmt: skip
    return rows


def measured(rows: list[dict]) -> list[dict]:
    """The rows that hold a measurement (not ``skipped``, not failing the quality gate)."""
    return [r for r in rows if "fps" in r and r.get("quality", {}).get("passed", True)]


def channels_served(row: dict) -> float:
    """25 fps channels one GPU serves at this row's throughput (compute only)."""
    return row["fps"] / FPS


def recommend_buckets(rows: list[dict], channels: int, max_buckets: int = 3) -> dict:
    """The bucket set for ``channels`` live channels from measured rows of one engine/dtype.

    The largest bucket is the smallest batch whose throughput covers ``channels`` x 25 fps
    (all channels' due frames in one batch); smaller buckets keep one channel's latency low
    (a batch of 1 or the smallest measured), and a middle one where the jump is large. When no
    measured batch covers the load, the fastest is chosen and ``covers`` is false.

    Returns:
        ``{"buckets": [...], "largest": row, "covers": bool, "need_fps": float}``.
    """
    rows = sorted(measured(rows), key=lambda r: r["batch"])
    if not rows:
        raise ValueError("no measured rows to recommend from")
    need = channels * FPS
    min_batch = min(channels, rows[-1]["batch"])  # all channels' due frames fit one batch
    covering = [r for r in rows if r["fps"] >= need and r["batch"] >= min_batch]
    largest = covering[0] if covering else max(rows, key=lambda r: r["fps"])
    buckets = {rows[0]["batch"], largest["batch"]}
    middle = [r["batch"] for r in rows if rows[0]["batch"] < r["batch"] < largest["batch"]]
    if middle and len(buckets) < max_buckets:
        buckets.add(middle[len(middle) // 2])
    return {
        "buckets": sorted(buckets),
        "largest": largest,
        "covers": bool(covering),
        "need_fps": need,
    }


def describe_recommendation(rec: dict) -> str:
    """One line: the buckets, and whether the largest covers the load."""
    big = rec["largest"]
    verdict = "covers" if rec["covers"] else "does NOT cover"
    return (
        f"buckets {rec['buckets']}: batch {big['batch']} at {big['fps']:.0f} fps {verdict} "
        f"{rec['need_fps']:.0f} fps ({big['_file'] if '_file' in big else big['scenario']})"
    )
