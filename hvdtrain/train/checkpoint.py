"""Checkpoints: written atomically by rank 0, validated on load, newest first.

A checkpoint is `run_dir/checkpoints/step-XXXXXXXX.pt`, a torch.save of a dict holding the model and
optimizer states, the position in training (epoch, batches done in that epoch, global step), every rank's
RNG states, and a fingerprint of what must match to resume (model, data, batch size, world size...).
torch is imported inside the functions that need it, so the CLI can list checkpoints instantly.
Writes go to a temporary file in the same directory (.step-XXXXXXXX.pt.<pid>-<random>.tmp), are fsynced, then
`os.replace`d over the final name, and the directory is fsynced: a crash mid-write leaves the previous checkpoint
as the newest valid one. A write that raises (KeyboardInterrupt and SystemExit included) removes its temporary
file; one that finds the file system full is a DiskFullError naming the last complete checkpoint to resume from; one killed outright (SIGKILL, or SIGTERM with Python's default handler: no `finally` runs) leaves it, and
the next job on the run directory removes it at its start (remove_interrupted_writes).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import CheckpointError, DiskFullError
from hvdtrain.files import full_disk, write_atomic
from hvdtrain.rundir import RunDir, checkpoint_name, checkpoint_step

FORMAT = 1
# What must match between a checkpoint and the job resuming from it (plus the world size, but for elastic jobs).
FINGERPRINT_FIELDS = (
    "strategy", "devices_per_rank", "balance", "micro_batches", "model", "hidden", "depth", "data", "synthetic_samples",
    "batch_size", "optimizer", "backward_passes_per_step", "seed",
)  # fmt: skip
# The temporary file of a write in progress (or of one that was killed): save() names it so.
TMP_RE = re.compile(r"^\.step-\d{8}\.pt\..+\.tmp$")


def fingerprint(cfg, world_size: Optional[int]) -> dict[str, Any]:
    """The settings a checkpoint records and a resuming job must share (else its position means nothing).
    `world_size`: the data-parallel replicas (cfg.data_ranks); None leaves it out: an elastic job resumes on any
    number of ranks."""
    out = {k: getattr(cfg, k) for k in FINGERPRINT_FIELDS}
    if cfg.strategy in ("data", "pipeline"):
        # Both write one replica's parameters under the unsplit model's names, the optimizer state in its order
        # (a pipeline gathers its stages): the same checkpoint, resumable by either on as many replicas.
        out["strategy"] = "data"
        for k in ("devices_per_rank", "balance", "micro_batches"):
            del out[k]
    if world_size is not None:
        out["world_size"] = world_size
    return out


def resume_path(cfg, slurm: SlurmEnv, warn: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The checkpoint a job starts from: --resume-from; else the newest complete one in run_dir/checkpoints when
    --resume is given or Slurm requeued the job (`slurm`, the job this process is in: SLURM_RESTART_COUNT > 0);
    else none. Checkpoints that nobody asked to resume from are an error rather than something to overwrite.

    What a killed job can leave there is passed over, and said through `warn` (one line each): the temporary
    files of a write that never finished (removed by the job's rank 0 at its start), and a checkpoint file cut
    short (`complete`: copied or written by something else than `save`, which never leaves one), which a
    resume skips for the newest complete one before it. Every caller gets the same answer from the same files."""
    if cfg.resume_from:
        return Path(cfg.resume_from)
    ckpt_dir = RunDir(cfg.run_dir).checkpoints
    found = list_checkpoints(ckpt_dir)
    if not (cfg.resume or slurm.restart_count > 0):
        if found:
            raise CheckpointError(
                f"{cfg.run_dir} already has checkpoints (newest {found[-1].name}): pass --resume to continue from "
                "it, or choose a new --run-dir"
            )
        return None
    warn = warn or (lambda _message: None)
    unfinished = interrupted_writes(ckpt_dir)
    if unfinished:
        warn(
            f"{ckpt_dir}: skipped {', '.join(p.name for p in unfinished)} (unfinished checkpoint write of a killed "
            "job; removed when the job starts)"
        )
    cut = []
    while found and not complete(found[-1]):
        cut.append(found.pop())
    if cut:
        instead = f"resuming from {found[-1].name}" if found else "no complete checkpoint is left"
        warn(
            f"{ckpt_dir}: skipped {', '.join(p.name for p in cut)}, cut short (a write that did not finish); {instead}"
        )
    return found[-1] if found else None


