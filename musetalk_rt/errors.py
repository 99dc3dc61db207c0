"""User-facing errors.

A :class:`UserError` is something the user can fix (a missing file, a bad option). The command
line prints its message as one line and exits non-zero; it never shows a traceback for it.
:func:`worth_logging` is the live process's rule for errors it survives and counts.
:func:`gpu_out_of_memory` turns torch's CUDA out-of-memory error into one line that says what to
change (a bench of five processes at once died of it with "internal error … report it");
:func:`report_unexpected` is the command lines' one line for any other error.
:class:`OneLineParser` makes an argument the parser refuses one line too (argparse's own
prints the whole usage first: 13 to 46 lines before the one that says what is wrong).
"""

import argparse
import re
import sys

EXIT_INTERNAL = 1  # an error no UserError named: a bug to report


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusal is one line: the error, then where the usage is.

    Its subcommands' parsers are of this class too (``add_subparsers`` makes them so).
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UserError(Exception):
    """An error caused by input the user can correct.

    Args:
        message: One line saying what is wrong and, where possible, the command that fixes it.
        exit_code: Process exit status the CLI uses (2 = bad input, 3 = missing prerequisite or
            not enough of a resource, such as GPU memory).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def worth_logging(n: int) -> bool:
    """Whether the ``n``-th error of a kind gets a log record with its traceback.

    The 1st, 2nd, 3rd and every 100th: an error that repeats every frame (a sticky CUDA error,
    a broken output) is counted in full but would otherwise bury the log and fill its disk.
    """
    return n <= 3 or n % 100 == 0


def gpu_out_of_memory(exc: BaseException) -> UserError | None:
    """A :class:`UserError` for torch's CUDA out-of-memory error, else ``None``.

    Looks through the causes as well (``torch.compile`` wraps a build's error in
    ``BackendCompilerFailed`` and keeps it as ``inner_exception``), and checks the class without
    importing torch (the command line's error path must not load it).
    """
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is None:
        return None
    seen = set()
    while exc is not None and not isinstance(exc, oom) and id(exc) not in seen:
        seen.add(id(exc))
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    if exc is None or not isinstance(exc, oom):
        return None
    text = str(exc)
    head = text.split(" Including non-PyTorch memory")[0].strip().rstrip(".")  # asked, free
    cap = re.search(r"([\d.]+ [KMGT]iB) allowed", text)
    if cap:  # the process's own share ran out, not the card
        fix = (
            f"; this process may use only {cap.group(1)}, the share of the card "
            "`bench --gpu-peers N` gives each of N processes (0.9/N)). Run fewer processes at "
            "once (a smaller --gpu-peers) or use smaller --batch-sizes"
        )
    else:
        fix = (
            "). Use smaller --batch-sizes or fewer buckets, run fewer GPU processes at once, or "
            "free the card (nvidia-smi lists what holds it)"
        )
    return UserError(f"the GPU ran out of memory ({head}{fix}", exit_code=3)


def report_unexpected(prog: str, exc: Exception) -> int:
    """Print one line for an error that is not a :class:`UserError`; return the exit status.

    A CUDA out-of-memory error gets its fix (:func:`gpu_out_of_memory`); anything else is an
    internal error, with how to get its traceback.

    Args:
        prog: The command's name at the start of the line (``musetalk-rt``).
        exc: The error.
    """
    oom = gpu_out_of_memory(exc)
    if oom is not None:
        print(f"{prog}: error: {oom}", file=sys.stderr)
        return oom.exit_code
    print(
        f"{prog}: internal error: {type(exc).__name__}: {str(exc)[:300]} "
        "(set MUSETALK_RT_DEBUG=1 for the traceback and report it)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL
