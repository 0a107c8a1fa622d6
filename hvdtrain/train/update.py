"""Update rules: how one step's local gradients become new parameters on every rank.

The Trainer runs forward and backward passes and then calls `rule.step(state)`; everything distributed about
the update lives behind this seam, so a new rule (a sharded optimizer, periodic model averaging, parameter
servers) is one new class here rather than another branch in the loop:

    sync    Horovod's DistributedOptimizer: gradients ring-allreduced (average or Adasum) during backward,
            then every rank takes the same optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hvdtrain.config import TrainConfig
from hvdtrain.parallel import horovod
from hvdtrain.train.state import TrainState


def base_optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    """The local optimizer named by cfg.optimizer, before any distributed wrapping."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


class UpdateRule:
    """The interface; subclasses override what differs."""

    name = "base"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def learning_rate(self) -> float:
        """The learning rate the optimizer runs with (after any scaling with the world size)."""
        return self.cfg.lr

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer the loop calls zero_grad/step on, and whose state_dict a checkpoint holds."""
        return base_optimizer(self.cfg, model.parameters(), lr)

    def step(self, state: TrainState) -> None:
        """Turn the gradients of the passes just run into new parameters."""
        state.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state for a checkpoint (e.g. a schedule position); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SyncUpdate(UpdateRule):
    """Synchronous data parallelism: w <- w - lr * mean_i grad_i, the allreduce overlapped with backward."""

    name = "sync"

    def learning_rate(self) -> float:
        # Linear lr scaling with the effective batch; Adasum adapts by itself and needs none.
        cfg = self.cfg
        return horovod.scaled_lr(cfg.lr, cfg.scale_lr and cfg.reduce_op == "average", cfg.backward_passes_per_step)

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg
        return horovod.distributed_optimizer(
            super().make_optimizer(model, lr), model, cfg.compression, cfg.backward_passes_per_step, cfg.reduce_op
        )


def update_rule(cfg: TrainConfig) -> UpdateRule:
    """The rule for this configuration (only sync today)."""
    return SyncUpdate(cfg)
