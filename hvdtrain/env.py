"""Where this process stands in the job: rank, size and local rank, read from the launcher's environment
(Horovod, OpenMPI, PMIx, Slurm, PMI), without initialising Horovod; and device layouts for hybrid jobs."""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

# (rank, size, local_rank, local_size) variable names per launcher, most specific first.
_SOURCES = (
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int
    size: int
    local_rank: int
    local_size: int


def int_var(environ: Mapping[str, str], name: str) -> Optional[int]:
    """An integer launcher variable; Slurm's compressed forms like '2(x3)' or '4,2' give their first value."""
    try:
        return int(environ[name].split("(")[0].split(",")[0])
    except (KeyError, ValueError):
        return None


def slurm_restart_count(environ: Optional[Mapping[str, str]] = None) -> int:
    """How many times Slurm has requeued this job (0 outside Slurm or on the first run)."""
    return int_var(os.environ if environ is None else environ, "SLURM_RESTART_COUNT") or 0


def rank_info(environ: Optional[Mapping[str, str]] = None) -> RankInfo:
    """This process's place in the job from the launcher's variables; a lone process is rank 0 of 1."""
    environ = os.environ if environ is None else environ
    for r, s, lr, ls in _SOURCES:
        rank = int_var(environ, r)
        if rank is None:
            continue
        size = int_var(environ, s) or 1
        local_rank = int_var(environ, lr)
        local_size = int_var(environ, ls)
        return RankInfo(
            rank,
            size,
            rank if local_rank is None else local_rank,
            size if local_size is None else local_size,
        )
    return RankInfo(0, 1, 0, 1)
