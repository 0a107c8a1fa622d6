"""One small exception tree. The CLI prints any HvdtrainError as one line and exits with its status."""


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
    """A job that started but failed; the message names the failing rank where known."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
