"""Figures from result rows (matplotlib, headless-safe). Each returns the ``Figure``.

The notebooks show them; ``experiments/figures.py`` saves the same ones from the committed rows
into ``experiments/figures/``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

FPS = 25


def _plt():
    """pyplot, imported late (matplotlib picks inline in a notebook, Agg without a display)."""
    import matplotlib.pyplot as plt

    return plt


def stage_bars(rows: list[dict], title: str = "time per batch by stage"):
    """Stacked bar per batch size of ``stage_profile`` rows (p50 ms per stage)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"b{r['batch']}" for r in rows]
    bottom = np.zeros(len(rows))
    stages = list(rows[0]["stage_p50_ms"]) if rows else []
    for s in stages:
        v = np.array([r["stage_p50_ms"].get(s, 0.0) for r in rows])
        ax.bar(labels, v, bottom=bottom, label=s)
        bottom += v
    ax.set_ylabel("ms per batch (p50)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _per_config(ax, rows: list[dict], field: str) -> None:
    """One line per engine/dtype: ``field`` against batch size (log2 axis)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if field in r:
            groups[f"{r['engine']}/{r['dtype']}"].append(r)
    colors = _plt().get_cmap("tab20").colors  # 20 distinct colours, markers beside them
    for i, (name, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["batch"])
        ax.plot(
            [r["batch"] for r in rs],
            [r[field] for r in rs],
            marker="os^vD"[i % 5],
            color=colors[(2 * i) % 20 + (i // 10) % 2],
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")


def _legend_below(fig, ax) -> None:
    """The legend under the axes, the figure taller by its lines.

    Inside the axes, the long engine labels covered the curves.
    """
    n = len(ax.get_legend_handles_labels()[1])
    fig.set_size_inches(8, 3.6 + 0.17 * n)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)
    fig.tight_layout()


def fps_vs_batch(rows: list[dict], channels: tuple[int, ...] = (1, 4, 8, 16), title: str = ""):
    """Throughput per engine/dtype against batch size, with the 25 fps x N channels lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    _per_config(ax, rows, "fps")
    for n in channels:
        ax.axhline(n * FPS, ls=":", lw=1, color="grey")
        ax.annotate(f"{n} ch", (1, n * FPS), fontsize=7, color="grey", va="bottom")
    ax.set_ylabel("frames/s (UNet + VAE decode)")
    ax.set_title(title or "throughput by batch size")
    _legend_below(fig, ax)
    return fig


def latency_vs_batch(rows: list[dict], title: str = "latency of one batch"):
    """p50 milliseconds of one batch per engine/dtype against batch size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    _per_config(ax, rows, "p50_ms")
    ax.set_ylabel("ms per batch (p50)")
    ax.set_title(title)
    _legend_below(fig, ax)
    return fig


def face_grid(comparisons: list, frames: int = 2):
    """Rows: per engine, reference | engine | |difference| for the first ``frames`` faces."""
    plt = _plt()
    n = len(comparisons)
    fig, axes = plt.subplots(n, 3 * frames, figsize=(2 * 3 * frames, 2.1 * n), squeeze=False)
    for i, c in enumerate(comparisons):
        for j in range(frames):
            k = j % len(c.faces)
            for col, (img, name) in enumerate(
                [(c.reference[k], "fp32 eager"), (c.faces[k], c.engine), (c.abs_diff[k], "|diff|")]
            ):
                ax = axes[i][3 * j + col]
                ax.imshow(img, cmap="magma" if img.ndim == 2 else None, vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0 and col == 1:
                    ax.set_title(f"{name}: {c.psnr_db} dB", fontsize=8)
                else:
                    ax.set_title(name, fontsize=8)
    fig.tight_layout()
    return fig


def vad_plot(timeline: dict, title: str = "voice activity"):
    """Speech probability over time with the decided segments shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 2.5))
    t = np.array(timeline["t_ms"]) / 1000
    ax.plot(t, timeline["prob"], lw=0.8)
    for start, end in timeline["segments"]:
        ax.axvspan(start / 1000, (end or t[-1] * 1000) / 1000, alpha=0.2, color="green")
    ax.set_xlabel("s")
    ax.set_ylabel("p(speech)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def tradeoff_plot(rows: list[dict], title: str = "streaming features: delay vs error"):
    """Median and p90 feature error against the added look-ahead."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = sorted(rows, key=lambda r: r["extra_lookahead_ms"])
    x = [r["extra_lookahead_ms"] for r in rows]
    for q in ("median", "p90"):
        ax.plot(x, [100 * r["error"].get(q, np.nan) for r in rows], marker="o", label=q)
    ax.set_xlabel("extra look-ahead, ms (MuseTalk's own 80 ms come on top)")
    ax.set_ylabel("per-frame error vs offline, %")
    enc = rows[0].get("encoder", "") if rows else ""
    ax.set_title(f"{title} ({enc})" if enc else title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def waterfall_plot(parts: list[dict], budget_ms: float = 5000.0, title: str = "voice to screen"):
    """Horizontal waterfall of the budget's parts against ``budget_ms``."""
    plt = _plt()
    steps = [p for p in parts if p["part"] != "total"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(steps) + 1.5))
    left = 0.0
    for i, p in enumerate(steps):
        ax.barh(i, p["ms"], left=left, color="tab:orange" if "assumed" in p["source"] else None)
        ax.annotate(f"{p['ms']:.0f}", (left + p["ms"], i), fontsize=7, va="center")
        left += p["ms"]
    ax.axvline(budget_ms, color="red", ls="--", lw=1)
    ax.annotate(f"budget {budget_ms / 1000:.0f} s", (budget_ms, len(steps) - 0.5), color="red")
    ax.set_yticks(range(len(steps)), [p["part"] for p in steps], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms (p50)")
    ax.set_xscale("symlog", linthresh=100)
    ax.set_title(f"{title}: {left:.0f} ms of {budget_ms:.0f}")
    fig.tight_layout()
    return fig


def metrics_plot(result, names=("musetalk_frames_out_total", "musetalk_late_frames_total")):
    """Counters of a dry run over time, one line per channel and metric."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    for name in names:
        for ch in sorted(result.recordings):
            t, v = result.series(name, ch)
            if t:
                ax.plot(t, v, label=f"{name.removeprefix('musetalk_')} {ch}")
    ax.set_xlabel("s since the senders started")
    ax.set_title("live metrics")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def frames_strip(result, channel: str = "c0"):
    """The sampled frames of one channel's recording side by side."""
    plt = _plt()
    frames = result.samples.get(channel, [])
    fig, axes = plt.subplots(1, max(1, len(frames)), figsize=(2.5 * max(1, len(frames)), 2.6))
    axes = np.atleast_1d(axes)
    for ax, f in zip(axes, frames, strict=False):
        ax.imshow(f)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{channel}: {result.frames.get(channel, 0)} frames recorded", fontsize=9)
    fig.tight_layout()
    return fig


def status_plot(checks: list[dict], title: str = "environment"):
    """One bar per checked item, coloured by status (ok, info, missing)."""
    plt = _plt()
    colours = {"ok": "tab:green", "info": "tab:blue", "missing": "tab:red"}
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(checks) + 1))
    for i, c in enumerate(checks):
        ax.barh(i, 1, color=colours.get(c["status"], "grey"))
        ax.annotate(c["status"], (0.5, i), ha="center", va="center", color="white", fontsize=8)
    ax.set_yticks(range(len(checks)), [c["item"] for c in checks], fontsize=8)
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_title(title)
    fig.tight_layout()
    return fig
