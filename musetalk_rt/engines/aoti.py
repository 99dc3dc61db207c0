"""The aoti engine: ``torch.export`` + AOTInductor, one ``.pt2`` package per module and bucket.

Each batch bucket of a stage's module is exported with static shapes (``torch.export.export``,
inputs made under ``torch.inference_mode()`` exactly as the runner passes them), compiled ahead
of time with ``torch._inductor.aoti_compile_and_package`` and loaded with
the package loader behind ``torch._inductor.aoti_load_package`` (:func:`load_package`: without
its ~40 s CPU-feature probe). A later process loads the packages from the engine cache
without exporting or compiling anything: no Dynamo, no inductor at run time.

Packaging choice: one package per stage module and bucket, the weights by default in one
binary file beside a small shared object, still inside the one ``.pt2``
(``aot_inductor.package_constants_in_so=False`` with the ``binary_blob`` on-disk format;
``weights="so"`` keeps the API's default). Each package is one self-contained file either way:
the engine cache stores and renames it atomically under a key that covers the weights
fingerprint (and this choice), and loading is a single call. The cost is one copy of the stage's
weights per bucket on disk and in memory; keep the bucket list short (one or two).

The C++ compiler: every package segfaulted in ``aoti_load_package`` on an H100 and an H200 host
(torch 2.11; UNet and VAE together, the UNet alone, either layout, and a two-convolution net
alike). The compiler inductor took there linked a static copy of libstdc++ into the package, and
that copy's ``std::regex`` (the runtime's device-string parser) crashes in a process that has
torch's shared libstdc++ (experiments/LOG.md). :func:`pick_cxx` therefore chooses a compiler
whose shared objects link libstdc++ dynamically and the build report names it.

The engine's copy of the module has its 0-dim buffers reshaped to ``[1]`` before export (see
:func:`export_friendly`): AOTInductor could not lower the UNet step's 0-dim timestep.

On CUDA each loaded package's call is captured in a CUDA graph (``--no-cuda-graphs``: the
package's C++ loop launches the kernels instead). The default runner refuses a capture
("operation not permitted when stream is capturing": its worker threads synchronise with CUDA
events), so a capturing engine loads the single-threaded one. The capture step holds the
package: its weights are freed with its loader, and a graph replayed after that read freed
memory — the illegal memory access that kept graphs off until 2026-12-04 (experiments/LOG.md).
On an H200, graphs took the plain package at batch 4 from 295–305 fps (an earlier call) to 348.

The compile engine's settings apply to a package too (``freezing``, ``channels_last``,
``coordinate_descent`` and the rewrites). With graphs, freezing + channels-last + the
transposed phase upsample + the channels-last group norm is the fastest measured set: on an
H200, 441.6 fps at batch 4 and 550.2 at batch 32, PSNR 57.8 dB, loaded in 2.1–3.3 s.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import tempfile
import time
import weakref
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch._inductor
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
from musetalk_rt.engines.compile import _ManualGraphStep
from musetalk_rt.engines.rewrites import apply_rewrites, rewrite_options, upsample_form
from musetalk_rt.errors import UserError


def export_friendly(module: nn.Module) -> nn.Module:
    """Reshape 0-dim buffers to ``[1]`` in place (``module`` must be the engine's own copy).

    Inductor's AOT lowering of an exported graph fails on ``unsqueeze`` of a lifted 0-dim
    constant (``UNetStep.timestep``; diffusers turns it into ``[1]`` and expands it to the batch
    itself, so the result is the same).
    """
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and buf.dim() == 0:
                persistent = name not in sub._non_persistent_buffers_set
                sub.register_buffer(name, buf.reshape(1), persistent=persistent)
    return module


def bucket_inputs(
    example_inputs,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, ...]:
    """The inputs of one bucket as the runner passes them: cast, on the device, inference.

    A package is compiled for its example inputs' strides, so 4-D inputs take the memory format
    the runner converts them to (:class:`~musetalk_rt.engines.base.Runner`).
    """
    with torch.inference_mode():
        xs = tuple(x.to(device=device, dtype=dtype).clone() for x in example_inputs(batch))
        return tuple(x.contiguous(memory_format=memory_format) if x.dim() == 4 else x for x in xs)


def export_bucket(
    module: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` for one bucket's inputs (static shapes, strict=False)."""
    with torch.inference_mode():
        return torch.export.export(module, inputs, strict=False)


def prepare_module(
    module: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    phase_upsample: bool | str = False,
    channels_last_norm: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> nn.Module:
    """The engine's copy of ``module``: rewritten, cast, on the device, export-friendly."""
    m = copy.deepcopy(module)
    apply_rewrites(m, phase_upsample, channels_last_norm)
    m = m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if memory_format is not torch.contiguous_format:
        m = m.to(memory_format=memory_format)
    return export_friendly(m)


_CXX_PROBE = """#include <regex>
#include <string>
extern "C" int probe(const char* s) {
  std::regex re("(cpu|cuda)(:([0-9]+))?");
  return std::regex_match(std::string(s), re) ? 1 : 0;
}
"""


@functools.lru_cache(maxsize=8)
def links_libstdcxx_dynamically(cxx: str) -> bool | None:
    """Does ``cxx -shared`` link the C++ runtime as a shared library (``libstdc++.so``)?

    A package's shared object built with its own static copy of libstdc++ crashes when loaded
    into a process that already has the shared one (torch): ``std::regex`` in the package's
    device-string parser dies on the other copy's locale (seen on an H200 host whose ``$CXX``
    did so; experiments/LOG.md). None when the probe cannot be compiled or inspected.
    """
    with tempfile.TemporaryDirectory(prefix="musetalk-cxx-") as tmp:
        src, so = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text(_CXX_PROBE)
        try:
            subprocess.run(
                [cxx, "-shared", "-fPIC", "-std=c++17", str(src), "-o", str(so)],
                capture_output=True,
                timeout=120,
                check=True,
            )
            deps = subprocess.run(["ldd", str(so)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
    return "libstdc++" in deps.stdout


def pick_cxx(candidates: Sequence[str | None]) -> tuple[str, str]:
    """The first compiler of ``candidates`` that links libstdc++ dynamically, and a note.

    Raises:
        UserError: None of them does (or none exists).
    """
    seen: list[str] = []
    for c in candidates:
        path = shutil.which(c) if c else None
        if not path or path in seen:
            continue
        seen.append(path)
        if links_libstdcxx_dynamically(path):
            note = "" if len(seen) == 1 else f" ({seen[0]} links libstdc++ statically: skipped)"
            return path, f"C++ compiler {path}{note}"
    raise UserError(
        "no C++ compiler here links libstdc++ as a shared library (tried "
        f"{', '.join(seen) or 'none found'}); an AOTInductor package built with a static copy "
        "crashes when loaded next to torch. Install g++ (apt-get install g++) or set CXX to one "
        "that does, or use --engine compile"
    )


# where an aoti package keeps the weights: "blob" = one binary file beside the compiled
# shared object (inside the .pt2), "so" = inside the shared object (the API's default)
AOTI_WEIGHTS = ("blob", "so")


class ExportedEngine(Engine):
    """The shared build loop of the ahead-of-time engines (``aoti``, ``trt``).

    Per bucket: load the file from the engine cache when there is one, else export the engine's
    copy of the module (:func:`export_bucket`) and compile it to a file (:meth:`_compile`); then
    load it (:meth:`_load`) and, on CUDA, capture its call in a CUDA graph. Their files are
    built ahead of time by ``engines build``, so ``render`` and ``live`` refuse to start
    without them (``prebuilt``) instead of compiling for minutes on event day.

    Args:
        cuda_graphs: Capture each loaded bucket's call in a ``torch.cuda.CUDAGraph`` (CUDA).
    """

    prebuilt = True
    per_bucket_cache = True
    compiler_note = ""  # how the files were compiled, for the report (set by _compile)
    suffix = ""  # file suffix of one bucket's file in the engine cache
    what = ""  # what the files are, for the report

    phase_upsample: str | bool = False  # upsample + conv from the small input (engines.rewrites)
    channels_last_norm: bool = False  # group norms reduced per channel and chunk (rewrites)
    channels_last: bool = False  # the module's weights and 4-D inputs in channels-last memory
    freezing: bool = False  # inductor freezing while compiling
    coordinate_descent: bool = False  # inductor's coordinate-descent kernel tuning

    def __init__(self, cuda_graphs: bool = True):
        self.cuda_graphs = cuda_graphs
        self._cached: dict[int, Path] = {}  # bucket -> its file in the engine cache

    def captures(self, device: torch.device | str) -> bool:
        """Whether a build on ``device`` captures each bucket's call in a CUDA graph."""
        return self.cuda_graphs and torch.device(device).type == "cuda"

    def row_options(self, device: torch.device | str | None = None) -> dict:
        # the files are the same with or without graphs (one cache key); the speed is not
        graphs = self.cuda_graphs if device is None else self.captures(device)
        return self.cache_options() | {"cuda_graphs": graphs}

    def file_name(self, batch: int) -> str:
        """File name of bucket ``batch`` inside the engine-cache folder."""
        return f"b{batch}{self.suffix}"

    def load_cache(self, folder: Path) -> bool:
        # one call per cache entry: entries of single buckets (how they are stored) and, from
        # before that, of a whole bucket set; a bucket's first file found is the one loaded
        files = {}
        for path in Path(folder).glob(f"b*{self.suffix}"):
            stem = path.name[1 : len(path.name) - len(self.suffix)]
            if stem.isdigit():
                files[int(stem)] = path
        for b, path in files.items():
            self._cached.setdefault(b, path)
        return bool(files)

    @abstractmethod
    def _compile(self, program, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
        """Compile one exported bucket to ``path``; returns the file written."""

    @abstractmethod
    def _load(self, path: Path, capture: bool = False):
        """The callable of one bucket's file (``capture``: to be captured in a CUDA graph)."""

    def build(
        self,
        module: nn.Module,
        example_inputs,
        batch_sizes: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Runner:
        device = torch.device(device)
        on_cuda = device.type == "cuda"
        graphs = self.captures(device)
        fmt = torch.channels_last if self.channels_last and on_cuda else torch.contiguous_format
        cached, self._cached = self._cached, {}
        built: dict[str, Path] = {}  # cache file name -> file written by this build
        buckets = sorted(set(batch_sizes))
        m = None
        work = Path(tempfile.mkdtemp(prefix=f"musetalk-{self.name}-"))
        loaded = 0
        report = EngineReport(self.name, dtype_name(dtype), str(device), buckets)
        fns = {}
        for b in buckets:
            inputs = bucket_inputs(example_inputs, b, dtype, device, fmt)  # [B, ...] per input
            t0 = time.perf_counter()
            path = cached.get(b)
            if path is not None and path.is_file():
                loaded += 1
            else:
                if m is None:
                    # the cast copy (fp16 comes from here), with the engine's rewrites
                    m = prepare_module(
                        module, dtype, device, self.phase_upsample, self.channels_last_norm, fmt
                    )
                path = self._compile(export_bucket(m, inputs), inputs, work / self.file_name(b))
                built[path.name] = path
            run = self._load(path, graphs)
            with torch.inference_mode():
                fns[b] = _ManualGraphStep(run, inputs) if graphs else run
                if not graphs:
                    run(*inputs)  # first call: loads the kernels
            if on_cuda:
                torch.cuda.synchronize(device)
            report.build_s[b] = round(time.perf_counter() - t0, 2)
        report.reason = (
            f"{self.what} ({loaded} loaded from the engine cache, {len(built)} built)"
            + (", CUDA graphs (manual capture)" if graphs else "")
            + (", channels_last" if fmt is torch.channels_last else "")
            + (f", phase upsample ({self.phase_upsample})" if self.phase_upsample else "")
            + (", channels-last group norm" if self.channels_last_norm else "")
            + (", freezing" if self.freezing else "")
            + (", coordinate-descent tuning" if self.coordinate_descent else "")
            + inductor_options.describe(getattr(self, "inductor_config", {}))
            + (f"; {self.compiler_note}" if built and self.compiler_note else "")
        )
        runner = Runner(fns, dtype, report, memory_format=fmt, artifacts=built)
        weakref.finalize(runner, shutil.rmtree, str(work), True)  # the files live as long
        return runner


@register
class AotiEngine(ExportedEngine):
    """``torch.export`` + AOTInductor per static bucket.

    Args:
        cuda_graphs: Capture each loaded package's call in a ``torch.cuda.CUDAGraph`` (CUDA;
            the package loads with the single-threaded runner, the one a capture accepts).
        weights: Where a package keeps the weights (``blob`` or ``so``; see the module).
        max_autotune: Inductor's max-autotune while compiling (slow builds, paid once).
        autotune_stages: Stages built with max-autotune (the others without); an alternative
            to ``max_autotune``, which tunes every stage.
        phase_upsample: Compute each nearest-2x upsample + 3x3 conv from the small input
            (:mod:`musetalk_rt.engines.rewrites`): ``True``/``"interleave"`` or ``"transpose"``.
        channels_last_norm: Group norms reduce per channel over pixel chunks (rewrites).
        channels_last: The module's weights and 4-D inputs in channels-last memory and 1x1
            convolutions as matmuls, as the compile engine on CUDA (CUDA only).
        freezing: Inductor freezing while compiling: the weights are folded as constants and
            the convolutions' weights re-laid out once in the package, not at every call.
        coordinate_descent: Inductor's coordinate-descent tuning of every generated kernel's
            launch configuration (a slower build, paid once).
        inductor_config: More inductor settings for the package's build, ``"KEY=VALUE,..."``
            or a mapping (:mod:`musetalk_rt.inductor_options`).
    """

    name = "aoti"
    description = "torch.export + AOTInductor, one .pt2 package per module and bucket"
    suffix = ".pt2"
    what = "AOTInductor packages"

    def __init__(
        self,
        cuda_graphs: bool = True,
        weights: str = "blob",
        max_autotune: bool = False,
        phase_upsample: bool | str = False,
        autotune_stages: Sequence[str] | str = (),
        channels_last_norm: bool = False,
        channels_last: bool = False,
        freezing: bool = False,
        coordinate_descent: bool = False,
        inductor_config: str | Mapping | None = None,
    ):
        super().__init__(cuda_graphs)
        self.inductor_config = inductor_options.parse(inductor_config)
        self.phase_upsample = upsample_form(phase_upsample) or False  # validated here
        self.channels_last_norm = channels_last_norm
        self.channels_last = channels_last
        self.freezing = freezing
        self.coordinate_descent = coordinate_descent
        if weights not in AOTI_WEIGHTS:
            raise UserError(f"aoti weights {weights!r}: choose one of {', '.join(AOTI_WEIGHTS)}")
        self.weights = weights
        self.max_autotune = max_autotune
        tuned_everywhere = "--aoti-max-autotune" if max_autotune else None
        self.autotune_stages = check_autotune_stages(autotune_stages, tuned_everywhere)

    def for_stage(self, stage: str) -> Engine:
        return engine_for_stage(self, stage, max_autotune=True)

    def cache_options(self) -> dict:
        opts = {"weights": self.weights}  # the package is the same with or without graphs
        if self.max_autotune:  # (absent when off: keys of engines built before stay valid)
            opts["max_autotune"] = True
        if self.autotune_stages:
            opts["autotune_stages"] = list(self.autotune_stages)
        for name in ("channels_last", "freezing", "coordinate_descent"):  # absent when off
            if getattr(self, name):
                opts[name] = True
        if self.inductor_config:
            opts["inductor_config"] = dict(self.inductor_config)
        return opts | rewrite_options(self.phase_upsample, self.channels_last_norm)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type == "cpu" and dtype == torch.float16:
            return "fp16 convolutions are not supported well on CPU; use --dtype fp32 or bf16"
        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return (
                "needs torch>=2.6 (torch._inductor.aoti_compile_and_package); or --engine compile"
            )
        if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
            return "AOTInductor needs a C++ compiler (apt-get install g++); or --engine eager"
        return None

    def _compile(self, program, inputs, path: Path) -> Path:
        cxx, note = pick_cxx((os.environ.get("CXX"), "g++", "c++", "clang++"))
        self.compiler_note = note
        configs = {"cpp.cxx": (None, cxx)}
        if self.max_autotune:  # Triton templates timed against the library kernels, per op
            configs["max_autotune"] = True
        if self.weights == "blob":  # weights beside the shared object, inside the package
            configs["aot_inductor.package_constants_in_so"] = False
            configs["aot_inductor.package_constants_on_disk_format"] = "binary_blob"
        # each setting given either way: inductor's global config may hold others (set in a
        # notebook), which a package built here would otherwise take while its cache key says
        # it has them off
        configs["conv_1x1_as_mm"] = bool(self.channels_last and inputs[0].is_cuda)
        configs["freezing"] = self.freezing
        configs["coordinate_descent_tuning"] = self.coordinate_descent
        configs.update(self.inductor_config)  # (the keys above are refused there)
        with torch.no_grad():  # (inductor freezes only a graph compiled without autograd)
            return Path(
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(path), inductor_configs=configs
                )
            )

    def _load(self, path: Path, capture: bool = False):
        # The container's default run synchronises its worker threads with CUDA events, which a
        # CUDA graph capture refuses ("operation not permitted when stream is capturing", seen
        # on an H200): the single-threaded runner is the one a graph can capture. The runner
        # calls each bucket from one thread (the GPU worker), so nothing is lost.
        return load_package(path, run_single_threaded=capture)


def load_package(path: Path, run_single_threaded: bool = False):
    """Load one ``.pt2`` package: ``aoti_load_package`` without its device-information probe.

    Before loading, torch's ``aoti_load_package`` compares the device facts recorded in the
    package with this host's, only to log a warning, and getting this host's facts probes the
    CPU's vector instruction sets by compiling test programs and loading each in a fresh Python
    process: on an H200 host that was 45 s of a 46 s warm load (once per process,
    experiments/LOG.md). The engine cache key already pins the GPU, its capability and the torch
    version, so the package loader is called directly, as ``aoti_load_package`` itself does after
    the probe. Should torch rename those internals, the public call is used (slower, same result).

    Args:
        path: The package.
        run_single_threaded: The runner a CUDA graph can capture (see :class:`AotiEngine`).
    """
    try:
        from torch._inductor.package.package import AOTICompiledModel

        # (path, model name, single-threaded, runners, device index: -1 = the current device)
        runner = torch._C._aoti.AOTIModelPackageLoader(
            str(path), "model", run_single_threaded, 1, -1
        )
    except (ImportError, AttributeError, TypeError):  # another torch's names or signature
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=run_single_threaded)
    return AOTICompiledModel(runner)
