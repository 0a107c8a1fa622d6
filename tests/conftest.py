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
