"""parallel.shards.shard_of_rest, the one rule of which samples a rank reads: an epoch's unprocessed samples dealt
over the world (torch only)."""

import pytest
from torch.utils.data.distributed import DistributedSampler

from hvdtrain.parallel.shards import epoch_order, shard_of_rest


@pytest.mark.parametrize("n,size", [(1437, 1), (1437, 2), (1437, 3), (10, 4), (3, 5)])
def test_nothing_processed_is_distributed_sampler(n, size):
    for rank in range(size):
        sampler = DistributedSampler(range(n), num_replicas=size, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(4)
        assert shard_of_rest(n, 7, 4, 0, size, rank) == list(sampler)


@pytest.mark.parametrize("n,size,batch", [(1437, 2, 32), (1437, 3, 16), (1437, 4, 7), (10, 4, 1)])
def test_at_a_step_boundary_of_the_same_world_it_is_the_rest_of_distributed_sampler(n, size, batch):
    """What a resume on the world that wrote the checkpoint reads: the uninterrupted run's batches from there on,
    the padding of the last round included."""
    for rank in range(size):
        sampler = DistributedSampler(range(n), num_replicas=size, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        whole = list(sampler)
        for steps in (1, 2, len(whole) // batch):
            assert shard_of_rest(n, 7, 3, steps * batch * size, size, rank) == whole[steps * batch :]


@pytest.mark.parametrize("processed,size", [(64, 1), (64, 3), (1400, 2), (1436, 4)])
def test_the_rest_is_dealt_once_padded_by_the_epochs_start(processed, size):
    n, seed, epoch = 1437, 0, 2
    rest = epoch_order(n, seed, epoch)[processed:]
    shards = [shard_of_rest(n, seed, epoch, processed, size, r) for r in range(size)]
    assert {len(s) for s in shards} == {-(-len(rest) // size)}
    dealt = [i for j in range(len(shards[0])) for s in shards for i in s[j : j + 1]]
    assert dealt[: len(rest)] == rest  # round-robin: position p of the rest goes to rank p % size
    padding = len(dealt) - len(rest)
    order = epoch_order(n, seed, epoch)
    assert dealt[len(rest) :] == order[:padding]  # padding repeats the epoch's first samples, as torch's


def test_everything_processed_leaves_nothing():
    assert shard_of_rest(10, 0, 0, 10, 2, 1) == []
