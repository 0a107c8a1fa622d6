"""Hooks: the public way to watch or extend the Trainer's loop without subclassing it.

    class StepTimes(Hook):
        def on_step_end(self, trainer):
            self.stamps.append(time.perf_counter())

    Trainer(cfg, hooks=[StepTimes()]).fit()

Every method is called on every rank, at the same point of the loop, with the Trainer (its `state` holds the
model, optimizer, epoch, step_in_epoch, step and samples_in_epoch; during a step, `batch_indices` holds the
sample indices of its backward passes; `rank` and `size` are this rank's). A hook that runs a collective must do
so on every rank. In an elastic job a worker that joins later starts with on_fit_start while the others are
training, so on_fit_start must not run a collective there; and steps rolled back to the last commit after a
worker failed are taken (and their hooks called) again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from hvdtrain.train.trainer import Trainer


class Hook:
    """Override any of these; the defaults do nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After set-up and restore (state.step is where training starts), before the first step."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before each optimizer step's forward/backward passes."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step; state.step and state.step_in_epoch count it already."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After the last step of an epoch, before evaluation; state.epoch is still the finished epoch."""

    def on_checkpoint(self, trainer: Trainer, path: Optional[Path]) -> None:
        """After a checkpoint was written (path on rank 0, None on the other ranks)."""

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        """After training (finished or preempted), with fit()'s result."""


class Hooks:
    """Calls each hook in order; the Trainer holds one of these."""

    def __init__(self, hooks: Sequence[Hook] = ()):
        self.hooks = list(hooks)

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def call(*args, **kwargs) -> None:
            for hook in self.hooks:
                getattr(hook, name)(*args, **kwargs)

        return call


def load_hooks(refs: Sequence[str]) -> list[Hook]:
    """The hooks of `hvdtrain train --hooks module:Name,...`: each Name is a Hook subclass (instantiated without
    arguments) or a function returning a Hook. Raises ConfigError naming the reference that does not load."""
    import importlib

    from hvdtrain.errors import ConfigError

    out = []
    for ref in refs:
        module_name, _, attr_path = ref.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for attr in attr_path.split("."):
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"--hooks {ref}: cannot load it ({e})") from None
        hook = obj() if isinstance(obj, type) and issubclass(obj, Hook) else obj() if callable(obj) else obj
        if not isinstance(hook, Hook):
            raise ConfigError(f"--hooks {ref}: gave a {type(hook).__name__}, not a hvdtrain.train.hooks.Hook")
        out.append(hook)
    return out
