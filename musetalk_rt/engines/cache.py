"""The engine cache: built engines on disk, keyed by everything that makes them valid.

Layout: ``<models_dir>/engines/<stage>/<engine>-<dtype>-<digest>/`` with ``meta.json`` (the
full key, readable) and the engine's own files. The key covers the weights fingerprint, the
stage and its input shapes, the batch buckets, the dtype, the engine and its options, the torch
(Triton, diffusers) versions, a digest of the model code the graphs are traced from, and the
GPU's name and compute capability, so a stale or foreign engine is
never loaded: a different key is a different folder, and a folder whose ``meta.json`` does not
match its key exactly is ignored. Folders are written under a temporary name and renamed into
place when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from musetalk_rt.leftovers import remove_leftovers, temp_folder

CACHE_FORMAT = 1


def device_identity(device: torch.device) -> dict:
    """The facts of a device an engine depends on (GPU name and capability, or the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": "cuda", "gpu": props.name, "capability": f"{props.major}.{props.minor}"}
    import platform

    return {"device": "cpu", "gpu": None, "capability": platform.machine()}


def _diffusers_version() -> str | None:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:
        return None


@functools.lru_cache(maxsize=1)
def model_code_digest() -> str:
    """A digest of the sources that define the traced graphs (``modeling/`` and the stages).

    An aoti or trt package holds the graph traced from this code (and diffusers' blocks, whose
    version is in the key too): after an edit, an old package would run the old maths and
    never meet the gate again.
    """
    import musetalk_rt

    root = Path(musetalk_rt.__file__).parent
    h = hashlib.sha256()
    for path in sorted([*(root / "modeling").glob("*.py"), root / "stages" / "model_stages.py"]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


@dataclass(frozen=True)
class EngineKey:
    """Everything a built engine depends on."""

    stage: str
    engine: str
    dtype: str
    buckets: tuple[int, ...]
    weights_fingerprint: str
    input_shapes: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    torch_version: str = torch.__version__
    triton_version: str | None = field(default_factory=_triton_version)
    diffusers_version: str | None = field(default_factory=_diffusers_version)
    model_code: str = field(default_factory=model_code_digest)
    format: int = CACHE_FORMAT

    def as_dict(self) -> dict:
        d = asdict(self)
        d["buckets"] = list(self.buckets)
        return d

    @property
    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def folder(self, root: Path) -> Path:
        return Path(root) / "engines" / self.stage / f"{self.engine}-{self.dtype}-{self.digest}"


def find(root: Path, key: EngineKey) -> Path | None:
    """The cached engine folder for ``key``, or None (missing, incomplete or foreign)."""
    folder = key.folder(root)
    meta = folder / "meta.json"
    if not meta.is_file():
        return None
    try:
        stored = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    want = json.loads(json.dumps(key.as_dict(), default=str))
    return folder if stored.get("key") == want else None


def store(root: Path, key: EngineKey, files: dict[str, bytes], report: dict) -> Path:
    """Write an engine's files and ``meta.json`` atomically; return the folder."""
    folder = key.folder(root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # a killed build's folders (engines run to GBs), and this process's own from a failed store
    remove_leftovers(folder.parent, folder.name)
    tmp = temp_folder(folder.parent, folder.name)
    tmp.mkdir()
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        meta = {"key": json.loads(json.dumps(key.as_dict(), default=str)), "report": report}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def list_engines(root: Path) -> list[dict]:
    """Every cached engine's ``meta.json`` (with its folder), for ``engines list``."""
    out = []
    for meta in sorted((Path(root) / "engines").glob("*/*/meta.json")):
        try:
            m = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        out.append({"folder": str(meta.parent), **m})
    return out
