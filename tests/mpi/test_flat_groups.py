"""Flat groups (hvdtrain's Horovod patch: DistributedOptimizer(groups=..., flat_groups=True)) against Horovod's own
groups: a group's gradients live in one buffer reduced in place, and every step must come out bit-identical to
the groups reduced through Horovod's fusion buffer, whatever the loop does to the gradients in between."""

import pytest
import torch
from conftest import batches
from patchcheck import patched, requires_patch
from torch import nn

from hvdtrain.parallel import horovod

# a launch of its own: Horovod's groups hang when made after test_data_parallel's hvd.join() in one process
# (docs/architecture.md, "One grouped allreduce")
pytestmark = pytest.mark.ranks([2, 3], launch="flat-groups")


class Net(nn.Module):
    """Three layers and one that no forward uses: its gradient never comes, as with a user's branch not taken."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
        self.unused = nn.Linear(7, 2)

    def forward(self, x):
        return self.body(x)


def run(hvd, batches, flat, groups=1, passes=1, compression="none", model_zero_grad=False, clip=False):
    model = Net().double()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01),
        named_parameters=model.named_parameters(),
        compression={"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[compression],
        backward_passes_per_step=passes,
        groups=groups,
        flat_groups=flat,
    )
    for x, y in batches:
        # The model's zero_grad drops every .grad (set_to_none): a flat group copies the new ones back in.
        (model.zero_grad if model_zero_grad else opt.zero_grad)()
        for xs, ys in zip(x.chunk(passes), y.chunk(passes)):
            (nn.functional.mse_loss(model(xs), ys) / passes).backward()
        if clip:  # Horovod's documented pattern for gradient clipping
            opt.synchronize()
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
    return model, opt


CASES = {
    "plain": {},
    "three groups": {"groups": 3},
    "accumulation": {"passes": 2},
    "fp16": {"compression": "fp16"},
    "model zero_grad": {"model_zero_grad": True},
    "clip": {"clip": True},
}


@requires_patch
@pytest.mark.parametrize("case", list(CASES))
def test_flat_groups_are_bit_identical_to_horovods_groups(hvd, case):
    assert horovod.flat_groups_supported()
    data = batches(4, per_rank=4, seed=7)
    flat, opt = run(hvd, data, True, **CASES[case])
    fused, _ = run(hvd, data, False, **CASES[case])
    for (name, a), (_, b) in zip(flat.named_parameters(), fused.named_parameters()):
        assert torch.equal(a, b), name
    # The parameters moved, identically on every rank (the unused layer too: weight decay and momentum act on its
    # zero gradient on every rank, as in the per-gradient path).
    first = Net().double()
    assert not torch.equal(flat.body[0].weight, first.body[0].weight)
    assert not torch.equal(flat.unused.weight, first.unused.weight)
    gathered = hvd.allgather(torch.cat([p.detach().flatten() for p in flat.parameters()]).unsqueeze(0))
    assert all(torch.equal(gathered[0], g) for g in gathered)
    # One buffer per group; each .grad a view of its group's buffer again after zero_grad.
    opt.zero_grad()
    expected = CASES[case].get("groups", 1)
    assert len(opt._flat_groups) == expected
    for fg in opt._flat_groups:
        for p in fg.params:
            assert p.grad is not None and p.grad.data_ptr() >= fg.buffer.data_ptr()
            assert p.grad.untyped_storage().data_ptr() == fg.buffer.untyped_storage().data_ptr()
            assert not p.grad.any()


@requires_patch
def test_hvdtrain_groups_are_flat(hvd):
    """hvdtrain's distributed_optimizer turns flat groups on with groups, and off without."""
    model = Net()
    grouped = horovod.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, groups=1)
    assert len(grouped._flat_groups) == 1 and len(grouped._flat_groups[0].params) == 8
    other = Net()
    plain = horovod.distributed_optimizer(torch.optim.SGD(other.parameters(), lr=0.1), other, groups=0)
    assert plain._flat_groups == []


@pytest.mark.skipif(patched(), reason="checks the stock Horovod fallback (scripts/setup.sh --stock-horovod)")
def test_hvdtrain_groups_on_stock_horovod_go_through_its_fusion_buffer(hvd):
    """On a stock Horovod, hvdtrain's distributed_optimizer asks for Horovod's own groups (no flat_groups, which
    stock's DistributedOptimizer does not take), and a grouped step comes out the same on every rank."""
    assert not horovod.flat_groups_supported()
    model = Net().double()
    opt = horovod.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, groups=1)
    assert not hasattr(opt, "_flat_groups")
    for x, y in batches(2, per_rank=4, seed=3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert not torch.equal(model.body[0].weight, Net().double().body[0].weight)
    gathered = hvd.allgather(torch.cat([p.detach().flatten() for p in model.parameters()]).unsqueeze(0))
    assert all(torch.equal(gathered[0], g) for g in gathered)
