"""``engines build --jobs N``: the build split into child processes, N at once.

Why: a GPU build is minutes per stage and bucket, most of it single-threaded code generation and
C++ compilation. On a 16-core H200 host the six aoti packages of buckets 4, 16 and 32, built in
six processes at once, finished in 223 s, each taking 122-186 s. Each child is a plain
``engines build`` of one stage (and, for ``aoti``/``trt``, one bucket): it builds, gates and
stores its own engine-cache entry, so the entries serve a later process exactly as one build's
would (``aoti`` and ``trt`` keep one entry per bucket; other engines one per stage and set).

Children write their output to one log file each; the parent prints one line per finished
child and a JSON line last. A child that fails does not stop the others (their entries are
valid); the parent then names it, with its last line and its log, and exits non-zero.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

POLL_S = 0.2  # how often the parent looks for finished children


@dataclass
class Task:
    """One child's share of the build: a stage and its buckets."""

    stage: str
    buckets: list[int]
    log: Path | None = None
    returncode: int | None = None
    result: dict = field(default_factory=dict)  # the child's JSON line
    last_line: str = ""  # the child's last line of output (its error, when it failed)

    @property
    def passed(self) -> bool:
        """The child exited cleanly and its build passed the quality gate."""
        return self.returncode == 0 and bool(self.result.get("passed"))

    @property
    def label(self) -> str:
        return f"{self.stage} b{','.join(map(str, self.buckets))}"


def split_tasks(stages: Sequence[str], buckets: Sequence[int], per_bucket: bool) -> list[Task]:
    """One task per stage and bucket when each bucket is its own cache entry, else per stage.

    Args:
        stages: Stages to build.
        buckets: Batch buckets.
        per_bucket: The engine keeps one cache entry per bucket (``aoti``, ``trt``).
    """
    buckets = sorted(set(buckets))
    sets = [[b] for b in buckets] if per_bucket else [buckets]
    # the largest buckets first: they take longest, so the pool ends sooner
    return [Task(st, s) for s in reversed(sets) for st in stages]


def run_tasks(
    tasks: list[Task],
    argv_for: Callable[[Task], list[str]],
    jobs: int,
    log_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every task's child process, ``jobs`` at once; fills each task's outcome.

    Args:
        tasks: From :func:`split_tasks`.
        argv_for: The child's command line for a task.
        jobs: How many children run at once (at least 1).
        log_dir: Folder for the children's logs (default: a new temporary folder).
        log: Where the progress lines go.

    Returns:
        The folder of the children's logs.
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="musetalk-engines-build-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    waiting = list(tasks)
    running: dict[subprocess.Popen, tuple[Task, float]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < max(1, jobs):
                task = waiting.pop(0)
                task.log = log_dir / f"{task.stage}_b{'-'.join(map(str, task.buckets))}.log"
                with open(task.log, "wb") as out:
                    proc = subprocess.Popen(
                        argv_for(task),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                running[proc] = (task, time.monotonic())
            for proc in [p for p in running if p.poll() is not None]:
                task, t0 = running.pop(proc)
                _collect(task, proc.returncode)
                log(_line(task, time.monotonic() - t0))
            if running:
                time.sleep(POLL_S)
    finally:  # interrupted: no child outlives the parent
        for proc in running:
            proc.kill()
            proc.wait()
    return log_dir


def _collect(task: Task, returncode: int) -> None:
    task.returncode = returncode
    lines = task.log.read_text(errors="replace").strip().splitlines() if task.log else []
    task.last_line = lines[-1] if lines else ""
    for line in reversed(lines):
        if line.startswith('{"engines_build"'):
            try:
                task.result = json.loads(line)
            except ValueError:
                pass
            break


def _line(task: Task, wall_s: float) -> str:
    r = task.result
    if task.returncode == 0 and r:
        cache = r.get("cache", {}).get(task.stage, "?")
        build = r.get("build_s", {}).get(task.stage, "?")
        done = f"done in {wall_s:.0f} s: cache {cache}, build {build} s"
        return f"  {task.label:<16} {done}, gate pass"
    if r and not r.get("passed", True):
        return f"  {task.label:<16} FAILED the quality gate (nothing stored); log: {task.log}"
    return f"  {task.label:<16} FAILED (exit {task.returncode}): {task.last_line}; log: {task.log}"


def summary(tasks: list[Task], engine: str, dtype: str, jobs: int, wall_s: float) -> dict:
    """The parent's JSON line: every task's outcome and whether all passed."""
    return {
        "engines_build": engine,
        "dtype": dtype,
        "jobs": jobs,
        "wall_s": round(wall_s, 1),
        "passed": all(t.passed for t in tasks),
        "tasks": [
            {
                "stage": t.stage,
                "buckets": t.buckets,
                "exit": t.returncode,
                "cache": t.result.get("cache", {}).get(t.stage),
                "build_s": t.result.get("build_s", {}).get(t.stage),
                "passed": t.passed,
                "stored": t.result.get("stored", {}).get(t.stage, []),
                "log": str(t.log),
            }
            for t in tasks
        ],
    }


def child_argv(words: list[str]) -> list[str]:
    """A ``musetalk-rt ...`` command line as this interpreter's ``python -m musetalk_rt ...``."""
    return [sys.executable, "-m", "musetalk_rt", *words[1:]]
