"""Local SGD (parallel.local_sgd.LocalSGD) on real ranks: the averaging schedule the way torch tests its
PeriodicModelAverager (each rank's parameters start equal to its rank: after a scheduled step they equal
mean(range(n)) exactly, and are untouched otherwise), warm-up steps are the synchronous update, and H = 1 with
plain SGD is synchronous data parallelism. Run on 2 and 3 ranks (the
ranks marker: hvdtrain.testing)."""

import pytest
import torch
from conftest import batches
from torch import nn

from hvdtrain.parallel import horovod
from hvdtrain.parallel.local_sgd import LocalSGD

pytestmark = pytest.mark.ranks([2, 3])

STEPS = 20


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()


def flat(model):
    return torch.cat([t.detach().reshape(-1) for t in model.state_dict().values() if t.is_floating_point()])


def gathered(model):
    return horovod.allgather_object(flat(model), name="test.local_sgd.gather")


@pytest.mark.parametrize("every,warmup", [(1, 0), (3, 0), (2, 5), (4, 3)])
def test_schedule_averages_exactly_at_the_scheduled_steps(hvd, every, warmup):
    """lr 0, so only the averaging moves the parameters; in warm-up the gradients are averaged instead."""
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    averager = LocalSGD(model, average_every=every, warmup=warmup, name=f"test.schedule.{every}.{warmup}")
    r, n = float(hvd.rank()), hvd.size()
    mean = sum(range(n)) / n
    averaged = []
    for step in range(1, 16):
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.fill_(r)
            for p in model.parameters():
                p.grad = torch.full_like(p, r)
        averager.step(optimizer)
        params = [*model.parameters(), *[b for b in model.buffers() if b.is_floating_point()]]
        if step <= warmup:
            assert all(torch.equal(p.grad, torch.full_like(p, mean)) for p in model.parameters()), step
            assert all(torch.equal(p, torch.full_like(p, r)) for p in params), step
        elif (step - warmup) % every == 0:
            assert all(torch.equal(p, torch.full_like(p, mean)) for p in params), step
            averaged.append(step)
        else:
            assert all(torch.equal(p, torch.full_like(p, r)) for p in params), step
        assert model[1].num_batches_tracked.item() == 0  # integer buffers are left alone
    assert averaged == [s for s in range(warmup + 1, 16) if (s - warmup) % every == 0]
    assert averager.steps == 15
    assert averager.collectives == min(warmup, 15) + len(averaged)


def train(model, optimizer, data, step):
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        step()


def sync_reference(data, momentum):
    model = make_model()
    optimizer = horovod.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum), model)
    train(model, optimizer, data, optimizer.step)
    return model


def local_sgd(data, momentum, every, warmup):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    averager = LocalSGD(model, average_every=every, warmup=warmup, name=f"test.local.{every}.{warmup}")
    train(model, optimizer, data, lambda: averager.step(optimizer))
    return model, averager


def test_every_step_with_plain_sgd_equals_synchronous_data_parallel(hvd):
    data = batches(STEPS)
    model, _ = local_sgd(data, momentum=0.0, every=1, warmup=0)
    reference = sync_reference(data, momentum=0.0)
    # Parameters; BatchNorm's running statistics are averaged by local SGD, each rank's own under sync.
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_warmup_steps_are_the_synchronous_update_with_momentum(hvd):
    data = batches(STEPS)
    model, averager = local_sgd(data, momentum=0.9, every=4, warmup=STEPS)
    reference = sync_reference(data, momentum=0.9)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    assert averager.in_warmup is False and averager.in_sync


def test_ranks_differ_between_averages_and_agree_after_them(hvd):
    data = batches(STEPS)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    averager = LocalSGD(model, average_every=4, name="test.diverge")
    for step, (x, y) in enumerate(data, start=1):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        averager.step(optimizer)
        views = gathered(model)
        same = all(torch.equal(v, views[0]) for v in views)
        assert same == (step % 4 == 0) == averager.in_sync, step
    # The averaged copy is the mean of the ranks' models and leaves this rank's model alone.
    optimizer.zero_grad()
    nn.functional.mse_loss(model(data[0][0]), data[0][1]).backward()
    optimizer.step()
    averager.steps += 1
    before = flat(model)
    views = gathered(model)
    copy = averager.averaged_state()
    expected = torch.stack(views).mean(0)
    got = torch.cat([v.reshape(-1) for v in copy.values() if v.is_floating_point()])
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert torch.equal(flat(model), before)
