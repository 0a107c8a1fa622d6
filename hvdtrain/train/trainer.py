"""The Trainer: the training loop every built-in job runs on every rank, on top of hvdtrain.parallel.

    Trainer(cfg).fit()                                   # the built-in job (digits CNN by default)
    Trainer(cfg, model=my_sequential, dataset=my_data, hooks=[my_hook]).fit()

    fit -> _train_and_finish -> _run_epoch -> _train_step
      Placement    where the model's parts live and what each rank does: data, device pipeline, rank pipeline,
                   parameter servers (train/placement.py); the loop never asks for the strategy
      World        fixed as launched, or elastic: commits, rollbacks, resizes (train/elastic.py)
      TrainState   model, optimizer, epoch, step_in_epoch, step      (train/state.py)
      UpdateRule   how a step's gradients become parameters: sync, sharded, local-sgd, async (train/update.py)
      ReportWindow loss/samples/preemption votes summed every log_every steps, overlapped, with every rank's
                   compute and wait seconds per step (timed by this rank's hvdtrain.progress record) (train/reporting.py)
      Hooks        on_fit_start, on_step_start/end, on_epoch_end, on_checkpoint, on_fit_end (train/hooks.py)

One process per rank. Rank 0 alone writes the shared files of the run directory (metrics.jsonl, TensorBoard
events, result.json, checkpoints/; config.json is written by the launching side, or here when the Trainer is
used as a library); every rank writes its own log (the launcher's per-rank wrapper does that). Every
distributed operation goes through `hvdtrain.parallel.horovod` (Horovod).

Checkpoints (train/checkpoints.py, a mixin): what every rank starts from, a checkpoint of any layout (resumed exactly
on the same one; on another, each remaining sample of the epoch once, the new world's learning rate), and what
each checkpoint holds and who writes it (docs/checkpoints.md).

The world the loop runs in (train/elastic.py) is fixed as launched, or elastic (`hvdtrain train --elastic`): then
the loop runs inside Horovod's elastic loop, the ranks commit every --commit-every steps and at every epoch end, a
worker's failure rolls the survivors back to the last commit, and the rest of the epoch is re-sharded over the new
world. The loop asks its world where the two differ (plan, groups_left, start, run, enter, epoch_done, step_done).

self.rank and self.size are this rank's data-parallel place (Placement.replica): which shard of the data it
reads, and of how many; the steps, the learning rate and a checkpoint's world size follow them. For a rank
pipeline that is its replica's index and the number of replicas.

Preemption: the preempt signal (USR2 by default, what `sbatch --signal` sends before the time limit) only
sets a flag. The ranks' votes travel in the reporting window's sum every log_every steps (one allreduce,
started after that step and read after the next, so it costs no extra round); every rank reads the same
answer after the same step, checkpoints it and stops; inside Slurm rank 0 then requeues the job, and the
requeued job resumes from that checkpoint by itself.
"""

from __future__ import annotations

import hashlib
import math
import random
import resource
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from hvdtrain import preempt, progress
from hvdtrain.config import TrainConfig, check_combinations
from hvdtrain.env import SlurmEnv, rank_info
from hvdtrain.errors import UsageError
from hvdtrain.files import write_json
from hvdtrain.parallel import horovod
from hvdtrain.rundir import RunDir
from hvdtrain.srunmpi import wire_up_problem
from hvdtrain.startup import Startup
from hvdtrain.train import checkpoint, datasets, models, placement
from hvdtrain.train.checkpoints import Checkpoints
from hvdtrain.train.elastic import world_for
from hvdtrain.train.hooks import Hook, Hooks, TimelineRecorder
from hvdtrain.train.reporting import Progress, Recorder, ReportWindow
from hvdtrain.train.state import TrainState


