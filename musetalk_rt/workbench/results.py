"""Result rows: where a notebook writes them and how they are read back.

Rows are JSON lines (never pickles) in ``<root>/<date>_<gpu>_<sha>/<name>.jsonl``, the layout
``musetalk-rt bench`` uses, so figures and the README's table come from one kind of file.
"""

from __future__ import annotations

import json
from pathlib import Path

from musetalk_rt.bench import REPO_ROOT, environment, results_dir, write_rows

DEFAULT_ROOT = REPO_ROOT / "experiments" / "results"


def run_folder(root: str | Path, device) -> Path:
    """The folder this run's rows go to: ``<root>/<date>_<gpu>_<sha>/``."""
    import torch

    return results_dir(Path(root), environment(torch.device(device)))


def save(rows: list[dict], root: str | Path, device, name: str) -> Path:
    """Append ``rows`` to ``<run folder>/<name>.jsonl``; returns the file."""
    return write_rows(rows, run_folder(root, device), f"{name}.jsonl")


def load(root: str | Path = DEFAULT_ROOT, name: str = "bench") -> list[dict]:
    """Every row of every ``<name>.jsonl`` under ``root``, each with ``_file`` (its source).

    Files are read in name order (dated folders: oldest first); rows marked ``errata`` are
    kept (callers decide), unreadable lines are an error naming the file and line.
    """
    rows = []
    for path in sorted(Path(root).glob(f"*/{name}.jsonl")):
        rel = path.relative_to(root).as_posix()
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON row ({exc.msg})") from None
            row["_file"] = rel
            rows.append(row)
    return rows


def newest(rows: list[dict], key: str) -> dict[str, dict]:
    """The newest row (by its ``time``) per value of ``key``, rows with ``errata`` left out."""
    out: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r.get("time", "")):
        if not r.get("errata") and key in r:
            out[r[key]] = r
    return out
