"""Trainer hooks the elastic tests attach with `hvdtrain train --hooks elastichooks:...` (tests/ on PYTHONPATH), and
the check of what they record.

RecordSamples writes, for every optimizer step a rank takes, one JSON line (time, epoch, step, rank, size, host,
the sample indices of the step) to $HVDTRAIN_TEST_RECORD/<host>.<pid>.jsonl. SlowSteps sleeps
$HVDTRAIN_TEST_STEP_SLEEP seconds before each step, so that a test has time to add or kill a host mid-epoch.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from hvdtrain.train.hooks import Hook


class RecordSamples(Hook):
    def __init__(self):
        out = Path(os.environ["HVDTRAIN_TEST_RECORD"])
        out.mkdir(parents=True, exist_ok=True)
        host = os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
        self.file = open(out / f"{host}.{os.getpid()}.jsonl", "a", buffering=1)
        self.host = host

    def on_step_start(self, trainer):
        s = trainer.state
        indices = [int(i) for batch in trainer.batch_indices for i in batch]
        row = {"time": time.time(), "epoch": s.epoch, "step": s.step, "rank": trainer.rank, "size": trainer.size,
               "host": self.host, "indices": indices}  # fmt: skip
        self.file.write(json.dumps(row) + "\n")


class SlowSteps(Hook):
    def __init__(self):
        self.seconds = float(os.environ.get("HVDTRAIN_TEST_STEP_SLEEP", "0.05"))

    def on_step_start(self, trainer):
        time.sleep(self.seconds)


def read_records(folder: Path) -> list[dict]:
    rows = []
    for path in Path(folder).glob("*.jsonl"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["time"])


def kept_steps(rows: list[dict], resizes: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, rolled back): a step's record is rolled back when a later resize restored a commit at or before
    that step (the resize record's step is where training went on; its time is after every rolled-back step)."""
    kept, rolled_back = [], []
    for r in rows:
        undone = any(z["time"] > r["time"] and z["step"] <= r["step"] for z in resizes)
        (rolled_back if undone else kept).append(r)
    return kept, rolled_back


def epoch_coverage(kept: list[dict], epoch: int, num_samples: int) -> tuple[set[int], collections.Counter]:
    """The samples trained on in `epoch` by the kept steps, and how often each was (padding repeats a few)."""
    counts = collections.Counter(i for r in kept if r["epoch"] == epoch for i in r["indices"])
    return set(counts), counts


# ------------------------------------------------------------------ what the tests of both tiers share


def train_samples() -> int:
    from hvdtrain.train import datasets

    return len(datasets.digits().train)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> None:
    """Until metrics.jsonl shows training at `step` or beyond (the job must still be running)."""
    deadline = time.monotonic() + timeout
    while not any(r.get("step", -1) >= step and "train_loss" in r for r in records(run_dir)):
        assert proc.poll() is None, f"the job ended (status {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return log.read_text(errors="replace")


def check_exactly_once(tmp_path: Path, run_dir: Path, epoch: int) -> tuple[int, int]:
    """The kept steps of `epoch` trained on every sample; a sample repeats only as padding of a partial last
    step (at most size - 1 per re-sharding). Returns (rolled-back step records, kept step records)."""
    rows = read_records(tmp_path / "record")
    resizes = [r for r in records(run_dir) if r.get("event") == "resize"]
    kept, rolled_back = kept_steps(rows, resizes)
    total = train_samples()
    seen, counts = epoch_coverage(kept, epoch, total)
    assert seen == set(range(total)), f"epoch {epoch}: {total - len(seen)} samples never trained on"
    repeats = sum(c - 1 for c in counts.values())
    assert repeats <= 2 * (1 + len(resizes)), f"epoch {epoch}: {repeats} samples trained on twice"
    # Each kept step is there once per rank of its world: no step was taken twice and kept twice.
    per_step = {}
    for r in kept:
        per_step.setdefault((r["step"], r["rank"]), []).append(r)
    assert all(len(v) == 1 for v in per_step.values()), "a step was kept twice for one rank"
    return len(rolled_back), len(kept)
