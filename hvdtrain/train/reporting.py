"""What the Trainer reports and how: the reporting window (summed over ranks, carrying the preemption votes),
the metric records (metrics.jsonl + TensorBoard, rank 0) and the progress display (tqdm, rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional

from hvdtrain.files import append_text, writing
from hvdtrain.parallel import horovod
from hvdtrain.rundir import RunDir


@dataclasses.dataclass(frozen=True)
class WindowReport:
    step: int  # the step that closed the window
    epoch: int
    loss: float  # mean training loss over the window's samples, all ranks
    samples_per_s: float  # all ranks together
    stop: bool  # some rank was asked to stop (preemption): every rank stops after the same step
    # Each rank's mean seconds per step in the window, in the order of the window's ranks (parallel.horovod.rank():
    # every rank, or an async job's workers): its own work (phases outside progress.COLLECTIVE_PHASES: hooks,
    # forward, backward, optimizer) and its waits on the others (the gradients' allreduce).
    rank_compute_s: tuple[float, ...] = ()
    rank_wait_s: tuple[float, ...] = ()


class ReportWindow:
    """Loss and samples since the last report. Every `every` steps (and at the last step) the ranks sum
    [loss, samples, preemption votes] in one allreduce, started after that step and read after the next one,
    so it overlaps a step instead of stalling it (one rank alone needs no collective). Every rank reads the same
    sums after the same step, which is how all agree where to stop. The same allreduce gathers each rank's work
    and wait seconds per step of the window (PendingSum's `own` slots: 2 x ranks more numbers, no collective
    more), for the straggler report."""

    def __init__(self, every: int):
        self.every = every
        self._loss, self._samples, self._start = 0.0, 0, time.perf_counter()
        self._steps, self._work, self._wait = 0, 0.0, 0.0
        self._pending: Optional[tuple[horovod.PendingSum, int, int, float]] = None

    def add(self, loss_sum: float, samples: int, work_s: float = 0.0, wait_s: float = 0.0) -> None:
        """A step's loss sum and samples, and the seconds this rank spent in it working and waiting."""
        self._loss += loss_sum
        self._samples += samples
        self._steps += 1
        self._work += work_s
        self._wait += wait_s

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    def start(self, step: int, epoch: int, stop_vote: bool) -> None:
        """Close the window at `step` and start summing it over the ranks; a new window begins."""
        steps = max(self._steps, 1)
        sums = horovod.PendingSum(
            [self._loss, float(self._samples), float(stop_vote)], name="hvdtrain.window",
            own=[self._work / steps, self._wait / steps],
        )  # fmt: skip
        self._pending = (sums, step, epoch, time.perf_counter() - self._start)
        self._loss, self._samples, self._start = 0.0, 0, time.perf_counter()
        self._steps, self._work, self._wait = 0, 0.0, 0.0

    @property
    def pending(self) -> bool:
        """A window's sums are under way (read() will wait for them)."""
        return self._pending is not None

    def read(self) -> Optional[WindowReport]:
        """The sums of the window started last (waiting for them if needed), or None if none is pending."""
        if self._pending is None:
            return None
        sums, step, epoch, elapsed = self._pending
        self._pending = None
        (loss_sum, samples, stop_votes), compute, wait = split_window(sums.result())
        return WindowReport(
            step, epoch, loss_sum / max(samples, 1.0), samples / max(elapsed, 1e-9), stop_votes > 0, compute, wait
        )


def split_window(sums: list[float]) -> tuple[tuple[float, float, float], tuple[float, ...], tuple[float, ...]]:
    """A window's sums as ReportWindow.start laid them out: ((loss, samples, stop votes), every rank's work s per
    step, every rank's wait s per step)."""
    totals, per_rank = sums[:3], sums[3:]
    n = len(per_rank) // 2
    return (totals[0], totals[1], totals[2]), tuple(per_rank[:n]), tuple(per_rank[n:])


class Recorder:
    """metrics.jsonl rows and TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, run_dir: RunDir, enabled: bool, echo: Callable[[str], None]):
        self.run_dir, self.enabled = run_dir, enabled
        self._tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir.tensorboard))
        except ImportError:  # tensorboard is an install requirement; keep training if someone removed it
            echo("hvdtrain: tensorboard is not installed; metrics go to metrics.jsonl only")

    def record(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # A line at a time, whole or not at all; a full file system ends the job in one line (DiskFullError).
        append_text(self.run_dir.metrics, json.dumps({"time": round(time.time(), 3), **row}) + "\n")
        if self._tb is not None and "event" not in row:  # events (start, resize, preempted) are not curves
            with writing(self.run_dir.tensorboard):  # its writer thread's error comes out at the next call
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                        self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            with writing(self.run_dir.tensorboard):
                tb.close()


class Progress:
    """The progress display of rank 0, drawn by tqdm:
    - stdout is a terminal: one bar, redrawn in place;
    - launched from a terminal (HVDTRAIN_TTY=1; the launchers pass whole lines only): a bar per line;
    - logs and pipes: plain lines."""

    def __init__(self, total_steps: int, epochs: int, enabled: bool, echo: Callable[[str], None], start_step: int = 0):
        self.total, self.epochs, self.enabled, self._echo = total_steps, epochs, enabled, echo
        self._bar = None
        self._lines_with_bar = os.environ.get("HVDTRAIN_TTY") == "1"
        self._started = time.perf_counter()
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout, leave=True
            )

    def say(self, line: str) -> None:
        """A line of its own that does not tear the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            self._echo(line)
        sys.stdout.flush()

    def update(self, report: WindowReport) -> None:
        if not self.enabled:
            return
        text = f"epoch {report.epoch + 1}/{self.epochs} step {report.step}/{self.total} loss {report.loss:.4f}"
        rate = f"{report.samples_per_s:,.0f} samples/s"
        if self._bar is not None:
            self._bar.set_description_str(f"epoch {report.epoch + 1}/{self.epochs}", refresh=False)
            self._bar.set_postfix_str(f"loss {report.loss:.4f} {rate}", refresh=False)
            self._bar.update(report.step - self._bar.n)
        elif self._lines_with_bar:
            from tqdm import tqdm

            bar = tqdm.format_meter(report.step, self.total, time.perf_counter() - self._started, ncols=40, unit="step")
            self._echo(f"{bar} {text} {rate}")
        else:
            self._echo(f"{text} {rate}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
