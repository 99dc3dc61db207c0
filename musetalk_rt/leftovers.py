"""Temporary folders that a killed process left behind, and their removal.

Avatar prepare and the engine cache write a folder whole under a temporary name
(``.NAME.partial-HOST-PID``) and rename it into place, so a reader never sees half a folder. A
process killed mid-write (Ctrl-C, out of memory, a full disk) leaves that temporary folder
behind, and an engine build's can hold gigabytes. The next writer of the same name on the same
host removes the ones whose process is gone; a folder of a process that still runs is another
writer's and is kept, and so is one written from another host (a shared cache volume: its
process id means nothing here). Names without a host (``.NAME.partial-PID``, written before
the host was added) count as this host's.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

KINDS = ("partial", "old")  # the temporary folder kinds: being written, being replaced


def _host() -> str:
    """This host's name as it may appear in a folder name (no path separators)."""
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def temp_folder(parent: Path, name: str, kind: str = "partial") -> Path:
    """This process's temporary folder for ``name`` under ``parent`` (not created)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return Path(parent) / f".{name}.{kind}-{_host()}-{os.getpid()}"


def remove_leftovers(parent: Path, name: str) -> list[Path]:
    """Delete this host's temporary folders for ``name`` whose process is gone (or is this one).

    Returns:
        The folders removed.
    """
    removed = []
    for kind in KINDS:
        prefix = f".{name}.{kind}-"
        for path in Path(parent).glob(f"{prefix}*"):
            host, _, pid_text = path.name[len(prefix) :].rpartition("-")
            try:
                pid = int(pid_text)
            except ValueError:
                continue
            if host and host != _host():
                continue  # another host's writer: whether it runs cannot be told from here
            if pid == os.getpid() or not process_exists(pid):
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(path)
    return removed


def process_exists(pid: int) -> bool:
    """Whether a process with this id runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except (OverflowError, ValueError):  # not a process id at all
        return False
    return True
