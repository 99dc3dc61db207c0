"""What this machine has for the toolkit, what is missing, and the command that fixes each.

One row per item: ``item``, ``status`` (``ok``, ``missing``, ``info``), ``detail`` and ``fix``
(empty when nothing is to be done). The same checks whether the notebook runs on a laptop's
CPU or on the event's GPU host; nothing here raises for a missing part.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from pathlib import Path

from musetalk_rt.extras import trt_install_spec

NOTEBOOKS_FIX = "pip install 'musetalk-rt[notebooks]'"
PACKAGES = {  # import name -> (distribution, what needs it, fix)
    "diffusers": ("diffusers", "the UNet and the VAE", "make setup"),
    "av": ("av", "decoding, encoding, RTMP", "make setup"),
    "websockets": ("websockets", "live ingest and senders", "make setup"),
    "soxr": ("soxr", "streaming resampler", "make setup"),
    "matplotlib": ("matplotlib", "the notebooks' plots", NOTEBOOKS_FIX),
    "ipywidgets": ("ipywidgets", "60_live_dry_run's controls", NOTEBOOKS_FIX),
    "papermill": ("papermill", "GPU sweeps of the notebooks", NOTEBOOKS_FIX),
    "groq": ("groq", "captions and voice mode", "pip install 'musetalk-rt[groq]'"),
    "torch_tensorrt": (
        "torch-tensorrt",
        "the trt engine",
        f"make trt, or pip install '{trt_install_spec()}' (or use --engine compile/aoti)",
    ),
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_checks(models_dir: str | Path = "models") -> list[dict]:
    """Rows describing the GPU, versions, weights and the engine cache (see module docstring).

    Args:
        models_dir: The weights layout and engine cache to look at.
    """
    import torch

    from musetalk_rt import weights
    from musetalk_rt.engines.cache import list_engines
    from musetalk_rt.testing.rtmp import rtmp_available

    rows = [
        _row("python", "info", platform.python_version()),
        _row("torch", "info", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
    ]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
        mem_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        rows.append(_row("gpu", "ok", f"{name}, compute capability {cc}, {mem_gb:.0f} GiB"))
    else:
        rows.append(
            _row(
                "gpu",
                "missing",
                "no CUDA GPU: CPU only (tiny weights for plumbing; speed numbers mean nothing)",
                "run on a GPU host with PyTorch's CUDA build (make TORCH_SPEC='torch==2.11.*')",
            )
        )
    for mod, (dist, why, fix) in PACKAGES.items():
        v = _version(dist) if importlib.util.find_spec(mod) else None
        rows.append(
            _row(dist, "ok", f"{v} ({why})")
            if v
            else _row(dist, "missing", f"not installed ({why})", fix)
        )
    missing_rtmp = rtmp_available()
    rows.append(
        _row("nginx-rtmp", "missing", missing_rtmp, "apt-get install nginx libnginx-mod-rtmp")
        if missing_rtmp
        else _row("nginx-rtmp", "ok", "nginx and its rtmp module (tests, bench e2e)")
    )
    checks = weights.check(models_dir)
    bad = [c for c in checks if c.status != "ok"]
    rows.append(
        _row(
            "weights",
            "missing" if bad else "ok",
            f"{len(checks) - len(bad)}/{len(checks)} files of the real weights in {models_dir}"
            + (f" (first problem: {bad[0].path} {bad[0].status})" if bad else ""),
            f"musetalk-rt weights download --models-dir {models_dir}" if bad else "",
        )
    )
    engines = list_engines(Path(models_dir))
    kinds = sorted({f"{e['key']['engine']}/{e['key']['dtype']}" for e in engines})
    rows.append(
        _row(
            "engine cache",
            "ok" if engines else "info",
            f"{len(engines)} cached stage engines ({', '.join(kinds)})"
            if engines
            else "empty: compile/aoti/trt build at first use",
            "" if engines else "musetalk-rt engines build --engine aoti --batch-sizes 4,16",
        )
    )
    return rows


def _row(item: str, status: str, detail: str, fix: str = "") -> dict:
    return {"item": item, "status": status, "detail": detail, "fix": fix}


def format_checks(rows: list[dict]) -> str:
    """The rows as a plain-text table, the fixes listed last."""
    w = max(len(r["item"]) for r in rows)
    lines = [f"{r['item']:<{w}}  {r['status']:<7}  {r['detail']}" for r in rows]
    fixes = [f"  {r['item']}: {r['fix']}" for r in rows if r["fix"]]
    if fixes:
        lines += ["", "to fix:", *fixes]
    return "\n".join(lines)
