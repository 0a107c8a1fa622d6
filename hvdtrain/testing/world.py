"""The world a test runs in, read from the launcher's variables (no MPI or Horovod initialised to know it), and
what every rank of it does together: gather a value from each, agree on an assertion (`assert_all`), wait at a
barrier. The collectives go through Horovod when the test initialised it (the `hvd` fixture), else through MPI
(mpi4py) when an MPI launcher started the ranks; a world of one needs neither."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Mapping, Optional

from hvdtrain import env

# Variables only a launcher sets on the processes it starts: a Slurm batch script has SLURM_PROCID and
# SLURM_NTASKS too, but it is not a rank of anything (srun sets SLURM_STEP_NUM_TASKS on a step's tasks).
_LAUNCHED = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
_MPI_LAUNCHED = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "PMI_FD")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the test's ranks. `mpi`: started by an MPI launcher (mpirun, mpiexec, srun with
    PMI), so that mpi4py's COMM_WORLD is the whole world; False under horovodrun's Gloo path and for a lone
    process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    mpi: bool = False

    def allgather(self, value: Any) -> list:
        """Every rank's `value`, in rank order, on every rank (a collective: every rank must call it)."""
        if self.size == 1:
            return [value]
        hvd = sys.modules.get("horovod.torch")
        if hvd is not None and hvd.is_initialized():
            return hvd.allgather_object(value, name="hvdtrain.testing.allgather")
        if self.mpi:
            from mpi4py import MPI

            return MPI.COMM_WORLD.allgather(value)
        raise RuntimeError(
            "hvdtrain.testing: these ranks were not started by MPI (horovodrun --gloo) and Horovod is not "
            "initialised: use the `hvd` fixture for collectives between them"
        )

    def barrier(self) -> None:
        """Every rank waits here for the others."""
        self.allgather(None)

    def assert_all(self, condition: Any, message: str = "") -> None:
        """A collective assertion: every rank calls it with its own condition, and every rank raises the same
        AssertionError, naming each rank whose condition was false, when any was. One rank's failure then ends the
        test on all of them at the same place, instead of leaving the others waiting in the next collective."""
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        outcomes = self.allgather((bool(condition), str(message)))
        failed = [(r, m) for r, (ok, m) in enumerate(outcomes) if not ok]
        if failed:
            raise AssertionError("; ".join(f"rank {r}: {m}" if m else f"rank {r}: assertion failed" for r, m in failed))


def launched(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process is a rank a launcher started (of any size, one included)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in _LAUNCHED)


def current(environ: Optional[Mapping[str, str]] = None) -> World:
    """This process's World: from the launcher's variables when one started it, else a world of one."""
    environ = os.environ if environ is None else environ
    if not launched(environ):
        return World()
    info = env.rank_info(environ)
    mpi = any(name in environ for name in _MPI_LAUNCHED)
    return World(info.rank, info.size, info.local_rank, info.local_size, mpi)


def assert_all(condition: Any, message: str = "") -> None:
    """`World.assert_all` in this process's world."""
    __tracebackhide__ = True
    current().assert_all(condition, message)
