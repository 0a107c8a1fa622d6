"""The mpi tier runs this whole session on every rank: mpirun -np 2 python -m mpi4py -m pytest tests/mpi.

Every test must take the same collective path on every rank. `python -m mpi4py` aborts the whole job when
a rank raises outside pytest; pytest-timeout ends a rank stuck in a collective.
"""

import os

import pytest


@pytest.fixture(scope="session")
def hvd():
    from hvdtrain.parallel import horovod

    os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"  # test_zero makes a process set of each rank alone
    h = horovod.init(threads=1)
    if h.size() < 2:
        pytest.skip("the mpi tier needs at least 2 ranks: run it under mpirun -np 2")
    return h
