"""`hvdtrain report RUN_DIR...`: what runs did, from their run directories alone.

metrics.jsonl (rank 0's records: training windows with loss, lr and samples/s; evaluations with test accuracy
and loss; events: start, checkpoint, resize, preempted, interrupted), result.json and, with --autotune,
Horovod's autotuner log (autotune.csv). Out: loss, accuracy, samples/s and lr against step and against wall
time (several runs overlaid) as one PNG, and a table per run: final accuracy, time and step to each accuracy
level, resizes, preemptions, requeues and resumes seen, the autotuner's choice. Nothing heavy is imported:
matplotlib only when the PNG is drawn.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hvdtrain.errors import UsageError
from hvdtrain.files import unfinished_writes
from hvdtrain.render import columns, save_plot
from hvdtrain.rundir import RunDir

# Horovod's autotuner log: its header, then one row per scored sample, then (when tuning finished) the best row.
AUTOTUNE_COLUMNS = (
    "hierarchical_allreduce", "hierarchical_allgather", "torus_allreduce", "cache_enabled", "cycle_time_ms",
    "tensor_fusion_threshold", "score",
)  # fmt: skip


@dataclasses.dataclass
class Run:
    path: Path
    records: list[dict[str, Any]]
    result: Optional[dict[str, Any]]
    autotune: Optional[dict[str, Any]] = None  # the autotuner's log, read (`autotune`); None without one

    @property
    def name(self) -> str:
        return self.path.name

    def rows(self, key: str) -> list[dict[str, Any]]:
        """The records holding `key` (training windows: train_loss; evaluations: test_accuracy)."""
        return [r for r in self.records if key in r and "event" not in r]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == kind]

    @functools.cached_property
    def t0(self) -> float:
        """Wall time zero: the first start of the run (or its first record, for runs before start records)."""
        starts = self.events("start")
        return starts[0]["time"] if starts else self.records[0]["time"]


def _ignore(_message: str) -> None:
    pass


def read_records(path: Path, warn: Callable[[str], None] = _ignore) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (rank 0 appends one JSON object per line). A killed job can leave its last
    line cut short: it is skipped and said (`warn`, one line), as are lines that are not records."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(
            f"{path.parent} has no metrics.jsonl: give the run directory of a hvdtrain train job"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}; give the run directory of a hvdtrain train job") from None
    lines = text.split("\n")
    unterminated = lines.pop()  # "" when the file ends with a newline, as every whole record does
    records, bad, truncated = [], [], False
    for number, line in enumerate([*lines, unterminated], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("time"), (int, float)):
            records.append(row)
        elif number == len(lines) + 1:
            truncated = True  # the writer was killed within its last line
        else:
            bad.append(number)
    if truncated:
        warn(f"{path}: skipped a truncated last line (a killed job)")
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warn(f"{path}: skipped {len(bad)} line(s) that are not metrics records (line {shown})")
    if not records:
        raise UsageError(
            f"{path} holds no complete record: the run was killed (or is still starting) before it logged a step; "
            "report a run that has trained"
        )
    return records


def load(path: Path, warn: Callable[[str], None] = _ignore) -> Run:
    """A run directory's records and result, tolerating what a killed job leaves (each skipped thing said in one
    line through `warn`): a last line of metrics.jsonl cut short, no result.json (the run did not finish), a
    result.json that does not read, temporary files of writes that were killed."""
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise UsageError(f"{path} is not a directory: give run directories (hvdtrain train --run-dir)")
    records = read_records(run_dir.metrics, warn)
    for tmp in unfinished_writes(run_dir.path):
        warn(f"{tmp}: skipped (the unfinished write of a killed job)")
    result = None
    try:
        result = json.loads(run_dir.result.read_text())
    except FileNotFoundError:
        warn(f"{run_dir.path}: no result.json (the run did not finish: killed, or still running); reported from "
             "metrics.jsonl alone")  # fmt: skip
    except (OSError, ValueError) as e:
        warn(f"{run_dir.result}: skipped, it does not read ({e})")
    if result is not None and not isinstance(result, dict):
        warn(f"{run_dir.result}: skipped, it is not a JSON object")
        result = None
    return Run(run_dir.path, records, result, autotune(run_dir.autotune, warn))


def autotune(path: Path, warn: Callable[[str], None] = _ignore) -> Optional[dict[str, Any]]:
    """What Horovod's autotuner tried and chose, from its log: samples scored, the best (highest score, bytes
    allreduced per microsecond) and whether tuning finished (Horovod then repeats the best row last). None
    without a log; a row cut short (a killed job) is skipped and said."""
    try:
        with open(path, newline="") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        if not isinstance(e, FileNotFoundError):
            warn(f"{path}: skipped, it does not read ({e})")
        return None
    samples, cut = [], 0
    for r in rows[1:]:
        if not any(r):
            continue
        try:
            samples.append({k: float(v) for k, v in zip(AUTOTUNE_COLUMNS, r, strict=True)})
        except ValueError:
            cut += 1
    if cut:
        warn(f"{path}: skipped {cut} row(s) cut short (a killed job)")
    if not samples:
        return {"samples": 0, "best": None, "finished": False}
    best = max(samples, key=lambda s: s["score"])
    finished = len(samples) > 1 and samples[-1] == best and best in samples[:-1]
    return {"samples": len(samples) - finished, "best": best, "finished": finished}


def first_reaching(run: Run, target: float) -> Optional[dict[str, Any]]:
    """The first evaluation at or above `target` accuracy, with its seconds since the run's start."""
    hit = next((r for r in run.rows("test_accuracy") if r["test_accuracy"] >= target), None)
    return hit and {"step": hit["step"], "seconds": hit["time"] - run.t0}


