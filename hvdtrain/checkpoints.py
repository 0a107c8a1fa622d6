"""`hvdtrain checkpoint ls|inspect|verify|consolidate`: what a run directory's checkpoints hold, whether they are
whole, and a plain torch file of one.

A target is a run directory (its checkpoints/), a checkpoints directory, or one checkpoint file; inspect, verify
and consolidate of a directory take its newest complete checkpoint (the one --resume takes), verify --all every one.
`ls` reads each file's small entries only: torch.load with mmap=True maps the tensors' storage without reading it,
so listing a run of 100 M-parameter checkpoints reads a few kB of each. torch is imported by the commands, never
by the CLI's import.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Optional

from hvdtrain.errors import CheckpointError, UsageError
from hvdtrain.files import size_text
from hvdtrain.render import fmt, render_table
from hvdtrain.rundir import META_FILE, RunDir
from hvdtrain.train import checkpoint

SETTINGS = ("lr", "momentum", "nesterov", "betas", "eps", "weight_decay")  # of a param group, in inspect's text


def locate(target: str) -> tuple[Optional[Path], list[Path]]:
    """(the checkpoints directory or None for a file, its finished checkpoints oldest first / [the file])."""
    path = Path(target)
    if path.is_file() or (path / META_FILE).is_file():  # a checkpoint file, or a sharded checkpoint's directory
        return None, [path]
    if not path.is_dir():
        raise UsageError(f"{target}: no such file or directory; give a run directory or a checkpoint file")
    folder = RunDir(path).checkpoints if RunDir(path).checkpoints.is_dir() else path
    found = checkpoint.list_checkpoints(folder)
    if not found and not checkpoint.interrupted_writes(folder):
        raise UsageError(f"{target}: holds no checkpoint (step-XXXXXXXX.pt, here or in checkpoints/)")
    return folder, found


def newest(target: str) -> Path:
    """The checkpoint a command on `target` reads: the file, or a directory's newest complete one."""
    folder, found = locate(target)
    whole = [p for p in found if checkpoint.complete(p)]
    if not whole:
        raise CheckpointError(f"{target}: no complete checkpoint (every one was cut short)")
    return whole[-1]


