"""The one rule of which samples a rank trains on: an epoch's order, and the part of it not yet processed dealt
over the current world. Static and elastic jobs, fresh starts and resumes on any world size all use it.

The position in an epoch is a number of samples (`processed`, all ranks together, in the epoch's order), not a
number of steps, so it keeps its meaning when the world or the batch size changes: whatever world resumes, the
epoch's unprocessed samples are dealt over it exactly once (plus DistributedSampler's padding of a last, short
round). With nothing processed the rule is torch's DistributedSampler (drop_last=False), so an uninterrupted run
reads exactly what a DistributedSampler would give it. torch only: no Horovod, no process group.
"""

from __future__ import annotations

import math

import torch


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's sample order: torch.randperm seeded with seed + epoch, as DistributedSampler draws it."""
    if not shuffle:
        return list(range(num_samples))
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=g).tolist()


def shard_of_rest(
    num_samples: int, seed: int, epoch: int, processed: int, num_replicas: int, rank: int, shuffle: bool = True
) -> list[int]:
    """Rank `rank`'s share of the epoch's samples after the first `processed` (in the epoch's order).

    The rest is dealt round-robin, padded to a multiple of num_replicas by repeating the epoch's first samples, as
    DistributedSampler pads a whole epoch. So with processed = 0, and with `processed` at any step boundary of the
    same world, the shard is exactly what DistributedSampler gives that rank from there: a resume on the world
    that wrote the checkpoint reads what the uninterrupted run read. Batch j of every rank covers positions
    [j*b*n, (j+1)*b*n) of the rest, so `processed` advances by b*n per batch (b: batch size, n: replicas) and stays
    exact across a change of n or b."""
    order = epoch_order(num_samples, seed, epoch, shuffle)
    rest = order[processed:]
    if not rest:
        return []
    total = math.ceil(len(rest) / num_replicas) * num_replicas
    padding = total - len(rest)
    rest += (order * math.ceil(padding / len(order)))[:padding]
    return rest[rank:total:num_replicas]
