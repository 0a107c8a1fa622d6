"""Local SGD (periodic model averaging, post-local SGD): every rank steps its own optimizer on its own data, and
every H steps the parameters are averaged over the ranks with one grouped allreduce:

    theta  <-  (1/N) sum_i theta_i          after local steps W+H, W+2H, ...  (W warm-up steps, H = average_every)

During the first W steps (warm-up) the gradients are averaged before each step instead, so those steps are the
synchronous update (w <- w - lr * mean_i grad_i), as torch's PostLocalSGDOptimizer does. With plain SGD and H = 1
local SGD is the synchronous update too: mean_i(w - lr g_i) = w - lr mean_i g_i.

What is averaged: every parameter and every floating-point buffer (BatchNorm's running mean and variance);
integer buffers (BatchNorm's num_batches_tracked) are the same on every rank and are left alone. The optimizer
state (momentum, Adam's moments) stays local: it is each rank's own running statistic of its own gradients, and
averaging it would add a second collective of 1-2x the model per period for no change in the update rule (torch's
averagers and Horovod PR #2699 keep it local as well).

    averager = LocalSGD(model, average_every=4, warmup=100)
    ...
    loss.backward()
    averager.step(optimizer)      # warm-up: gradients averaged, then the step; after: the local step, and every
                                  # 4th one the parameters averaged
"""

from __future__ import annotations

from typing import Any

import horovod.torch as hvd
import torch
from torch import nn


def averaged_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What an averaging round reduces: the parameters and the floating-point buffers, in a fixed order."""
    params = [p for p in model.parameters()]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return params + buffers


class LocalSGD:
    """The schedule and the collectives of local SGD for one model; `steps` (local steps taken) is its position,
    saved with state_dict() so that a resumed run averages at the same steps as an uninterrupted one."""

    def __init__(self, model: nn.Module, average_every: int, warmup: int = 0, name: str = "hvdtrain.local_sgd"):
        if average_every < 1:
            raise ValueError(f"average_every must be at least 1, not {average_every}")
        if warmup < 0:
            raise ValueError(f"warmup must not be negative, not {warmup}")
        self.model = model
        self.average_every = average_every
        self.warmup = warmup
        self.name = name
        self.steps = 0  # local optimizer steps taken (warm-up included)
        self.synced_at = 0  # the step after which the ranks' models were last made equal
        self.collectives = 0  # grouped allreduces run (gradients in warm-up, parameters after)

    @property
    def in_warmup(self) -> bool:
        return self.steps < self.warmup

    def due(self, steps: int) -> bool:
        """Whether the parameters are averaged right after local step number `steps` (1-based)."""
        return steps > self.warmup and (steps - self.warmup) % self.average_every == 0

    @property
    def in_sync(self) -> bool:
        """True when every rank holds the same parameters: in warm-up, or right after an average."""
        return self.steps <= self.warmup or self.synced_at == self.steps

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimizer step of local SGD (call after backward, instead of optimizer.step())."""
        if self.in_warmup and hvd.size() > 1:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            hvd.grouped_allreduce_(grads, op=hvd.Average, name=f"{self.name}.grads")
            self.collectives += 1
        optimizer.step()
        self.steps += 1
        if self.due(self.steps):
            self.average()

    @torch.no_grad()
    def average(self) -> None:
        """theta <- mean over the ranks of theta, in place, for the parameters and floating-point buffers."""
        self.synced_at = self.steps
        if hvd.size() > 1:
            hvd.grouped_allreduce_([t.data for t in averaged_tensors(self.model)], op=hvd.Average,
                                   name=f"{self.name}.params")  # fmt: skip
            self.collectives += 1

    @torch.no_grad()
    def averaged_state(self) -> dict[str, torch.Tensor]:
        """Collective: the model's state_dict with the averaged values, leaving this rank's model as it is (what
        evaluation and checkpoints use between averaging steps)."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if hvd.size() > 1:
            floating = [k for k, v in state.items() if v.is_floating_point()]
            hvd.grouped_allreduce_([state[k] for k in floating], op=hvd.Average, name=f"{self.name}.copy")
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "average_every": self.average_every, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any], in_sync: bool = True) -> None:
        """The schedule's position; in_sync: whether every rank was given the same parameters (a broadcast)."""
        self.steps = int(state["steps"])
        self.synced_at = self.steps if in_sync else -1
