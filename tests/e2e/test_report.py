"""`hvdtrain report` on real runs: a 2-rank job with Horovod's autotuner, stopped and resumed; the report's
numbers are the run's own (result.json, metrics.jsonl), the resume is counted and the autotuner's choice is its
log's best row. A 2-rank job whose rank 1 is slow (tests/faulthooks.py SlowRank): the report names rank 1 and its
host as the straggler, and not rank 0, whose time goes to waiting for it."""

import csv
import json
import os
import socket
import subprocess
from pathlib import Path

from conftest import HVDTRAIN

TESTS = Path(__file__).resolve().parents[1]


def test_report_of_an_autotuned_run_resumed_once(hvdtrain, tmp_path):
    run = tmp_path / "run"
    # Horovod scores a sample every 5 x STEPS_PER_SAMPLE cycles of each tensor; no warm-up: the log fills in a
    # short run.
    common = ["train", "-np", 2, "--model", "mlp", "--autotune", "--env", "HOROVOD_AUTOTUNE_WARMUP_SAMPLES=0",
              "--env", "HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE=2", "--run-dir", run]  # fmt: skip
    for extra in (["--epochs", 3], ["--epochs", 6, "--resume"]):
        proc = hvdtrain(*common, *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    proc = hvdtrain("report", run, "--targets", "0.5,0.9", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    (s,) = out["runs"]
    result = json.loads((run / "result.json").read_text())
    assert s["steps"] == result["steps"] and s["final_accuracy"] == result["test_accuracy"] and s["finished"]
    assert (s["starts"], s["resumes"], s["preemptions"], s["requeues"], s["resizes"]) == (2, 1, 0, 0, 0)
    reached = s["to_accuracy"]["0.5"]
    assert reached is not None and 0 < reached["step"] <= s["steps"] and 0 < reached["seconds"] <= s["wall_seconds"]
    with open(run / "autotune.csv") as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))
    assert rows and s["autotune"]["best"]["score"] == max(float(r["score"]) for r in rows)
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG" and out["plot"] == str(run / "report.png")

    text = hvdtrain("report", run).stdout
    assert "run: autotune" in text and f"curves: {run}/report.png" in text


SLOW_S = 0.03  # rank 1's extra work per step


def test_report_names_the_slow_rank_and_its_host(child_env, tmp_path):
    run = tmp_path / "run"
    env = {**child_env, "PYTHONPATH": f"{child_env['PYTHONPATH']}{os.pathsep}{TESTS}",  # faulthooks, for --hooks
           "HVDTRAIN_TEST_RANK": "1", "HVDTRAIN_TEST_STEP_SLEEP": str(SLOW_S)}  # fmt: skip
    args = ["train", "-np", 2, "--model", "mlp", "--max-steps", 60, "--log-every", 10, "--hooks", "faulthooks:SlowRank",
            "--env", "HVDTRAIN_TEST_RANK", "--env", "HVDTRAIN_TEST_STEP_SLEEP", "--run-dir", run]  # fmt: skip
    proc = subprocess.run([*HVDTRAIN, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr

    windows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "train_loss" in w]
    assert [w["step"] for w in windows] == [10, 20, 30, 40, 50, 60]
    for w in windows:  # seconds per step: rank 1 works SLOW_S more, rank 0 waits for it
        (fast, slow), (fast_wait, slow_wait) = w["rank_compute_s"], w["rank_wait_s"]
        assert slow >= SLOW_S and fast < slow - SLOW_S / 2 and fast_wait > slow_wait, w

    proc = subprocess.run([*HVDTRAIN, "report", str(run), "--json"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (s,) = json.loads(proc.stdout)["runs"]
    host = socket.gethostname()
    assert [(f["rank"], f["host"], f["first_step"], f["last_step"]) for f in s["stragglers"]] == [(1, host, 10, 60)]
    (found,) = s["stragglers"]
    assert found["windows"] == 6 and found["compute_s"] >= SLOW_S and found["ratio"] > 1.3
    fast, slow = s["ranks"]
    assert (fast["rank"], fast["host"], slow["rank"], slow["host"]) == (0, host, 1, host)
    assert slow["compute_s"] >= SLOW_S and fast["wait_s"] >= SLOW_S / 2 and fast["windows"] == slow["windows"] == 6

    text = subprocess.run([*HVDTRAIN, "report", str(run)], env=env, capture_output=True, text=True, timeout=120)
    assert f"run: straggler: rank 1 ({host}) computed " in text.stdout, text.stdout + text.stderr
    assert "straggler: rank 0" not in text.stdout
