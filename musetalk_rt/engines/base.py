"""The engine interface, the registry and the selection rule."""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from musetalk_rt.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

ExampleInputs = Callable[[int], tuple[torch.Tensor, ...]]

MODEL_STAGES = ("unet", "vae_decode")  # the stages an engine builds (musetalk_rt.stages)


def check_autotune_stages(
    stages: Sequence[str] | str, tuned_everywhere: str | None = None
) -> tuple[str, ...]:
    """Validate ``autotune_stages`` (names or one comma-separated string); sorted, unique.

    Args:
        stages: Stage names.
        tuned_everywhere: The option that already tunes every stage, when it is set (a clash).

    Raises:
        UserError: A name that is not a model stage, or a clash with ``tuned_everywhere``.
    """
    names = stages.split(",") if isinstance(stages, str) else list(stages)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in MODEL_STAGES]
    if unknown:
        choose = ", ".join(MODEL_STAGES)
        raise UserError(f"--autotune-stages: unknown stage {unknown[0]!r}; choose from {choose}")
    if names and tuned_everywhere:
        raise UserError(
            "--autotune-stages tunes the stages it names; drop "
            f"{tuned_everywhere}, or drop --autotune-stages to tune every stage"
        )
    return tuple(sorted(set(names)))


def engine_for_stage(engine: Engine, stage: str, **tuned) -> Engine:
    """``engine`` for ``stage`` with its ``autotune_stages`` resolved.

    Returns ``engine`` itself when it has none; else a shallow copy without them, with the
    attributes ``tuned`` set when ``stage`` is one of them (the copy's cache key is then that of
    the engine the stage is built as).
    """
    if not getattr(engine, "autotune_stages", ()):
        return engine
    resolved = copy.copy(engine)
    resolved.autotune_stages = ()
    if isinstance(getattr(resolved, "_cached", None), dict):
        # the stage's own cached files: a shallow copy would share the dict, and the VAE
        # stage would find (and load) the UNet's files of the same bucket
        resolved._cached = {}
    if stage in engine.autotune_stages:
        for name, value in tuned.items():
            setattr(resolved, name, value)
    return resolved


