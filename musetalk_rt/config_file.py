"""``--config FILE.toml``: one reader for its tables (``[live]``, ``[groq]``), one kind of error.

Every problem with the file is a :class:`~musetalk_rt.errors.UserError` naming the file and
what is wrong with it, never a traceback.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from musetalk_rt.errors import UserError


def read_table(path: str | Path, name: str) -> dict:
    """The table ``[name]`` of a TOML file (empty when the file has none).

    Raises:
        UserError: Missing or unreadable file, invalid TOML, ``name`` not a table.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM from Windows editors
    except FileNotFoundError:
        raise UserError(f"--config {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {p}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {p}: not valid TOML ({exc})") from None
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise UserError(f"--config {p}: [{name}] must be a table")
    return table
