"""Data parallelism with Horovod: init, device pinning, DistributedOptimizer, broadcast, sharding,
metric averaging and uneven data. Every distributed line of the trainer goes through here.

The collectives here run over the job's group: every rank, or, when `init(group=...)` named a subset (the
workers of an asynchronous job, whose other ranks serve parameters), that subset as a Horovod process set;
rank() and size() are then this rank's place in the group.
"""

from __future__ import annotations

import io
import os
import time
from typing import Mapping, Optional, Sequence

import horovod.torch as hvd
import torch
from torch.utils.data.distributed import DistributedSampler

from hvdtrain.errors import ConfigError

_group = None  # the process set of init(group=...) on its members; None: every rank (Horovod's global set)
_part = None  # this rank's process set of init(parts=...) (a pipeline stage's replicas); None: no parts


def _set():
    return _group if _group is not None else hvd.global_process_set


def init(
    threads: Optional[int] = None,
    deterministic: bool = False,
    group: Optional[Sequence[int]] = None,
    parts: Optional[Sequence[Sequence[int]]] = None,
    timeline: bool = False,
    autotune_log=None,
):
    """Initialise Horovod and this rank's threads; returns the `horovod.torch` module. `group`: the ranks this
    module's collectives run over (every rank calls init with the same list; on the others they are not used).
    `parts`: disjoint lists of ranks covering the job (a pipeline's stages: the ranks holding one stage of every
    replica), each a process set; `part()` is this rank's, for the gradients of its stage. Parts of one rank each
    (one replica: nothing to average) make no process set (Horovod would coordinate each one every cycle), and
    part() is then None; one part of every rank is the global set.
    `timeline`: Horovod's dynamic timeline, recorded between start_timeline and stop_timeline. `autotune_log`: a
    path: Horovod's autotuner on, its log there (rank 0 writes it)."""
    global _group, _part
    if timeline:
        os.environ["HOROVOD_TIMELINE"] = "DYNAMIC"
    if autotune_log is not None:
        os.environ.update(HOROVOD_AUTOTUNE="1", HOROVOD_AUTOTUNE_LOG=str(autotune_log))
    if deterministic:
        # No tensor fusion: every gradient is reduced on its own, in the same grouping every run.
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", "0")
    if group is not None:
        members = hvd.ProcessSet(sorted(group))
        hvd.init(process_sets=[members])
        _group = members if hvd.rank() in group else None
        if _group is not None:
            _await_registration(members)
    elif parts is not None and len(parts) > 1 and len(parts[0]) > 1:
        sets = [hvd.ProcessSet(sorted(p)) for p in parts]
        hvd.init(process_sets=sets)
        _part = next(s for s, p in zip(sets, parts) if hvd.rank() in p)
        _await_registration(_part)
    else:
        hvd.init()
        if parts is not None and len(parts) == 1:  # one part: every rank
            _part = hvd.global_process_set
    # Oversubscribed CPUs: leave room for Horovod's background thread; OMP_NUM_THREADS is set by the launcher.
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None
    if threads:
        torch.set_num_threads(threads)
    return hvd


def _await_registration(members) -> None:
    """Horovod's background thread registers the process sets given to hvd.init a few cycles after init returns
    (the ranks agree on them first); until then a member's set reports itself unknown."""
    deadline = time.monotonic() + 60
    while True:
        try:
            members.size()
            return
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def start_timeline(path) -> None:
    """Record Horovod's timeline into `path` from now on (its coordinator, rank 0, writes it; every rank calls
    this). Needs init(timeline=True)."""
    try:
        hvd.start_timeline(str(path), mark_cycles=False)
    except ValueError as e:  # Horovod was initialised before, without HOROVOD_TIMELINE=DYNAMIC
        raise ConfigError(f"--timeline: {e}") from None


def stop_timeline() -> None:
    """Stop recording; the file is complete (a valid JSON array) when this returns on rank 0."""
    hvd.stop_timeline()


def device() -> torch.device:
    """This rank's device: cuda:local_rank when GPUs are visible, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def scaled_lr(lr: float, scale: bool, backward_passes_per_step: int = 1) -> float:
    """Linear scaling: the effective batch is size x backward passes times larger (Goyal et al., 2017)."""
    return lr * size() * backward_passes_per_step if scale else lr


def part():
    """This rank's process set of init(parts=...) (None without parts)."""
    return _part


def distributed_optimizer(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    compression: str = "none",
    backward_passes_per_step: int = 1,
    reduce_op: str = "average",
    process_set=None,
    named_parameters=None,
    groups: int = 0,
) -> torch.optim.Optimizer:
    """Wrap `optimizer` so gradients are ring-allreduced (averaged, or Adasum) before each step, over every rank
    or over `process_set`; `named_parameters` (default the model's) name the allreduces. `groups`: 0 reduces each
    gradient as soon as it is ready; N >= 1, in N grouped allreduces of consecutive parameters (Horovod's groups),
    each once its last gradient is ready (at most one group per parameter). With hvdtrain's Horovod patch a group's
    gradients live in one flat buffer (each .grad a view of it), reduced as one tensor in place (flat_groups)."""
    comp = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}.get(compression)
    if comp is None:
        raise ConfigError(f"--compression: '{compression}' is not one of none, fp16")
    op = {"average": hvd.Average, "adasum": hvd.Adasum}.get(reduce_op)
    if op is None:
        raise ConfigError(f"--reduce-op: '{reduce_op}' is not one of average, adasum")
    groups = min(groups, sum(1 for p in model.parameters() if p.requires_grad))
    flat = {"flat_groups": True} if groups and flat_groups_supported() else {}
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=named_parameters if named_parameters is not None else model.named_parameters(),
        compression=comp,
        backward_passes_per_step=backward_passes_per_step,
        op=op,
        process_set=process_set if process_set is not None else hvd.global_process_set,
        groups=groups or None,
        **flat,
    )