def summarize(run: Run, targets: Sequence[float]) -> dict[str, Any]:
    evals, train = run.rows("test_accuracy"), run.rows("train_loss")
    preempted = run.events("preempted")
    out: dict[str, Any] = {
        "run": str(run.path),
        "steps": max(r.get("step", 0) for r in run.records),
        "wall_seconds": run.records[-1]["time"] - run.t0,
        "final_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "final_train_loss": train[-1]["train_loss"] if train else None,
        "samples_per_s": sorted(r["samples_per_s"] for r in train)[len(train) // 2] if train else None,
        "to_accuracy": {f"{t:g}": first_reaching(run, t) for t in targets},
        "starts": len(run.events("start")),
        "resumes": sum(1 for e in run.events("start") if e.get("resumed_from")),
        "resizes": len(run.events("resize")),
        "preemptions": len(preempted),
        "requeues": len({e["restart"] for e in run.events("start") if e.get("restart")}),
        "interrupts": len(run.events("interrupted")),
        "finished": bool(run.result) and not run.result.get("preempted") and not run.result.get("interrupted"),
        "autotune": run.autotune,
    }
    return out


def _cell(hit: Optional[dict[str, Any]]) -> str:
    return f"{hit['seconds']:.1f} s / {hit['step']}" if hit else "-"


def format_table(summaries: Sequence[dict[str, Any]], targets: Sequence[float]) -> str:
    head = ["run", "final acc", "steps", "wall s", "samples/s"] + [f"to {t:g} (s / step)" for t in targets]
    head += ["resumes", "resizes", "preempted", "requeued"]
    rows = []
    for s in summaries:
        acc = f"{s['final_accuracy']:.4f}" if s["final_accuracy"] is not None else "-"
        speed = f"{s['samples_per_s']:,.0f}" if s["samples_per_s"] is not None else "-"
        row = [Path(s["run"]).name, acc, str(s["steps"]), f"{s['wall_seconds']:.1f}", speed]
        row += [_cell(s["to_accuracy"][f"{t:g}"]) for t in targets]
        row += [str(s[k]) for k in ("resumes", "resizes", "preemptions", "requeues")]
        rows.append(row)
    lines = columns([head, *rows], [i > 0 for i in range(len(head))])
    for s in summaries:
        tune = s["autotune"]
        if tune is None:
            continue
        name = Path(s["run"]).name
        if not tune["best"]:
            lines.append(
                f"{name}: autotune: no sample scored yet (Horovod scores one every 5 x 10 cycles of each tensor)"
            )
            continue
        b = tune["best"]
        state = (
            "chose"
            if tune["finished"]
            else f"still tuning when the run ended; best so far of {tune['samples']} samples:"
        )
        lines.append(
            f"{name}: autotune {state} cycle time {b['cycle_time_ms']:g} ms, fusion threshold "
            f"{b['tensor_fusion_threshold']:g} MiB, response cache {'on' if b['cache_enabled'] else 'off'}, "
            f"hierarchical allreduce {'on' if b['hierarchical_allreduce'] else 'off'} (score {b['score']:.3g} "
            "bytes/us)"
        )
    return "\n".join(lines)


CURVES = (("train_loss", "loss (train -, test --)"), ("test_accuracy", "test accuracy"),
          ("samples_per_s", "samples/s (all ranks)"), ("lr", "learning rate"))  # fmt: skip


def plot(runs: Sequence[Run], path: Path) -> Path:
    """Loss, accuracy, samples/s and lr against step (top row) and wall time since the run's start (bottom row),
    one colour per run; resizes and preemptions marked as dotted vertical lines, resumes dash-dotted."""

    def curve(ax, run: Run, by_time: bool, key: str, colour: str) -> None:
        def x(r):
            return r["time"] - run.t0 if by_time else r["step"]

        rows = run.rows(key)
        label = run.name if key == CURVES[0][0] else None
        marker = "o" if key == "test_accuracy" else None
        ax.plot([x(r) for r in rows], [r[key] for r in rows], color=colour, label=label, marker=marker, markersize=3)
        if key == "train_loss":
            tests = run.rows("test_loss")
            ax.plot([x(r) for r in tests], [r["test_loss"] for r in tests], color=colour, ls="--")
        for e in [*run.events("resize"), *run.events("preempted"), *run.events("interrupted")]:
            ax.axvline(x(e), color=colour, ls=":", alpha=0.6)
        for e in run.events("start")[1:]:  # a resume
            ax.axvline(x(e), color=colour, ls="-.", alpha=0.6)

    def draw(axes):
        for i, run in enumerate(runs):
            for col, (key, _) in enumerate(CURVES):
                curve(axes[col], run, False, key, f"C{i % 10}")
                curve(axes[4 + col], run, True, key, f"C{i % 10}")
        for col, (_, title) in enumerate(CURVES):
            for ax, xlabel in ((axes[col], "step"), (axes[4 + col], "wall time since the start (s)")):
                ax.set_title(title)
                ax.set_xlabel(xlabel)
                ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)

    return save_plot(path, draw, ncols=4, width=4.5, nrows=2)
