"""The Trainer: the training loop every built-in job runs on every rank, on top of hvdtrain.parallel.

    Trainer(cfg).fit()                                   # the built-in job (digits CNN by default)
    Trainer(cfg, model=my_sequential, dataset=my_data).fit()

One process per rank. Rank 0 alone writes the shared files of the run directory (config.json,
metrics.jsonl, TensorBoard events, result.json, checkpoints/); every rank writes its own log (the launcher's
per-rank wrapper does that). Every distributed operation goes through `hvdtrain.parallel.data` (Horovod).

Exact resume: a checkpoint holds the model and optimizer, the epoch, the number of steps done in that epoch
(the sampler order is a pure function of seed and epoch, so the position is enough), and every rank's RNG
states. Resuming restores all of it, so a run interrupted at any checkpoint and resumed ends bitwise equal to
an uninterrupted one in deterministic mode on CPU.

Preemption: the preempt signal (USR2 by default, what `sbatch --signal` sends before the time limit) only
sets a flag. Each step the flag is max-allreduced together with the gradients (asynchronously, so it costs
no extra round), every rank sees the same answer after the same step, checkpoints it, and stops; inside
Slurm rank 0 then requeues the job, and the requeued job resumes from that checkpoint by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from hvdtrain import preempt
from hvdtrain.config import TrainConfig
from hvdtrain.env import slurm_restart_count
from hvdtrain.errors import CheckpointError, ConfigError
from hvdtrain.files import write_json, write_text_atomic
from hvdtrain.parallel import data as P
from hvdtrain.train import checkpoint as C
from hvdtrain.train import data as D
from hvdtrain.train import models as M


def params_sha256(model: nn.Module) -> str:
    """A fingerprint of the parameters' exact bits (what the resume tests compare)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train `model` (default: the reference model named by cfg.model) on `dataset` (default: cfg.data).

    model: an nn.Sequential (required for model/hybrid strategies, which split it) or any nn.Module (data).
    dataset: a hvdtrain.train.data.Dataset (train/test TensorDatasets, input shape, number of classes).
    loss_fn: defaults to cross entropy. Returns from fit(): a dict of the run's results.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: Optional[nn.Module] = None,
        dataset: Optional[D.Dataset] = None,
        loss_fn: Optional[Callable] = None,
        echo: Callable[[str], None] = print,
    ):
        self.cfg = cfg.validate(check_data=dataset is None)
        self.cfg.with_defaults()
        self._user_model = model
        self._user_dataset = dataset
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self._echo = echo
        self.run_dir = Path(self.cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ------------------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        P.init(deterministic=cfg.deterministic)
        self.rank, self.size = P.rank(), P.size()
        self.is_main = self.rank == 0
        if cfg.strategy == "model" and self.size > 1:
            raise ConfigError(
                f"--strategy model runs one replica on one rank, but this job has {self.size} ranks: "
                "use -np 1, or --strategy hybrid for data parallelism across model-parallel replicas"
            )
        self.data = self._user_dataset or D.load(cfg.data, cfg.synthetic_samples, cfg.seed)

        # Same seed on every rank for the initial weights (rank 0's are broadcast anyway).
        seed_everything(cfg.seed)
        model = self._user_model or M.build(cfg.model, self.data.input_shape, self.data.num_classes, cfg.hidden, cfg.depth)
        if cfg.strategy == "data":
            self.device = P.device()
            self.model = model.to(self.device)
            self.in_device = self.out_device = self.device
        else:
            import horovod.torch as hvd

            from hvdtrain.parallel.hybrid import devices_for_rank
            from hvdtrain.parallel.model import Pipeline

            devices = devices_for_rank(hvd.local_rank(), hvd.local_size(), cfg.devices_per_rank)
            self.model = Pipeline(model, devices, balance=cfg.balance, micro_batches=cfg.micro_batches)
            self.in_device, self.out_device = self.model.input_device, self.model.output_device
        # From here on each rank draws its own random numbers (dropout): seed + rank.
        seed_everything(cfg.seed + self.rank)

        # Linear lr scaling with the effective batch; Adasum adapts by itself and needs none.
        self.lr = P.scaled_lr(cfg.lr, cfg.scale_lr and cfg.reduce_op == "average", cfg.backward_passes_per_step)
        params = self.model.parameters()
        if cfg.optimizer == "sgd":
            base = torch.optim.SGD(params, lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adam":
            base = torch.optim.Adam(params, lr=self.lr, weight_decay=cfg.weight_decay)
        else:
            base = torch.optim.AdamW(params, lr=self.lr, weight_decay=cfg.weight_decay)
        self.optimizer = P.distributed_optimizer(
            base, self.model, cfg.compression, cfg.backward_passes_per_step, cfg.reduce_op
        )
        self.sampler = P.sampler(self.data.train, shuffle=True, seed=cfg.seed)
        self.fingerprint = C.fingerprint(cfg, self.size)

    # ------------------------------------------------------------------------------------- checkpoints
    def _restore_or_broadcast(self) -> None:
        """Start every rank from the same state: a checkpoint (loaded by rank 0), or rank 0's fresh weights."""
        self.epoch, self.step_in_epoch, self.step = 0, 0, 0
        path = C.resume_path(self.cfg, os.environ)
        error = None
        state = None
        if path is not None and self.is_main:
            try:
                state = C.load(path, self.fingerprint)
            except CheckpointError as e:
                error = str(e)
        # Every rank learns whether rank 0 could load it, so all fail together instead of hanging.
        error = P.broadcast_object(error, name="hvdtrain.ckpt_error")
        if error:
            raise CheckpointError(error)
        if path is None:
            # Parameters only: Horovod's broadcast_optimizer_state would take a dummy step to create state.
            P.broadcast_state(self.model, None)
            return
        if self.is_main:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        P.broadcast_state(self.model, self.optimizer)
        position = P.broadcast_object(
            (state["epoch"], state["step_in_epoch"], state["step"], state["rng"]) if self.is_main else None,
            name="hvdtrain.position",
        )
        self.epoch, self.step_in_epoch, self.step, rngs = position
        C.set_rng_state(rngs[self.rank])
        self._say(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1}, step {self.step_in_epoch} in it)")

    def _checkpoint(self) -> Optional[Path]:
        """Collective: every rank hands in its RNG states; rank 0 writes the file atomically."""
        rngs = P.allgather_object(C.rng_state(), name="hvdtrain.rng")
        if not self.is_main:
            return None
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "rng": rngs,
            "fingerprint": self.fingerprint,
            "config": dataclasses.asdict(self.cfg),
        }
        path = C.save(state, self.ckpt_dir, self.step, keep=self.cfg.keep_checkpoints)
        self._record({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path

    # -------------------------------------------------------------------------------------- reporting
    def _say(self, line: str) -> None:
        if self.is_main:
            self._echo(line)
            sys.stdout.flush()

    def _record(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(k, v, row.get("step", self.step))

    def _open_outputs(self) -> None:
        self._tb = None
        if not self.is_main:
            return
        write_text_atomic(self.run_dir / "config.json", self.cfg.to_json())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:  # tensorboard is an install requirement; keep training if someone removed it
            self._echo("hvdtrain: tensorboard is not installed; metrics go to metrics.jsonl only")

    def _progress(self, step: int, epoch: int, steps_total: int, loss: float, rate: float) -> None:
        if not self.is_main:
            return
        width = 24
        done = int(width * step / max(1, steps_total))
        line = (
            f"epoch {epoch + 1}/{self.cfg.epochs} step {step}/{steps_total} "
            f"loss {loss:.4f} {rate:,.0f} samples/s"
        )
        bar = f"[{'#' * done}{'.' * (width - done)}] "
        if sys.stdout.isatty():  # run directly in a terminal: one bar, redrawn
            sys.stdout.write(f"\r{bar}{line}")
            sys.stdout.flush()
        elif os.environ.get("HVDTRAIN_TTY") == "1":  # launched from a terminal: launchers pass whole lines only
            self._echo(bar + line)
        else:  # logs and pipes: plain lines
            self._echo(line)

    # ------------------------------------------------------------------------------------------ steps
    def _batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's batches of indices for `epoch` (a pure function of seed and epoch)."""
        self.sampler.set_epoch(epoch)
        return list(torch.as_tensor(list(self.sampler)).split(self.cfg.batch_size))

    def _train_step(self, group: list[torch.Tensor]) -> tuple[float, int]:
        """One optimizer step over len(group) local backward passes; returns (loss sum, samples)."""
        self.optimizer.zero_grad()
        loss_sum, samples = 0.0, 0
        x_all, y_all = self.data.train.tensors
        for index in group:
            x, y = x_all[index], y_all[index]
            if self.in_device.type != "cpu" or self.out_device.type != "cpu":
                x, y = x.to(self.in_device, non_blocking=True), y.to(self.out_device, non_blocking=True)
            loss = self.loss_fn(self.model(x), y)
            # Accumulated gradients are summed: divide so the step sees the mean over the passes.
            (loss / len(group)).backward()
            loss_sum += loss.item() * len(index)
            samples += len(index)
        self.optimizer.step()
        return loss_sum, samples

    def _report(self, pending, steps_total: int) -> bool:
        """Read a window's sums (started one step earlier), record and show them; True if any rank was
        asked to stop. Every rank reads the same sums after the same step, so all agree where to stop."""
        sums, step, epoch, elapsed = pending
        loss_sum, samples, stop_votes = sums.result()
        loss, rate = loss_sum / max(samples, 1.0), samples / max(elapsed, 1e-9)
        self._record({"step": step, "epoch": epoch, "train_loss": loss, "lr": self.lr, "samples_per_s": rate})
        self._progress(step, epoch, steps_total, loss, rate)
        return stop_votes > 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact test loss and accuracy over the whole test split: each rank takes samples rank, rank+size..."""
        self.model.eval()
        x_all, y_all = self.data.test.tensors
        mine = torch.arange(self.rank, len(y_all), self.size)
        loss_sum, correct = 0.0, 0.0
        for chunk in mine.split(256):
            x, y = x_all[chunk].to(self.in_device), y_all[chunk].to(self.out_device)
            out = self.model(x)
            loss_sum += self.loss_fn(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
        m = P.average_metrics({"test_loss": loss_sum, "test_accuracy": correct}, len(mine), name="hvdtrain.eval")
        return m

    # -------------------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._setup()
        self._open_outputs()
        self._restore_or_broadcast()
        k = cfg.backward_passes_per_step
        steps_per_epoch = len(self._batches(0)) // k
        if steps_per_epoch == 0:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} x --backward-passes-per-step {k} is more than this rank's "
                f"{len(self.sampler)} training samples: lower them or use fewer ranks"
            )
        steps_total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            steps_total = min(steps_total, cfg.max_steps)
        if self.step == 0:
            self._say(
                f"training {cfg.model} on {cfg.data}: {self.size} rank(s), strategy {cfg.strategy}, "
                f"{steps_total} steps of {cfg.batch_size} x {k} samples per rank, lr {self.lr:g}"
            )

        preempt.install(cfg.preempt_signal)
        preempted = False
        window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
        train_seconds, train_samples = 0.0, 0
        last_eval: dict[str, float] = {}
        # Every log_every steps the ranks sum [loss, samples, preemption votes] in one allreduce, started
        # after that step and read after the next one, so it overlaps a step instead of waiting for it.
        pending = None
        try:
            while self.epoch < cfg.epochs and self.step < steps_total and not preempted:
                batches = self._batches(self.epoch)
                groups = [batches[i : i + k] for i in range(0, steps_per_epoch * k, k)]
                self.model.train()
                t0 = time.perf_counter()
                for group in groups[self.step_in_epoch :]:
                    if self.step >= steps_total:
                        break
                    loss_sum, samples = self._train_step(group)
                    self.step += 1
                    self.step_in_epoch += 1
                    window_loss += loss_sum
                    window_samples += samples
                    train_samples += samples
                    if pending is not None:
                        preempted, pending = self._report(pending, steps_total), None
                    if self.step % cfg.log_every == 0 or self.step == steps_total:
                        votes = float(preempt.requested())
                        sums = P.PendingSum([window_loss, float(window_samples), votes], name="hvdtrain.window")
                        pending = (sums, self.step, self.epoch, time.perf_counter() - window_start)
                        window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
                    if preempted:
                        break
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self._checkpoint()
                if pending is not None:  # the epoch's (or the run's) last window
                    preempted, pending = self._report(pending, steps_total) or preempted, None
                train_seconds += time.perf_counter() - t0
                if preempted:
                    break
                if self.step_in_epoch >= steps_per_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                    if cfg.eval_every_epoch and self.epoch < cfg.epochs and self.step < steps_total:
                        last_eval = self.evaluate()
                        self._record({"step": self.step, "epoch": self.epoch, **last_eval})
                        self._say(f"epoch {self.epoch}: test accuracy {last_eval['test_accuracy']:.4f}")
        finally:
            preempt.uninstall()
        if sys.stdout.isatty() and self.is_main:
            sys.stdout.write("\n")

        if preempted:
            path = self._checkpoint()
            self._say(f"preempted at step {self.step}: checkpoint {path}")
            requeued = self._requeue() if self.is_main else None
            return self._finish({"preempted": True, "requeued": requeued}, train_seconds, train_samples)

        last_eval = self.evaluate()
        self._record({"step": self.step, "epoch": self.epoch, **last_eval})
        if not (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
            self._checkpoint()  # the end state, unless the last step just wrote it
        self._say(
            f"test accuracy: {last_eval['test_accuracy']:.4f} (test loss {last_eval['test_loss']:.4f}, "
            f"{self.step} steps, {train_seconds:.1f} s training)"
        )
        return self._finish({"preempted": False, **last_eval}, train_seconds, train_samples)

    def _requeue(self) -> Optional[str]:
        cfg, environ = self.cfg, os.environ
        if "SLURM_JOB_ID" not in environ or not cfg.requeue:
            return None
        restarts = slurm_restart_count(environ)
        if restarts >= cfg.max_requeues:
            self._say(f"not requeueing: the job was already requeued {restarts} times (--max-requeues {cfg.max_requeues})")
            return None
        from hvdtrain.slurm import requeue_job

        job = requeue_job(environ)
        self._say(f"requeued Slurm job {job}; it will resume from the checkpoint")
        return job

    def _finish(self, extra: dict[str, Any], seconds: float, samples: int) -> dict[str, Any]:
        total = P.PendingSum([float(samples)], name="hvdtrain.samples").result()[0]
        result = {
            "steps": self.step,
            "epochs_done": self.epoch,
            "world_size": self.size,
            "seconds_training": round(seconds, 3),
            "samples_per_s": total / seconds if seconds > 0 else math.nan,
            "params_sha256": params_sha256(self.model),
            "run_dir": str(self.run_dir),
            **extra,
        }
        if self.is_main:
            write_json(self.run_dir / "result.json", result)
            if self._tb is not None:
                self._tb.close()
        return result
