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

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from hvdtrain.files import writing
from hvdtrain.rundir import TIMELINE_STEPS_HEADER, RunDir

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


class TimelineRecorder(Hook):
    """--timeline and --timeline-steps A:B: Horovod's (dynamic) timeline of the whole run or of steps A to B
    into `path`, and rank 0's step boundaries beside it (RunDir.timeline_steps: step, start and end in
    microseconds since the epoch, the unit of the timeline's own clock), so that each span falls in its step."""

    def __init__(self, path: Path, window: Optional[tuple[int, int]]):
        self.path = Path(path)
        self.steps_path = RunDir(self.path.parent).timeline_steps
        self.window = window
        self.recording = False
        self.steps_file = None
        self.started_us = 0

    def _start(self, trainer: Trainer) -> None:
        from hvdtrain.parallel import horovod

        horovod.start_timeline(self.path)
        self.recording = True
        if trainer.is_main:
            with writing(self.steps_path):
                self.steps_file = open(self.steps_path, "w")
                self.steps_file.write(TIMELINE_STEPS_HEADER + "\n")

    def _stop(self) -> None:
        from hvdtrain.parallel import horovod

        if self.recording:
            horovod.stop_timeline()
            self.recording = False
        if self.steps_file is not None:
            self.steps_file.close()
            self.steps_file = None

    def on_fit_start(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if self.window is None:
            self._start(trainer)
        elif step >= self.window[1] and trainer.is_main:
            print(f"hvdtrain: --timeline-steps {self.window[0]}:{self.window[1]}: the run starts after step {step}, "
                  "so nothing is recorded", flush=True)  # fmt: skip

    def on_step_start(self, trainer: Trainer) -> None:
        step = trainer.state.step + 1
        if self.window is not None and not self.recording and self.window[0] <= step <= self.window[1]:
            self._start(trainer)
        self.started_us = time.time_ns() // 1000

    def on_step_end(self, trainer: Trainer) -> None:
        if self.steps_file is not None:
            with writing(self.steps_path):
                self.steps_file.write(f"{trainer.state.step},{self.started_us},{time.time_ns() // 1000}\n")
                self.steps_file.flush()
        if self.window is not None and trainer.state.step >= self.window[1]:
            self._stop()

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self._stop()
