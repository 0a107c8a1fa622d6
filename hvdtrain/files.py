"""Atomic small-file writes: a reader (another rank, a test, the user) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional


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


def cache_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """hvdtrain's cache on this machine: $HVDTRAIN_CACHE, else ~/.cache/hvdtrain (as scripts/setup.sh's wheels)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("HVDTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hvdtrain"))


def write_json(path, obj: Any) -> Path:
    """`obj` as indented, key-sorted JSON, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_creatable_dir(path, flag: str) -> None:
    """Raise UsageError naming `flag` unless `path` is a directory this process can write in, or one it can create
    (every part of the path that exists is a directory, and the deepest existing one takes a new directory: tried
    with a temporary one, removed at once; root's permissions and read-only file systems count). Writes nothing."""
    import tempfile

    from hvdtrain.errors import UsageError

    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory; choose another path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hvdtrain-check-", dir=existing))
    except OSError as e:
        raise UsageError(
            f"{flag} {path}: cannot create directories in {existing} ({e.strerror}); choose another path"
        ) from None
