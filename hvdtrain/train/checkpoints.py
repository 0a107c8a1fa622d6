"""The Trainer's checkpoints: what every rank starts from (a checkpoint of any layout, or rank 0's fresh weights),
and the checkpoints it writes (rank 0 alone, in the background with --async-checkpoint, or every rank its own shard
of a sharded optimizer's state). A mixin of train.trainer.Trainer, which holds the state it reads and writes.

Exact resume, on any layout (docs/checkpoints.md): a checkpoint holds the model and optimizer (the unsplit model's,
whatever the strategy), the epoch, the number of its samples done (the epoch's order is a pure function of seed
and epoch; parallel.shards deals its rest over whatever world resumes), every rank's RNG states and the layout that
wrote it. Resuming on the same layout restores all of it, so a run interrupted at any checkpoint and resumed ends
bitwise equal to an uninterrupted one in deterministic mode on CPU; on another world size, batch or strategy each
remaining sample of the epoch is read once, the learning rate becomes the new world's, and rank 0 says what changed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

from hvdtrain import progress
from hvdtrain.errors import CheckpointError
from hvdtrain.parallel import horovod
from hvdtrain.train import checkpoint


class Checkpoints:
    """The Trainer's reading and writing of checkpoints (self: the Trainer)."""

    def _restore_or_broadcast(self) -> Optional[Path]:
        """Start every rank from the same state: a checkpoint (loaded by rank 0; returns its path), or rank 0's
        fresh weights."""
        path = checkpoint.resume_path(self.cfg, self.slurm)
        saved, error = None, None
        if path is not None and self.is_main:
            try:
                saved = self.read_checkpoint(path)
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
            (self._position_of(saved), saved["rng"], saved.get("update", {}), self.resume_change)
            if self.is_main
            else None,
            name="hvdtrain.position",
        )
        self.state.position, rngs, update_state, self.resume_change = position
        self.update.load_state_dict(update_state)
        self.restore_rng(rngs)
        return path

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Rank 0: the checkpoint at `path`, checked against this job, made this job's: its learning rate becomes
        this world's (a resume on another world size or batch follows the scaling rule, and a new --lr takes
        effect), and what changed from the job that wrote it is kept as one line (resume_change)."""
        saved = checkpoint.load(path, self.fingerprint)
        if self.update.name != "sharded":  # a sharded checkpoint's optimizer state made whole for this job
            saved = checkpoint.consolidate_optimizer(saved)
        lr_before = checkpoint.set_learning_rate(saved, self.lr)
        self.resume_change = checkpoint.layout_change(saved, self._layout(), lr_before)
        return saved

    def restore_rng(self, rngs: list[Any]) -> None:
        """This rank's RNG states from a checkpoint's (checkpoint.restore_rng)."""
        checkpoint.restore_rng(rngs, *horovod.world(), self.cfg.seed, self.state.step)

    def _layout(self) -> dict[str, Any]:
        """How this job trains, as a checkpoint records it (what a resume on another layout compares)."""
        cfg = self.cfg
        return {
            "ranks": self.size, "processes": horovod.world()[1], "strategy": cfg.strategy, "update": self.update.name,
            "stages": cfg.stages if cfg.strategy == "pipeline" else 1, "batch_size": cfg.batch_size,
            "backward_passes_per_step": cfg.backward_passes_per_step, "lr": self.lr,
        }  # fmt: skip

    def _position_of(self, saved: dict[str, Any]) -> tuple[int, int, int, int]:
        return checkpoint.position(saved, self.cfg, self.size, len(self.data.train))

    def _checkpoint(self, last: bool = False) -> Optional[Path]:
        """Collective: every rank hands in its RNG states; rank 0 writes the file atomically, in the background with
        --async-checkpoint (self.writes; `last`: the job's last, waited for: the end, a preemption, Ctrl-C)."""
        progress.set_phase("checkpoint")
        started = time.perf_counter()
        rngs = horovod.allgather_object(checkpoint.rng_state(), name="hvdtrain.rng")
        entries = self.update.checkpoint_entries(self.state, root_rank=0)
        path = saved = None
        if self.is_main:
            saved = {
                **self.state.position_entries(),
                **entries,
                "rng": rngs,
                "fingerprint": self.fingerprint,
                "layout": self._layout(),
                "config": dataclasses.asdict(self.cfg),
            }
        path = self._write(saved, self.update.shard_file(self.state))
        if self.is_main:
            self.checkpoint_stall_s.append(time.perf_counter() - started)
            if last:
                self.writes.wait()
            self._record_checkpoints()
        self.hooks.on_checkpoint(self, path)
        return path

    def _write(self, saved: Optional[dict[str, Any]], shard: Optional[dict[str, Any]]) -> Optional[Path]:
        """Rank 0 writes `saved` (through self.writes); or, with a `shard` on every rank (a sharded optimizer), every
        rank writes its own shard in parallel and rank 0 the rest (checkpoint.save_sharded, collective). Returns
        the checkpoint's path on rank 0."""
        step, folder, keep = self.state.step, self.run_dir.checkpoints, self.cfg.keep_checkpoints
        if shard is None:
            return self.writes.save(saved, folder, step, keep=keep) if self.is_main else None

        def agree(problem: Optional[tuple[str, str]]) -> list:
            return horovod.allgather_object(problem, name="hvdtrain.ckpt_shards")

        path = checkpoint.save_sharded(saved, shard, folder, step, horovod.world(), agree, keep)
        if not self.is_main:
            return None
        self.writes.done.append((step, path))
        return path

    def _record_checkpoints(self) -> None:
        """Rank 0: a metrics.jsonl record of each checkpoint written since the last call (a background write's
        when it is done)."""
        for step, path in self.writes.take_done():
            self.recorder.record({"event": "checkpoint", "step": step, "path": str(path)})
