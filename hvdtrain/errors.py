"""One small exception tree. The CLI prints any HvdtrainError as one line and exits with its status."""

from __future__ import annotations


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


class LaunchError(HvdtrainError):
    """A job that started but failed; the message names the failing rank where known. `cause` says what came
    first, when the records tell (hvdtrain.launching.failures.CAUSES): e.g. "stall" or "lost_host", which a requeued job
    can get over, unlike a rank's own error ("failed")."""

    def __init__(self, message: str, exit_code: int = 1, cause: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.cause = cause
