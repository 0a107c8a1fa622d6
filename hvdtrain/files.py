"""Output paths and the writes into them.

Before work starts, every output path a command takes is checked by one helper (`check_output_path`): the wrong
kind (a file where a directory goes, or the other way round), a part of it that is a file, a place this process
cannot write in (permissions, a read-only file system), a file system with too little space left. Small files are
written atomically: a reader (another rank, a test, the user) never sees half a file.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from hvdtrain.errors import UsageError

# What an output path needs free before a command starts writing there: a run directory's first files, a plot.
MIN_FREE_BYTES = 1024 * 1024
# Errors that mean "the file system (or the user's quota on it) is full".
_FULL = (errno.ENOSPC, errno.EDQUOT)


def size_text(b: float) -> str:
    """A byte count for people: 512 B, 12 KiB, 3 MiB, 1.25 GiB."""
    if b < 1024:
        return f"{b:.0f} B"
    if b < 1024**2:
        return f"{b / 1024:.0f} KiB"
    return f"{b / 1024**2:.0f} MiB" if b < 1024**3 else f"{b / 1024**3:.2f} GiB"


def write_text_atomic(path, text: str, mode: Optional[int] = None) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def write_json(path, obj: Any) -> Path:
    """`obj` as indented, key-sorted JSON, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
        full = e.errno in _FULL
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
