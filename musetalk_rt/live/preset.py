"""Event presets: the ``[live]`` table of ``--config FILE.toml`` as the live process's defaults.

A preset holds the tuned settings (engine, dtype, buckets, compile options, streaming and delay
settings) so the crew types only the show's parts (avatar, RTMP URL). Each key is a live option
name with ``_`` for ``-`` (``batch_sizes = [4]``, ``compile_freezing = true``); options given on
the command line win. ``[live.sources]`` says which result rows each value comes from
(``configs/event.toml``; the tests check that every cited row exists and that the cited live
run used these settings). The token is
never read from a file: ``--token`` or ``MUSETALK_RT_TOKEN``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from musetalk_rt.config_file import read_table
from musetalk_rt.errors import OneLineParser, UserError

NOT_IN_PRESETS = {"token", "config", "help"}


def preset_defaults(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """The ``[live]`` table of ``path`` as parser defaults (``{dest: value}``), each checked.

    Values go through the option's own type and choices, so a wrong one is an error naming the
    file, never argparse's usage text. Repeatable options (``--channel``) are refused: the
    command line would add to them instead of replacing them.

    Raises:
        UserError: Unreadable file, bad TOML, an unknown or forbidden key, a bad value.
    """
    p = Path(path)
    table = read_table(p, "live")
    options = {a.dest: a for a in parser._actions if a.option_strings}
    out: dict = {}
    for key, value in table.items():
        if key == "sources":
            continue  # the citations, for people and tests
        if key in NOT_IN_PRESETS:
            raise UserError(f"--config {p}: [live] {key} cannot be set in a file")
        action = options.get(key)
        if action is None:
            raise UserError(f"--config {p}: unknown [live] key {key!r} (live options, e.g. engine)")
        if isinstance(action, argparse._AppendAction):
            raise UserError(
                f"--config {p}: [live] {key} is repeatable: give it on the command line"
            )
        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise UserError(f"--config {p}: [live] {key} must be true or false")
            out[key] = value
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            text = str(value)
        else:
            raise UserError(f"--config {p}: [live] {key} = {value!r}: expected a value or a list")
        try:
            converted = action.type(text) if action.type else text
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"--config {p}: [live] {key} = {value!r}: {exc}") from None
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise UserError(f"--config {p}: [live] {key} = {value!r}: choose one of {choices}")
        out[key] = converted
    return out


def parse_with_preset(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """Parse ``argv`` with a ``--config`` file's ``[live]`` values as the defaults.

    Options on the command line win; a preset's ``true`` flag cannot be switched off there
    (those flags have no ``--no-`` form): leave it out of the preset instead. The result's
    ``from_preset`` names the options whose value came from the file (the command line did not
    give them), so that a preset's options of one engine need not stop a run with another.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = OneLineParser(prog=parser.prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    preset = preset_defaults(known.config, parser) if known.config else {}
    from_preset: set[str] = set()
    if preset:
        # which preset values the command line left alone: parse once with a marker as their
        # defaults (argparse's defaults are otherwise indistinguishable from given values)
        parser.set_defaults(**dict.fromkeys(preset, _FROM_PRESET))
        marked = parser.parse_args(argv)
        from_preset = {k for k in preset if getattr(marked, k) is _FROM_PRESET}
        parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    args.from_preset = from_preset
    return args


_FROM_PRESET = object()  # the marker of parse_with_preset's first parse
