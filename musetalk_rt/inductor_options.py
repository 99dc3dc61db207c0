"""Inductor settings named on the command line: ``--inductor-config KEY=VALUE[,KEY=VALUE]``.

Why: tuning engineers try inductor's switches one at a time (programmatic dependent launch on
Hopper, combo kernels, ...) as experiment rows, without a code change per switch. Each key is
checked against the installed torch's own ``torch._inductor.config``, its value typed from that
key's declared type (booleans, numbers and text only) and checked by ``torch.compile``'s own
option check, and the settings are part of the engine cache key, so an engine built with them
never loads in a run without them. Keys that an engine flag already owns are refused with the
flag's name (two ways to set one thing would let the cache key and the build disagree).

The syntax check (:func:`check_syntax`) is torch-free, for the argument parser; :func:`parse`
needs torch and runs when an engine is made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from musetalk_rt.errors import UserError

FLAG = "--inductor-config"
# keys an engine flag sets (the flag to use instead)
OWNED = {
    "freezing": "--compile-freezing",
    "coordinate_descent_tuning": "--compile-cd-tuning",
    "max_autotune": "--compile-mode max-autotune or --aoti-max-autotune",
    "max_autotune_gemm": "--autotune-stages",
    "max_autotune_pointwise": "--compile-mode max-autotune",
    "conv_1x1_as_mm": "--no-channels-last / --aoti-channels-last",
    "triton.cudagraphs": "--compile-graph-capture / --no-cuda-graphs",
    "triton.cudagraph_trees": "--compile-graph-capture",
    "cpp.cxx": "the CXX environment variable",
    "aot_inductor.package_constants_in_so": "--aoti-weights",
    "aot_inductor.package_constants_on_disk_format": "--aoti-weights",
    "aot_inductor.package": "--engine aoti (it always builds a package)",
    "aot_inductor.output_path": "the engine cache (it names the package's path)",
}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
EXAMPLE = "e.g. triton.enable_pdl=true or combo_kernels=true"


def split_items(text: str) -> list[tuple[str, str]]:
    """``"a=1,b.c=x"`` -> ``[("a", "1"), ("b.c", "x")]`` (syntax only).

    A comma-separated part without ``=`` continues the value before it (``b=x,y``: ``"x,y"``).

    Raises:
        UserError: An item without ``=``, an empty or malformed key, or a key given twice.
    """
    items: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep and items:  # a value holding commas: max_autotune_gemm_backends=ATEN,TRITON
            items[-1] = (items[-1][0], f"{items[-1][1]},{item}")
            continue
        if not sep or not _KEY.fullmatch(key) or not value:
            raise UserError(f"{FLAG} {item!r}: write KEY=VALUE ({EXAMPLE})")
        if any(k == key for k, _ in items):
            raise UserError(f"{FLAG}: {key} is given twice")
        items.append((key, value))
    if not items:
        raise UserError(f"{FLAG}: no KEY=VALUE given ({EXAMPLE})")
    return items


def check_syntax(text: str) -> str:
    """The argument parser's type for ``--inductor-config``: the text, its syntax checked.

    Raises:
        argparse.ArgumentTypeError: The message of :func:`split_items`.
    """
    import argparse

    try:
        split_items(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_SIMPLE = {"bool": bool, "int": int, "float": float, "str": str}


def _simple_type(declared, default) -> type | None:
    """The simple type of a key declared as ``bool``/``int``/``float``/``str`` (or ``None``).

    ``declared`` is torch's declared type: a class, a typing form or a string such as
    ``"str | None"``; without one (older torch) the default's type counts. Anything else:
    ``None``.
    """
    import typing

    if declared is None:
        declared = type(default) if default is not None else None
    if isinstance(declared, str):
        names = [n.strip() for n in declared.replace("Optional[", "").rstrip("]").split("|")]
        names = [n for n in names if n not in ("None", "NoneType")]
        return _SIMPLE.get(names[0]) if len(names) == 1 else None
    if declared in (bool, int, float, str):
        return declared
    args = [a for a in typing.get_args(declared) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (bool, int, float, str) else None


def _typed(key: str, value: str, kind: type):
    """``value`` as ``kind``."""
    if kind is bool:
        low = value.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise UserError(f"{FLAG} {key}={value}: {key} takes true or false")
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{FLAG} {key}={value}: {key} takes an integer") from None
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{FLAG} {key}={value}: {key} takes a number") from None
    return value


def parse(spec: str | Mapping | None) -> dict:
    """Inductor settings from ``"KEY=VALUE,..."`` or a mapping, checked against torch's config.

    Returns:
        ``{key: typed value}``, keys sorted (a stable part of the engine cache key); empty for
        ``None`` or an empty mapping.

    Raises:
        UserError: Bad syntax, a key the installed torch does not have (with the nearest ones),
            a key an engine flag owns (naming the flag), or a value of the wrong type.
    """
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = split_items(str(spec))
    import difflib

    import torch._inductor.config as inductor_config

    defaults = inductor_config.get_config_copy()
    declared = getattr(inductor_config, "get_type", lambda key: None)
    out = {}
    for key, value in items:
        if key in OWNED:
            raise UserError(f"{FLAG} {key}: set it with {OWNED[key]}")
        if key not in defaults:
            near = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else f" ({EXAMPLE})"
            raise UserError(f"{FLAG}: torch's inductor has no setting {key!r}{hint}")
        kind = _simple_type(declared(key), defaults[key])
        if kind is None:
            raise UserError(
                f"{FLAG} {key}: its type ({str(declared(key))[:80]}) is not a boolean, number or "
                "text, which the command line cannot set; set it in Python (torch._inductor.config)"
            )
        out[key] = _typed(key, value, kind)
    out = dict(sorted(out.items()))
    _check_with_torch(out)
    return out


def _check_with_torch(settings: dict) -> None:
    """What ``torch.compile(options=...)`` says of ``settings``, as one line.

    It checks each value against the key's declared type; skipped where that private check is
    missing.
    """
    import torch

    wrapper = getattr(torch, "_TorchCompileInductorWrapper", None)
    if wrapper is None:
        return
    try:
        wrapper(None, dict(settings), False)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UserError(f"{FLAG}: torch.compile refuses these settings: {exc}") from None


def describe(settings: Mapping) -> str:
    """``", inductor triton.enable_pdl=True"`` for an engine report; empty when none."""
    if not settings:
        return ""
    return ", inductor " + " ".join(f"{k}={v}" for k, v in settings.items())
