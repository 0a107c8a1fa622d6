"""The reference models: deep_mlp carries the input's signal through its depth and learns the digits at the
default optimizer settings (it stayed at chance before); its init is the seed's; the benchmark's descriptions
of its tensors hold."""

import re

import pytest
import torch
from torch import nn

from hvdtrain.bench import plans
from hvdtrain.train import datasets, models


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def deep(depth=8, seed=0, hidden=64):
    torch.manual_seed(seed)
    return models.deep_mlp((1, 8, 8), 10, hidden=hidden, depth=depth)


@pytest.mark.parametrize("depth", [8, 16])
def test_deep_mlp_output_depends_on_the_input_at_init(digits, depth):
    """How much of the output varies across the training images, relative to its size: with PyTorch's default
    init through plain Linear + ReLU layers it was 6e-4 at depth 8 (3e-7 at 16): a constant set by the biases."""
    with torch.no_grad():
        out = deep(depth)(digits.train.tensors[0])
    assert (out.std(0).mean() / out.abs().mean()).item() > 0.1


@pytest.mark.parametrize("lr,batch", [(0.05, 32), (0.1, 64)], ids=["1-rank", "2-rank"])
def test_deep_mlp_learns_the_digits_in_three_epochs(digits, lr, batch):
    """SGD with momentum 0.9 at the default lr 0.05 (and lr 0.1 on a batch of 64, what 2 ranks step with), 3
    epochs, one process: far above chance (0.10, where the default init left it). Under a second."""
    model = deep()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = digits.train.tensors
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for index in torch.randperm(len(x), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            opt.step()
    x_test, y_test = digits.test.tensors
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.75


def test_deep_mlp_init_is_the_seeds():
    a, b, c = deep(seed=0).state_dict(), deep(seed=0).state_dict(), deep(seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])


def test_deep_mlp_is_linear_and_parameter_free_layers_alternating():
    model = deep(depth=3, hidden=12)
    assert isinstance(model, nn.Sequential) and len(model) == 3 + 2 * 3 + 1
    assert [i for i, layer in enumerate(model) if isinstance(layer, nn.Linear)] == [1, 3, 5, 7, 9]
    assert all(not list(model[i].parameters()) for i in (0, 2, 4, 6, 8))


@pytest.mark.parametrize(
    "shape",
    [*plans.MODEL_SHAPES.values(), *plans.TINY_MODEL_SHAPES.values()],
    ids=lambda s: f"{s.model}-{s.hidden}x{s.depth}",
)
def test_the_benchmark_shapes_tensor_counts_are_the_models(shape):
    model = models.build(shape.model, (1, 8, 8), 10, shape.hidden, shape.depth)
    assert f"({len(list(model.parameters()))})" in shape.about


@pytest.mark.parametrize(
    "shape", [*plans.LARGE_MODEL_SHAPES.values(), *plans.TINY_LARGE_MODEL_SHAPES.values()], ids=lambda s: s.about
)
def test_the_benchmark_shapes_parameter_counts_are_the_models(shape):
    model = models.build(shape.model, (1, 8, 8), 10, shape.hidden, shape.depth)
    millions = float(re.match(r"([\d.]+) M parameters", shape.about).group(1))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
