"""Data parallelism with Horovod: init, device pinning, DistributedOptimizer, broadcast, sharding,
metric averaging and uneven data. Every distributed line of the trainer goes through here.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import horovod.torch as hvd
import torch
from torch.utils.data.distributed import DistributedSampler

from hvdtrain.errors import ConfigError


def init(threads: Optional[int] = None, deterministic: bool = False):
    """Initialise Horovod and this rank's threads; returns the `horovod.torch` module."""
    if deterministic:
        # No tensor fusion: every gradient is reduced on its own, in the same grouping every run.
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", "0")
    hvd.init()
    # Oversubscribed CPUs: leave room for Horovod's background thread; OMP_NUM_THREADS is set by the launcher.
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None
    if threads:
        torch.set_num_threads(threads)
    return hvd


def device() -> torch.device:
    """This rank's device: cuda:local_rank when GPUs are visible, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def scaled_lr(lr: float, scale: bool, backward_passes_per_step: int = 1) -> float:
    """Linear scaling: the effective batch is size x backward passes times larger (Goyal et al., 2017)."""
    return lr * hvd.size() * backward_passes_per_step if scale else lr


def distributed_optimizer(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    compression: str = "none",
    backward_passes_per_step: int = 1,
    reduce_op: str = "average",
) -> torch.optim.Optimizer:
    """Wrap `optimizer` so gradients are ring-allreduced (averaged, or Adasum) before each step."""
    comp = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}.get(compression)
    if comp is None:
        raise ConfigError(f"--compression: '{compression}' is not one of none, fp16")
    op = {"average": hvd.Average, "adasum": hvd.Adasum}.get(reduce_op)
    if op is None:
        raise ConfigError(f"--reduce-op: '{reduce_op}' is not one of average, adasum")
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=comp,
        backward_passes_per_step=backward_passes_per_step,
        op=op,
    )


def broadcast_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, root_rank: int = 0):
    """Make every rank start from root_rank's parameters and optimizer state (also after a resume)."""
    hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
    if optimizer is not None:
        # As one object, not hvd.broadcast_optimizer_state: that one takes a dummy optimizer step to create
        # missing state, which moves the weights when weight decay is on.
        state = hvd.broadcast_object(optimizer.state_dict(), root_rank=root_rank, name="hvdtrain.optimizer_state")
        optimizer.load_state_dict(state)


def broadcast_object(obj, root_rank: int = 0, name: str = "broadcast_object"):
    """Any picklable object from root_rank to every rank (small things: positions, errors, RNG states)."""
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name)


def sampler(dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> DistributedSampler:
    """This rank's shard of `dataset`; call `set_epoch(e)` every epoch for a new, agreed order."""
    return DistributedSampler(
        dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=shuffle, seed=seed, drop_last=drop_last
    )


class PendingSum:
    """Sums of a few numbers over all ranks, started now and read later (so it can overlap a training step).
    One rank alone needs no collective."""

    def __init__(self, values: list[float], name: str):
        local = torch.tensor(values, dtype=torch.float64)
        self._local = local if hvd.size() == 1 else None
        self._handle = None if hvd.size() == 1 else hvd.allreduce_async(local, op=hvd.Sum, name=name)

    def result(self) -> list[float]:
        total = self._local if self._local is not None else hvd.synchronize(self._handle)
        return total.tolist()


def average_metrics(sums: Mapping[str, float], count: float, name: str = "metrics") -> dict[str, float]:
    """Exact global means: each rank gives per-metric sums over its `count` samples; returns sum/count totals."""
    keys = sorted(sums)
    *total, n = PendingSum([float(sums[k]) for k in keys] + [float(count)], name=name).result()
    return {k: (total[i] / n if n else float("nan")) for i, k in enumerate(keys)}


def any_rank(flag: bool, name: str = "any_rank") -> bool:
    """True on every rank if `flag` is true on at least one, in a blocking allreduce of its own. (The Trainer
    agrees on preemption through its overlapped window sums instead, see PendingSum.)"""
    return hvd.allreduce(torch.tensor([int(flag)], dtype=torch.int32), op=hvd.Max, name=name).item() > 0


def join_and_resync(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Finish uneven data: ranks that ran out of batches wait in hvd.join() while the others go on (they see
    zeros from joined ranks); then everyone takes the parameters of the last rank to join. Returns that rank."""
    last = hvd.join()
    broadcast_state(model, optimizer, root_rank=last)
    return last


def allgather_object(obj, name: str = "allgather_object") -> list:
    return hvd.allgather_object(obj, name=name)


def rank() -> int:
    return hvd.rank()


def size() -> int:
    return hvd.size()


def local_rank() -> int:
    return hvd.local_rank()


def local_size() -> int:
    return hvd.local_size()
