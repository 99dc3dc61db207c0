"""Engines: turn a reference module into a fast one with the same call signature.

An engine is chosen by name from a registry. Each engine says whether it can run on this host
(and if not, the fix), builds a :class:`Runner` for a set of batch buckets, and reports what it
did and why. Every engine is checked against fp32 eager by :mod:`musetalk_rt.engines.parity`.

=========  ========================================================================
``eager``  the module itself (fp32) or a cast copy (fp16/bf16); any batch size
``compile`` ``torch.compile`` (inductor, fullgraph, one static graph per batch bucket),
           channels-last and CUDA-graph replay on CUDA
``aoti``   ``torch.export`` + AOTInductor: one ``.pt2`` package per module and bucket, loaded
           from the engine cache without export or compilation; CUDA-graph replay on CUDA
``trt``    torch-tensorrt (dynamo path): one static TensorRT program per module and bucket,
           fp16 by casting; needs torch-tensorrt (``make trt``) and a CUDA GPU
=========  ========================================================================
"""

from musetalk_rt.engines.aoti import AotiEngine
from musetalk_rt.engines.base import (
    DTYPES,
    Engine,
    EngineReport,
    Runner,
    available_engines,
    get_engine,
    parse_dtype,
    register,
    select_engine,
)
from musetalk_rt.engines.compile import CompileEngine
from musetalk_rt.engines.eager import EagerEngine
from musetalk_rt.engines.trt import TrtEngine

__all__ = [
    "DTYPES",
    "AotiEngine",
    "CompileEngine",
    "EagerEngine",
    "Engine",
    "EngineReport",
    "Runner",
    "TrtEngine",
    "available_engines",
    "get_engine",
    "parse_dtype",
    "register",
    "select_engine",
]
