import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def child_env(tmp_path):
    """Environment for real launches from tests: the venv first on PATH, root allowed for OpenMPI, and the test's
    own temporary directory as TMPDIR (per-rank logs kept after a failing launch stay with the test)."""
    return {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PYTHONPATH": str(REPO),
    }


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "mpich: runs under MPICH's Hydra (an MPICH module first on PATH: tests/mpich.py)"
    )


@pytest.fixture
def mpich_env(child_env, tmp_path):
    """child_env as after `module load mpich`: the module's bin/ (tests/mpich.py) first on PATH, so mpirun and
    mpiexec are MPICH's Hydra; no Open MPI variable of the tests' own (whatever reaches the ranks is hvdtrain's)."""
    from mpich import module_bin

    env = {k: v for k, v in child_env.items() if not k.startswith("OMPI_")}
    return {**env, "PATH": f"{module_bin(tmp_path / 'mpich')}{os.pathsep}{env['PATH']}"}
