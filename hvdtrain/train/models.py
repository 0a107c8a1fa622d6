"""Reference models, all `nn.Sequential` so that model parallelism can split them at any layer.

No BatchNorm: its statistics would depend on the micro-batch size, and pipelined outputs must equal the
unsplit model's exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(input_shape, num_classes: int, hidden: int = 64) -> nn.Sequential:
    n_in = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(n_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn(input_shape, num_classes: int, hidden: int = 64) -> nn.Sequential:
    """A small CNN for 8x8 single-channel images (digits): two 3x3 convs, a pool, two linear layers."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * (height // 2) * (width // 2), hidden * 2), nn.ReLU(),
        nn.Linear(hidden * 2, num_classes),
    )  # fmt: skip


def deep_mlp(input_shape, num_classes: int, hidden: int = 64, depth: int = 8) -> nn.Sequential:
    """Many equal layers: the shape that benchmarks tensor fusion and balances evenly across stages.

    Flatten, then depth + 1 pairs of layers (Linear, then LayerNorm + ReLU as one layer), then the output Linear:
    3 + 2 * depth + 1 layers, the Linear ones at 1, 3, ..., 3 + 2 * depth (TrainConfig.layers), and
    2 * (depth + 2) parameter tensors (bench.plans counts them).

    Why not plain Linear + ReLU with PyTorch's default init: that init (weights uniform in +-1/sqrt(fan_in))
    scales a ReLU layer's input-dependent signal by about 1/sqrt(6); after 9 such layers what reaches the output
    is a constant set by the biases, ~0.06 % of it varying with the input, and SGD at the default lr stayed at
    chance (0.10 test accuracy on the digits; Adam 0.50). With Kaiming's init alone the signal reaches the output,
    but a depth of 8 at lr 0.05 with momentum 0.9 (0.1 on 2 ranks) then diverged or died in some seeds.
    So each hidden Linear is followed by a LayerNorm without parameters (per sample: a pipeline's micro-batches
    and the unsplit model compute the same; no parameters: the tensor count and the layers are unchanged) and
    initialised by _init_scaled: see there."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), _norm_relu(hidden)]
    for _ in range(depth):
        layers += [nn.Linear(hidden, hidden), _norm_relu(hidden)]
    layers.append(nn.Linear(hidden, num_classes))  # PyTorch's default init (no LayerNorm after it)
    for layer in layers[:-1]:
        if isinstance(layer, nn.Linear):
            _init_scaled(layer)
    return nn.Sequential(*layers)


def _norm_relu(width: int) -> nn.Sequential:
    """LayerNorm over the features, without parameters, then ReLU: one layer of the model's Sequential."""
    return nn.Sequential(nn.LayerNorm(width, elementwise_affine=False), nn.ReLU())


# A Linear followed by a LayerNorm computes the same whatever its weights' scale; the scale then sets only how
# far an SGD step moves them: the gradient shrinks as 1/|W|, so the step relative to W goes as lr / |W|^2.
# At Kaiming's scale (std sqrt(2 / fan_in)) the default lr 0.05 with momentum 0.9 was still too noisy for 8 layers
# (digits test accuracy 0.92-0.96 over seeds, in a plain loop at batch 32 and at lr 0.1, batch 64 as on 2 ranks);
# at 4 times it, 0.94-0.98 (mean 0.96; mlp's: 0.96-0.98).
INIT_GAIN = 4.0


def _init_scaled(layer: nn.Linear) -> None:
    """Kaiming's normal init times INIT_GAIN, zero bias (drawn from torch's generator: seeded, deterministic)."""
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    with torch.no_grad():
        layer.weight.mul_(INIT_GAIN)
    nn.init.zeros_(layer.bias)


def build(name: str, input_shape, num_classes: int, hidden: int = 64, depth: int = 8) -> nn.Sequential:
    if name == "mlp":
        return mlp(input_shape, num_classes, hidden)
    if name == "cnn":
        if len(input_shape) != 3:
            from hvdtrain.errors import ConfigError

            raise ConfigError(
                f"--model cnn needs image inputs (channels, height, width), got shape {tuple(input_shape)}; use --model mlp"
            )
        return cnn(input_shape, num_classes, hidden)
    return deep_mlp(input_shape, num_classes, hidden, depth)
