"""Event presets: the ``[live]`` table of ``--config FILE.toml`` as the live process's defaults.

A preset holds the tuned settings (engine, dtype, buckets, compile options, streaming and delay
settings) so the crew types only the show's parts (avatar, RTMP URL). Each key is a live option
name with ``_`` for ``-`` (``batch_sizes = [4]``, ``compile_freezing = true``); options given on
the command line win. ``[live.sources]`` says which result rows each value comes from
(``configs/event.toml``; the tests check that every cited row exists and agrees). The token is
never read from a file: ``--token`` or ``MUSETALK_RT_TOKEN``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from musetalk_rt.config_file import read_table
from musetalk_rt.errors import UserError

NOT_IN_PRESETS = {"token", "config", "help"}


def preset_argv(path: str | Path, parser: argparse.ArgumentParser) -> list[str]:
    """The ``[live]`` table of ``path`` as command-line words for ``parser``.

    Raises:
        UserError: Unreadable file, bad TOML, an unknown or forbidden key, a value of the
            wrong kind.
    """
    p = Path(path)
    table = read_table(p, "live")
    options = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in table.items():
        if key == "sources":
            continue  # the citations, for people and tests
        if key in NOT_IN_PRESETS:
            raise UserError(f"--config {p}: [live] {key} cannot be set in a file")
        action = options.get(key)
        if action is None:
            raise UserError(f"--config {p}: unknown [live] key {key!r} (live options, e.g. engine)")
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise UserError(f"--config {p}: [live] {key} must be true or false")
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv += [flag, str(value)]
        else:
            raise UserError(f"--config {p}: [live] {key} = {value!r}: expected a value or a list")
    return argv


def parse_with_preset(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file's ``[live]`` values go first, so the command wins."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        argv = preset_argv(known.config, parser) + argv
    return parser.parse_args(argv)
