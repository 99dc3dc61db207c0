"""The compile engine: ``torch.compile`` per static batch bucket, with CUDA graphs on CUDA.

Only the hot region (one stage's module) is compiled, with ``fullgraph=True`` and static shapes:
one graph per bucket. On CUDA the module is converted to channels-last and inductor's own CUDA
graphs (mode ``reduce-overhead``) make each bucket's step one graph replay by default.
Compile time is measured per bucket and reported apart from run time.

Options that only transform the engine's own copy of the module (the reference is never touched):
``fuse_qkv`` concatenates each diffusers attention's q/k/v (or k/v) projections into one linear
layer. ``graph_capture="manual"`` compiles without inductor's CUDA graphs and captures one
``torch.cuda.CUDAGraph`` per bucket around the compiled call: a replay then skips Dynamo's guards
and the cudagraph-tree bookkeeping (host latency before a B=4 step's GPU work on an H100:
1.1-1.8 ms with cudagraph trees, 0.36 ms with the manual capture). The first manual capture (an
early version, no freezing) crashed with an illegal memory access on replay; this one (warm-up on
a side stream, synchronised capture) ran with freezing and both stages fused. See
experiments/LOG.md.

Engine cache: after a build, ``torch.compiler.save_cache_artifacts()`` serialises what inductor
produced (FX graphs, AOTAutograd graphs, Triton kernels, autotuning results); a later process
with the same key loads them with ``load_cache_artifacts`` before compiling, which then skips
code generation and kernel compilation (Dynamo still traces the module).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from musetalk_rt import inductor_options
from musetalk_rt.engines.base import (
    Engine,
    EngineReport,
    Runner,
    check_autotune_stages,
    dtype_name,
    engine_for_stage,
    register,
)
from musetalk_rt.engines.rewrites import apply_rewrites, rewrite_options, upsample_form
from musetalk_rt.errors import UserError

GRAPH_CAPTURES = ("trees", "manual")


def mode_options(mode: str | None, **options) -> dict:
    """Inductor's options of ``mode`` with ``options`` on top.

    ``torch.compile`` takes a mode or options, not both: pass these as options, without a mode.

    Raises:
        UserError: ``mode`` is not one of inductor's modes.
    """
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if (mode or "default") not in modes:
        raise UserError(f"unknown compile mode {mode!r}; choose one of {', '.join(modes)}")
    return {**modes[mode or "default"], **options}


def _in_settings(compiled, **settings):
    """``compiled``, every call of it made with ``settings`` in inductor's global config.

    Dynamo reads ``freezing`` there as it traces (weights traced as constants or as inputs), so
    it cannot be a ``torch.compile`` option, which only inductor sees; left set after a build,
    the settings would reach later compiles in the process, whose cache keys say otherwise. So
    they are set around each call — the build's compiles and captures, a graph re-captured
    later, and a recompile after the build (a guard that failed) alike — and restored after.
    A call that hits the compiled graph pays ~35 us for it on a 2-core CPU; a replayed CUDA
    graph does not call it.
    """
    import torch._inductor.config as inductor_config

    def call(*inputs):
        with inductor_config.patch(settings):
            return compiled(*inputs)

    return call


def _clone(out):
    """Clone a tensor or tuple of tensors (a graph's outputs are overwritten by the next replay)."""
    return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()


def _tree_step(compiled):
    """Wrap a cudagraph-tree compiled module as one step.

    The output is cloned: the tree's output buffer is overwritten by the next replay.
    """

    def step(*inputs: torch.Tensor):
        torch.compiler.cudagraph_mark_step_begin()
        return _clone(compiled(*inputs))

    return step


class _ManualGraphStep:
    """Replay one ``torch.cuda.CUDAGraph`` captured around ``fn`` on static input buffers.

    Inputs are copied into the static buffers; the output is cloned (the next replay overwrites
    the static output). The step holds ``fn`` for as long as it lives: the graph replays ``fn``'s
    kernels on the memory ``fn`` owns (an AOTInductor package's weights are freed with its
    loader, and a replay after that read freed memory: the illegal memory access of
    ``--aoti-cuda-graphs`` on an H200, experiments/LOG.md 2026-12-04).
    """

    def __init__(self, fn, inputs: Sequence[torch.Tensor], warmup: int = 3):
        self.fn = fn  # keeps the memory the graph's kernels read alive (see above)
        self.static_inputs = [x.clone() for x in inputs]
        self.priority = 0
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles/autotunes outside the capture
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.recapture(0)

    def recapture(self, priority: int) -> None:
        """Capture the graph again on a stream of ``priority`` (lower is higher; CUDA's range).

        PyTorch instantiates its graphs with per-node priorities, so a graph's kernels run at
        the priority of the stream they were captured on, whichever stream replays them: a
        stage that should win the SMs from another stage's kernels is captured high.
        """
        old = getattr(self, "graph", None)
        if old is not None and priority == self.priority:
            return
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(self.static_inputs[0].device, priority=priority)
        # the old graph's memory pool: it is never replayed again, and a pool of its own would
        # hold a second copy of the step's intermediates until the caching allocator is emptied
        pool = old.pool() if old is not None else None
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            output = self.fn(*self.static_inputs)
        torch.cuda.synchronize()
        self.graph, self.static_output, self.priority = graph, output, priority

    def __call__(self, *inputs: torch.Tensor):
        for dst, src in zip(self.static_inputs, inputs, strict=True):
            dst.copy_(src)
        self.graph.replay()
        return _clone(self.static_output)


def fuse_qkv_projections(module: nn.Module) -> int:
    """Fuse the q/k/v projections of every diffusers model inside ``module``, in place.

    Returns:
        The number of attention modules fused (0 when the module has no diffusers attention).
    """
    fused = 0
    with torch.no_grad():
        for sub in list(module.modules()):
            if hasattr(sub, "fuse_qkv_projections") and hasattr(sub, "attn_processors"):
                sub.fuse_qkv_projections()  # diffusers: projections + FusedAttnProcessor2_0
                fused += sum(1 for m in sub.modules() if getattr(m, "fused_projections", False))
    module.requires_grad_(False)
    return fused


@register
class CompileEngine(Engine):
    """``torch.compile`` with static batch buckets (and CUDA graphs on CUDA).

    Args:
        backend: Dynamo backend (``inductor``; tests use ``aot_eager`` to stay CPU-cheap).
        mode: ``torch.compile`` mode (None = default).
        cuda_graphs: Capture each bucket in a CUDA graph (CUDA only).
        freezing: Inductor freezing (weights as constants, folded and re-laid out). Set in
            inductor's global config around each call of the compiled module, as
            ``coordinate_descent`` and (CUDA) ``conv_1x1_as_mm`` are (``_in_settings``): dynamo
            reads ``freezing`` there while it traces, so it cannot be a ``torch.compile``
            option; between calls the config is as it was, so no other compile in the process
            takes this engine's settings, and a recompile of this one takes its own.
        coordinate_descent: Inductor's coordinate-descent kernel tuning (slower compile).
        channels_last: Convert the module and 4-D inputs to channels-last (CUDA only).
        fuse_qkv: Fuse each attention's q/k/v projections into one linear (engine's copy).
        cudnn_benchmark: ``torch.backends.cudnn.benchmark`` (process-wide): cuDNN times its
            convolution algorithms on the first call of each shape (during the build).
        graph_capture: ``trees`` (inductor's cudagraph trees, mode reduce-overhead) or
            ``manual`` (one ``torch.cuda.CUDAGraph`` per bucket around the compiled call).
        phase_upsample: Compute each nearest-2x upsample + 3x3 conv from the small input
            (:mod:`musetalk_rt.engines.rewrites`; exact, 2.25x less work there): ``True`` or
            ``"interleave"`` (one 2x2 conv + interleave) or ``"transpose"`` (one transposed
            conv).
        channels_last_norm: Rewrite each group norm to reduce per channel over chunks of
            256 pixels (contiguous in channels-last memory), then merge into group statistics.
        autotune_stages: Stages built with ``gemm_autotune`` (the others without). At batch 4
            on an H200 inductor's Triton templates beat cuDNN/cuBLAS 2-4x on the UNet's small
            matmuls and convolutions timed one by one, yet the tuned UNet ran slower (5.11
            against 4.20 ms) after ~14 minutes of tuning (experiments/LOG.md, 2026-12-03).
        gemm_autotune: Inductor's ``max_autotune_gemm``: each matmul and convolution times
            Triton templates against cuDNN/cuBLAS and keeps the fastest. Unlike mode
            ``max-autotune`` it leaves pointwise kernels alone and adds no coordinate-descent
            tuning (that mode turns it on whatever ``coordinate_descent`` says).
        inductor_config: More inductor settings, ``"KEY=VALUE,..."`` or a mapping
            (:mod:`musetalk_rt.inductor_options`; inductor backend only).
    """

    name = "compile"
    description = "torch.compile (inductor), static buckets, CUDA graphs"

    def __init__(
        self,
        backend: str = "inductor",
        mode: str | None = None,
        cuda_graphs: bool = True,
        freezing: bool = False,
        coordinate_descent: bool = False,
        channels_last: bool = True,
        fuse_qkv: bool = False,
        cudnn_benchmark: bool = False,
        graph_capture: str = "trees",
        phase_upsample: bool | str = False,
        channels_last_norm: bool = False,
        autotune_stages: Sequence[str] | str = (),
        gemm_autotune: bool = False,
        inductor_config: str | Mapping | None = None,
    ):
        if graph_capture not in GRAPH_CAPTURES:
            choices = ", ".join(GRAPH_CAPTURES)
            raise UserError(f"unknown graph capture {graph_capture!r}; choose one of {choices}")
        self.backend = backend
        self.mode = mode
        self.cuda_graphs = cuda_graphs
        self.freezing = freezing
        self.coordinate_descent = coordinate_descent
        self.channels_last = channels_last
        self.fuse_qkv = fuse_qkv
        self.cudnn_benchmark = cudnn_benchmark
        self.graph_capture = graph_capture
        self.phase_upsample = upsample_form(phase_upsample) or False  # validated here
        self.channels_last_norm = channels_last_norm
        self.gemm_autotune = gemm_autotune
        tuned_everywhere = f"--compile-mode {mode}" if (mode or "").startswith("max-") else None
        self.autotune_stages = check_autotune_stages(autotune_stages, tuned_everywhere)
        self.inductor_config = inductor_options.parse(inductor_config)
        if self.inductor_config and backend != "inductor":
            raise UserError(f"{inductor_options.FLAG} needs the inductor backend, not {backend}")

    def for_stage(self, stage: str) -> Engine:
        return engine_for_stage(self, stage, gemm_autotune=True)

    CACHE_FILE = "compile_cache.bin"

    def cache_options(self) -> dict:
        opts = {
            "backend": self.backend,
            "mode": self.mode,
            "cuda_graphs": self.cuda_graphs,
            "freezing": self.freezing,
            "coordinate_descent": self.coordinate_descent,
            "channels_last": self.channels_last,
            "fuse_qkv": self.fuse_qkv,
            "cudnn_benchmark": self.cudnn_benchmark,
            "graph_capture": self.graph_capture,
        }
        if self.autotune_stages:  # (absent when unset: keys of engines built before stay valid)
            opts["autotune_stages"] = list(self.autotune_stages)
        if self.gemm_autotune:  # (absent when off, as above)
            opts["gemm_autotune"] = True
        if self.inductor_config:  # (absent when none, as above)
            opts["inductor_config"] = dict(self.inductor_config)
        return opts | rewrite_options(self.phase_upsample, self.channels_last_norm)

    def load_cache(self, folder: Path) -> bool:
        path = Path(folder) / self.CACHE_FILE
        if self.backend != "inductor" or not path.is_file():
            return False
        return torch.compiler.load_cache_artifacts(path.read_bytes()) is not None

    def cache_files(self, runner: Runner | None = None) -> dict[str, bytes]:
        if self.backend != "inductor":
            return {}
        saved = torch.compiler.save_cache_artifacts()
        return {self.CACHE_FILE: saved[0]} if saved else {}

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type == "cpu" and dtype == torch.float16:
            return "fp16 convolutions are not supported well on CPU; use --dtype fp32 or bf16"
        if self.backend == "inductor" and device.type == "cpu":
            import shutil

            if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
                return "inductor on CPU needs a C++ compiler (apt-get install g++)"
        return None

    def build(
        self,
        module: nn.Module,
        example_inputs,
        batch_sizes: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Runner:
        on_cuda = device.type == "cuda"
        channels_last = self.channels_last and on_cuda
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        m = copy.deepcopy(module)
        n_fused = fuse_qkv_projections(m) if self.fuse_qkv else 0
        rewritten = apply_rewrites(m, self.phase_upsample, self.channels_last_norm)
        m = m.to(dtype=dtype)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        import torch._dynamo.config as dynamo_config

        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 4 * len(batch_sizes))
        mode = self.mode
        manual_graphs = on_cuda and self.cuda_graphs and self.graph_capture == "manual"
        if manual_graphs:  # the capture is ours: compile without inductor's CUDA graphs
            mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(
                mode, mode
            )
        elif on_cuda and self.cuda_graphs and mode in (None, "default"):
            mode = "reduce-overhead"  # inductor's cudagraph trees: one graph replay per call
        tree_graphs = on_cuda and mode in ("reduce-overhead", "max-autotune")
        if self.cudnn_benchmark and on_cuda:
            torch.backends.cudnn.benchmark = True
        gemm_tuned = self.gemm_autotune and self.backend == "inductor"
        # tuned or more settings: the mode (still named in the report) becomes options
        extra = dict(self.inductor_config) | ({"max_autotune_gemm": True} if gemm_tuned else {})
        options = mode_options(mode, **extra) if extra else None
        compiled = _in_settings(
            torch.compile(
                m,
                fullgraph=True,
                dynamic=False,
                backend=self.backend,
                mode=mode if options is None else None,
                options=options,
            ),
            freezing=self.freezing,
            coordinate_descent_tuning=self.coordinate_descent,
            conv_1x1_as_mm=self.backend == "inductor" and on_cuda,
        )
        report = EngineReport(
            self.name,
            dtype_name(dtype),
            str(device),
            sorted(set(batch_sizes)),
            reason=f"backend={self.backend}, mode={mode or 'default'}"
            + (", channels_last" if channels_last else "")
            + (", CUDA graphs (inductor cudagraph trees)" if tree_graphs else "")
            + (", CUDA graphs (manual capture)" if manual_graphs else "")
            + (", freezing" if self.freezing else "")
            + (", GEMM/convolution autotuning (max_autotune_gemm)" if gemm_tuned else "")
            + (f", fused qkv ({n_fused} attentions)" if self.fuse_qkv else "")
            + rewritten
            + (", cudnn.benchmark" if self.cudnn_benchmark and on_cuda else "")
            + inductor_options.describe(self.inductor_config),
        )
        fns = {}
        for b in sorted(set(batch_sizes)):
            inputs = []
            with torch.inference_mode():  # inference tensors, as the runner passes at run time
                for x in example_inputs(b):
                    x = x.to(device=device, dtype=dtype).clone()
                    inputs.append(x.contiguous(memory_format=fmt) if x.dim() == 4 else x)
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled(*inputs)  # compiles this bucket
                if tree_graphs:
                    fns[b] = _tree_step(compiled)
                    fns[b](*inputs)  # records the graph
                elif manual_graphs:
                    fns[b] = _ManualGraphStep(compiled, inputs)
                else:
                    fns[b] = compiled
            if on_cuda:
                torch.cuda.synchronize(device)
            report.build_s[b] = round(time.perf_counter() - t0, 2)
        return Runner(fns, dtype, report, memory_format=fmt)