def _size(path: Path) -> int:
    """Bytes of a checkpoint file, or of a sharded checkpoint's files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _tensors(state: Any) -> list:
    import torch

    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def _bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(state))


def summary(path: Path) -> dict[str, Any]:
    """What `ls` shows of one checkpoint file (its tensors are mapped, not read)."""
    row: dict[str, Any] = {"file": str(path), "bytes": _size(path), "complete": checkpoint.complete(path)}
    if not row["complete"]:
        return {**row, "status": "cut short"}
    try:
        saved = checkpoint.load(path, mmap=True)
    except CheckpointError as e:
        return {**row, "status": "unreadable", "problem": str(e)}
    layout = checkpoint.saved_layout(saved)
    groups = (saved.get("optimizer") or {}).get("param_groups") or [{}]
    model = saved.get("model") or {}
    return {
        **row, "status": "complete", "step": saved.get("step"), "epoch": saved.get("epoch"),
        "samples_in_epoch": saved.get("samples_in_epoch"), "ranks": layout.get("processes") or layout.get("ranks"),
        "strategy": layout.get("strategy"), "update": layout.get("update"), "batch_size": layout.get("batch_size"),
        "lr": layout.get("lr", groups[0].get("lr")), "params": sum(t.numel() for t in _tensors(model)),
        "model": (saved.get("fingerprint") or {}).get("model"),
    }  # fmt: skip


def ls(target: str) -> list[dict[str, Any]]:
    """One row per checkpoint of `target` (and per unfinished write), oldest first; the one --resume takes marked."""
    folder, found = locate(target)
    rows = [summary(p) for p in found]
    whole = [r for r in rows if r["status"] == "complete"]
    if whole:
        whole[-1]["resume"] = True
    if folder is not None:
        rows += [{"file": str(p), "bytes": _size(p), "complete": False, "status": "unfinished write"}
                 for p in checkpoint.interrupted_writes(folder)]  # fmt: skip
    return rows


def format_ls(rows: list[dict[str, Any]]) -> str:
    headers = ["step", "epoch", "samples", "ranks", "strategy", "update", "batch", "lr", "params", "size", "status",
               "file"]  # fmt: skip
    table = []
    for r in rows:
        status = r["status"] + (" (--resume takes it)" if r.get("resume") else "")
        epoch = r.get("epoch")
        table.append([
            fmt(r.get("step")), "-" if epoch is None else epoch + 1, fmt(r.get("samples_in_epoch")), fmt(r.get("ranks")),
            r.get("strategy") or "-", r.get("update") or "-", fmt(r.get("batch_size")),
            "-" if r.get("lr") is None else f"{r['lr']:g}", fmt(r.get("params")), size_text(r["bytes"]), status,
            os.path.basename(r["file"]),
        ])  # fmt: skip
    return render_table(headers, table)


def inspect(target: str) -> dict[str, Any]:
    """Everything a checkpoint says about itself: position, layout, fingerprint, sizes, optimizer settings."""
    path = newest(target)
    saved = checkpoint.load(path, mmap=True)
    optimizer = saved.get("optimizer") or {}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.get("param_groups", [])]
    kinds = sorted({k for s in (optimizer.get("state") or {}).values() for k in s})
    if optimizer.get("files"):  # sharded: the entries of rank 0's file (mapped, not read)
        import torch

        first = torch.load(optimizer["files"][0], map_location="cpu", weights_only=True, mmap=True)
        kinds = sorted({k for b in first["buckets"] for k in b["state"]})
    model = saved.get("model") or {}
    files = optimizer.get("files") or []
    return {
        "file": str(path), "bytes": _size(path), "sharded_files": len(files), "step": saved.get("step"), "epoch": saved.get("epoch"),
        "step_in_epoch": saved.get("step_in_epoch"), "samples_in_epoch": saved.get("samples_in_epoch"),
        "layout": checkpoint.saved_layout(saved), "fingerprint": saved.get("fingerprint"),
        "model": {"tensors": len(model), "params": sum(t.numel() for t in _tensors(model)), "bytes": _bytes(model)},
        "optimizer": {"param_groups": groups, "state": kinds,
                      "bytes": sum(Path(f).stat().st_size for f in files) if files else _bytes(optimizer)},
        "rng_states": len(saved.get("rng") or []), "local_states": len(saved.get("local") or []),
        "update": sorted(saved.get("update") or {}),
    }  # fmt: skip


def format_inspect(info: dict[str, Any]) -> str:
    layout, model, opt = info["layout"], info["model"], info["optimizer"]
    epoch = info["epoch"]
    lines = [
        f"{info['file']} ({size_text(info['bytes'])})",
        f"  position   step {info['step']}, epoch {'-' if epoch is None else epoch + 1}, "
        f"{fmt(info['samples_in_epoch'])} of its samples done",
        "  written by " + ", ".join(f"{k} {v}" for k, v in layout.items() if v is not None),
        "  must match " + ", ".join(f"{k} {v}" for k, v in (info["fingerprint"] or {}).items()),
        f"  model      {model['params']:,} parameters in {model['tensors']} tensors ({size_text(model['bytes'])})",
        f"  optimizer  {', '.join(opt['state']) or 'no state'} ({size_text(opt['bytes'])}"
        + (f", in the files of its {info['sharded_files']} ranks" if info["sharded_files"] else "") + "); "
        + "; ".join(", ".join(f"{k} {g[k]}" for k in SETTINGS if k in g) for g in opt["param_groups"]),
        f"  RNG states of {info['rng_states']} rank(s)"
        + (f"; each rank's own model and optimizer ({info['local_states']} ranks, local SGD)" if info["local_states"] else ""),
    ]  # fmt: skip
    return "\n".join(lines)


def verify_one(path: Path) -> list[str]:
    """What is wrong with one checkpoint file ([] when nothing): the archive's checksums, the whole load, the
    entries a resume needs, the model's values finite, the optimizer's state for the model's parameters only."""
    if not checkpoint.complete(path):
        what = "its manifest is missing or does not match its files" if path.is_dir() else "no zip directory at its end"
        return [f"cut short ({what}): a write that did not finish"]
    for archive in sorted(path.iterdir()) if path.is_dir() else [path]:
        if archive.suffix != ".pt":
            continue
        try:
            with zipfile.ZipFile(archive) as z:
                bad = z.testzip()
        except Exception as e:  # a changed byte in a header: bad names, sizes, compression types
            return [f"unreadable archive {archive.name} ({type(e).__name__}: {e})"]
        if bad is not None:
            return [f"checksum mismatch in {archive.name}: {bad}: the file changed after it was written"]
    try:
        saved = checkpoint.consolidate_optimizer(checkpoint.load(path, mmap=False))
    except CheckpointError as e:
        return [str(e)]
    except Exception as e:  # a shard that does not merge
        return [f"its optimizer files do not merge ({type(e).__name__}: {e})"]
    problems = [f"no {k!r} entry" for k in ("model", "optimizer", "step", "epoch", "rng") if k not in saved]
    model = saved.get("model") or {}
    nonfinite = [k for k, t in model.items() if t.is_floating_point() and not t.isfinite().all()]
    if nonfinite:
        problems.append(f"non-finite values in {', '.join(nonfinite[:3])}" + (" ..." if len(nonfinite) > 3 else ""))
    floats = [k for k, t in model.items() if t.is_floating_point()]  # the parameters and any float buffers
    optimizer = saved.get("optimizer") or {}
    indices = {i for g in optimizer.get("param_groups", []) for i in g.get("params", [])}
    if indices and max(indices) >= len(floats):
        problems.append(f"the optimizer holds {len(indices)} parameters, the model at most {len(floats)}")
    return problems


def verify(target: str, every: bool) -> list[tuple[Path, list[str]]]:
    """(file, problems) for the newest complete checkpoint of `target`, or (`every`) for each one."""
    folder, found = locate(target)
    paths = found if every or folder is None else [newest(target)]
    return [(p, verify_one(p)) for p in paths]


def consolidate(target: str, out: Path, with_optimizer: bool) -> tuple[Path, dict[str, Any]]:
    """Write the model's state_dict of `target`'s checkpoint (with its optimizer's: {"model", "optimizer"}) as a plain
    torch file, loadable with torch.load(weights_only=True) and no hvdtrain; returns (source, what was written)."""
    import torch

    from hvdtrain.files import write_atomic

    path = newest(target)
    saved = checkpoint.consolidate_optimizer(checkpoint.load(path, mmap=False))
    plain = {"model": saved["model"], "optimizer": saved["optimizer"]} if with_optimizer else saved["model"]
    write_atomic(out, lambda f: torch.save(plain, f), fsync=True)
    return path, plain
