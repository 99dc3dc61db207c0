"""The trt engine: torch-tensorrt's dynamo path, one static TensorRT program per module and bucket.

Each bucket of a stage's module is exported with static shapes (the same export as the ``aoti``
engine: the engine's own copy of the module, cast to the dtype, inputs made under
``torch.inference_mode()``) and compiled with ``torch_tensorrt.dynamo.compile`` on the inputs'
GPU. The dynamo path does not make an fp32 graph fp16 through ``enabled_precisions`` (from
torch-tensorrt 2.11 on, the graph's own types are kept, and 2.13 has no other mode), so fp16
comes from casting the engine's copy of the module (and the inputs) to half; before 2.11,
``use_explicit_typing=True`` asks for the same. The module is never modified. The result is
saved with ``torch_tensorrt.save`` (format ``exported_program``) and reloaded with
``torch.export.load(...).module()``; the engine cache holds those files (keyed also by the
torch-tensorrt and TensorRT versions: an engine loads only in the TensorRT that built it), so a
later process skips TensorRT's build. Each build keeps TensorRT's timing cache in its own work
folder, so parallel builds (``engines build --jobs``) never rewrite one shared file.

Needs the optional dependency ``torch-tensorrt`` in the release made for the installed torch
(:func:`musetalk_rt.extras.trt_install_spec`: each release pins one torch minor version, so an
unpinned install would replace torch) and a CUDA GPU. Nothing of this module that needs
TensorRT has been run yet: the CPU tests cover the export, the input specs, the build settings
per torch-tensorrt version, the cache keys and the messages.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import torch

from musetalk_rt.engines.aoti import ExportedEngine
from musetalk_rt.engines.base import register
from musetalk_rt.extras import trt_install_spec

INSTALL_HINT = (
    f"torch-tensorrt is not installed: pip install '{trt_install_spec()}' (the release made for "
    "this torch; `make trt` in a checkout), or use --engine compile or --engine aoti"
)


def trt_available() -> bool:
    """Whether ``torch_tensorrt`` imports."""
    try:
        import torch_tensorrt  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing libnvinfer)
        return False
    return True


def tensorrt_version() -> str | None:
    """The TensorRT library's version (``tensorrt.__version__``), or None without it."""
    try:
        import tensorrt
    except Exception:
        return None
    return getattr(tensorrt, "__version__", None)


def compile_settings(
    compile_fn, device: torch.device, timing_cache: Path, workspace_bytes: int | None = None
) -> dict:
    """Keyword arguments for ``torch_tensorrt.dynamo.compile`` as the installed release takes them.

    Always: the inputs' GPU (else TensorRT builds on the current device, GPU 0), one-op blocks
    allowed (``min_block_size=1``) and this build's own timing-cache file. Before torch-tensorrt
    2.11 (``use_explicit_typing`` off by default) explicit typing is asked for, so the cast
    module's fp16 stays fp16; 2.11 and 2.12 type explicitly by default (and warn when asked),
    2.13 has no such setting. ``enabled_precisions`` is never passed (the dynamo path ignores
    it, and 2.11 refuses anything but fp32 with explicit typing).
    """
    params = inspect.signature(compile_fn).parameters
    settings: dict = {"device": device, "min_block_size": 1}
    if "timing_cache_path" in params:
        settings["timing_cache_path"] = str(timing_cache)
    typing = params.get("use_explicit_typing")
    if typing is not None and typing.default is not True:
        settings["use_explicit_typing"] = True
    if workspace_bytes:
        settings["workspace_size"] = int(workspace_bytes)
    return settings


def partition_summary(module) -> tuple[int, int]:
    """``(TensorRT blocks, blocks left to PyTorch)`` of a compiled graph module.

    torch-tensorrt names its partitions ``_run_on_acc_<i>`` (a TensorRT engine) and
    ``_run_on_gpu_<i>`` (ops it could not convert, run by PyTorch between the engines).
    """
    names = [name for name, _ in module.named_children()]
    acc = sum(1 for n in names if n.startswith("_run_on_acc"))
    return acc, sum(1 for n in names if n.startswith("_run_on_gpu"))


def input_specs(
    example_inputs, batch_sizes: Sequence[int], dtype: torch.dtype
) -> dict[int, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Bucket -> ``[(shape, dtype), ...]`` of the static inputs TensorRT is built for."""
    out = {}
    for b in sorted(set(batch_sizes)):
        out[b] = [(tuple(x.shape), dtype) for x in example_inputs(b)]
    return out


@register
class TrtEngine(ExportedEngine):
    """torch-tensorrt (dynamo) per static bucket, fp16 by casting; CUDA graphs on top.

    Args:
        cuda_graphs: Capture each bucket's call in a ``torch.cuda.CUDAGraph``.
        workspace_gb: TensorRT builder workspace limit (None = TensorRT's default).
    """

    name = "trt"
    description = "torch-tensorrt dynamo path, one static engine per module and bucket (CUDA)"
    suffix = ".pt2"  # what torch.export.save/load expect (other names warn)
    what = "TensorRT programs"

    def __init__(self, cuda_graphs: bool = True, workspace_gb: float | None = None):
        super().__init__(cuda_graphs)
        self.workspace_gb = workspace_gb

    def cache_options(self) -> dict:
        version = None
        if trt_available():
            import torch_tensorrt

            version = torch_tensorrt.__version__
        return {  # (graphs or not, the engine file is the same: one key, as for aoti)
            "workspace_gb": self.workspace_gb,
            "torch_tensorrt": version,
            "tensorrt": tensorrt_version(),  # an engine runs only in the TensorRT that built it
        }

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if not trt_available():
            return INSTALL_HINT
        if torch.device(device).type != "cuda":
            return "TensorRT needs a CUDA GPU; on this host use --engine compile or --engine aoti"
        return None

    def _compile(self, program, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
        import torch_tensorrt

        device = inputs[0].device  # with its index: the build runs on the inputs' GPU
        workspace = int(self.workspace_gb * (1 << 30)) if self.workspace_gb else None
        timing_cache = path.parent / "timing_cache.bin"  # this build's work folder: its own
        settings = compile_settings(torch_tensorrt.dynamo.compile, device, timing_cache, workspace)
        with torch.cuda.device(device):
            trt_gm = torch_tensorrt.dynamo.compile(program, arg_inputs=list(inputs), **settings)
            torch_tensorrt.save(
                trt_gm, str(path), output_format="exported_program", arg_inputs=list(inputs)
            )
        acc, fallback = partition_summary(trt_gm)
        self.compiler_note = (
            f"torch-tensorrt {torch_tensorrt.__version__}, TensorRT {tensorrt_version()}: "
            f"{acc} TensorRT block(s), {fallback} left to PyTorch"
        )
        return path

    def _load(self, path: Path, capture: bool = False):
        import torch_tensorrt  # noqa: F401  (registers TensorRT's ops before torch.export.load)

        return torch.export.load(str(path)).module()
