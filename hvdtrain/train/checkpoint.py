"""Checkpoints: written atomically by rank 0, validated on load, newest first, resumable on any layout.

A checkpoint is `run_dir/checkpoints/step-XXXXXXXX.pt`, a torch.save of a dict holding the model and
optimizer states (the unsplit model's, in torch's format, whatever the strategy: a pipeline gathers its stages),
the position in training (epoch, samples of it done, global step), every rank's
RNG states, the layout that wrote it (ranks, strategy, update, batch, learning rate), and a fingerprint of what
must match to resume (model, data, optimizer, seed). Anything else may change on a resume: the world size, the
strategy, the update rule, the batch. The position counts samples (parallel.shards), so the epoch's unprocessed
samples are dealt over the new world once; the learning rate becomes the new world's (set_learning_rate); and the
job says what changed in one line (layout_change). With --shard-optimizer a checkpoint is the directory
step-XXXXXXXX/ instead: every rank writes its own part of the optimizer state in parallel (save_sharded), rank 0
the rest (meta.pt) and, last, the manifest of every file, before the directory gets its name.
torch is imported inside the functions that need it, so the CLI can list checkpoints instantly.
Writes go to a temporary file in the same directory (.step-XXXXXXXX.pt.<pid>-<random>.tmp), are fsynced, then
`os.replace`d over the final name, and the directory is fsynced: a crash mid-write leaves the previous checkpoint
as the newest valid one. A write that raises (KeyboardInterrupt and SystemExit included) removes its temporary
file; one that finds the file system full is a DiskFullError naming the last complete checkpoint to resume from; one killed outright (SIGKILL, or SIGTERM with Python's default handler: no `finally` runs) leaves it, and
the next job on the run directory removes it at its start (remove_interrupted_writes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import CheckpointError, DiskFullError, HvdtrainError
from hvdtrain.files import full_disk, write_atomic
from hvdtrain.rundir import (
    MANIFEST_FILE,
    META_FILE,
    SHARD_FILE,
    RunDir,
    checkpoint_name,
    checkpoint_step,
    sharded_checkpoint_name,
)

FORMAT = 1
# What must match between a checkpoint and the job resuming from it: the model, the data (and its order: the
# seed), the optimizer. Checkpoints written before the resume on any layout also hold strategy, batch size and
# world size in their fingerprint; only the resuming job's fields are compared, so those resume anywhere too.
FINGERPRINT_FIELDS = ("model", "hidden", "depth", "data", "synthetic_samples", "optimizer", "seed")
# The temporary file of a write in progress (or of one that was killed): save() names it so.
TMP_RE = re.compile(r"^\.step-\d{8}(?:\.pt)?\..+\.tmp$")


def fingerprint(cfg) -> dict[str, Any]:
    """The settings a checkpoint records and a resuming job must share (else its state and position mean
    nothing)."""
    return {k: getattr(cfg, k) for k in FINGERPRINT_FIELDS}


def set_learning_rate(saved: dict[str, Any], lr: float) -> Optional[float]:
    """Give every optimizer state of a checkpoint (its "optimizer", and each rank's own of a local SGD one) the
    learning rate `lr` of the job resuming it; returns the rate it was written with (None: no optimizer state)."""
    states = [saved.get("optimizer"), *(own.get("optimizer") for own in saved.get("local") or [])]
    before = None
    for i, state in enumerate(states):
        for group in (state or {}).get("param_groups", []):
            if i == 0 and before is None:
                before = group.get("lr")
            group["lr"] = lr
    return before


def saved_layout(saved: dict[str, Any]) -> dict[str, Any]:
    """The layout that wrote a checkpoint: its record, or (written before it kept one) what its fingerprint and
    configuration say."""
    if "layout" in saved:
        return saved["layout"]
    config = saved.get("config") or {}
    return {
        "ranks": (saved.get("fingerprint") or {}).get("world_size"), "strategy": config.get("strategy"),
        "update": "sharded" if config.get("shard_optimizer") else config.get("update"),
        "stages": config.get("stages") if config.get("strategy") == "pipeline" else 1,
        "batch_size": config.get("batch_size"), "backward_passes_per_step": config.get("backward_passes_per_step"),
    }  # fmt: skip


def _ranks(n: Optional[int]) -> str:
    return f"{n} rank" + ("" if n == 1 else "s")


def layout_change(saved: dict[str, Any], layout: dict[str, Any], lr_before: Optional[float]) -> Optional[str]:
    """One line of what differs between the job that wrote `saved` and the one resuming it (`layout`), e.g.
    "step 120 of a 4-rank job resumed on 2 ranks; lr 0.2 -> 0.1"; None when nothing does."""
    old = saved_layout(saved)
    changes = []
    for key, words in (("strategy", "strategy"), ("stages", "stages"), ("update", "update")):
        if old.get(key) is not None and old[key] != layout[key]:
            changes.append(f"{words} {old[key]} -> {layout[key]}")
    if old.get("batch_size") is not None and old["batch_size"] != layout["batch_size"]:
        changes.append(f"batch {old['batch_size']} -> {layout['batch_size']} per rank")
    passes = old.get("backward_passes_per_step")
    if passes is not None and passes != layout["backward_passes_per_step"]:
        changes.append(f"backward passes per step {passes} -> {layout['backward_passes_per_step']}")
    if lr_before is not None and lr_before != layout["lr"]:
        changes.append(f"lr {lr_before:g} -> {layout['lr']:g}")
    # The job's ranks, as -np counts them (a pipeline's stages too, an async job's servers too).
    before = old.get("processes") or old.get("ranks")
    if not changes and before == layout["processes"]:
        return None
    of = f" of a {before}-rank job" if before else ""
    head = f"step {saved.get('step', 0)}{of} resumed on {_ranks(layout['processes'])}"
    return "; ".join([head, *changes])


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
    """Whether a checkpoint is whole, without reading it. A file: torch.save writes a zip archive, whose directory
    comes last, so a file cut short has none. A sharded checkpoint's directory: its manifest (written last, before
    the directory got its name) lists every file with its size."""
    if path.is_dir():
        try:
            files = json.loads((path / MANIFEST_FILE).read_text())["files"]
            return all((path / name).stat().st_size == size for name, size in files.items())
        except (OSError, ValueError, KeyError, TypeError):
            return False
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
        raise _disk_full(final, e) from e
    _fsync_dir(ckpt_dir)
    prune(ckpt_dir, keep)
    return final


def _disk_full(final: Path, error: BaseException) -> BaseException:
    """The one line of a checkpoint write that found the file system full: the last complete checkpoint is intact."""
    previous = [p for p in list_checkpoints(final.parent) if p != final]
    kept = (
        f"the last complete checkpoint {previous[-1]} is intact: free some space, then resume with --resume"
        if previous
        else "there is no earlier checkpoint: free some space, then start again"
    )
    return full_disk(final, error, fix=kept) or error


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints."""
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        _remove(old)


