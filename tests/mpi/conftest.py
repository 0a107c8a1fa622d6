"""The mpi tier runs this whole session on every rank: mpirun -np 2 python -m mpi4py -m pytest tests/mpi.

Every test must take the same collective path on every rank. `python -m mpi4py` aborts the whole job when
a rank raises outside pytest; pytest-timeout ends a rank stuck in a collective.
"""

import os

import pytest
import torch


@pytest.fixture(scope="session")
def hvd():
    from hvdtrain.parallel import horovod

    os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"  # test_zero makes a process set of each rank alone
    h = horovod.init(threads=1)
    if h.size() < 2:
        pytest.skip("the mpi tier needs at least 2 ranks: run it under mpirun -np 2")
    return h


def batches(steps, per_rank=4, seed=1):
    """This rank's part of every step's global batch (7 inputs, 2 outputs, float64; the same global batches on
    every rank)."""
    from hvdtrain.parallel import horovod

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(per_rank * horovod.size(), 7, generator=g, dtype=torch.float64)
        y = torch.randn(per_rank * horovod.size(), 2, generator=g, dtype=torch.float64)
        r = horovod.rank()
        out.append((x[r * per_rank : (r + 1) * per_rank], y[r * per_rank : (r + 1) * per_rank]))
    return out
