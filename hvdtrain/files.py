"""Output paths and the writes into them.

Before work starts, every output path a command takes is checked by one helper (`check_output_path`): the wrong
kind (a file where a directory goes, or the other way round), a part of it that is a file, a place this process
cannot write in (permissions, a read-only file system), a file system with too little space left. While working,
writes are atomic (a reader never sees half a file, a failed write leaves the previous file as it was and no
temporary file behind), appends are whole lines or nothing, and a full file system is one line naming the path and
the space left (DiskFullError), not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional

from hvdtrain.errors import DiskFullError, UsageError

# What an output path needs free before a command starts writing there: a run directory's first files, a plot.
MIN_FREE_BYTES = 1024 * 1024
# Errors that mean "the file system (or the user's quota on it) is full".
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def size_text(b: float) -> str:
    """A byte count for people: 512 B, 12 KiB, 3 MiB, 1.25 GiB."""
    if b < 1024:
        return f"{b:.0f} B"
    if b < 1024**2:
        return f"{b / 1024:.0f} KiB"
    return f"{b / 1024**2:.0f} MiB" if b < 1024**3 else f"{b / 1024**3:.2f} GiB"


def write_atomic(path, write: Callable[[BinaryIO], None], mode: Optional[int] = None, fsync: bool = False) -> Path:
    """Write `path` through `write(f)` (a binary file) into a temporary file beside it (.NAME.<pid>-<random>.tmp),
    then rename it over `path`, creating the folder. A write that fails removes the temporary file and leaves the
    previous `path` as it was; a full file system raises DiskFullError naming `path`. `mode`: the file's
    permissions (else as umask gives); `fsync`: the data is on disk before the rename."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def unfinished_writes(folder: Path) -> list[Path]:
    """The temporary files of atomic writes (write_atomic: .NAME.<pid>-<random>.tmp) in `folder`: what a write
    killed outright (no cleanup runs) leaves behind, or one still under way."""
    try:
        return sorted(p for p in Path(folder).iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
    except OSError:
        return []


def write_text_atomic(path, text: str, mode: Optional[int] = None) -> Path:
    """Write `text` to `path` atomically (write_atomic)."""
    return write_atomic(path, lambda f: f.write(text.encode()), mode=mode)


def write_json(path, obj: Any) -> Path:
    """`obj` as indented, key-sorted JSON, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_text(path, text: str) -> None:
    """Append `text` (whole lines) to `path`, whole or not at all: a write the file system refuses is cut back off,
    so the file keeps its earlier lines intact and the next append starts a line of its own; a full file system
    raises DiskFullError naming `path`."""
    data = memoryview(text.encode())
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except BaseException:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
    """Around a write of `path`: an error that comes of a full file system (ENOSPC, EDQUOT; also wrapped, as torch's
    writer wraps it) raises DiskFullError naming `path` and the space left; any other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        full = full_disk(path, e)
        if full is None:
            raise
        raise full from e


def full_disk(path, error: BaseException, fix: str = "free some space, or write elsewhere") -> Optional[DiskFullError]:
    """A DiskFullError naming `path`, the space left on its file system and `fix`, when `error` (or an error it was
    raised from or during) is a full file system or quota; else None."""
    seen: Optional[BaseException] = error
    while seen is not None and not (isinstance(seen, OSError) and seen.errno in FULL_ERRNOS):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    try:
        free, mount = free_space(path)
        left = f"only {size_text(free)} free on {mount}"
    except OSError:
        left = "no space left"
    return DiskFullError(f"cannot write {path}: the file system is full ({left}); {fix}")


def free_space(path) -> tuple[int, Path]:
    """The bytes this process may still write on the file system that holds `path` (or its deepest existing part;
    root may use the blocks kept for it), and that file system's mount point."""
    existing = _deepest_existing(Path(path).expanduser().absolute())
    st = os.statvfs(existing)
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    mount, dev = existing, os.stat(existing).st_dev
    while mount != mount.parent and os.stat(mount.parent).st_dev == dev:
        mount = mount.parent
    return blocks * st.f_frsize, mount


def _deepest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_path(
    path, flag: str, directory: bool = True, name: str = "NAME", min_free: int = MIN_FREE_BYTES
) -> Path:
    """Raise UsageError naming `flag` unless `path` can take a command's output: a directory (`directory`) this
    process can write in or create, or a file it can create or replace (written beside it and renamed over it:
    write_atomic). Checked, in order: the path exists as the other kind (a path ending in / is a directory); a part of
    it that exists is a file; the deepest existing directory takes a new entry (tried with a temporary directory,
    removed at once: root's permissions and read-only file systems count); the file system there has `min_free`
    bytes free (and room for a new file). Leaves nothing behind. Returns the path, absolute; `name`: the file's
    name in the fix for a directory given where a file goes."""
    import tempfile

    given = f"{flag} {path}"
    text, path = str(path), Path(path).expanduser().absolute()
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{given}: exists and is not a directory; choose another path")
    if not directory and (path.is_dir() or text.endswith(os.sep)):
        raise UsageError(f"{given}: is a directory; give the path of a file (e.g. {text.rstrip(os.sep)}/{name})")
    existing = _deepest_existing(path if directory else path.parent)
    if not existing.is_dir():
        raise UsageError(f"{given}: {existing} is a file, not a directory; choose another path")
    full = False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hvdtrain-check-", dir=existing))
    except OSError as e:
        full = e.errno in FULL_ERRNOS
        if not full:
            what = "directories" if directory else "files"
            raise UsageError(
                f"{given}: cannot create {what} in {existing} ({e.strerror}); choose another path"
            ) from None
    free, mount = free_space(existing)
    if free < min_free:
        raise UsageError(
            f"{given}: only {size_text(free)} free on {mount} (at least {size_text(min_free)} needed); free some "
            "space or choose another path"
        )
    if full:
        raise UsageError(f"{given}: no room for a new file on {mount} (no free inodes, or the quota is reached); "
                         "free some or choose another path")  # fmt: skip
    return path


def cache_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """hvdtrain's cache on this machine: $HVDTRAIN_CACHE, else ~/.cache/hvdtrain (as scripts/setup.sh's wheels)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("HVDTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hvdtrain"))