def flat_groups_supported() -> bool:
    """Whether this Horovod's DistributedOptimizer takes flat_groups (hvdtrain's patch; a stock Horovod reduces
    the groups through its fusion buffer)."""
    import inspect

    return "flat_groups" in inspect.signature(hvd.DistributedOptimizer).parameters


def broadcast_state(
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    root_rank: int = 0,
    process_set=None,
):
    """Make every rank start from root_rank's parameters and optimizer state (also after a resume); over the
    group, or over `process_set` (root_rank is then a global rank, Horovod's convention)."""
    target = process_set if process_set is not None else _group
    if target is None:
        hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
    else:  # hvd.broadcast_parameters knows no process sets
        handles = [
            hvd.broadcast_async_(t, root_rank, name=f"hvdtrain.params.{k}", process_set=target)
            for k, t in sorted(model.state_dict().items())
        ]
        for h in handles:
            hvd.synchronize(h)
    if optimizer is not None:
        # As one object, not hvd.broadcast_optimizer_state: that one takes a dummy optimizer step to create
        # missing state, which moves the weights when weight decay is on.
        state = broadcast_object(
            optimizer.state_dict(), root_rank=root_rank, name="hvdtrain.optimizer_state", process_set=process_set
        )
        optimizer.load_state_dict(state)


def broadcast_object(obj, root_rank: int = 0, name: str = "broadcast_object", process_set=None):
    """Any picklable object from root_rank to every rank of the group, or of `process_set` (small things:
    positions, errors, RNG states)."""
    target = process_set if process_set is not None else _set()
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name, process_set=target)


def sampler(
    dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False, replica: Optional[tuple[int, int]] = None
) -> DistributedSampler:
    """This rank's shard of `dataset`; call `set_epoch(e)` every epoch for a new, agreed order. `replica`:
    (index, count) of the data-parallel replica this rank is part of, when that is not its place in the group
    (a pipeline: every stage of replica r reads replica r's shard)."""
    index, count = replica if replica is not None else (rank(), size())
    return DistributedSampler(dataset, num_replicas=count, rank=index, shuffle=shuffle, seed=seed, drop_last=drop_last)


class PendingSum:
    """Sums of a few numbers over all ranks, started now and read later (so it can overlap a training step).
    One rank alone needs no collective.

    `own`: numbers of this rank alone, gathered in the same allreduce: each goes to this rank's slot of a block of
    size() slots (zeros elsewhere), so the sums after `values`' hold every rank's, block k for own[k], in the
    order of rank() (the group's places: in an async job the workers', which are their global ranks too)."""

    def __init__(self, values: list[float], name: str, own: Sequence[float] = ()):
        n = size()
        slots = [0.0] * (len(own) * n)
        if own:
            slots[rank() :: n] = own
        local = torch.tensor([*values, *slots], dtype=torch.float64)
        alone = n == 1
        self._local = local if alone else None
        self._handle = None if alone else hvd.allreduce_async(local, op=hvd.Sum, name=name, process_set=_set())

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
    flag_t = torch.tensor([int(flag)], dtype=torch.int32)
    return hvd.allreduce(flag_t, op=hvd.Max, name=name, process_set=_set()).item() > 0


def join_and_resync(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Finish uneven data: ranks that ran out of batches wait in hvd.join() while the others go on (they see
    zeros from joined ranks); then everyone takes the parameters of the last rank to join. Returns that rank."""
    last = hvd.join()
    broadcast_state(model, optimizer, root_rank=last)
    return last


def allgather_object(obj, name: str = "allgather_object") -> list:
    """Every rank's `obj`, in rank order, on every rank (small things: RNG states, host names)."""
    if _group is None:
        return hvd.allgather_object(obj, name=name)
    import cloudpickle  # hvd.allgather_object knows no process sets: its two allgathers, on the group

    data = torch.frombuffer(bytearray(cloudpickle.dumps(obj)), dtype=torch.uint8)
    sizes = hvd.allgather(torch.tensor([len(data)]), name=f"{name}.sz", process_set=_group).tolist()
    gathered = hvd.allgather(data, name=f"{name}.t", process_set=_group).numpy()
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [cloudpickle.load(io.BytesIO(gathered[offsets[i] : offsets[i + 1]].tobytes())) for i in range(len(sizes))]


def barrier_all() -> None:
    """Every rank of the job, whatever the group, waits for all the others. An async job ends with it: Horovod
    shuts down on every rank as soon as one rank's process exits (taking MPI with it), so no rank may leave while
    another still needs Horovod or MPI."""
    hvd.barrier(process_set=hvd.global_process_set)


def rank() -> int:
    """This rank's place in the group (its Horovod rank when the group is every rank)."""
    return _set().rank()


def size() -> int:
    """Ranks in the group."""
    return _set().size()


def world() -> tuple[int, int]:
    """(rank, size) in the whole job, whatever the group."""
    return hvd.rank(), hvd.size()


def local_rank() -> int:
    return hvd.local_rank()


def local_size() -> int:
    return hvd.local_size()
