"""The sharded optimizer's layout (pure arithmetic, the same on every rank) and which optimizers it takes."""

import pytest
import torch
from torch import nn

from hvdtrain.errors import ConfigError
from hvdtrain.parallel.zero import check_optimizer, layout


def params(*shapes, requires_grad=True):
    return [nn.Parameter(torch.zeros(*s), requires_grad=requires_grad) for s in shapes]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_every_element_is_owned_by_exactly_one_rank(size):
    groups = [params((5, 3), (5,), (3, 2)), params((4,), (1,))]  # 15 + 5 + 6 = 26 and 4 + 1 = 5 elements
    owned = {}
    for rank in range(size):
        for n, b in enumerate(layout(groups, size, rank, bucket_elements=20)):
            assert b.padded == b.shard * size and b.length <= b.padded < b.length + size
            for piece in b.pieces:
                assert 0 <= piece.at and piece.at + piece.end - piece.start <= b.shard
                for e in range(piece.start, piece.end):
                    key = (piece.index, e)
                    assert key not in owned, f"element {key} owned twice"
                    owned[key] = (rank, n)
    sizes = [15, 5, 6, 4, 1]
    assert sorted(owned) == [(i, e) for i, s in enumerate(sizes) for e in range(s)]


def test_buckets_keep_groups_apart_fill_up_to_the_cap_and_skip_frozen_parameters():
    frozen = params((8,), requires_grad=False)
    groups = [params((10,), (10,), (30,)) + frozen, params((2,))]
    buckets = layout(groups, 2, 0, bucket_elements=20)
    assert [(b.group, b.indices, b.length) for b in buckets] == [(0, [0, 1], 20), (0, [2], 30), (1, [4], 2)]
    # The index of a parameter is its place in the optimizer's order, frozen ones counted (state dict keys).
    assert buckets[2].indices == [4]


def test_a_slice_may_start_inside_a_parameter():
    (b,) = layout([params((3,), (4,))], 2, 1, bucket_elements=100)  # 7 elements, padded to 8: rank 1 has 4..7
    assert [(p.index, p.start, p.end, p.at) for p in b.pieces] == [(1, 1, 4, 0)]
    assert b.shard == 4


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_elementwise_optimizers_are_taken(cls):
    check_optimizer(cls)


@pytest.mark.parametrize(
    "cls,needle",
    [
        (torch.optim.LBFGS, "cannot run LBFGS: it keeps a history of whole flattened gradients"),
        (torch.optim.SparseAdam, "cannot run SparseAdam: it takes sparse gradients"),
        (torch.optim.Adafactor, "cannot run Adafactor: it factors each matrix's second moment"),
    ],
)
def test_optimizers_that_are_not_elementwise_are_refused(cls, needle):
    with pytest.raises(ConfigError, match=needle):
        check_optimizer(cls)


def test_an_unknown_optimizer_needs_to_be_vouched_for():
    class Lamb(torch.optim.Adam):
        pass

    with pytest.raises(ConfigError, match="Lamb is not one hvdtrain knows: pass elementwise=True"):
        check_optimizer(Lamb)
    check_optimizer(Lamb, elementwise=True)
