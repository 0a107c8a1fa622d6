"""One small exception tree. The CLI prints any HvdtrainError as one line and exits with its status."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


class HvdtrainError(Exception):
    """Base class: a problem the user can fix. `exit_code` is the CLI's exit status for it."""

    exit_code = 1


class UsageError(HvdtrainError):
    """Bad input (flags, hostfiles, configs, paths): nothing was started."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid training configuration or config file."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, corrupt, or does not match the job."""


class UserCodeError(ConfigError):
    """The user's own code (a --hooks module, a Hook's constructor) raised while it was loaded. `user_traceback`: its
    traceback trimmed to the user's frames (it is theirs to read), shown before the one line."""

    def __init__(self, message: str, user_traceback: str = ""):
        super().__init__(message)
        self.user_traceback = user_traceback


class DiskFullError(HvdtrainError):
    """A write the file system refused because it is full (or the user's quota is): the message names the path and
    the space left. Exit status 1: the work had started (a check before any work is a UsageError instead)."""


class LaunchError(HvdtrainError):
    """A job that started but failed; the message names the failing rank where known. `cause` says what came
    first, when the records tell (hvdtrain.launching.failures.CAUSES): e.g. "stall" or "lost_host", which a requeued job
    can get over, unlike a rank's own error ("failed")."""

    def __init__(self, message: str, exit_code: int = 1, cause: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.cause = cause


def rank_main(main: Callable[[list[str]], Optional[int]], argv: Sequence[str]) -> int:
    """A rank's entry point (the training worker, a benchmark's worker, the planner's probe): `main(argv)`'s exit
    status, or, when it raises a HvdtrainError (bad input found on the rank, a full disk under its output), the
    user's traceback where their code raised, the error's one line on stderr and its exit status: the launch report
    then names the rank and shows the line, not hvdtrain's traceback."""
    try:
        return main(list(argv)) or 0
    except HvdtrainError as e:
        if getattr(e, "user_traceback", ""):  # the user's own code raised (a --hooks module): its traceback is theirs
            print(e.user_traceback, file=sys.stderr, end="")
        print(f"hvdtrain: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


# Where the command line keeps the traceback of a failure it did not foresee: the run's logs/ once a command has one
# (keep_tracebacks_in), else hvdtrain's cache (files.cache_dir()/tracebacks).
_traceback_dir = None


def keep_tracebacks_in(folder) -> None:
    """The command's run has its logs in `folder` (created): a failure's traceback goes there, for a bug report."""
    global _traceback_dir
    _traceback_dir = folder


def traceback_dir():
    """The folder keep_tracebacks_in named (None: none yet)."""
    return _traceback_dir