def parse_dtype(name: str) -> torch.dtype:
    """``fp32`` | ``fp16`` | ``bf16`` -> torch dtype (one clear error otherwise)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


@dataclass
class EngineReport:
    """What an engine built, how long it took, and why it was chosen."""

    engine: str
    dtype: str
    device: str
    batch_sizes: list[int] | None  # None: any batch size
    build_s: dict[int, float] = field(default_factory=dict)  # per bucket, compile/capture time
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    # "hit" (loaded from the engine cache), "partial" (some buckets loaded, the others built),
    # "miss", or None (no cache used)
    cache: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        buckets = "any batch" if self.batch_sizes is None else f"buckets {self.batch_sizes}"
        build = sum(self.build_s.values())
        extra = f", built in {build:.1f} s" if self.build_s else ""
        extra += f", engine cache {self.cache}" if self.cache else ""
        return f"{self.engine}/{self.dtype} on {self.device} ({buckets}{extra}): {self.reason}"


class Runner:
    """A callable built by an engine; runs fixed buckets (or any batch when ``buckets`` is None).

    Inputs are cast to the runner's dtype. Calls with a batch that is not a bucket are padded to
    the next bucket (or split) and the output sliced, so callers never see buckets.

    Args:
        fns: Bucket -> callable, or ``{0: fn}`` for a runner that takes any batch size.
        dtype: Compute dtype of the inputs.
        report: The engine's report.
        memory_format: Memory format the inputs are converted to (4-D inputs only).
        artifacts: Files this build wrote (cache file name -> path), for the engine cache.
    """

    def __init__(
        self,
        fns: dict[int, Callable],
        dtype: torch.dtype,
        report: EngineReport,
        memory_format: torch.memory_format = torch.contiguous_format,
        artifacts: dict[str, Path] | None = None,
    ):
        self.fns = fns
        self.dtype = dtype
        self.report = report
        self.memory_format = memory_format
        self.artifacts = artifacts or {}
        self.buckets = None if 0 in fns else sorted(fns)

    def capture_priority(self, priority: int, batch: int | None = None) -> int:
        """Re-capture CUDA graphs on a stream of ``priority`` (lower is higher).

        PyTorch's graphs keep the priority of the stream they were captured on. Only graphs
        this project captures itself (the manual capture of ``compile`` and ``aoti``) can be
        re-captured; others keep the default priority. A graph already at ``priority`` is left
        as it is.

        Args:
            priority: The CUDA stream priority (0 is the default).
            batch: Only the bucket that serves this batch size (None: every bucket).

        Returns:
            How many buckets have their graph at ``priority`` now (0: no such graph).
        """
        if batch is None or self.buckets is None:
            fns = list(self.fns.values())
        else:
            fns = [self.fns[self.bucket_for(batch)]]
        done = 0
        for fn in fns:
            if hasattr(fn, "recapture"):
                fn.recapture(priority)
                done += 1
        return done

    def bucket_for(self, batch: int) -> int:
        """The bucket that runs ``batch`` (a larger batch runs in pieces of the largest)."""
        return next((k for k in self.buckets if k >= batch), self.buckets[-1])

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if not x.is_inference():
            # compiled engines guard on the tensor kind: builds see inference tensors, so every
            # call must too (an ordinary tensor here cost a full re-compile at the first call)
            x = x.clone()
        if x.dim() == 4 and self.memory_format is not torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        return x

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.buckets is None:
            return self.fns[0](*(self._cast(x) for x in inputs))
        b = inputs[0].shape[0]
        if b > self.buckets[-1]:  # split into the largest bucket
            step = self.buckets[-1]
            parts = [self(*(x[i : i + step] for x in inputs)) for i in range(0, b, step)]
            return torch.cat(parts)
        bucket = self.bucket_for(b)
        if bucket != b:  # pad by repeating the last row; the padding's output is discarded
            inputs = tuple(torch.cat([x, x[-1:].expand(bucket - b, *x.shape[1:])]) for x in inputs)
        # cast after the padding: a concatenation with an expanded row repeated twice or more
        # comes back in NCHW memory whatever its inputs' format, and a compiled bucket guards
        # on strides (such a batch re-compiled the whole module at its first call, 30-60 s on a
        # GPU)
        out = self.fns[bucket](*(self._cast(x) for x in inputs))
        return out[:b] if bucket != b else out


class Engine(ABC):
    """Base class of all engines."""

    name: str = ""
    description: str = ""
    prebuilt: bool = False  # built ahead by ``engines build``; render and live only load it
    # one engine-cache entry per bucket (each bucket's file stands alone), so buckets built in
    # separate processes or on separate days serve together; else one entry per bucket set
    per_bucket_cache: bool = False

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when the engine can run here, else why not and what fixes it."""
        return None

    @abstractmethod
    def build(
        self,
        module: nn.Module,
        example_inputs: ExampleInputs,
        batch_sizes: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Runner:
        """Build a runner of ``module`` for ``batch_sizes`` (the module is never modified)."""

    def cache_options(self) -> dict:
        """Options that change what ``build`` produces (part of the engine-cache key)."""
        return {}

    def row_options(self, device: torch.device | str | None = None) -> dict:
        """The options a bench row records: the cache key's and those that only change the run.

        Args:
            device: Where the row ran (an option that applies on CUDA only is off elsewhere).
        """
        return self.cache_options()

    def for_stage(self, stage: str) -> Engine:
        """The engine that builds ``stage``: per-stage options resolved (default: this one).

        Args:
            stage: A name from :data:`MODEL_STAGES`.
        """
        return self

    def load_cache(self, folder: Path) -> bool:
        """Prime the next ``build`` from a cached engine folder; False if this engine cannot."""
        return False

    def cache_files(self, runner: Runner | None = None) -> dict[str, bytes]:
        """Files to store in the engine cache after a successful build ({} = nothing).

        Args:
            runner: The runner whose files to store (one engine may build several stages);
                the default stores the files the runner's build wrote (``runner.artifacts``).
        """
        if runner is None:
            return {}
        return {name: Path(path).read_bytes() for name, path in sorted(runner.artifacts.items())}


_REGISTRY: dict[str, type[Engine]] = {}


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator adding an engine to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_engines() -> list[str]:
    return sorted(_REGISTRY)


def get_engine(name: str, **options) -> Engine:
    """Instantiate a registered engine by name."""
    if name not in _REGISTRY:
        raise UserError(f"unknown engine {name!r}; choose one of {', '.join(available_engines())}")
    cls = _REGISTRY[name]
    not_taken = sorted(set(options) - engine_parameters(name))
    if not_taken:
        raise UserError(
            f"engine {name!r} does not take the options {', '.join(not_taken)} "
            "(options of another engine: see --help for which engine takes which)"
        )
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise UserError(f"engine {name!r}: {exc}") from None
    return cls(**options)


def engine_parameters(name: str) -> set[str]:
    """The option names engine ``name``'s constructor takes (empty for an unknown name)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        return set()
    params = inspect.signature(cls).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def select_engine(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    fallback: str | None = None,
    log: Callable[[str], None] | None = None,
    fallback_options: dict | None = None,
    fix_hint: str = " (or pass --fallback eager)",
    **options,
) -> tuple[Engine, str]:
    """Pick an engine, explaining the choice.

    Args:
        name: Requested engine.
        device: Where it must run.
        dtype: Requested compute dtype.
        fallback: Engine to use when ``name`` cannot run here; without it that is an error.
            Checked now, so that a misspelt fallback is not found on the day it is needed.
        log: Receives a line when the fallback is taken.
        fallback_options: Defaults for the fallback's constructor (e.g. the live process's
            graph capture for ``compile``); the fallback also gets those of ``options`` it
            takes, and the reason names the ones it does not.
        fix_hint: Appended to the error when ``name`` cannot run, there is no fallback and
            the eager engine could run here (the caller's way out to it; empty where the
            command has no ``--fallback``).
        **options: Passed to the engine's constructor.

    Returns:
        The engine and the reason it was chosen.

    Raises:
        UserError: Unknown name, or unusable with no fallback (the message names the fix).
    """
    device = torch.device(device)
    engine = get_engine(name, **options)
    fb_options: dict = {}
    if fallback is not None:
        taken = engine_parameters(fallback)
        fb_options = {k: v for k, v in (fallback_options or {}).items() if k in taken}
        fb_options |= {k: v for k, v in options.items() if k in taken}
        chosen = get_engine(fallback, **fb_options)  # an unknown fallback: its line, now
    why_not = engine.unavailable_reason(device, dtype)
    if why_not is None:
        return engine, f"requested, usable on {device.type}"
    if fallback is None:
        # the way out only where it is one: not when eager itself (or eager at this dtype) fails
        helps = name != "eager" and get_engine("eager").unavailable_reason(device, dtype) is None
        hint = fix_hint if helps else ""
        raise UserError(f"engine {name!r} cannot run here: {why_not}{hint}", exit_code=3)
    second = chosen.unavailable_reason(device, dtype)
    if second is not None:
        raise UserError(
            f"engine {name!r} cannot run here ({why_not}); fallback {fallback!r} "
            f"cannot either ({second})",
            exit_code=3,
        )
    reason = f"fallback from {name!r}: {why_not}"
    dropped = sorted(set(options) - set(fb_options))
    if dropped:
        reason += f"; {fallback} does not take {', '.join(dropped)}"
    if log:
        log(f"engine: {reason}")
    return chosen, reason
