"""Reference models, all `nn.Sequential` so that model parallelism can split them at any layer.

No BatchNorm: its statistics would depend on the micro-batch size, and pipelined outputs must equal the
unsplit model's exactly.
"""

from __future__ import annotations

import math

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
    """Many equal layers: the shape that benchmarks tensor fusion and balances evenly across stages."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


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
