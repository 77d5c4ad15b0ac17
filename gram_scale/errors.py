"""The one error type for bad input: printed as ``file:line: problem``, exit code 2."""

from __future__ import annotations

import os
from collections.abc import Callable


class InputError(Exception):
    """A problem with a user's file or flag, reported on one line without a traceback."""

    def __init__(self, where: str | os.PathLike | None, line: int | None, problem: str):
        self.where = None if where is None else str(where)
        self.line = line
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        problem = " ".join(str(self.problem).split())  # always one line
        if self.where is None:
            return problem
        if self.line is None:
            return f"{self.where}: {problem}"
        return f"{self.where}:{self.line}: {problem}"


EXIT_INPUT_ERROR = 2


class TrainingStopped(Exception):
    """The run cannot go on (e.g. too many non-finite steps); the message is one line."""


EXIT_TRAINING_STOPPED = 3
EXIT_PEER_LOST = 4
EXIT_FAILED = 1  # a real failure of this process (a bug, out of memory): not the input's fault


class Interrupted(Exception):
    """The run stopped at a step boundary on a signal; the message is one line. ``said``: the
    main process has already printed it; ``code``: the exit code (128 + the signal number)."""

    def __init__(self, message: str, said: bool = False, code: int = 130):
        super().__init__(message)
        self.said = said
        self.code = code


# 128 + the signal number, what shells report for a program a signal ended
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM
EXIT_SIGUSR1 = 138


def run_command(body: Callable[[], object]) -> int:
    """Run the body of a small command (predict, embed, plot): exit code 0, or 2 with
    ``error: <one line>`` on stderr when it raises an InputError."""
    import sys

    try:
        body()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    return 0
