"""The trt engine: torch-tensorrt's dynamo path, one static TensorRT program per module and bucket.

Each bucket of a stage's module is exported with static shapes (the same export as the ``aoti``
engine: the engine's own copy of the module, cast to the dtype, inputs made under
``torch.inference_mode()``) and compiled with ``torch_tensorrt.dynamo.compile``. The dynamo path
does not make an fp32 graph fp16 through ``enabled_precisions``, so fp16 comes from casting the
engine's copy of the module (and the inputs) to half and compiling with
``use_explicit_typing=True``: TensorRT keeps the graph's own types. The module is never
modified. The result is saved with ``torch_tensorrt.save`` (format
``exported_program``) and reloaded with ``torch.export.load(...).module()``; the engine cache
holds those files, so a later process skips TensorRT's build.

Needs the optional dependency ``torch-tensorrt`` (``pip install 'musetalk-rt[trt]'``) and a CUDA
GPU. Nothing of this module that needs TensorRT has been run yet: the CPU tests cover the export,
the input specs, the cache keys and the messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from musetalk_rt.engines.aoti import ExportedEngine
from musetalk_rt.engines.base import register

INSTALL_HINT = (
    "torch-tensorrt is not installed: pip install 'musetalk-rt[trt]', "
    "or use --engine compile or --engine aoti"
)


def trt_available() -> bool:
    """Whether ``torch_tensorrt`` imports."""
    try:
        import torch_tensorrt  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing libnvinfer)
        return False
    return True


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
    suffix = ".ep"
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
        }

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if not trt_available():
            return INSTALL_HINT
        if torch.device(device).type != "cuda":
            return "TensorRT needs a CUDA GPU; on this host use --engine compile or --engine aoti"
        return None

    def _compile(self, program, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
        import torch_tensorrt

        settings = {
            "use_explicit_typing": True,  # the cast module's types are kept (fp16 stays fp16)
            "min_block_size": 1,
        }
        if self.workspace_gb:
            settings["workspace_size"] = int(self.workspace_gb * (1 << 30))
        try:
            trt_gm = torch_tensorrt.dynamo.compile(program, arg_inputs=list(inputs), **settings)
        except TypeError:  # torch-tensorrt < 2.5 names it inputs
            trt_gm = torch_tensorrt.dynamo.compile(program, inputs=list(inputs), **settings)
        try:
            torch_tensorrt.save(
                trt_gm, str(path), output_format="exported_program", arg_inputs=list(inputs)
            )
        except TypeError:  # torch-tensorrt < 2.6 names it inputs
            torch_tensorrt.save(
                trt_gm, str(path), output_format="exported_program", inputs=list(inputs)
            )
        return path

    def _load(self, path: Path, capture: bool = False):
        import torch_tensorrt  # noqa: F401  (registers TensorRT's ops before torch.export.load)

        return torch.export.load(str(path)).module()
