"""Runs on every rank: ``python -m hvdtrain.bench.updates_worker PLAN.json OUT.json``.

One run of the built-in job (the digits CNN, evaluated after every epoch) with one update rule, optionally with one
worker slowed down (a straggler: after each of its steps it sleeps (factor - 1) x that step's time). Rank 0 writes
the run's curve (test accuracy after each epoch, against training time and step), its throughput and what the
rule exchanged per step (collectives or messages, counted by the rule itself).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hvdtrain.bench.plans import UpdatesWorkerPlan
from hvdtrain.bench.report import write_json
from hvdtrain.errors import rank_main
from hvdtrain.rundir import RunDir
from hvdtrain.train.hooks import Hook


class Straggler(Hook):
    """Slow one worker down by `factor`: after each of its steps, sleep (factor - 1) x the step's time."""

    def __init__(self, factor: float, rank: int):
        self.factor, self.rank = factor, rank
        self._start = 0.0

    def on_step_start(self, trainer) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, trainer) -> None:
        if trainer.rank == self.rank and self.factor > 1:
            time.sleep((self.factor - 1) * (time.perf_counter() - self._start))


class Clock(Hook):
    """Training time as a curve needs it: the wall clock from the first step, less the time spent evaluating (the
    same work in every mode), so accuracy against time is accuracy against training time."""

    def __init__(self):
        self.start = None
        self.paused = 0.0  # evaluations: from an epoch's end to the next step
        self._ended = None
        self.curve: list[dict] = []

    def on_step_start(self, trainer) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        if self._ended is not None:
            self.paused += now - self._ended
            self._ended = None

    def on_epoch_end(self, trainer) -> None:
        self._ended = time.perf_counter()
        self.curve.append({"epoch": trainer.state.epoch + 1, "step": trainer.state.step,
                           "seconds": self._ended - self.start - self.paused})  # fmt: skip


def exchanges(trainer) -> dict:
    """What the rule sent per step, by its own count: collectives (sync, local-sgd) or messages (async)."""
    rule, steps = trainer.update, max(trainer.state.step, 1)
    if rule.name == "local-sgd":
        return {"collectives_per_step": rule.averager.collectives / steps}
    if rule.name == "async":
        return {"messages_per_step": rule.client.messages / steps}
    # Horovod's DistributedOptimizer: one allreduce per gradient tensor (fused into fewer by Horovod).
    return {"collectives_per_step": float(len([p for p in trainer.model.parameters() if p.requires_grad]))}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hvdtrain.bench.updates_worker PLAN.json OUT.json", file=sys.stderr)
        return 2
    from hvdtrain.config import TrainConfig
    from hvdtrain.train.trainer import Trainer

    plan = UpdatesWorkerPlan.from_json(Path(argv[0]).read_text())
    cfg = TrainConfig.from_dict(plan.config)
    clock = Clock()
    trainer = Trainer(cfg, echo=lambda _line: None, hooks=[Straggler(plan.straggler, plan.straggler_rank), clock])
    result = trainer.fit()
    if "parameter_server" in result or trainer.rank != 0:
        return 0
    accuracies = [
        r["test_accuracy"] for r in map(json.loads, RunDir(cfg.run_dir).metrics.read_text().splitlines())
        if "test_accuracy" in r
    ]  # fmt: skip
    # One evaluation per epoch end (the last one is the final evaluation, after the last epoch).
    curve = [{**point, "test_accuracy": acc} for point, acc in zip(clock.curve, accuracies)]
    write_json(Path(argv[1]), {
        "mode": plan.mode, "straggler": plan.straggler, "round": plan.round, "workers": trainer.size,
        "samples_per_s_per_worker": result["samples_per_s"] / trainer.size, "steps": result["steps"],
        "seconds_training": result["seconds_training"], "final_accuracy": result["test_accuracy"],
        "curve": curve, **exchanges(trainer),
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(main, sys.argv[1:]))
