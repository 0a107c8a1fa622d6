"""Whether the installed Horovod has hvdtrain's patch (scripts/patches), read from its files without importing it:
importing horovod.torch at collection would load torch into every test session, the unit tier's included. The
library itself asks `hvdtrain.parallel.horovod.flat_groups_supported()`, and `hvdtrain doctor` the library's
symbol, as below. Tests that need the patch take `@requires_patch` (or `pytestmark = requires_patch`)."""

from __future__ import annotations

import functools
import importlib.util
import mmap
from pathlib import Path

import pytest

# A function only the patch adds to Horovod's library (wake on wait), as scripts/setup.sh and doctor check it.
PATCH_SYMBOL = b"_ZN7horovod6common15AnyBlockingWaitEv"


@functools.cache
def patched() -> bool:
    """True when horovod.torch's library exports the patch's symbol and its DistributedOptimizer takes flat_groups."""
    try:
        spec = importlib.util.find_spec("horovod")  # a top-level package: found, not imported
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    torch_dir = Path(next(iter(spec.submodule_search_locations))) / "torch"
    optimizer = torch_dir / "optimizer.py"
    libs = sorted(torch_dir.glob("mpi_lib_v2*.so"))
    if not optimizer.is_file() or not libs or "flat_groups" not in optimizer.read_text():
        return False
    with open(libs[0], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(PATCH_SYMBOL) != -1


requires_patch = pytest.mark.skipif(
    not patched(), reason="needs hvdtrain's Horovod patch (scripts/setup.sh without --stock-horovod)"
)
