"""The world a Trainer's loop runs in: fixed as launched, or elastic (`hvdtrain train --elastic`).

    FixedWorld    mpirun, srun, horovodrun: the steps are planned once, an epoch's batches are the sampler's, a
                  checkpoint is read by rank 0 and broadcast before the first step (Trainer._restore_or_broadcast)
    ElasticWorld  horovodrun's elastic driver (HOROVOD_ELASTIC=1): the loop runs inside Horovod's elastic loop.
                  Every --commit-every steps and at every epoch end the ranks commit (an in-memory copy of model,
                  optimizer, position and update state); a worker's failure rolls every survivor back to the last
                  commit, a host change is taken at the next commit; then the world is re-formed, the learning rate
                  follows the new world size (when scaled), rank 0's state is broadcast to every worker (new ones
                  included), the rest of the epoch's samples are re-sharded over the new world, and metrics.jsonl
                  records the resize. Nothing before the loop runs a collective: a worker that joins later starts
                  there while the others are in the loop.

The Trainer calls its world where the two differ: plan (the steps for the current world), steps_left_in_epoch,
groups_left (this rank's remaining steps of the epoch), start (the state every rank starts from), run (the loop:
once, or inside Horovod's elastic loop), enter (after every (re)start of it), epoch_done and step_done (where an
elastic world commits).

This module is the Trainer's side of elasticity (what a commit keeps, how a rollback or a new world reaches the
Trainer's state, its records and its progress); parallel/elastic.py stays Horovod's side (a State over callbacks,
hvd.elastic.run, the re-sharding of an epoch's rest), torch and Horovod only and tested on its own, so the
collective layer never learns about the Trainer.
"""

from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import torch

from hvdtrain.errors import ConfigError
from hvdtrain.parallel import elastic as horovod_elastic
from hvdtrain.parallel import horovod, shards
from hvdtrain.train import checkpoint
from hvdtrain.train.reporting import Recorder, ReportWindow
from hvdtrain.train.state import TrainState

if TYPE_CHECKING:
    from hvdtrain.train.trainer import Trainer

T = TypeVar("T")


def world_for(trainer: Trainer) -> FixedWorld:
    """The world of this process: elastic in a worker of horovodrun's elastic driver, else fixed."""
    return ElasticWorld(trainer) if horovod_elastic.enabled() else FixedWorld(trainer)


class FixedWorld:
    """A world that stays as launched."""

    elastic = False

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def steps_for(self, samples: int) -> int:
        """Optimizer steps over `samples` samples shared by the current world (what is left is dropped)."""
        t = self.trainer
        return math.ceil(math.ceil(samples / t.size) / t.cfg.batch_size) // t.cfg.backward_passes_per_step

    def plan(self) -> None:
        """The Trainer's steps_per_epoch and steps_total for the current world size."""
        t = self.trainer
        cfg, n = t.cfg, len(t.data.train)
        t.steps_per_epoch = self.steps_for(n)
        if t.steps_per_epoch == 0:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} x --backward-passes-per-step {cfg.backward_passes_per_step} is more "
                f"than this rank's {math.ceil(n / t.size)} training samples: lower them or use fewer ranks"
            )
        t.steps_total = self._steps_total()
        if cfg.max_steps is not None:
            t.steps_total = min(t.steps_total, cfg.max_steps)

    def _steps_total(self) -> int:
        # What is done, the rest of this epoch on the current world, the epochs after it.
        t = self.trainer
        cfg, s = t.cfg, t.state
        rest = self.steps_for(len(t.data.train) - s.samples_in_epoch) if s.epoch < cfg.epochs else 0
        return s.step + rest + max(0, cfg.epochs - s.epoch - 1) * t.steps_per_epoch

    def steps_left_in_epoch(self) -> int:
        t = self.trainer
        return self.steps_for(len(t.data.train) - t.state.samples_in_epoch)

    def groups_left(self) -> list[list[torch.Tensor]]:
        """This rank's remaining optimizer steps of the epoch under way, each a list of backward passes' indices:
        the samples of the epoch not yet processed, dealt over the current world (parallel.shards.shard_of_rest:
        DistributedSampler's shards when none were; what the uninterrupted run reads on a resume on the same
        world; each of the rest once on another world)."""
        t = self.trainer
        cfg, s, k = t.cfg, t.state, t.cfg.backward_passes_per_step
        mine = shards.shard_of_rest(len(t.data.train), cfg.seed, s.epoch, s.samples_in_epoch, t.size, t.rank)
        batches = list(torch.as_tensor(mine, dtype=torch.long).split(cfg.batch_size))
        return [batches[i : i + k] for i in range(0, self.steps_left_in_epoch() * k, k)]

    def start(self) -> Optional[Path]:
        """Every rank from the same state (a checkpoint's, whose path it returns, or rank 0's fresh weights), and
        the steps planned again from its position."""
        path = self.trainer._restore_or_broadcast()
        self.plan()
        return path

    def run(self, train: Callable[[], T]) -> T:
        """The loop, `train`: once."""
        return train()

    def remove_interrupted_writes(self, say: Callable[[str], None]) -> None:
        """Rank 0, the checkpoints' one writer, before its first write: what a killed write left (see
        checkpoint.remove_interrupted_writes; the run lock keeps any other job's writer away)."""
        if self.trainer.is_main:
            checkpoint.remove_interrupted_writes(self.trainer.run_dir.checkpoints, say)

    def enter(self) -> None:
        """At every (re)start of the loop."""

    def epoch_done(self) -> None:
        """After an epoch's last step (the state has moved on to the next epoch)."""

    def step_done(self) -> None:
        """After a step and its report and checkpoint."""


