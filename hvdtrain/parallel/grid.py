"""A pipeline's ranks as replicas of stages (imports no torch: the launching side names ranks with it).

N ranks, P stages per replica, N/P replicas. Replica r is ranks r*P ... r*P+P-1 (consecutive ranks share a host
under mpirun's and Slurm's block mapping, so the activations stay on it where they can), stage s of it rank
r*P+s. The ranks holding stage s of every replica are that stage's process set (parallel.pipe).
"""

from __future__ import annotations

import dataclasses

from hvdtrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Grid:
    """N ranks as N/P replicas of P consecutive stages."""

    ranks: int
    stages: int

    def __post_init__(self):
        if self.stages < 1 or self.ranks % self.stages:
            raise ConfigError(
                f"{self.stages} stages do not divide {self.ranks} ranks: -np must be a multiple of --stages"
            )

    @property
    def replicas(self) -> int:
        return self.ranks // self.stages

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def rank_of(self, replica: int, stage: int) -> int:
        return replica * self.stages + stage

    def role(self, rank: int) -> str:
        """What a rank is, in the words of its log and of a failure report."""
        return f"stage {self.stage_of(rank)} of replica {self.replica_of(rank)}"

    def stage_sets(self) -> list[list[int]]:
        """For each stage, the ranks holding it in every replica (a Horovod process set each)."""
        return [[self.rank_of(r, s) for r in range(self.replicas)] for s in range(self.stages)]
