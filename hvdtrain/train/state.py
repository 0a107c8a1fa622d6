"""TrainState: what the loop advances, a checkpoint saves and a resume (or, later, an elastic reset) restores.

The sampler's order is a pure function of (seed, epoch), so (epoch, step_in_epoch) is the whole position in
the data; `step` counts optimizer steps over the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # the epoch under way (0-based)
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    step: int = 0  # optimizer steps done in the run

    def advance(self) -> None:
        """One optimizer step was taken."""
        self.step += 1
        self.step_in_epoch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    @property
    def position(self) -> tuple[int, int, int]:
        return self.epoch, self.step_in_epoch, self.step

    @position.setter
    def position(self, value: tuple[int, int, int]) -> None:
        self.epoch, self.step_in_epoch, self.step = value

    def to_checkpoint(self) -> dict[str, Any]:
        """The model, optimizer and position entries of a checkpoint (the Trainer adds RNGs and checks)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
        }

    @staticmethod
    def position_in(checkpoint: dict[str, Any]) -> tuple[int, int, int]:
        """The (epoch, step_in_epoch, step) a checkpoint written by to_checkpoint holds."""
        return checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["step"]

    def load_weights(self, checkpoint: dict[str, Any]) -> None:
        """Model and optimizer from a checkpoint (rank 0 reads the file; the others receive a broadcast)."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
