"""User-facing errors.

A :class:`UserError` is something the user can fix (a missing file, a bad option). The command
line prints its message as one line and exits non-zero; it never shows a traceback for it.
:func:`worth_logging` is the live process's rule for errors it survives and counts.
"""


class UserError(Exception):
    """An error caused by input the user can correct.

    Args:
        message: One line saying what is wrong and, where possible, the command that fixes it.
        exit_code: Process exit status the CLI uses (2 = bad input, 3 = missing prerequisite).
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
