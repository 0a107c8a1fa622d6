"""`hvdtrain report RUN_DIR...`: what runs did, from their run directories alone.

metrics.jsonl (rank 0's records: training windows with loss, lr, samples/s and every rank's compute and wait
seconds per step; evaluations with test accuracy and loss; events: start, checkpoint, resize, preempted,
interrupted), result.json, the ranks' host records (logs/rank.R.host) and, with --autotune, Horovod's autotuner
log (autotune.csv). Out: loss, accuracy, samples/s and lr against step and against wall time (several runs
overlaid) as one PNG, and a table per run: final accuracy, time and step to each accuracy level, resizes,
preemptions, requeues and resumes seen, the autotuner's choice; then each rank's compute and wait per step, and
the stragglers (`stragglers`). Nothing heavy is imported: matplotlib only when the PNG is drawn.

A straggler: a rank whose compute per step (rank_compute_s: its own work, not its waits on the others) is above
STRAGGLER_RATIO times the median of the other ranks' in at least STRAGGLER_WINDOWS consecutive windows, by at
least STRAGGLER_MIN_EXCESS_S a step. The others' median, not all ranks': with two ranks the other one is the
yardstick (a median of both would need the slow rank at 1.86x to exceed 1.3x). Consecutive: in the same world,
so a start (resume) or an elastic resize ends a run of windows, as does a window without the times.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import statistics
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
STRAGGLER_RATIO = 1.3  # a rank computing more than this times the others' median step ...
STRAGGLER_WINDOWS = 3  # ... in at least this many consecutive logging windows ...
STRAGGLER_MIN_EXCESS_S = 0.0005  # ... and at least this much longer a step (below: the timer noise of tiny steps)


@dataclasses.dataclass
class Run:
    path: Path
    records: list[dict[str, Any]]
    result: Optional[dict[str, Any]]
    autotune: Optional[dict[str, Any]] = None  # the autotuner's log, read (`autotune`); None without one
    hosts: dict[int, str] = dataclasses.field(default_factory=dict)  # rank -> host, from logs/rank.R.host

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
    return Run(run_dir.path, records, result, autotune(run_dir.autotune, warn), run_dir.logs.hosts())


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
        "ranks": rank_times(run),
        "stragglers": stragglers(run),
    }
    return out


def _per_rank(row: dict[str, Any], key: str) -> Optional[list[float]]:
    """A window's per-rank seconds (rank_compute_s, rank_wait_s), None when absent (a run of an older hvdtrain) or
    not a list of numbers."""
    values = row.get(key)
    if not isinstance(values, list) or not values:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return values


def rank_times(run: Run) -> list[dict[str, Any]]:
    """Each rank's median compute and wait seconds per step over the windows that time it (rank: its place in
    the windows' lists); [] for a run whose metrics.jsonl has no per-rank times."""
    compute: dict[int, list[float]] = {}
    wait: dict[int, list[float]] = {}
    for row in run.rows("train_loss"):
        for key, into in (("rank_compute_s", compute), ("rank_wait_s", wait)):
            for rank, v in enumerate(_per_rank(row, key) or []):
                into.setdefault(rank, []).append(v)
    return [
        {"rank": rank, "host": run.hosts.get(rank), "windows": len(compute[rank]),
         "compute_s": statistics.median(compute[rank]),
         "wait_s": statistics.median(wait[rank]) if wait.get(rank) else None}
        for rank in sorted(compute)
    ]  # fmt: skip


def stragglers(run: Run) -> list[dict[str, Any]]:
    """The ranks that computed slower than the others in enough consecutive windows (the rule: the module's
    docstring), one entry per run of such windows: the rank, its host, its mean compute per step over them, the
    others' median, the ratio of the two, and the steps that closed the first and the last of the windows."""
    found: list[dict[str, Any]] = []
    streaks: dict[int, list[tuple[int, float, float]]] = {}  # rank -> (window's step, its compute, others' median)

    def end(rank: int) -> None:
        streak = streaks.pop(rank)
        if len(streak) >= STRAGGLER_WINDOWS:
            own = statistics.fmean(c for _, c, _ in streak)
            others = statistics.fmean(m for _, _, m in streak)
            found.append({"rank": rank, "host": run.hosts.get(rank), "windows": len(streak),
                          "first_step": streak[0][0], "last_step": streak[-1][0], "compute_s": own,
                          "others_median_s": others, "ratio": own / others if others > 0 else None})  # fmt: skip

    ranks = None
    for row in run.records:
        compute = _per_rank(row, "rank_compute_s") if "event" not in row else None
        if compute is None and "train_loss" not in row and row.get("event") not in ("start", "resize"):
            continue  # an evaluation or a checkpoint: between windows, not one
        if compute is None or len(compute) != ranks:
            for rank in list(streaks):
                end(rank)
            ranks = compute and len(compute)
            if compute is None:
                continue
        for rank, own in enumerate(compute):
            others = compute[:rank] + compute[rank + 1 :]
            median = statistics.median(others) if others else None
            if median is not None and own > STRAGGLER_RATIO * median and own - median >= STRAGGLER_MIN_EXCESS_S:
                streaks.setdefault(rank, []).append((row["step"], own, median))
            elif rank in streaks:
                end(rank)
    for rank in list(streaks):
        end(rank)
    return sorted(found, key=lambda f: (f["first_step"], f["rank"]))


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _rank_name(rank: int, host: Optional[str]) -> str:
    return f"rank {rank} ({host})" if host else f"rank {rank} (host not recorded)"


def straggler_line(found: dict[str, Any]) -> str:
    """rank 1 (node2) computed 1.8x the others' median step (12.1 ms vs 6.7 ms) in the 5 windows ending at steps
    20 to 60."""
    ratio = f"{found['ratio']:.1f}x" if found["ratio"] is not None else "more than"
    return (
        f"{_rank_name(found['rank'], found['host'])} computed {ratio} the others' median step "
        f"({_ms(found['compute_s'])} ms vs {_ms(found['others_median_s'])} ms) in the {found['windows']} windows "
        f"ending at steps {found['first_step']} to {found['last_step']}"
    )


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
        lines += _rank_lines(s)
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


def _rank_lines(summary: dict[str, Any]) -> list[str]:
    """A run's per-rank times (ms per step, medians over the windows) and its stragglers, or nothing when its
    metrics.jsonl has no per-rank times."""
    ranks, name = summary["ranks"], Path(summary["run"]).name
    if not ranks:
        return []
    rows = [["rank", "host", "compute ms/step", "wait ms/step", "windows"]]
    rows += [[str(r["rank"]), r["host"] or "-", _ms(r["compute_s"]), "-" if r["wait_s"] is None else _ms(r["wait_s"]),
              str(r["windows"])] for r in ranks]  # fmt: skip
    lines = [f"{name}: each rank's step, median over the logging windows (compute: its own work; wait: on the others)"]
    lines += ["  " + line for line in columns(rows, [True, False, True, True, True])]
    found = summary["stragglers"]
    lines += [f"{name}: straggler: {straggler_line(f)}" for f in found]
    if not found and len(ranks) > 1:
        lines.append(f"{name}: no straggler (no rank computed over {STRAGGLER_RATIO:g}x the others' median step in "
                     f"{STRAGGLER_WINDOWS} consecutive windows)")  # fmt: skip
    return lines


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
