"""Engines: turn a reference module into a fast one with the same call signature.

An engine is chosen by name from a registry. Each engine says whether it can run on this host
(and if not, the fix), builds a :class:`Runner` for a set of batch buckets, and reports what it
did and why. Every engine is checked against fp32 eager by :mod:`musetalk_rt.engines.parity`.

=========  ========================================================================
``eager``  the module itself (fp32) or a cast copy (fp16/bf16); any batch size
``compile`` ``torch.compile`` (inductor, fullgraph, one static graph per batch bucket),
           channels-last and CUDA-graph replay on CUDA
=========  ========================================================================
"""

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

__all__ = [
    "DTYPES",
    "CompileEngine",
    "EagerEngine",
    "Engine",
    "EngineReport",
    "Runner",
    "available_engines",
    "get_engine",
    "parse_dtype",
    "register",
    "select_engine",
]
