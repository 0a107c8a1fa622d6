"""Atomic small-file writes: a reader (another rank, a test, the user) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


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
