"""Install commands for the optional dependencies, worked out without importing them (or torch).

Why: a hint for a missing extra is printed where importing torch or the extra would be slow or
fail (the environment checks of the notebooks, argument errors). torch-tensorrt is the case
that needs care: each of its releases requires one torch minor version, so the command has to
name the release made for the installed torch, or pip replaces torch.
"""

from __future__ import annotations

import importlib.metadata


def torch_version() -> str | None:
    """The installed torch's version (``"2.13.0+cpu"``), from its metadata; None without it."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def trt_install_spec(torch_version_text: str | None = None) -> str:
    """The torch-tensorrt release made for a torch version (default: the installed torch).

    ``"2.13.0+cu130"`` -> ``"torch-tensorrt==2.13.*"``; without torch, the unpinned name.
    """
    version = torch_version_text or torch_version()
    if not version:
        return "torch-tensorrt"
    major, minor = version.split("+")[0].split(".")[:2]
    return f"torch-tensorrt=={major}.{minor}.*"
