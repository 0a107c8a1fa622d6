"""Model parallelism by device split, with GPipe-style micro-batch pipelining.

`Pipeline(model, devices, balance=None, micro_batches=m)` cuts an `nn.Sequential` (or takes an explicit
list of stages) into len(devices) consecutive stages, stage i living on devices[i]. A batch is cut into m
micro-batches that go through the stages in clock order (at clock t, stage j works on micro-batch t - j), so
on CUDA devices, whose kernels run asynchronously, stage j+1 computes micro-batch i while stage j computes
micro-batch i+1. Outputs are concatenated on the last device. Autograd carries the backward pass back
through the same device hops. Results equal the unsplit model's (up to float summation order), provided the
layers treat samples independently (no BatchNorm in training mode).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from hvdtrain.errors import ConfigError

DeviceLike = Union[str, torch.device]


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balance_by_params(layers: Sequence[nn.Module], parts: int) -> list[int]:
    """Split consecutive layers into `parts` non-empty groups minimising the largest group's parameter count.

    Parameter-free layers (activations, pooling) weigh a little so they do not all pile into one group; when
    there are at least `parts` layers with parameters, every group gets one (a stage without parameters has
    nothing to train: a pipeline's optimizer would have no parameters). Exact dynamic programme over split
    points: O(parts * n^2), n is small.
    """
    n = len(layers)
    if parts > n:
        raise ConfigError(f"cannot split {n} layers over {parts} devices: give at most {n} devices or a deeper model")
    weights = [param_count(layer) + 1 for layer in layers]
    prefix, holders = [0], [0]  # holders: layers with parameters among the first i
    for layer, w in zip(layers, weights):
        prefix.append(prefix[-1] + w)
        holders.append(holders[-1] + (param_count(layer) > 0))
    each_holds = holders[-1] >= parts
    inf = float("inf")
    # best[k][i]: the smallest possible max-group weight putting the first i layers into k groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                if each_holds and holders[i] == holders[j]:
                    continue
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    sizes, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def split_stages(
    model: Union[nn.Sequential, Sequence[nn.Module]], parts: int, balance: Optional[Sequence[int]] = None
) -> list[nn.Module]:
    """Cut a Sequential into `parts` stages (by `balance`, else by parameter count); a list of stages is used as is."""
    if not isinstance(model, nn.Sequential):
        stages = list(model)
        if len(stages) != parts:
            raise ConfigError(f"{len(stages)} explicit stages given for {parts} devices: give one stage per device")
        if balance is not None:
            raise ConfigError("balance applies to an nn.Sequential, not to a list of explicit stages")
        return stages
    layers = list(model.children())
    if balance is None:
        balance = balance_by_params(layers, parts)
    balance = list(balance)
    if len(balance) != parts or any(b < 1 for b in balance) or sum(balance) != len(layers):
        raise ConfigError(
            f"impossible balance {balance}: need {parts} stage sizes, each at least 1, adding up to the "
            f"model's {len(layers)} layers"
        )
    stages, start = [], 0
    for size in balance:
        stages.append(nn.Sequential(*layers[start : start + size]))
        start += size
    return stages


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


class Pipeline(nn.Module):
    """An nn.Module whose stages live on different devices, run as a GPipe micro-batch pipeline."""

    def __init__(
        self,
        model: Union[nn.Sequential, Sequence[nn.Module]],
        devices: Sequence[DeviceLike],
        balance: Optional[Sequence[int]] = None,
        micro_batches: int = 1,
    ):
        super().__init__()
        if not devices:
            raise ConfigError("a pipeline needs at least one device")
        if micro_batches < 1:
            raise ConfigError(f"micro_batches={micro_batches}: must be at least 1")
        self.devices = [torch.device(d) for d in devices]
        self.micro_batches = micro_batches
        stages = split_stages(model, len(self.devices), balance)
        self.stages = nn.ModuleList(stage.to(dev) for stage, dev in zip(stages, self.devices))
        self.balance = [len(list(s.children())) if isinstance(s, nn.Sequential) else 1 for s in stages]
        if isinstance(model, nn.Sequential):
            # Its state_dict is the unsplit model's (the layers' own names, not stages.j.i): a checkpoint of a device
            # pipeline resumes on any strategy, and theirs on it. (Old keys, stages.j.i, still load.)
            layer_names = iter(name for name, _ in model.named_children())
            self._unsplit = {f"stages.{j}.{i}": next(layer_names) for j, n in enumerate(self.balance) for i in range(n)}
            self._split = {v: k for k, v in self._unsplit.items()}
            self._register_state_dict_hook(_unsplit_names)
            self._register_load_state_dict_pre_hook(_split_names, with_module=True)

    @property
    def input_device(self) -> torch.device:
        return self.devices[0]

    @property
    def output_device(self) -> torch.device:
        return self.devices[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = min(self.micro_batches, x.shape[0])
        chunks = list(x.chunk(m)) if m > 1 else [x]
        p = len(self.stages)
        acts: list = [None] * len(chunks)
        for clock in range(len(chunks) + p - 1):
            # Every (stage, micro-batch) pair of one tick is independent: stage j takes the activation
            # stage j-1 made for micro-batch i at the previous tick.
            for j in range(min(p - 1, clock), -1, -1):
                i = clock - j
                if i >= len(chunks):
                    continue
                inp = chunks[i] if j == 0 else acts[i]
                acts[i] = self.stages[j](_to(inp, self.devices[j]))
        return torch.cat(acts) if len(acts) > 1 else acts[0]


def _rename(state: dict, prefix: str, names: dict[str, str], depth: int) -> None:
    """Rename, in place and in order, the keys prefix + A.B.rest whose first `depth` parts are a key of `names`."""
    items = list(state.items())
    state.clear()
    for key, value in items:
        if key.startswith(prefix):
            parts = key[len(prefix) :].split(".", depth)
            head = ".".join(parts[:depth])
            if head in names and len(parts) > depth:
                key = f"{prefix}{names[head]}.{parts[depth]}"
        state[key] = value


def _unsplit_names(module: Pipeline, state: dict, prefix: str, _metadata) -> None:
    _rename(state, prefix, module._unsplit, 3)  # stages.j.i


def _split_names(module: Pipeline, state: dict, prefix: str, *_args) -> None:
    _rename(state, prefix, module._split, 1)


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle fraction of a GPipe schedule: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)
