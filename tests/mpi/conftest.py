"""The mpi tier: the tests here are marked ranks(N) (hvdtrain's pytest plugin, hvdtrain.testing): a plain
`pytest tests/mpi` launches each rank count's tests as one job, every rank a pytest session of them. Every test
must take the same collective path on every rank; the plugin's per-test timeout (--ranks-timeout, the hang
watchdog) ends one that hangs, naming the rank and showing every rank's stack.
"""

import os

import pytest
import torch


@pytest.fixture(scope="session")
def hvd():
    """The plugin's hvd fixture, with dynamic process sets (test_zero makes a process set of each rank alone), and
    hvdtrain's own wrappers (hvdtrain.parallel.horovod) at hand."""
    from hvdtrain.parallel import horovod

    os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"
    return horovod.init(threads=1)


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
