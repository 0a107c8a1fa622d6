"""The Trainer: the training loop every built-in job runs on every rank, on top of hvdtrain.parallel.

    Trainer(cfg).fit()                                   # the built-in job (digits CNN by default)
    Trainer(cfg, model=my_sequential, dataset=my_data, hooks=[my_hook]).fit()

    fit -> _run_epoch -> _train_step
      TrainState   model, optimizer, epoch, step_in_epoch, step      (train/state.py)
      UpdateRule   how a step's gradients become parameters: sync, sharded, local-sgd (train/update.py)
      ReportWindow loss/samples/preemption votes summed every log_every steps, overlapped (train/reporting.py)
      Hooks        on_fit_start, on_step_start/end, on_epoch_end, on_checkpoint, on_fit_end (train/hooks.py)

One process per rank. Rank 0 alone writes the shared files of the run directory (metrics.jsonl, TensorBoard
events, result.json, checkpoints/; config.json is written by the launching side, or here when the Trainer is
used as a library); every rank writes its own log (the launcher's per-rank wrapper does that). Every
distributed operation goes through `hvdtrain.parallel.horovod` (Horovod).

Exact resume: a checkpoint holds the model and optimizer, the epoch, the number of steps done in that epoch
(the sampler order is a pure function of seed and epoch, so the position is enough), and every rank's RNG
states. Resuming restores all of it, so a run interrupted at any checkpoint and resumed ends bitwise equal to
an uninterrupted one in deterministic mode on CPU.

Elastic (launched by `hvdtrain train --elastic`, HOROVOD_ELASTIC=1): the loop runs inside Horovod's elastic
loop (hvdtrain.parallel.elastic). Every --commit-every steps and at every epoch end the ranks commit (an
in-memory copy of model, optimizer, position and update state); a worker's failure rolls every survivor back
to the last commit, a host change is taken at the next commit; then the world is re-formed, the learning rate
follows the new world size (when scaled), rank 0's state is broadcast to every worker (new ones included), the
rest of the epoch's samples are re-sharded over the new world, and metrics.jsonl records the resize. Nothing
before the loop runs a collective: a worker that joins later starts there while the others are in the loop.

Pipeline (--strategy pipeline, parallel.pipe): each rank holds one stage of a replica; self.rank and self.size
are then the replica's index and the number of replicas (what the data shards, the steps, the learning rate and
a checkpoint's world size follow), the steps run the stage's schedule (_pipeline_passes), the last stage alone
has the loss and the outputs (the other stages add zeros to the sums), and checkpoints are gathered into the
data-parallel format (train.update.PipelineUpdate).

Preemption: the preempt signal (USR2 by default, what `sbatch --signal` sends before the time limit) only
sets a flag. The ranks' votes travel in the reporting window's sum every log_every steps (one allreduce,
started after that step and read after the next, so it costs no extra round); every rank reads the same
answer after the same step, checkpoints it and stops; inside Slurm rank 0 then requeues the job, and the
requeued job resumes from that checkpoint by itself.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import random
import resource
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from hvdtrain import preempt
from hvdtrain.config import (
    ASYNC_NOT_ELASTIC,
    GROUPS_NOT_ELASTIC,
    PIPELINE_NOT_ELASTIC,
    SHARDED_NOT_ELASTIC,
    TIMELINE_NOT_ELASTIC,
    TrainConfig,
)
from hvdtrain.env import SlurmEnv, rank_info
from hvdtrain.errors import CheckpointError, ConfigError
from hvdtrain.files import write_json
from hvdtrain.parallel import elastic, horovod
from hvdtrain.rundir import RunDir
from hvdtrain.startup import Startup
from hvdtrain.train import checkpoint, datasets, models
from hvdtrain.train.hooks import Hook, Hooks, TimelineRecorder
from hvdtrain.train.reporting import Progress, Recorder, ReportWindow
from hvdtrain.train.state import TrainState
from hvdtrain.train.update import update_rule


def params_sha256(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """A fingerprint of the parameters' exact bits (what the resume tests compare), of a model or its state_dict."""
    h = hashlib.sha256()
    state = model if isinstance(model, dict) else model.state_dict()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train `model` (default: the reference model named by cfg.model) on `dataset` (default: cfg.data).

    model: an nn.Sequential (required for the model/hybrid/pipeline strategies, which split it) or any nn.Module
    (data).
    dataset: a hvdtrain.train.datasets.Dataset (train/test TensorDatasets, input shape, number of classes).
    loss_fn: defaults to cross entropy. hooks: hvdtrain.train.hooks.Hook instances, called on every rank.
    Returns from fit(): a dict of the run's results.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: Optional[nn.Module] = None,
        dataset: Optional[datasets.Dataset] = None,
        loss_fn: Optional[Callable] = None,
        echo: Callable[[str], None] = print,
        hooks: Sequence[Hook] = (),
    ):
        self.cfg = cfg.validate(check_data=dataset is None).with_defaults()
        self._user_model = model
        self._user_dataset = dataset
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self._echo = echo
        self.run_dir = RunDir(self.cfg.run_dir)
        if self.cfg.records_timeline:  # first: its step boundaries exclude the other hooks' work
            hooks = [TimelineRecorder(self.run_dir.timeline, self.cfg.timeline_window()), *hooks]
        self.hooks = Hooks(hooks)
        self.startup = Startup()  # time to the first step, in phases (hvdtrain.startup)

    # ------------------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        self.startup.mark("imports")
        self.grid = self._grid()
        horovod.init(
            deterministic=cfg.deterministic,
            group=self._workers(),
            parts=self.grid and self.grid.stage_sets(),
            timeline=cfg.records_timeline,
            autotune_log=self.run_dir.autotune if cfg.autotune else None,
        )
        self.startup.mark("hvd.init")
        # In an async job: this rank's place among the workers (a server's: its place in the job).
        self.rank, self.size = horovod.rank(), horovod.size()
        self.is_main = self.rank == 0
        self.stage = None  # a pipeline's: this rank's parallel.pipe.Stage
        if self.grid is not None:  # the data-parallel place: this rank's replica, and how many there are
            self.rank, self.size = self.grid.replica_of(self.rank), self.grid.replicas
        self.elastic = elastic.enabled()
        for setting, message in [
            (cfg.shard_optimizer, SHARDED_NOT_ELASTIC),
            (cfg.update == "async", ASYNC_NOT_ELASTIC),
            (cfg.strategy == "pipeline", PIPELINE_NOT_ELASTIC),
            (cfg.records_timeline, TIMELINE_NOT_ELASTIC),
            (bool(cfg.grad_groups), GROUPS_NOT_ELASTIC),
        ]:
            if self.elastic and setting:
                raise ConfigError(message)
        if cfg.strategy == "model" and self.size > 1:
            raise ConfigError(
                f"--strategy model runs one replica on one rank, but this job has {self.size} ranks: "
                "use -np 1, or --strategy hybrid for data parallelism across model-parallel replicas"
            )
        self.data = self._user_dataset or datasets.load(cfg.data, cfg.synthetic_samples, cfg.seed)
        self.startup.mark("data")
        # Same seed on every rank for the initial weights (rank 0's are broadcast anyway).
        seed_everything(cfg.seed)
        model = self._place(
            self._user_model
            or models.build(cfg.model, self.data.input_shape, self.data.num_classes, cfg.hidden, cfg.depth)
        )
        global_rank, world_size = horovod.world()
        # From here on each rank draws its own random numbers (dropout): seed + rank.
        seed_everything(cfg.seed + global_rank)
        self.update = update_rule(
            cfg, world_size=world_size, rank=global_rank, stage=self.stage, builtin_model=self._user_model is None
        )
        self.lr = self.update.learning_rate()
        self.state = TrainState(model, self.update.make_optimizer(model, self.lr))
        self.sampler = horovod.sampler(self.data.train, shuffle=True, seed=cfg.seed, replica=(self.rank, self.size))
        # An elastic job resumes on any world size: its position counts samples, not steps.
        self.fingerprint = checkpoint.fingerprint(cfg, None if self.elastic else self.size)
        self.startup.mark("model")

    def _workers(self) -> Optional[list[int]]:
        """An async job's worker ranks (the group every collective of the loop runs over); None: every rank."""
        cfg = self.cfg
        if cfg.update != "async":
            return None
        from hvdtrain.parallel.ps import roles

        size = rank_info().size
        cfg.data_ranks(size)  # raises when the servers leave no worker
        return roles(size, cfg.ps_ranks)[0]

    def _grid(self):
        """A pipeline's ranks as replicas of stages (parallel.grid.Grid); None for the other strategies."""
        if self.cfg.strategy != "pipeline":
            return None
        from hvdtrain.parallel.grid import Grid

        size = rank_info().size
        self.cfg.data_ranks(size)  # raises when the stages do not divide the ranks
        return Grid(size, self.cfg.stages)

    @property
    def model(self) -> nn.Module:
        """The model being trained (the state's: a resume or a reset replaces it there)."""
        return self.state.model

    def _place(self, model: nn.Module) -> nn.Module:
        """This rank's device (data), or a pipeline over its k devices (model, hybrid)."""
        if self.cfg.strategy == "data":
            self.in_device = self.out_device = horovod.device()
            return model.to(self.in_device)
        if self.cfg.strategy == "pipeline":
            return self._stage_of(model)
        from hvdtrain.parallel.hybrid import devices_for_rank
        from hvdtrain.parallel.pipeline import Pipeline

        cfg = self.cfg
        devices = devices_for_rank(horovod.local_rank(), horovod.local_size(), cfg.devices_per_rank)
        pipeline = Pipeline(model, devices, balance=cfg.balance, micro_batches=cfg.micro_batches)
        self.in_device, self.out_device = pipeline.input_device, pipeline.output_device
        return pipeline

    def _stage_of(self, model: nn.Module) -> nn.Module:
        """A pipeline: this rank's stage of the model (the neighbours agree on the shapes between them)."""
        from mpi4py import MPI  # after hvd.init, which initialised MPI for threads

        from hvdtrain.parallel.pipe import Stage

        cfg, x = self.cfg, self.data.train.tensors[0]
        self.in_device = self.out_device = horovod.device()
        # A communicator of the pipeline's own; left to MPI_Finalize (freeing one while Horovod runs crashed MPI).
        self.stage = Stage.build(
            model, self.grid, MPI.COMM_WORLD.Dup(), x.shape[1:], x.dtype, cfg.balance, cfg.schedule,
            cfg.micro_batches, self.in_device,
        )  # fmt: skip
        st = self.stage
        first, layers = st.bounds[st.index][:2]
        print(
            f"hvdtrain: pipeline: this rank is {self.grid.role(st.rank)} (layers {first}-{first + layers - 1}; "
            f"{self.grid.stages} stages, {self.grid.replicas} replica(s))",
            flush=True,
        )
        return st.module

    def _steps_for(self, samples: int) -> int:
        """Optimizer steps over `samples` samples shared by the current world (what is left is dropped)."""
        cfg = self.cfg
        return math.ceil(math.ceil(samples / self.size) / cfg.batch_size) // cfg.backward_passes_per_step

    def _plan_steps(self) -> None:
        """steps_per_epoch and steps_total for the current world size (again after every elastic resize)."""
        cfg, k, s = self.cfg, self.cfg.backward_passes_per_step, self.state
        n = len(self.data.train)
        self.steps_per_epoch = self._steps_for(n)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} x --backward-passes-per-step {k} is more than this rank's "
                f"{math.ceil(n / self.size)} training samples: lower them or use fewer ranks"
            )
        if self.elastic:  # what is done, the rest of this epoch on the current world, the epochs after it
            rest = self._steps_for(n - s.samples_in_epoch) if s.epoch < cfg.epochs else 0
            self.steps_total = s.step + rest + max(0, cfg.epochs - s.epoch - 1) * self.steps_per_epoch
        else:
            self.steps_total = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.steps_total = min(self.steps_total, cfg.max_steps)

    def _steps_left_in_epoch(self) -> int:
        s = self.state
        if self.elastic:
            return self._steps_for(len(self.data.train) - s.samples_in_epoch)
        return self.steps_per_epoch - s.step_in_epoch

    # ------------------------------------------------------------------------------------- checkpoints
    def _restore_or_broadcast(self) -> Optional[Path]:
        """Start every rank from the same state: a checkpoint (loaded by rank 0; returns its path), or rank 0's
        fresh weights."""
        path = checkpoint.resume_path(self.cfg, os.environ)
        saved, error = None, None
        if path is not None and self.is_main:
            try:
                saved = checkpoint.load(path, self.fingerprint)
            except CheckpointError as e:
                error = str(e)
        # Every rank learns whether rank 0 could load it, so all fail together instead of hanging.
        error = horovod.broadcast_object(error, name="hvdtrain.ckpt_error")
        if error:
            raise CheckpointError(error)
        if path is None:
            # Parameters only: Horovod's broadcast_optimizer_state would take a dummy step to create state.
            self.update.broadcast(self.state)
            return None
        self.update.restore(self.state, saved)
        position = horovod.broadcast_object(
            (self._position_of(saved), saved["rng"], saved.get("update", {})) if self.is_main else None,
            name="hvdtrain.position",
        )
        self.state.position, rngs, update_state = position
        self.update.load_state_dict(update_state)
        if len(rngs) == horovod.size():  # (a checkpoint of another layout: the ranks keep their fresh seeds)
            checkpoint.set_rng_state(rngs[horovod.rank()])
        return path

    def _position_of(self, saved: dict[str, Any]) -> tuple[int, int, int, int]:
        """The position a checkpoint holds; samples_in_epoch computed from its steps (and the world size it was
        written with) when it predates that field."""
        epoch, step_in_epoch, step, samples = TrainState.position_in(saved)
        if samples is None:
            per_step = self.cfg.batch_size * self.cfg.backward_passes_per_step
            size = saved.get("fingerprint", {}).get("world_size") or self.size
            samples = min(len(self.data.train), step_in_epoch * per_step * size)
        return epoch, step_in_epoch, step, samples

    def _load_for_elastic(self) -> Optional[Path]:
        """An elastic job's start from a checkpoint, without a collective: the worker that is rank 0 at the start
        loads it (jobs.preflight has checked it); the elastic loop's first sync gives it to every worker."""
        path = checkpoint.resume_path(self.cfg, os.environ)
        if path is None or not self.is_main:
            return path
        saved = checkpoint.load(path, self.fingerprint)
        self.state.load_weights(saved)
        self.state.position = self._position_of(saved)
        self.update.load_state_dict(saved.get("update", {}))
        if len(saved["rng"]) == self.size:
            checkpoint.set_rng_state(saved["rng"][self.rank])
        return path

    def _checkpoint(self) -> Optional[Path]:
        """Collective: every rank hands in its RNG states; rank 0 writes the file atomically."""
        rngs = horovod.allgather_object(checkpoint.rng_state(), name="hvdtrain.rng")
        entries = self.update.checkpoint_entries(self.state, root_rank=0)
        path = None
        if self.is_main:
            saved = {
                **self.state.position_entries(),
                **entries,
                "rng": rngs,
                "fingerprint": self.fingerprint,
                "config": dataclasses.asdict(self.cfg),
            }
            path = checkpoint.save(saved, self.run_dir.checkpoints, self.state.step, keep=self.cfg.keep_checkpoints)
            self.recorder.record({"event": "checkpoint", "step": self.state.step, "path": str(path)})
        self.hooks.on_checkpoint(self, path)
        return path

    # ------------------------------------------------------------------------------------------ steps
    def _batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's batches of indices for `epoch` (a pure function of seed and epoch)."""
        self.sampler.set_epoch(epoch)
        return list(torch.as_tensor(list(self.sampler)).split(self.cfg.batch_size))

    def _groups_left(self) -> list[list[torch.Tensor]]:
        """This rank's remaining optimizer steps of the epoch under way, each a list of backward passes' indices.
        Static: the epoch's batches from step_in_epoch on. Elastic: the samples not yet processed, re-sharded over
        the current world (parallel.elastic.shard_of_rest; equal to the static batches when none were)."""
        cfg, s, k = self.cfg, self.state, self.cfg.backward_passes_per_step
        if self.elastic:
            mine = elastic.shard_of_rest(
                len(self.data.train), cfg.seed, s.epoch, s.samples_in_epoch, self.size, self.rank
            )
            batches = list(torch.as_tensor(mine, dtype=torch.long).split(cfg.batch_size))
            return [batches[i : i + k] for i in range(0, self._steps_left_in_epoch() * k, k)]
        batches = self._batches(s.epoch)
        return [batches[i : i + k] for i in range(0, self.steps_per_epoch * k, k)][s.step_in_epoch :]

    def _train_step(self, group: list[torch.Tensor]) -> None:
        """One optimizer step over len(group) local backward passes."""
        self.batch_indices = group
        self.hooks.on_step_start(self)
        self.state.optimizer.zero_grad()
        x_all, y_all = self.data.train.tensors
        passes = self._passes if self.stage is None else self._pipeline_passes
        loss_sum, samples = passes(group, x_all, y_all)
        self.update.step(self.state)
        self.state.advance()
        self.window.add(loss_sum, samples)
        self.train_samples += samples
        self.hooks.on_step_end(self)

    def _passes(self, group: list[torch.Tensor], x_all, y_all) -> tuple[float, int]:
        """The backward passes of one step on this rank's model (its device, or its in-rank device pipeline):
        (loss sum, samples)."""
        loss_sum, samples = 0.0, 0
        for index in group:
            x, y = x_all[index], y_all[index]
            if self.in_device.type != "cpu" or self.out_device.type != "cpu":
                x, y = x.to(self.in_device, non_blocking=True), y.to(self.out_device, non_blocking=True)
            loss = self.loss_fn(self.model(x), y)
            # Accumulated gradients are summed: divide so the step sees the mean over the passes.
            (loss / len(group)).backward()
            loss_sum += loss.item() * len(index)
            samples += len(index)
        return loss_sum, samples

    def _pipeline_passes(self, group: list[torch.Tensor], x_all, y_all) -> tuple[float, int]:
        """A pipeline's backward passes of one step: each batch through the stages in the schedule's order (the
        first stage feeds the inputs, the last takes the labels and the loss). (loss sum, samples) on the last."""
        st, loss_sum, samples = self.stage, 0.0, 0
        self.update.expect_backwards(self.state, sum(st.micro_count(len(index)) for index in group))
        for index in group:
            x = x_all[index].to(self.in_device) if st.first else None
            y = y_all[index].to(self.out_device) if st.last else None
            loss, n = st.train_pass(len(index), x, y, self.loss_fn, 1 / len(group))
            loss_sum, samples = loss_sum + loss, samples + n
        return loss_sum, samples

    def _report(self) -> bool:
        """Read the window started one step earlier, if any: record and show it; True if the ranks agreed to stop."""
        report = self.window.read()
        if report is None:
            return False
        self.recorder.record(
            {"step": report.step, "epoch": report.epoch, "train_loss": report.loss, "lr": self.lr,
             "samples_per_s": report.samples_per_s}
        )  # fmt: skip
        self.progress.update(report)
        return report.stop

    def _run_epoch(self) -> bool:
        """The rest of the current epoch's steps; True when the ranks agreed to stop."""
        cfg, s = self.cfg, self.state
        # Step j of this call covers positions [j*b*n, (j+1)*b*n) of the epoch's rest (b: samples per rank and
        # step, n: ranks), in the epoch's order: that is what samples_in_epoch records.
        per_step = cfg.batch_size * cfg.backward_passes_per_step * self.size
        base, rest = s.samples_in_epoch, len(self.data.train) - s.samples_in_epoch
        self.model.train()
        started = time.perf_counter()
        stop = False
        try:
            for j, group in enumerate(self._groups_left(), start=1):
                if s.step >= self.steps_total:
                    break
                self._train_step(group)
                if not self.startup.done:
                    self._started()
                s.samples_in_epoch = base + min(rest, j * per_step)
                stop = self._report()
                if self.window.due(s.step, self.steps_total):
                    self.window.start(s.step, s.epoch, self._stop_requested())
                if stop:
                    break
                if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0:
                    self._checkpoint()
                if self.elastic and s.step % cfg.commit_every == 0:
                    self.commits.commit()  # raises HostsUpdatedInterrupt when hosts changed
            stop = self._report() or stop  # the epoch's (or the run's) last window
        finally:
            self.train_seconds += time.perf_counter() - started
        return stop

    def _started(self) -> None:
        """After the first step: the start-up's phases, said by rank 0 and kept for result.json."""
        self.startup.mark("first step")
        self.startup.done = True
        if self.startup.marks:
            self.progress.say(self.startup.line())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact test loss and accuracy over the whole test split: each rank (a pipeline: each replica, through its
        stages) takes samples rank, rank+size..."""
        model = self.update.eval_model(self.state)
        model.eval()
        x_all, y_all = self.data.test.tensors
        mine = torch.arange(self.rank, len(y_all), self.size)
        st = self.stage
        loss_sum, correct = 0.0, 0.0
        for chunk in mine.split(256):
            x, y = x_all[chunk].to(self.in_device), y_all[chunk].to(self.out_device)
            out = model(x) if st is None else st.forward_only(len(chunk), x if st.first else None)
            if out is None:
                continue  # a pipeline stage before the last
            loss_sum += self.loss_fn(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
        if st is not None:
            st.flush()
        counted = len(mine) if st is None or st.last else 0  # a pipeline's last stage alone has outputs
        return horovod.average_metrics({"test_loss": loss_sum, "test_accuracy": correct}, counted, name="hvdtrain.eval")

    def _evaluate_and_record(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.recorder.record({"step": self.state.step, "epoch": self.state.epoch, **metrics})
        return metrics

    # -------------------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._setup()
        if self.update.serves:
            return self._serve()
        self._plan_steps()
        self._open_outputs()
        resumed = self._load_for_elastic() if self.elastic else self._restore_or_broadcast()
        self.update.start(self.state)
        self.startup.mark("restore" if resumed is not None else "broadcast")
        s = self.state
        self.recorder.record({"event": "start", "step": s.step, "epoch": s.epoch, "ranks": self.size,
                              "resumed_from": resumed and str(resumed), "restart": SlurmEnv.read().restart_count})  # fmt: skip
        self.progress = Progress(self.steps_total, cfg.epochs, self.is_main, self._echo, start_step=s.step)
        if self.is_main and not self.elastic:  # the checkpoints' one writer, before its first write (see there)
            checkpoint.remove_interrupted_writes(self.run_dir.checkpoints, self.progress.say)
        if resumed is not None:
            self.progress.say(
                f"resumed from {resumed} at step {s.step} (epoch {s.epoch + 1}, step {s.step_in_epoch} in it)"
            )
        if s.step == 0:
            self.progress.say(
                f"training {cfg.model} on {cfg.data}: {self._ranks_said()}, strategy {cfg.strategy}, "
                f"{self.steps_total} steps of {cfg.batch_size} x {cfg.backward_passes_per_step} samples per rank, "
                f"lr {self.lr:g}"
            )
        self.window = ReportWindow(cfg.log_every)
        self.train_seconds, self.train_samples = 0.0, 0
        self.hooks.on_fit_start(self)
        # The worker process installed the handler before its imports and keeps it to the end: a warning signal
        # during the final evaluation, checkpoint or Horovod's shutdown is then a no-op, not a death by USR2.
        # Used as a library, the Trainer installs it for fit() and restores the caller's afterwards.
        own_handler = preempt.install(cfg.preempt_signal)
        try:
            if self.elastic:
                self._world: Optional[tuple[int, list[str]]] = None  # (size, hosts) at the last (re)start
                self._steps_lost = 0  # by the last rollback, until a resize record reports them
                self.commits = elastic.Commits(self._snapshot, self._rollback, self._broadcast_state)
                self.commits.register_reset_callbacks([self._on_reset])
                result = elastic.run(self.commits, self._train_and_finish)
            else:
                result = self._train_and_finish()
        finally:
            if own_handler:
                preempt.uninstall()
            self.progress.close()
        self.hooks.on_fit_end(self, result)
        self.update.close()
        return result

    def _serve(self) -> dict[str, Any]:
        """An async job's parameter server: serve the workers until each is finished (no loop, no files but its
        log of updates)."""
        index = self.update.server.index
        print(f"hvdtrain: async: this rank serves parameter shard {index} of {len(self.update.servers)}", flush=True)
        result = self.update.serve(self.run_dir.ps_log(index))
        print(f"hvdtrain: async: server {index} applied {result['version']} updates", flush=True)
        return {"parameter_server": index, **result}

    def _ranks_said(self) -> str:
        cfg = self.cfg
        if self.grid is not None:
            return (f"{self.grid.ranks} rank(s) as {self.size} replica(s) of {self.grid.stages} pipeline stages "
                    f"({cfg.schedule}, {cfg.micro_batches} micro-batch(es) per batch)")  # fmt: skip
        if self.cfg.update != "async":
            return f"{self.size} rank(s)"
        servers, staleness = len(self.update.servers), self.update.staleness
        return f"{self.size} worker(s) and {servers} parameter server(s), max staleness {staleness}"

    def _train_and_finish(self) -> dict[str, Any]:
        """The epochs, then the final evaluation and checkpoint (or the preemption checkpoint): in an elastic job
        all of it runs inside the elastic loop, which calls this again after every reset."""
        cfg, s = self.cfg, self.state
        if self.elastic:
            self._enter_world()
        stopped = False
        while s.epoch < cfg.epochs and s.step < self.steps_total and not stopped:
            stopped = self._run_epoch()
            if not stopped and self._steps_left_in_epoch() == 0:
                self.hooks.on_epoch_end(self)
                s.next_epoch()
                if self.elastic:
                    self._plan_steps()
                    self.commits.commit()
                if cfg.eval_every_epoch and s.epoch < cfg.epochs and s.step < self.steps_total:
                    accuracy = self._evaluate_and_record()["test_accuracy"]
                    self.progress.say(f"epoch {s.epoch}: test accuracy {accuracy:.4f}")
        return self._stop_preempted() if stopped else self._finish_training()

    # ----------------------------------------------------------------------------------------- elastic
    def _snapshot(self) -> dict[str, Any]:
        """What a commit keeps (copies): a checkpoint's model, optimizer and position, and the update rule's state."""
        return copy.deepcopy({**self.state.to_checkpoint(), "update": self.update.state_dict()})

    def _rollback(self, saved: dict[str, Any]) -> None:
        """After a worker failed: back to the last commit (the steps since are lost and run again)."""
        self._steps_lost = self.state.step - saved["step"]
        self.state.load_weights(saved)
        self.state.position = TrainState.position_in(saved)
        self.update.load_state_dict(saved["update"])

    def _broadcast_state(self) -> None:
        """Rank 0's model, optimizer, position and update state to every worker (after a reset, and at the
        start: a new worker gets the state of the running ones)."""
        horovod.broadcast_state(self.model, self.state.optimizer)
        position, update = horovod.broadcast_object(
            (self.state.position, self.update.state_dict()), name="hvdtrain.elastic_position"
        )
        self.state.position = position
        self.update.load_state_dict(update)

    def _on_reset(self) -> None:
        """The world was re-formed (on the workers that were in it before; no collective here: new workers are
        not in this callback). The learning rate follows the new world size (_enter_world reads it back)."""
        self.lr = self.update.learning_rate()
        for group in self.state.optimizer.param_groups:
            group["lr"] = self.lr

    def _enter_world(self) -> None:
        """Every worker, after every (re)start of the elastic loop: who is who now, the plan for the current world
        size, and (rank 0) a resize record in metrics.jsonl with the hosts before and after."""
        self.rank, self.size = horovod.rank(), horovod.size()
        self.is_main = self.rank == 0
        self.lr = self.state.optimizer.param_groups[0]["lr"]
        # The name the driver knows this worker's host by (discovery's), else the host's own name.
        me = os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
        hosts = sorted(horovod.allgather_object(me, name="hvdtrain.elastic_hosts"))
        if self.is_main and not self.recorder.enabled:  # rank 0's host was lost: this worker now writes the records
            self.recorder = Recorder(self.run_dir, True, self._echo)
        elif not self.is_main and self.recorder.enabled:
            self.recorder.close()
            self.recorder = Recorder(self.run_dir, False, self._echo)
        self.progress.enabled = self.is_main
        self._plan_steps()
        self.progress.total = self.steps_total
        self.window = ReportWindow(self.cfg.log_every)  # a sum started before the reset is gone with the old world
        s = self.state
        print(f"hvdtrain: elastic: this worker is rank {self.rank} of {self.size} from step {s.step}", flush=True)
        previous, self._world = self._world, (self.size, hosts)
        if previous is None:
            self.recorder.record({"event": "elastic_start", "step": s.step, "epoch": s.epoch, "size": self.size,
                                  "hosts": hosts})  # fmt: skip
            return
        if previous == self._world:
            return
        lost, self._steps_lost = self._steps_lost, 0
        self.recorder.record(
            {"event": "resize", "step": s.step, "epoch": s.epoch, "samples_in_epoch": s.samples_in_epoch,
             "old_size": previous[0], "new_size": self.size, "old_hosts": previous[1], "hosts": hosts,
             "steps_redone": lost, "lr": self.lr}
        )  # fmt: skip
        self.progress.say(
            f"elastic: {previous[0]} -> {self.size} ranks at step {s.step} (epoch {s.epoch + 1}, "
            f"{s.samples_in_epoch} of its samples done; hosts {', '.join(hosts)}); "
            f"{lost} uncommitted step(s) run again, lr {self.lr:g}"
        )

    def _stop_requested(self) -> bool:
        """This rank's vote for a stop: the preemption signal came, or Ctrl-C of `hvdtrain train` left its mark."""
        return preempt.requested() or self.run_dir.interrupted.exists()

    def _stop_preempted(self) -> dict[str, Any]:
        path = self._checkpoint()
        # `hvdtrain train` marks a stop that Ctrl-C asked for: no preemption, so no requeue.
        interrupted = self.run_dir.interrupted.exists()
        self.progress.say(
            f"{'interrupted' if interrupted else 'preempted'} at step {self.state.step}: checkpoint {path}"
        )
        # Recorded first: a requeue ends the job at once. The requeued job's start record counts it (restart).
        event = "interrupted" if interrupted else "preempted"
        self.recorder.record({"event": event, "step": self.state.step, "epoch": self.state.epoch})
        requeued = None
        if self.is_main and not interrupted:
            requeued = preempt.requeue_after_preemption(self.cfg.requeue, self.cfg.max_requeues, self.progress.say)
        return self._finish({"preempted": not interrupted, "interrupted": interrupted, "requeued": requeued})

    def _finish_training(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        self.update.finish(s)
        metrics = self._evaluate_and_record()
        if not (cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0):
            self._checkpoint()  # the end state, unless the last step just wrote it
        self.progress.say(
            f"test accuracy: {metrics['test_accuracy']:.4f} (test loss {metrics['test_loss']:.4f}, "
            f"{s.step} steps, {self.train_seconds:.1f} s training)"
        )
        return self._finish({"preempted": False, **metrics})

    # -------------------------------------------------------------------------------------- outputs
    def _open_outputs(self) -> None:
        if self.is_main:
            self.cfg.save(self.run_dir)  # a no-op when launched by `hvdtrain train`, which wrote it already
        self.recorder = Recorder(self.run_dir, self.is_main, self._echo)

    def _pipeline_result(self) -> dict[str, Any]:
        """A pipeline's layout, and the most activation memory each stage held (of replica 0; collective)."""
        if self.stage is None:
            return {}
        peaks = horovod.allgather_object(
            (self.stage.meter.peak_bytes, self.stage.meter.peak_micro), name="hvdtrain.pipeline_peaks"
        )
        return {
            "ranks": self.grid.ranks,
            "stages": self.grid.stages,
            "schedule": self.cfg.schedule,
            "micro_batches": self.cfg.micro_batches,
            "activation_peak_bytes": [b for b, _ in peaks[: self.grid.stages]],
            "micro_batches_in_flight_peak": [m for _, m in peaks[: self.grid.stages]],
        }

    def _finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        total = horovod.PendingSum([float(self.train_samples)], name="hvdtrain.samples").result()[0]
        # Each rank's peak resident memory (Linux reports KiB): what `hvdtrain plan` predicts per rank.
        rss = horovod.allgather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, name="hvdtrain.rss")
        seconds = self.train_seconds
        model_state = self.update.model_state(self.state)
        result = {
            "steps": self.state.step,
            "epochs_done": self.state.epoch,
            "world_size": self.size,
            "update": self.update.name,
            "seconds_training": round(seconds, 3),
            "samples_per_s": total / seconds if seconds > 0 else math.nan,
            "params_sha256": model_state and params_sha256(model_state),
            "run_dir": str(self.run_dir.path),
            "peak_rss_bytes": rss,
            "startup_s": self.startup.phases(),  # rank 0's phases up to the first step (hvdtrain.startup)
            **self._pipeline_result(),
            **extra,
        }
        if self.is_main:
            write_json(self.run_dir.result, result)
        self.recorder.close()
        return result
