"""TrainState: what the loop advances, a checkpoint saves, and a resume or an elastic reset restores.

The epoch's order is a pure function of (seed, epoch), and the position in it is the number of the epoch's
samples processed by all ranks together (`samples_in_epoch`): whatever world reads on (a resume on another world
size, an elastic resize) is dealt the rest (parallel.shards). `step` counts optimizer steps over the run;
`step_in_epoch` those of the epoch under way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn


@dataclasses.dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # the epoch under way (0-based)
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    step: int = 0  # optimizer steps done in the run
    samples_in_epoch: int = 0  # samples of that epoch processed, all ranks together, in the epoch's order

    def advance(self) -> None:
        """One optimizer step was taken."""
        self.step += 1
        self.step_in_epoch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.samples_in_epoch = 0

    @property
    def position(self) -> tuple[int, int, int, int]:
        return self.epoch, self.step_in_epoch, self.step, self.samples_in_epoch

    @position.setter
    def position(self, value: tuple[int, int, int, int]) -> None:
        self.epoch, self.step_in_epoch, self.step, self.samples_in_epoch = value

    def to_checkpoint(self) -> dict[str, Any]:
        """The model, optimizer and position entries of a checkpoint (an elastic commit's copy; the Trainer's
        checkpoint files take model and optimizer from the update rule, which may gather them)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self.position_entries(),
        }

    def position_entries(self) -> dict[str, int]:
        """The position entries of a checkpoint."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "samples_in_epoch": self.samples_in_epoch,
        }

    @staticmethod
    def position_in(checkpoint: dict[str, Any]) -> tuple[int, int, int, Optional[int]]:
        """The (epoch, step_in_epoch, step, samples_in_epoch) a checkpoint written by to_checkpoint holds;
        samples_in_epoch is None in checkpoints written before it was recorded."""
        c = checkpoint
        return c["epoch"], c["step_in_epoch"], c["step"], c.get("samples_in_epoch")

    def load_weights(self, checkpoint: dict[str, Any]) -> None:
        """Model and optimizer from a checkpoint (rank 0 reads the file; the others receive a broadcast)."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
