"""Update rules: how one step's local gradients become new parameters on every rank.

The Trainer runs forward and backward passes and then calls `rule.step(state)`; everything distributed about
the update lives behind this seam, so a new rule (a sharded optimizer, periodic model averaging, parameter
servers) is one new class here rather than another branch in the loop:

    sync    Horovod's DistributedOptimizer: gradients ring-allreduced (average or Adasum) during backward,
            then every rank takes the same optimizer step.
    sharded the same update with the optimizer state partitioned (ZeRO stage 1, parallel/zero.py): gradients
            reduce-scattered during backward, each rank steps its slice, the slices all-gathered.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from hvdtrain.config import TrainConfig
from hvdtrain.parallel import horovod
from hvdtrain.train.state import TrainState


def optimizer_spec(cfg: TrainConfig, lr: float) -> tuple[type, dict[str, Any]]:
    """The torch optimizer class named by cfg.optimizer and its settings."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {"lr": lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls, {"lr": lr, "weight_decay": cfg.weight_decay}


def base_optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    """The local optimizer named by cfg.optimizer, before any distributed wrapping."""
    cls, kwargs = optimizer_spec(cfg, lr)
    return cls(params, **kwargs)


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

    def restore(self, state: TrainState, saved: Optional[dict[str, Any]]) -> None:
        """Every rank: the model and optimizer of a checkpoint that rank 0 read (`saved`; None on the others)."""
        if saved is not None:
            state.load_weights(saved)
        horovod.broadcast_state(state.model, state.optimizer)

    def optimizer_state(self, optimizer: torch.optim.Optimizer, root_rank: int) -> Optional[dict[str, Any]]:
        """Called on every rank when a checkpoint is written: the optimizer state root_rank will save (None
        elsewhere is allowed). Collective for rules whose state is spread over the ranks."""
        return optimizer.state_dict()

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


class ShardedUpdate(SyncUpdate):
    """The synchronous update with the optimizer state partitioned over the ranks (ZeRO stage 1): the same
    arithmetic as SyncUpdate, 1/N of its optimizer state per rank."""

    name = "sharded"

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        from hvdtrain.parallel.zero import ShardedOptimizer

        cfg = self.cfg
        cls, kwargs = optimizer_spec(cfg, lr)
        return ShardedOptimizer(
            cls, model, compression=cfg.compression, backward_passes_per_step=cfg.backward_passes_per_step, **kwargs
        )

    def restore(self, state: TrainState, saved: Optional[dict[str, Any]]) -> None:
        # Every rank takes its slices of the whole state (rank 0 alone could keep only its own).
        if saved is not None:
            state.model.load_state_dict(saved["model"])
        horovod.broadcast_state(state.model, None)
        whole = horovod.broadcast_object(saved and saved["optimizer"], name="hvdtrain.optimizer_state")
        state.optimizer.load_state_dict(whole)

    def optimizer_state(self, optimizer: torch.optim.Optimizer, root_rank: int) -> Optional[dict[str, Any]]:
        # Consolidated into torch's unsharded format (a checkpoint loads with or without sharding, on any size).
        return optimizer.state_dict(root_rank=root_rank)


def update_rule(cfg: TrainConfig) -> UpdateRule:
    """The rule for this configuration."""
    return ShardedUpdate(cfg) if cfg.shard_optimizer else SyncUpdate(cfg)
