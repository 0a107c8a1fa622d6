"""Hybrid parallelism: each Horovod rank owns k local devices holding one pipelined model replica
(devices local_rank*k ... local_rank*k+k-1); ranks are data parallel across replicas."""

from __future__ import annotations

from typing import Optional

from hvdtrain.errors import ConfigError


def devices_for_rank(local_rank: int, local_size: int, k: int, cuda_count: Optional[int] = None) -> list[str]:
    """The k devices of this rank. On a machine without GPUs the k stages are CPU stages (for testing)."""
    if k < 1:
        raise ConfigError(f"--devices-per-rank {k}: must be at least 1")
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_count == 0:
        return ["cpu"] * k
    need = local_size * k
    if need > cuda_count:
        raise ConfigError(
            f"hybrid layout needs {local_size} ranks per node x {k} devices per rank = {need} GPUs, but only "
            f"{cuda_count} are visible on this node: lower -np or --devices-per-rank, or ask for more GPUs"
        )
    return [f"cuda:{local_rank * k + i}" for i in range(k)]