class ElasticWorld(FixedWorld):
    """A world that changes while the job runs (parallel.elastic): workers come and go, training goes on."""

    elastic = True

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        self.commits: Optional[horovod_elastic.Commits] = None
        self.world: Optional[tuple[int, list[str]]] = None  # (size, hosts) at the last (re)start
        self.steps_lost = 0  # by the last rollback, until a resize record reports them

    def remove_interrupted_writes(self, say: Callable[[str], None]) -> None:
        """Not in an elastic job: rank 0 changes with the world, so no rank knows that no other is writing."""

    def start(self) -> Optional[Path]:
        """A start from a checkpoint without a collective: the worker that is rank 0 at the start loads it
        (jobs.preflight has checked it); the elastic loop's first sync gives it to every worker."""
        t = self.trainer
        path = checkpoint.resume_path(t.cfg, t.slurm)
        if path is None or not t.is_main:
            return path
        saved = t.read_checkpoint(path)
        t.state.load_weights(saved)
        t.state.position = t._position_of(saved)
        t.update.load_state_dict(saved.get("update", {}))
        t.restore_rng(saved["rng"])
        return path

    def run(self, train: Callable[[], T]) -> T:
        """`train` inside Horovod's elastic loop, again after every reset."""
        self.commits = horovod_elastic.Commits(self._snapshot, self._rollback, self._broadcast)
        self.commits.register_reset_callbacks([self._on_reset])
        return horovod_elastic.run(self.commits, train)

    def epoch_done(self) -> None:
        self.plan()
        self.commits.commit()

    def step_done(self) -> None:
        if self.trainer.state.step % self.trainer.cfg.commit_every == 0:
            self.commits.commit()  # raises HostsUpdatedInterrupt when hosts changed

    def _snapshot(self) -> dict[str, Any]:
        """What a commit keeps (copies): a checkpoint's model, optimizer and position, and the update rule's state."""
        t = self.trainer
        return copy.deepcopy({**t.state.to_checkpoint(), "update": t.update.state_dict()})

    def _rollback(self, saved: dict[str, Any]) -> None:
        """After a worker failed: back to the last commit (the steps since are lost and run again)."""
        t = self.trainer
        self.steps_lost = t.state.step - saved["step"]
        t.state.load_weights(saved)
        t.state.position = TrainState.position_in(saved)
        t.update.load_state_dict(saved["update"])

    def _broadcast(self) -> None:
        """Rank 0's model, optimizer, position and update state to every worker (after a reset, and at the
        start: a new worker gets the state of the running ones)."""
        t = self.trainer
        horovod.broadcast_state(t.model, t.state.optimizer)
        position, update = horovod.broadcast_object(
            (t.state.position, t.update.state_dict()), name="hvdtrain.elastic_position"
        )
        t.state.position = position
        t.update.load_state_dict(update)

    def _on_reset(self) -> None:
        """The world was re-formed (on the workers that were in it before; no collective here: new workers are
        not in this callback). The learning rate follows the new world size (enter reads it back)."""
        t = self.trainer
        t.lr = t.update.learning_rate()
        for group in t.state.optimizer.param_groups:
            group["lr"] = t.lr

    def enter(self) -> None:
        """Every worker, after every (re)start of the elastic loop: who is who now, the plan for the current world
        size, and (rank 0) a resize record in metrics.jsonl with the hosts before and after."""
        t = self.trainer
        t.rank, t.size = t.placement.replica()
        t.is_main = t.rank == 0
        t.lr = t.state.optimizer.param_groups[0]["lr"]
        # The name the driver knows this worker's host by (discovery's), else the host's own name.
        me = os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
        hosts = sorted(horovod.allgather_object(me, name="hvdtrain.elastic_hosts"))
        if t.is_main and not t.recorder.enabled:  # rank 0's host was lost: this worker now writes the records
            t.recorder = Recorder(t.run_dir, True, t._echo)
        elif not t.is_main and t.recorder.enabled:
            t.recorder.close()
            t.recorder = Recorder(t.run_dir, False, t._echo)
        t.progress.enabled = t.is_main
        self.plan()
        t.progress.total = t.steps_total
        t.window = ReportWindow(t.cfg.log_every)  # a sum started before the reset is gone with the old world
        print(f"hvdtrain: elastic: this worker is rank {t.rank} of {t.size} from step {t.state.step}", flush=True)
        previous, self.world = self.world, (t.size, hosts)
        if previous is None:
            s = t.state
            t.recorder.record({"event": "elastic_start", "step": s.step, "epoch": s.epoch, "size": t.size,
                               "hosts": hosts})  # fmt: skip
        elif previous != self.world:
            self._record_resize(previous, hosts)

    def _record_resize(self, previous: tuple[int, list[str]], hosts: list[str]) -> None:
        """The world changed: a resize record (rank 0) and a line saying it."""
        t, s = self.trainer, self.trainer.state
        lost, self.steps_lost = self.steps_lost, 0
        t.recorder.record(
            {"event": "resize", "step": s.step, "epoch": s.epoch, "samples_in_epoch": s.samples_in_epoch,
             "old_size": previous[0], "new_size": t.size, "old_hosts": previous[1], "hosts": hosts,
             "steps_redone": lost, "lr": t.lr}
        )  # fmt: skip
        t.progress.say(
            f"elastic: {previous[0]} -> {t.size} ranks at step {s.step} (epoch {s.epoch + 1}, "
            f"{s.samples_in_epoch} of its samples done; hosts {', '.join(hosts)}); "
            f"{lost} uncommitted step(s) run again, lr {t.lr:g}"
        )