def save_sharded(
    meta: Optional[dict[str, Any]],
    shard: dict[str, Any],
    ckpt_dir: Path,
    step: int,
    where: tuple[int, int],
    agree: Callable[[Optional[tuple[str, str]]], list],
    keep: int = 3,
) -> Path:
    """Collective: every rank of `where` (rank, size) writes its own `shard` of the optimizer state, in parallel,
    into .step-XXXXXXXX.shards.tmp/; rank 0 also writes `meta` (the rest of the checkpoint). `agree` (an allgather)
    tells every rank whether every write went through; then rank 0 writes the manifest (each file and its size)
    and renames the directory to step-XXXXXXXX/, which makes it the newest complete checkpoint, and prunes. A write
    that fails (a full disk) fails every rank with the same line and leaves no directory; a rank killed mid-write
    leaves the temporary one, which --resume passes over and the next job's rank 0 removes."""
    import torch

    rank, size = where
    final = ckpt_dir / sharded_checkpoint_name(step)
    tmp = ckpt_dir / f".{final.name}.shards.tmp"  # the same name on every rank; matches TMP_RE
    problem = None
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        write_atomic(tmp / SHARD_FILE.format(rank=rank), lambda f: torch.save(shard, f), fsync=True)
        if meta is not None:
            write_atomic(tmp / META_FILE, lambda f: torch.save({"format": FORMAT, **meta}, f), fsync=True)
    except DiskFullError as e:
        problem = ("full", str(_disk_full(final, e)))
    except OSError as e:
        problem = ("error", f"cannot write {tmp}: {e.strerror or e}")
    failed = [p for p in agree(problem) if p]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        agree(None)  # every rank fails once the temporary directory is gone (a rank's exit ends the job)
        kind, message = problem or failed[0]
        raise DiskFullError(message) if kind == "full" else HvdtrainError(message)
    if rank == 0:
        files = {SHARD_FILE.format(rank=r): (tmp / SHARD_FILE.format(rank=r)).stat().st_size for r in range(size)}
        files[META_FILE] = (tmp / META_FILE).stat().st_size
        manifest = json.dumps({"format": FORMAT, "step": step, "ranks": size, "files": files}, indent=1)
        write_atomic(tmp / MANIFEST_FILE, lambda f: f.write(manifest.encode()), fsync=True)
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (a resumed job): the newer replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        prune(ckpt_dir, keep)
    return final


