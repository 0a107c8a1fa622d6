"""Device split and micro-batch pipelining: outputs and gradients equal the unsplit model's."""

import copy

import pytest
import torch
from torch import nn

from hvdtrain.errors import ConfigError
from hvdtrain.parallel.pipeline import Pipeline, balance_by_params, bubble_fraction, split_stages
from hvdtrain.train import models


def deep(seed=0):
    torch.manual_seed(seed)
    return models.deep_mlp((1, 8, 8), 10, hidden=12, depth=3).double()  # 10 layers


def outputs_and_grads(model, x, y):
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "devices,balance,micro",
    [
        (["cpu", "cpu"], None, 1),
        (["cpu", "cpu"], None, 4),
        (["cpu", "cpu"], [1, 9], 3),
        (["cpu", "cpu", "cpu"], [4, 3, 3], 2),
        (["cpu", "cpu", "cpu", "cpu"], None, 8),
        (["cpu"], None, 5),
    ],
)
def test_pipeline_equals_unsplit_model(devices, balance, micro):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)
    ref = deep()
    pipe = Pipeline(copy.deepcopy(ref), devices, balance=balance, micro_batches=micro)
    assert len(pipe.stages) == len(devices)
    out_ref, grads_ref = outputs_and_grads(ref, x, y)
    out, grads = outputs_and_grads(pipe, x, y)
    assert torch.allclose(out, out_ref, atol=1e-6, rtol=0)
    assert len(grads) == len(grads_ref)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_explicit_stage_list():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU()), nn.Linear(8, 10)
    ref = nn.Sequential(copy.deepcopy(a), copy.deepcopy(b))
    pipe = Pipeline([a, b], ["cpu", "cpu"], micro_batches=2)
    x = torch.randn(6, 1, 8, 8)
    assert torch.allclose(pipe(x), ref(x), atol=1e-6)


def test_micro_batches_larger_than_the_batch_still_work():
    ref = deep()
    pipe = Pipeline(copy.deepcopy(ref), ["cpu", "cpu"], micro_batches=8)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(pipe(x), ref(x), atol=1e-6)


@pytest.mark.parametrize(
    "balance,needle",
    [([5, 4], "adding up to the model's 10 layers"), ([10, 0], "at least 1"), ([3, 3, 4], "need 2 stage sizes")],
)
def test_impossible_balance_is_a_clear_error(balance, needle):
    with pytest.raises(ConfigError, match="impossible balance") as e:
        Pipeline(deep(), ["cpu", "cpu"], balance=balance)
    assert needle in str(e.value)


def test_more_devices_than_layers_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot split 2 layers over 3 devices"):
        split_stages(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), 3)


def test_balance_by_params_minimises_the_largest_stage():
    layers = [nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10), nn.ReLU(), nn.Linear(10, 10), nn.Linear(10, 10)]
    sizes = balance_by_params(layers, 2)
    assert sizes == [1, 5]  # the big layer alone; the rest together
    assert sum(balance_by_params(layers, 3)) == len(layers)


def test_bubble_fraction():
    assert bubble_fraction(1, 4) == 0
    assert bubble_fraction(4, 1) == pytest.approx(3 / 4)
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)
