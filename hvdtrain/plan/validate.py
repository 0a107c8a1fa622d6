"""`hvdtrain plan --validate STEPS`: the plan checked against real runs. The fastest fitting layout of each kind
is trained for STEPS steps on this machine (`hvdtrain train`, in a temporary run directory), and its predicted
step time and memory per rank are set beside the measured ones."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hvdtrain.config import TrainConfig
from hvdtrain.errors import LaunchError
from hvdtrain.plan.render import label, model_flags
from hvdtrain.rundir import RunDir


def to_validate(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates `--validate` runs: the fastest fitting one of each layout (the recommendation among them)."""
    seen, out = set(), []
    for cand in plan["candidates"]:  # fastest first
        if cand["fits"] and cand["layout"] not in seen:
            seen.add(cand["layout"])
            out.append(cand)
    return out


def validate(plan: dict[str, Any], cfg: TrainConfig, steps: int, echo) -> list[dict[str, Any]]:
    """Run each of `to_validate(plan)` for real on this machine (`hvdtrain train ... --max-steps steps`, in a
    temporary run directory) and set its predicted step time and memory beside the measured ones: the training
    seconds per step and the largest peak RSS of any rank."""
    rows = []
    for cand in to_validate(plan):
        with tempfile.TemporaryDirectory(prefix="hvdtrain-plan-") as tmp:
            run_dir = Path(tmp) / "run"
            command = [sys.executable, "-m", "hvdtrain", "train", "-np", str(plan["ranks"]), *model_flags(cfg),
                       *cand["args"], "--max-steps", str(steps), "--no-eval-every-epoch", "--run-dir", str(run_dir)]  # fmt: skip
            echo(f"hvdtrain: plan: validating {label(cand)} ({steps} steps) ...")
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                raise LaunchError(f"validating {label(cand)}: the job failed (exit {proc.returncode}):\n{tail}")
            result = json.loads(RunDir(run_dir).result.read_text())
        measured = result["seconds_training"] / result["steps"]
        rss = max(result["peak_rss_bytes"])
        rows.append({
            "layout": label(cand), "args": cand["args"], "predicted_step_seconds": cand["step_seconds"],
            "measured_step_seconds": measured, "step_ratio": measured / cand["step_seconds"],
            "predicted_memory_bytes": cand["memory_bytes"], "measured_peak_rss_bytes": rss,
            "memory_ratio": rss / cand["memory_bytes"],
        })  # fmt: skip
    return rows