def complete(path: Path) -> bool:
    """Whether a checkpoint file is whole, without reading it: torch.save writes a zip archive, whose directory
    comes last, so a file cut short has none."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary files of an interrupted write are never listed)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(step, p) for p in ckpt_dir.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict[str, Any], ckpt_dir: Path, step: int, keep: int = 3) -> Path:
    """Atomically write `state` as the checkpoint of `step` into `ckpt_dir` (a RunDir's .checkpoints), then
    prune all but the newest `keep`."""
    import torch

    final = ckpt_dir / checkpoint_name(step)
    try:  # the temporary file, .step-XXXXXXXX.pt.<pid>-<random>.tmp, matches TMP_RE
        write_atomic(final, lambda f: torch.save({"format": FORMAT, **state}, f), fsync=True)
    except DiskFullError as e:
        previous = list_checkpoints(ckpt_dir)
        kept = (
            f"the last complete checkpoint {previous[-1]} is intact: free some space, then resume with --resume"
            if previous
            else "there is no earlier checkpoint: free some space, then start again"
        )
        raise (full_disk(final, e, fix=kept) or e) from e
    _fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def interrupted_writes(ckpt_dir: Path) -> list[Path]:
    """The temporary files in `ckpt_dir` that checkpoint writes left (or are writing), by name."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if TMP_RE.match(p.name))


def remove_interrupted_writes(ckpt_dir: Path, say: Callable[[str], None]) -> list[Path]:
    """Remove the temporary files that interrupted checkpoint writes left in `ckpt_dir` (a writer killed by
    SIGKILL, or by SIGTERM with Python's default handler, runs no cleanup), and say so in one line; returns them.

    Call it only from the process that writes this run directory's checkpoints, at its start, before its first
    save: then no temporary file there belongs to a live writer. Within a job that process is the only writer
    (rank 0), and it has written nothing yet; another job cannot be writing, because `hvdtrain train` holds the
    run directory's lock (hvdtrain.runlock) for the whole job and refuses a second one on the same directory.
    (Not in an elastic job: a worker that starts as rank 0 there may have replaced a rank 0 that was lost with
    its host and could still be finishing a write; nor for a Trainer that two callers run on one run directory
    without `hvdtrain train`, which nothing protects.)"""
    removed = []
    for tmp in interrupted_writes(ckpt_dir):
        try:
            tmp.unlink()
        except FileNotFoundError:
            continue
        removed.append(tmp)
    if removed:
        say(
            f"removed {len(removed)} unfinished checkpoint write(s) left by an interrupted job in {ckpt_dir}: "
            + ", ".join(p.name for p in removed)
        )
    return removed


def load(path: Path, fingerprint: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load and check a checkpoint; a corrupt or mismatched file raises CheckpointError naming the fix."""
    previous = [p for p in list_checkpoints(path.parent) if p != path and p.name < path.name]
    import torch

    hint = f"; the previous checkpoint {previous[-1]} is intact: resume from it with --resume-from" if previous else ""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated zip, bad pickle, wrong file type: all mean "unreadable"
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}){hint}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hvdtrain checkpoint (format {FORMAT}){hint}")
    if fingerprint is not None:
        saved = state.get("fingerprint", {})
        diffs = [
            f"{k}: checkpoint has {saved.get(k)!r}, this job has {v!r}"
            for k, v in fingerprint.items()
            if saved.get(k) != v
        ]
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} does not match this job ({'; '.join(diffs)}): "
                "run with the checkpoint's settings or start a new --run-dir"
            )
    return state


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
