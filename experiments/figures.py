"""Regenerate every figure in experiments/figures/ (and the README's table) from result rows.

    python experiments/figures.py                      # figures from experiments/results
    python experiments/figures.py --readme README.md   # also rewrite the performance table

Figures, one per GPU where rows exist: ``fps_<gpu>.png`` and ``latency_<gpu>.png`` (bench rows,
the newest per configuration and batch), ``stages_<gpu>.png`` (the newest stage profile run),
``budget_<gpu>.png`` (the newest compile ``bench e2e`` run with a derived delay). The same
functions draw them in the notebooks (``musetalk_rt.workbench.plots``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _slug(gpu: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in gpu.removeprefix("NVIDIA ").lower())


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from musetalk_rt.workbench import budget, plots, report, results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "figures")
    p.add_argument("--readme", type=Path, help="rewrite this README's performance table")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []

    bench = [r for r in results.load(args.results, "bench") if r.get("driver")]
    for gpu in sorted({r["gpu"] for r in bench}):
        latest: dict = {}
        for r in sorted((r for r in bench if r["gpu"] == gpu and not r.get("errata")),
                        key=lambda r: r.get("time", "")):  # fmt: skip
            latest[(report.config_label(r), r["batch"])] = r
        mine = [dict(r, engine=report.config_label(r).split(" ")[0],
                     dtype=" ".join(report.config_label(r).split(" ")[1:]))
                for r in latest.values()]  # fmt: skip
        for name, fig in (
            ("fps", plots.fps_vs_batch(mine, title=f"throughput, {gpu}")),
            ("latency", plots.latency_vs_batch(mine, title=f"one batch, {gpu}")),
        ):
            path = args.out / f"{name}_{_slug(gpu)}.png"
            fig.savefig(path, dpi=110)
            written.append(path)

    stages = [r for r in results.load(args.results, "stage_profile") if r.get("driver")]
    for gpu in sorted({r["gpu"] for r in stages}):
        mine = [r for r in stages if r["gpu"] == gpu]
        last = max(mine, key=lambda r: r.get("time", ""))
        run = {  # the newest run of that engine/dtype: one bar per batch, the newest row
            r["batch"]: r
            for r in sorted(mine, key=lambda r: r.get("time", ""))
            if (r["_file"], r["engine"], r["dtype"])
            == (last["_file"], last["engine"], last["dtype"])
        }
        run = [run[b] for b in sorted(run)]
        fig = plots.stage_bars(run, f"{run[0]['engine']}/{run[0]['dtype']} stages, {gpu}")
        path = args.out / f"stages_{_slug(gpu)}.png"
        fig.savefig(path, dpi=110)
        written.append(path)

    e2e = results.load(args.results, "e2e")
    import tomllib

    sources = tomllib.loads((ROOT / "configs" / "event.toml").read_text())["live"]["sources"]
    preset_run = sources["engine"][0].partition("#run=")[2]
    for gpu in sorted({r.get("gpu", "") for r in e2e if r.get("kind") == "summary"}):
        if not gpu or gpu.startswith("cpu"):
            continue
        try:  # the event preset's run where it is on this GPU, else the newest compile run
            summary = budget.find_e2e_summary(e2e, engine="compile", gpu=gpu, run=preset_run)
        except ValueError:
            try:
                summary = budget.find_e2e_summary(e2e, engine="compile", gpu=gpu)
            except ValueError:
                continue
        fig = plots.waterfall_plot(budget.waterfall(summary), title=f"voice to screen, {gpu}")
        path = args.out / f"budget_{_slug(gpu)}.png"
        fig.savefig(path, dpi=110)
        written.append(path)

    changed = None
    if args.readme:
        changed = report.update_readme(args.readme, report.perf_table(bench))
    for path in written:
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    print(json.dumps({"figures": len(written), "readme_changed": changed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
