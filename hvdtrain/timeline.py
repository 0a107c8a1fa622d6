"""Horovod's timeline, read and summarized: where a step's time goes.

Horovod's coordinator (rank 0) writes the timeline, a Chrome trace: every tensor is a "process", and on it a
negotiation span (NEGOTIATE_ALLREDUCE, with an instant for each rank that became ready), then the operation's
span (ALLREDUCE) holding its activities (WAIT_FOR_DATA, MEMCPY_IN_FUSION_BUFFER, MPI_ALLREDUCE,
MEMCPY_OUT_FUSION_BUFFER...). hvdtrain's Trainer writes, beside it, when each recorded step began and ended on
rank 0 (timeline.steps.csv, microseconds since the epoch); the timeline's metadata gives its own clock's start
in the same unit, so each span falls in a step. The summary is per phase (the time any tensor spent in it, as a
share of step time) and per tensor (its time in each phase).

A job killed while Horovod writes leaves a file cut in the middle of an event, its JSON array never closed: `read`
drops the partial event and says so (`repair` rewrites the file); a timeline without a single operation is an
error, not a table of zeros. Nothing heavy is imported: matplotlib only when a PNG is drawn.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hvdtrain.errors import DiskFullError, UsageError
from hvdtrain.files import write_text_atomic
from hvdtrain.render import fixed_row, save_plot
from hvdtrain.rundir import RunDir

# The order phases are shown in: a tensor's life, from negotiation to the copy out of the fusion buffer.
PHASE_ORDER = (
    "NEGOTIATE", "QUEUE", "WAIT_FOR_DATA", "WAIT_FOR_OTHER_TENSOR_DATA", "INIT_FUSION_BUFFER", "ALLOCATE_OUTPUT",
    "MEMCPY_IN_FUSION_BUFFER", "MPI_ALLREDUCE", "GLOO_ALLREDUCE", "MPI_ADASUM_ALLREDUCE", "MPI_ALLGATHER",
    "GLOO_ALLGATHER", "MPI_BCAST", "GLOO_BCAST", "MPI_REDUCESCATTER", "MEMCPY_OUT_FUSION_BUFFER",
)  # fmt: skip
OTHER = "OTHER"  # inside an operation's span, in none of its activities


@dataclasses.dataclass(frozen=True)
class Span:
    """One phase of one tensor, in microseconds since the epoch."""

    tensor: str
    phase: str  # an activity (MPI_ALLREDUCE...), NEGOTIATE, or OTHER; the operation span itself: op
    start: float
    end: float
    op: str = ""  # the operation (ALLREDUCE, BROADCAST...) the span belongs to; NEGOTIATE_X: X

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass
class Timeline:
    path: Path
    events: list[dict[str, Any]]
    dropped_bytes: int  # of a partial last event (the writer was killed), 0 for a whole file
    start_us: float  # the timeline's clock zero, in microseconds since the epoch
    closed: bool = True  # False: the JSON array was never closed (its writer was killed), read up to its last event


def _ignore(_message: str) -> None:
    pass


def _parse(text: str) -> tuple[Any, str, int]:
    """A Chrome-trace JSON array, cut short or not (Horovod's writer killed mid-event, or before it closed the
    array): (its parsed longest prefix of whole events, that prefix's JSON text closed again, bytes dropped)."""
    try:
        return json.loads(text), text, 0
    except json.JSONDecodeError:
        pass
    end = len(text)
    while True:
        end = text.rfind("}", 0, end)
        if end < 0:  # not one whole event: what follows the opening bracket is dropped
            return [], "[]", max(0, len(text.rstrip()) - (text.find("[") + 1))
        candidate = text[: end + 1].rstrip().rstrip(",") + "]"
        try:
            return json.loads(candidate), candidate, len(text) - (end + 1)
        except json.JSONDecodeError:
            continue  # a '}' inside the partial event (its args): look further back


def repair_text(text: str) -> tuple[str, int]:
    """The longest prefix of whole events of a trace cut short, closed again: (valid JSON text, bytes dropped)."""
    _, fixed, dropped = _parse(text)
    return fixed, dropped


def read(path: Path, warn: Callable[[str], None] = _ignore) -> Timeline:
    """The events of a timeline file, repaired in memory when cut short (then said through `warn`, one line)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the timeline {path}: {e}; give a run directory or a timeline.json") from None
    if not text.lstrip().startswith("["):
        raise UsageError(f"{path} is not a Horovod timeline (a JSON array of trace events); give a timeline.json")
    parsed, fixed, dropped = _parse(text)  # parsed once: a whole run's trace is large
    closed = fixed is text
    if dropped:
        warn(f"{path}: skipped a partial last event of {dropped} bytes (a killed job never closed the file)")
    elif not closed:
        warn(f"{path}: read up to its last whole event (a killed job never closed the file)")
    if not isinstance(parsed, list):
        raise UsageError(f"{path} is not a Horovod timeline (a JSON array of trace events); give a timeline.json")
    events = [e for e in parsed if isinstance(e, dict)]
    start = next(
        (e["args"]["start_time_since_epoch_in_micros"] for e in events
         if e.get("ph") == "M" and "start_time_since_epoch_in_micros" in e.get("args", {})),
        0,
    )  # fmt: skip
    return Timeline(Path(path), events, dropped, float(start), closed)


def repair(path: Path) -> int:
    """Rewrite a timeline cut short as valid JSON (atomically); the bytes of the partial event dropped, 0 when
    it was whole (then nothing is written)."""
    text = Path(path).read_text()
    fixed, dropped = repair_text(text)
    if fixed != text:
        write_text_atomic(path, fixed)
    return dropped


def spans(timeline: Timeline) -> list[Span]:
    """Every tensor's phases: its negotiation, and inside each operation the activities and the time in none of
    them (OTHER), the operation span itself as phase == op. Unclosed spans (the file was cut) are left out."""
    names: dict[int, str] = {}
    stacks: dict[int, list[tuple[str, float]]] = {}
    covered: dict[int, list[tuple[float, float]]] = {}
    out: list[Span] = []
    zero = timeline.start_us
    for e in timeline.events:
        ph, pid = e.get("ph"), e.get("pid")
        if ph == "M" and e.get("name") == "process_name" and "name" in e.get("args", {}):
            names[pid] = e["args"]["name"]
        elif ph == "B":
            stacks.setdefault(pid, []).append((e.get("name", ""), zero + e["ts"]))
        elif ph == "E" and stacks.get(pid):
            name, start = stacks[pid].pop()
            end, tensor = zero + e["ts"], names.get(pid, str(pid))
            if name.startswith("NEGOTIATE_"):
                out.append(Span(tensor, "NEGOTIATE", start, end, name.removeprefix("NEGOTIATE_")))
            elif stacks[pid]:  # an activity inside the operation
                covered.setdefault(pid, []).append((start, end))
                out.append(Span(tensor, name, start, end, stacks[pid][-1][0]))
            else:  # the operation: its time outside the activities is OTHER
                out.append(Span(tensor, name, start, end, name))
                reach = start
                for a, b in [*sorted(covered.pop(pid, [])), (end, end)]:
                    if a > reach:
                        out.append(Span(tensor, OTHER, reach, a, name))
                    reach = max(reach, b)
    return out


def read_steps(path: Path, warn: Callable[[str], None] = _ignore) -> list[tuple[int, float, float]]:
    """(step, start, end) of each recorded step, microseconds since the epoch, from timeline.steps.csv; a line
    cut short (a killed job) is skipped and said through `warn`."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    steps, cut = [], 0
    for line in lines[1:]:
        try:
            step, start, end = line.split(",")
            steps.append((int(step), float(start), float(end)))
        except ValueError:
            cut += bool(line.strip())
    if cut:
        warn(f"{path}: skipped {'a line' if cut == 1 else f'{cut} lines'} cut short (a killed job)")
    return steps


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """The length of the union of intervals."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def _phase_key(phase: str) -> tuple[int, str]:
    return (PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER), phase)


def locate(target: Path) -> tuple[Path, Optional[Path]]:
    """(timeline file, steps file or None) for a run directory or a timeline file."""
    target = Path(target)
    if target.is_dir():
        path = RunDir(target).timeline
        if not path.exists():
            raise UsageError(
                f"{target} has no {path.name}: train with --timeline (or --timeline-steps A:B), or give the file"
            )
    elif target.exists():
        path = target
    else:
        raise UsageError(f"{target} does not exist: give a run directory or a timeline.json")
    steps = RunDir(path.parent).timeline_steps
    return path, steps if steps.exists() else None


def load(target: Path, warn: Callable[[str], None] = _ignore) -> tuple[Timeline, list, list[Span]]:
    """(the timeline, its recorded steps, its spans) for a run directory or a timeline file, what a killed job cut
    short skipped and said through `warn`. A timeline with no operation in it, or none inside its recorded steps,
    holds nothing to summarize: UsageError."""
    path, steps_path = locate(target)
    data = read(path, warn)
    steps = read_steps(steps_path, warn) if steps_path else []
    every = spans(data)  # read once: a whole run's trace is large
    if not every:
        raise UsageError(
            f"{path} holds no recorded operation (the job ended before Horovod recorded one, or was killed first); "
            "record a run that trains at least a step"
        )
    if steps and not within(every, windows_of(every, steps)):
        first, last = steps[0][0], steps[-1][0]
        raise UsageError(
            f"{path} holds no operation inside the recorded steps {first}-{last} of {steps_path} (the timeline "
            f"ended before them: a killed job); record the run again, or remove {steps_path.name} to summarize "
            "the whole recording"
        )
    return data, steps, every


def windows_of(every: Sequence[Span], steps: Sequence[tuple[int, float, float]]) -> list[tuple[float, float]]:
    """The recorded steps' (start, end), in order; without a step record, the whole recording as one window."""
    if steps:
        return sorted((a, b) for _, a, b in steps)
    return [(min(s.start for s in every), max(s.end for s in every))] if every else []


def within(items: Sequence[Span], windows: Sequence[tuple[float, float]]) -> list[Span]:
    """The spans that start inside one of the (sorted, disjoint) windows: a bisection per span."""
    starts = [a for a, _ in windows]
    out = []
    for s in items:
        i = bisect.bisect_right(starts, s.start) - 1
        if i >= 0 and s.start < windows[i][1]:
            out.append(s)
    return out


def summarize(
    timeline: Timeline, steps: Sequence[tuple[int, float, float]], every: Optional[Sequence[Span]] = None
) -> dict[str, Any]:
    """Per phase and per tensor, the time inside the recorded steps (all of the timeline when no steps are known),
    in milliseconds per step; each phase's `wall` is the time any tensor was in it (fused tensors share it), its
    `share` that over the step time. `tensors[t][phase]` sums tensor t's spans; `totals` are the column sums.
    `every`: the timeline's spans, when the caller has them already."""
    every = spans(timeline) if every is None else every
    ops = [s for s in every if s.phase == s.op]
    phases = [s for s in every if s.phase != s.op]
    windows = windows_of(every, steps)
    step_us = sum(b - a for a, b in windows)
    n = max(len(windows), 1)
    kept = within(phases, windows)
    kept_ops = within(ops, windows)
    names = sorted({s.phase for s in kept}, key=_phase_key)
    tensors: dict[str, dict[str, float]] = {}
    for s in kept:
        row = tensors.setdefault(s.tensor, {})
        row[s.phase] = row.get(s.phase, 0.0) + s.duration / 1000 / n
    for row in tensors.values():
        row["total"] = sum(row.values())
    totals = {p: sum(row.get(p, 0.0) for row in tensors.values()) for p in [*names, "total"]}
    wall = {p: union_length([(s.start, s.end) for s in kept if s.phase == p]) / 1000 / n for p in names}
    busy = union_length([(s.start, s.end) for s in kept]) / 1000 / n
    step_ms = step_us / 1000 / n
    return {
        "timeline": str(timeline.path),
        "repaired_bytes": timeline.dropped_bytes,
        "steps": [s for s, _, _ in steps],
        "step_ms": step_ms,
        "step_ms_each": [round((b - a) / 1000, 3) for a, b in windows],
        "ops": sorted({s.op for s in kept_ops}),
        "phases": {p: {"wall_ms": wall[p], "share": wall[p] / step_ms if step_ms else 0.0} for p in names},
        "communication_ms": busy,
        "communication_share": busy / step_ms if step_ms else 0.0,
        "tensors": tensors,
        "totals": totals,
        "spans_outside_steps": len(phases) - len(kept),
    }


def format_summary(summary: dict[str, Any], top: int = 20) -> str:
    """The summary as text: the phases, then the tensors taking the most time (all of them in `totals`)."""
    steps = summary["steps"]
    window = f"steps {steps[0]}-{steps[-1]} ({len(steps)})" if steps else "the whole recording (no step record)"
    lines = [f"timeline {summary['timeline']}: {window}, {summary['step_ms']:.2f} ms per step on rank 0"]
    widths = (28, 10, 9)
    lines.append(fixed_row(["phase", "ms/step", "of step"], widths))
    for phase, row in summary["phases"].items():
        lines.append(fixed_row([phase, f"{row['wall_ms']:.3f}", f"{row['share']:.1%}"], widths))
    comm = [f"{summary['communication_ms']:.3f}", f"{summary['communication_share']:.1%}"]
    lines.append(fixed_row(["any communication", *comm], widths))
    phases = list(summary["phases"])
    short = [p.replace("_FUSION_BUFFER", "").replace("MEMCPY_", "COPY_").lower() for p in phases]
    width = max([len("tensor"), *(len(t) for t in list(summary["tensors"])[:top])]) + 2
    widths = [width, *[14] * len(phases), 10]
    lines.append("")
    lines.append("per tensor, ms per step (fused tensors each count the shared time):")
    lines.append(fixed_row(["tensor", *short, "total"], widths))
    rows = sorted(summary["tensors"].items(), key=lambda kv: -kv[1]["total"])

    def line(name: str, row: dict[str, float]) -> str:
        return fixed_row([name, *(f"{row.get(p, 0.0):.3f}" for p in phases), f"{row['total']:.3f}"], widths)

    lines += [line(name, row) for name, row in rows[:top]]
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more tensor(s) (--json lists all)")
    lines.append(line("all tensors", summary["totals"]))
    if summary["spans_outside_steps"]:
        lines.append(f"({summary['spans_outside_steps']} span(s) outside the recorded steps are not counted)")
    return "\n".join(lines)


def plot_step(every: Sequence[Span], steps: Sequence[tuple[int, float, float]], path: Path) -> Optional[int]:
    """A PNG of one step's phases (the median-length recorded step; without steps, the whole recording) from the
    timeline's spans: a row per tensor, a bar per phase, against ms since the step began. Returns the step drawn
    (None: the recording)."""
    every = [s for s in every if s.phase != s.op]
    if steps:
        step, a, b = sorted(steps, key=lambda s: s[2] - s[1])[len(steps) // 2]
    else:
        step, (a, b) = None, (windows_of(every, steps) or [(0.0, 0.0)])[0]
    mine = within(every, [(a, b)])
    order = sorted({s.tensor for s in mine}, key=lambda t: min(s.start for s in mine if s.tensor == t))
    phases = sorted({s.phase for s in mine}, key=_phase_key)

    def draw(axes):
        import matplotlib

        ax = axes[0]
        colors = matplotlib.colormaps["tab10"]
        for i, phase in enumerate(phases):
            for s in (s for s in mine if s.phase == phase):
                y = order.index(s.tensor)
                ax.barh(y, (s.end - s.start) / 1000, left=(s.start - a) / 1000, color=colors(i % 10), height=0.8)
            ax.barh(0, 0, color=colors(i % 10), label=phase)  # the legend's entry
        ax.axvline((b - a) / 1000, color="black", linestyle="--", label="step end")
        ax.set_yticks(range(len(order)), order, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("ms since the step began" if step is not None else "ms since the first span")
        ax.set_title(f"Horovod timeline, step {step}" if step is not None else "Horovod timeline")
        ax.legend(fontsize=7, loc="lower right")

    save_plot(path, draw, width=10)
    return step


def after_job(path: Path, echo) -> None:
    """After a job that recorded a timeline (however it ended): repair a file cut short, say where it is."""
    path = Path(path)
    if not path.exists():
        echo(f"hvdtrain: no timeline was written at {path} (the job ended before recording began)")
        return
    try:
        dropped = repair(path)
    except (OSError, UnicodeDecodeError, DiskFullError) as e:
        echo(f"hvdtrain: the timeline {path} could not be repaired: {e}")
        return
    cut = f" (cut short: its partial last event, {dropped} bytes, was dropped)" if dropped else ""
    echo(f"hvdtrain: timeline {path}{cut}; `hvdtrain timeline {path.parent}` summarizes it")