def consolidate_optimizer(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint whose optimizer state is in its ranks' files (sharded) with that state made torch's whole
    one (what a job that does not shard, or `hvdtrain checkpoint consolidate`, needs); others as they are."""
    optimizer = saved.get("optimizer") or {}
    if "files" not in optimizer:
        return saved
    from hvdtrain.parallel import zero_files

    pieces = zero_files.Pieces.of_files(optimizer["files"])
    return {**saved, "optimizer": zero_files.consolidate(pieces, optimizer["shapes"], optimizer["param_groups"])}


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
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        except FileNotFoundError:
            continue
        removed.append(tmp)
    if removed:
        say(
            f"removed {len(removed)} unfinished checkpoint write(s) left by an interrupted job in {ckpt_dir}: "
            + ", ".join(p.name for p in removed)
        )
    return removed


def load(path: Path, fingerprint: Optional[dict[str, Any]] = None, mmap: bool = False) -> dict[str, Any]:
    """Load and check a checkpoint (a file, or a sharded one's directory: its meta.pt, with the optimizer entry's
    "files" naming the ranks' files); a corrupt or mismatched one raises CheckpointError naming the fix. `mmap`:
    the tensors are mapped, not read (what a listing needs)."""
    previous = [p for p in list_checkpoints(path.parent) if p != path and p.name < path.name]
    import torch

    hint = f"; the previous checkpoint {previous[-1]} is intact: resume from it with --resume-from" if previous else ""
    sharded = path.is_dir()
    if sharded and not complete(path):
        raise CheckpointError(f"checkpoint {path} is not complete (a sharded write that did not finish){hint}")
    try:
        state = torch.load(path / META_FILE if sharded else path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated zip, bad pickle, wrong file type: all mean "unreadable"
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}){hint}") from None
    if sharded and isinstance(state, dict) and isinstance(state.get("optimizer"), dict):
        ranks = state["optimizer"].get("sharded", 0)  # each rank's file of its optimizer state, by rank
        state["optimizer"]["files"] = [str(path / SHARD_FILE.format(rank=r)) for r in range(ranks)]
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


def position(saved: dict[str, Any], cfg, size: int, samples: int) -> tuple[int, int, int, int]:
    """The (epoch, step_in_epoch, step, samples_in_epoch) a checkpoint holds; samples_in_epoch computed from its steps
    (and the batch and world size it was written with, else `cfg`'s and `size`) when it predates that field, at most
    the epoch's `samples`."""
    c = saved
    epoch, step_in_epoch, step, done = c["epoch"], c["step_in_epoch"], c["step"], c.get("samples_in_epoch")
    if done is None:
        written = saved.get("config") or {}  # the job that wrote it: its batch, passes and world size
        per_step = written.get("batch_size", cfg.batch_size) * written.get(
            "backward_passes_per_step", cfg.backward_passes_per_step
        )
        done = min(samples, step_in_epoch * per_step * ((saved.get("fingerprint") or {}).get("world_size") or size))
    return epoch, step_in_epoch, step, done


def restore_rng(rngs: list[Any], rank: int, size: int, seed: int, step: int) -> None:
    """Rank `rank`'s RNG states as a checkpoint of as many ranks (`size`) kept them; else (another world) a stream
    of the rank's own, seeded from the seed, the rank and the step, so a resume on a new world is as reproducible
    as one on the old."""
    if len(rngs) == size:
        set_rng_state(rngs[rank])
        return
    import random

    import numpy as np
    import torch

    derived = hash((seed, rank, step)) % 2**31  # (a tuple of ints hashes the same in every process)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)


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


def host_copy(state: Any) -> Any:
    """A copy of `state` whose tensors are this process's own, in host memory (containers rebuilt, other values
    shared): what a background write reads while training changes the live tensors in place."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):  # an OrderedDict stays one (a state_dict's order and _metadata matter)
        copy = type(state)((k, host_copy(v)) for k, v in state.items())
        if hasattr(state, "_metadata"):
            copy._metadata = state._metadata
        return copy
    if type(state) in (list, tuple):
        return type(state)(host_copy(v) for v in state)
    return state


class Writes:
    """Rank 0's checkpoint writes: synchronous, or (`background`, --async-checkpoint) in a thread while training
    goes on, at most one in flight.

    `save` of a background write takes a host copy of the state at the step boundary (the training stall: the
    copy, plus waiting for the previous write if it is still going), hands it to a thread and returns the path the
    checkpoint will have. `wait` blocks until the write in flight, if any, is done, and raises what it raised (a
    full disk is a DiskFullError naming the last complete checkpoint, as a synchronous write's). The job waits
    before the next save, before a preemption's requeue, at the end of training and when it fails (the thread is
    not a daemon: the interpreter finishes the write before it exits). A write killed with its process leaves the
    previous checkpoint the newest complete one, as a synchronous one does."""

    def __init__(self, background: bool):
        self.background = background
        self._thread = None
        self._error: Optional[BaseException] = None
        self.done: list[tuple[int, Path]] = []  # (step, path) of the writes finished since the caller last took them

    def save(self, state: dict[str, Any], ckpt_dir: Path, step: int, keep: int) -> Path:
        self.wait()
        if not self.background:
            path = save(state, ckpt_dir, step, keep)
            self.done.append((step, path))
            return path
        import threading

        copy = host_copy(state)

        def write() -> None:
            try:
                path = save(copy, ckpt_dir, step, keep)
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e
                return
            self.done.append((step, path))  # (the list of now: take_done may have swapped it during the write)

        self._thread = threading.Thread(target=write, name=f"hvdtrain-checkpoint-{step}", daemon=False)
        self._thread.start()
        return ckpt_dir / checkpoint_name(step)

    def wait(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def take_done(self) -> list[tuple[int, Path]]:
        done, self.done = self.done, []
        return done
