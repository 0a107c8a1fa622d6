"""MPICH as a user who loaded an MPICH module has it: a bin/ first on PATH whose mpiexec and mpirun are MPICH's
Hydra, with its hydra_pmi_proxy beside them (Hydra starts the proxy from the directory it was run from) and MPICH's
mpicc. Debian's mpich package provides the files (/usr/bin/mpiexec.hydra, hydra_pmi_proxy, mpicc.mpich); Open MPI
stays the machine's default. Shared by the tiers: tests/conftest.py's `mpich_env` fixture puts the module first
on a launch's PATH; tests that need MPICH take `@requires_mpich` (or `pytestmark`), and the `mpich` marker
selects them (pytest -m mpich)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HYDRA = Path("/usr/bin/mpiexec.hydra")
MODULE = {  # name in the module's bin/ -> the file it is
    "mpiexec": HYDRA,
    "mpirun": HYDRA,
    "hydra_pmi_proxy": Path("/usr/bin/hydra_pmi_proxy"),
    "mpicc": Path("/usr/bin/mpicc.mpich"),
}

requires_mpich = pytest.mark.skipif(
    not HYDRA.exists(), reason=f"MPICH's Hydra is not installed ({HYDRA}): apt-get install mpich"
)


def module_bin(folder: Path) -> Path:
    """folder/bin holding the module's links (those whose file is installed); returns it."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in MODULE.items():
        if target.exists() and not (bin_dir / name).exists():
            (bin_dir / name).symlink_to(target)
    return bin_dir


def compile_mpi(source: str, out: Path, bin_dir: Path) -> Path:
    """An MPI program built from C `source` with the module's mpicc (skips the test where it is missing)."""
    mpicc = bin_dir / "mpicc"
    if not mpicc.exists() or shutil.which("cc") is None:
        pytest.skip("MPICH's mpicc (/usr/bin/mpicc.mpich) or a C compiler is not installed")
    c_file = out.with_suffix(".c")
    c_file.write_text(source)
    subprocess.run([str(mpicc), "-o", str(out), str(c_file)], check=True, capture_output=True, timeout=120)
    return out