def params_sha256(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """A fingerprint of the parameters' exact bits (what the resume tests compare), of a model or its state_dict."""
    h = hashlib.sha256()
    state = model if isinstance(model, dict) else model.state_dict()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _seconds(values: Sequence[float]) -> list[float]:
    """Seconds per step as metrics.jsonl keeps them: to the microsecond."""
    return [round(v, 6) for v in values]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer(Checkpoints):
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
        self.slurm = SlurmEnv.read()  # the job this process is in, read once (run dir, resume, requeue)
        self.cfg = cfg.validate(check_data=dataset is None).with_defaults(self.slurm)
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
        self.placement = placement.choose(cfg, rank_info().size)  # where the model's parts live, who does what
        horovod.init(
            deterministic=cfg.deterministic,
            timeline=cfg.records_timeline,
            autotune_log=self.run_dir.autotune if cfg.autotune else None,
            **self.placement.process_sets(),
        )
        self.startup.mark("hvd.init")
        problem = wire_up_problem(self.slurm, world_size=horovod.world()[1])  # N singletons: srun's wrong --mpi
        if problem:
            raise UsageError(problem)
        self.is_main = horovod.rank() == 0  # (an async job's: rank 0 of the workers)
        # The data-parallel place: which shard of the data this rank reads, of how many.
        self.rank, self.size = self.placement.replica()
        self.world = world_for(self)  # fixed as launched, or elastic (train/elastic.py)
        check_combinations(cfg, elastic=self.world.elastic, ranks=horovod.world()[1])  # config.COMBINATIONS
        self.data = self._user_dataset or datasets.load(cfg.data, cfg.synthetic_samples, cfg.seed)
        self.startup.mark("data")
        # Same seed on every rank for the initial weights (rank 0's are broadcast anyway).
        seed_everything(cfg.seed)
        model = self.placement.place(
            self._user_model
            or models.build(cfg.model, self.data.input_shape, self.data.num_classes, cfg.hidden, cfg.depth),
            self.data,
        )
        # From here on each rank draws its own random numbers (dropout): seed + rank.
        seed_everything(cfg.seed + horovod.world()[0])
        self.update = self.placement.update_rule(builtin_model=self._user_model is None)
        self.lr = self.update.learning_rate()
        self.state = TrainState(model, self.update.make_optimizer(model, self.lr))
        self.fingerprint = checkpoint.fingerprint(cfg)
        self.writes = checkpoint.Writes(background=cfg.async_checkpoint)  # rank 0's checkpoint writes
        self.checkpoint_stall_s: list[float] = []  # rank 0: the training time each checkpoint took (result.json)
        self.resume_change: Optional[str] = None  # a resume on another layout: what changed, in one line
        self.startup.mark("model")

    @property
    def model(self) -> nn.Module:
        """The model being trained (the state's: a resume or a reset replaces it there)."""
        return self.state.model

    # ------------------------------------------------------------------------------------------ steps
    def _train_step(self, group: list[torch.Tensor]) -> None:
        """One optimizer step over len(group) local backward passes."""
        self.batch_indices = group
        progress.step(self.state.step + 1, phase="hook")  # the step it is in, as metrics.jsonl numbers them
        work_before, wait_before = self._timer.spent()
        self.hooks.on_step_start(self)
        self.state.optimizer.zero_grad()
        x_all, y_all = self.data.train.tensors
        progress.set_phase("forward")
        loss_sum, samples = self.placement.passes(self.state, group, x_all, y_all, self.loss_fn)
        progress.set_phase("allreduce")
        self.update.step(self.state)
        self.state.advance()
        self.train_samples += samples
        progress.set_phase("hook")
        self.hooks.on_step_end(self)
        work, wait = self._timer.spent()
        self.window.add(loss_sum, samples, work - work_before, wait - wait_before)

    def _report(self) -> bool:
        """Read the window started one step earlier, if any: record and show it; True if the ranks agreed to stop."""
        if not self.window.pending:
            return False
        with progress.phase("report"):
            report = self.window.read()
        self.recorder.record(
            {"step": report.step, "epoch": report.epoch, "train_loss": report.loss, "lr": self.lr,
             "samples_per_s": report.samples_per_s, "rank_compute_s": _seconds(report.rank_compute_s),
             "rank_wait_s": _seconds(report.rank_wait_s)}
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
            for j, group in enumerate(self.world.groups_left(), start=1):
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
                self.world.step_done()  # an elastic world commits
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
        progress.set_phase("eval")
        model = self.update.eval_model(self.state)
        model.eval()
        x_all, y_all = self.data.test.tensors
        mine = torch.arange(self.rank, len(y_all), self.size)
        sums, counted = self.placement.test_sums(model, x_all, y_all, mine, self.loss_fn)
        return horovod.average_metrics(sums, counted, name="hvdtrain.eval")

    def _evaluate_and_record(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.recorder.record({"step": self.state.step, "epoch": self.state.epoch, **metrics})
        return metrics

    # -------------------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        # This rank's record (the hang watchdog's), or one of its own outside hvdtrain: what times its steps' work
        # and wait for the straggler report.
        self._timer = progress.publisher(create=True)
        progress.set_phase("init")  # the hang watchdog watches this rank from here (hvdtrain.progress)
        self._setup()
        if not self.placement.trains:  # an async job's parameter server
            return self.placement.serve(self.run_dir)
        self._start()
        # The worker process installed the handler before its imports and keeps it to the end: a warning signal
        # during the final evaluation, checkpoint or Horovod's shutdown is then a no-op, not a death by USR2.
        # Used as a library, the Trainer installs it for fit() and restores the caller's afterwards.
        own_handler = preempt.install(self.cfg.preempt_signal)
        try:
            result = self.world.run(self._train_and_finish)
        finally:
            if own_handler:
                preempt.uninstall()
            self.progress.close()
        self.hooks.on_fit_end(self, result)
        self.update.close()
        progress.set_phase("done")
        return result

    def _start(self) -> None:
        """Every rank from the same state (a checkpoint's, or fresh), the start recorded and said, the hooks told."""
        cfg = self.cfg
        self.world.plan()
        self._open_outputs()
        resumed = self.world.start()
        self.update.start(self.state)
        self.startup.mark("restore" if resumed is not None else "broadcast")
        s = self.state
        self.recorder.record({"event": "start", "step": s.step, "epoch": s.epoch, "ranks": self.size,
                              "resumed_from": resumed and str(resumed), "restart": self.slurm.restart_count,
                              "changed": self.resume_change})  # fmt: skip
        self.progress = Progress(self.steps_total, cfg.epochs, self.is_main, self._echo, start_step=s.step)
        self.world.remove_interrupted_writes(self.progress.say)
        if resumed is not None:
            self.progress.say(
                f"resumed from {resumed} at step {s.step} (epoch {s.epoch + 1}, {s.samples_in_epoch} of its "
                f"{len(self.data.train)} samples done)"
            )
            if self.resume_change:
                self.progress.say(self.resume_change)
        if s.step == 0:
            self.progress.say(
                f"training {cfg.model} on {cfg.data}: {self.placement.describe(self.size)}, strategy {cfg.strategy}, "
                f"{self.steps_total} steps of {cfg.batch_size} x {cfg.backward_passes_per_step} samples per rank, "
                f"lr {self.lr:g}"
            )
        self.window = ReportWindow(cfg.log_every)
        self.train_seconds, self.train_samples = 0.0, 0
        self.hooks.on_fit_start(self)

    def _train_and_finish(self) -> dict[str, Any]:
        """The epochs, then the final evaluation and checkpoint (or the preemption checkpoint): in an elastic job
        all of it runs inside the elastic loop, which calls this again after every reset."""
        cfg, s = self.cfg, self.state
        self.world.enter()
        stopped = False
        while s.epoch < cfg.epochs and s.step < self.steps_total and not stopped:
            stopped = self._run_epoch()
            if not stopped and self.world.steps_left_in_epoch() == 0:
                self.hooks.on_epoch_end(self)
                s.next_epoch()
                self.world.epoch_done()  # an elastic world plans again and commits
                if cfg.eval_every_epoch and s.epoch < cfg.epochs and s.step < self.steps_total:
                    accuracy = self._evaluate_and_record()["test_accuracy"]
                    self.progress.say(f"epoch {s.epoch}: test accuracy {accuracy:.4f}")
        return self._stop_preempted() if stopped else self._finish_training()

    def _stop_requested(self) -> bool:
        """This rank's vote for a stop: the preemption signal came, or Ctrl-C of `hvdtrain train` left its mark."""
        return preempt.requested() or self.run_dir.interrupted.exists()

    def _stop_preempted(self) -> dict[str, Any]:
        path = self._checkpoint(last=True)
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
            requeued = preempt.requeue_after_preemption(
                self.cfg.requeue, self.cfg.max_requeues, self.progress.say, self.slurm
            )
        return self._finish({"preempted": not interrupted, "interrupted": interrupted, "requeued": requeued})

    def _finish_training(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        self.update.finish(s)
        metrics = self._evaluate_and_record()
        if not (cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0):
            self._checkpoint(last=True)  # the end state, unless the last step just wrote it
        elif self.is_main:
            self.writes.wait()
            self._record_checkpoints()
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
            "checkpoint_stall_s": _seconds(self.checkpoint_stall_s),  # rank 0: each checkpoint's pause of training
            **self.placement.result(),
            **extra,
        }
        if self.is_main:
            write_json(self.run_dir.result, result)
        self.recorder.close()
        return result
