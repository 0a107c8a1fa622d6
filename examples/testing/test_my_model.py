"""Testing your own distributed code with hvdtrain's pytest plugin (docs/testing.md): a plain `pytest` runs each
test below on 1, 2 and 3 ranks, through hvdtrain's launcher, and checks it against one process.

    pytest examples/testing                    # launches the ranks itself: one job per rank count
    pytest examples/testing --ranks-gloo       # the same through horovodrun's Gloo controller
    hvdtrain run -np 2 -- python -m pytest examples/testing   # in place: only the 2-rank tests run

The model is yours (here a small MLP on scikit-learn's digits); the claim tested is the one data parallelism
makes: N ranks, each on its share of every global batch, end with the weights one process gets on the whole batch.
"""

import pytest
import torch
from torch import nn

from hvdtrain.train import datasets

STEPS = 6
GLOBAL_BATCH = 36  # every rank count tested divides it: each rank's share is the same size


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def global_batches():
    x, y = datasets.digits().train.tensors
    return [
        (x[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH].double(), y[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH])
        for i in range(STEPS)
    ]


def train(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def one_process() -> nn.Module:
    model = make_model()
    return train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), global_batches())


@pytest.mark.ranks([1, 2, 3])
def test_data_parallel_training_equals_one_process(hvd, world):
    model = make_model()
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), named_parameters=model.named_parameters()
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    mine = [(x.chunk(world.size)[world.rank], y.chunk(world.size)[world.rank]) for x, y in global_batches()]
    train(model, optimizer, mine)
    for (name, got), want in zip(model.named_parameters(), one_process().parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=f"{name} on rank {world.rank}")


@pytest.mark.ranks([2, 3])
def test_every_rank_ends_with_the_same_weights(hvd, world):
    """A collective check: each rank compares its weights with rank 0's, and every rank fails alike if any differs
    (world.assert_all), so no rank is left waiting in a collective the others skipped."""
    model = make_model()
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    mine = [(x.chunk(world.size)[world.rank], y.chunk(world.size)[world.rank]) for x, y in global_batches()]
    train(model, optimizer, mine)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    rank0 = hvd.broadcast(flat, root_rank=0, name="rank0.weights")
    world.assert_all(torch.equal(flat, rank0), f"rank {world.rank}'s weights differ from rank 0's")


@pytest.mark.ranks([1, 2, 3])
def test_a_checkpoint_rank_0_writes_is_what_every_rank_reads(hvd, world, rank_tmp_path):
    model = make_model()
    path = rank_tmp_path / "model.pt"  # the same directory on every rank
    if world.rank == 0:
        torch.save(model.state_dict(), path)
    world.barrier()
    loaded = make_model()
    loaded.load_state_dict(torch.load(path))
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
