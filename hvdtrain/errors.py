"""One small exception tree. The CLI prints any HvdtrainError as one line and exits with its status."""

from __future__ import annotations

from typing import Optional


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


# Where the command line keeps the traceback of a failure it did not foresee: the run's logs/ once a command has one
# (keep_tracebacks_in), else hvdtrain's cache (files.cache_dir()/tracebacks).
_traceback_dir = None
TRACEBACK_LOG = "hvdtrain.traceback.log"


def keep_tracebacks_in(folder) -> None:
    """The command's run has its logs in `folder` (created): a failure's traceback goes there, for a bug report."""
    global _traceback_dir
    _traceback_dir = folder


def unforeseen(error: BaseException, argv) -> str:
    """One line for an exception that escaped a command (the CLI's boundary, clickopts.OneLineErrors): an operating
    system's error names its file and cause (a full disk the space left), anything else is a bug in hvdtrain. The
    traceback, with the command line and version, is appended to a log whose path the line gives."""
    import datetime
    import errno
    import os
    import traceback
    from pathlib import Path

    from hvdtrain import __version__
    from hvdtrain.files import cache_dir

    now = datetime.datetime.now()
    if _traceback_dir is not None:
        log = Path(_traceback_dir) / TRACEBACK_LOG
    else:
        log = cache_dir() / "tracebacks" / f"{now:%Y%m%d-%H%M%S}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(
                f"{now.isoformat(timespec='seconds')} hvdtrain {__version__}: hvdtrain {' '.join(map(str, argv))}\n"
            )
            f.write(text + "\n")
        kept = f"the traceback is in {log}"
    except OSError:
        kept = "its traceback could not be kept (HVDTRAIN_DEBUG=1 shows it)"
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        if error.errno == errno.ENOSPC:
            free = _free_space(error.filename) if error.filename is not None else None
            left = f" (only {free} free)" if free is not None else ""
            return f"{where}no space left on the file system{left}; free some space or choose another path ({kept})"
        return f"{where}{error.strerror}; check the path and its permissions ({kept})"
    return (
        f"internal error (a bug in hvdtrain): {type(error).__name__}: {error}; {kept}: please report it with that "
        "file (hvdtrain --debug shows it here)"
    )


def _free_space(path) -> Optional[str]:
    """How much space the file system holding `path` (or its nearest existing parent) has left, e.g. '12 KiB'."""
    import shutil
    from pathlib import Path

    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < 1024:
        return f"{free} B"
    units = ["KiB", "MiB", "GiB", "TiB"]
    size = free / 1024
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:.1f} {units[0]}"
