"""Elastic training across the simulated hosts: node2 joins a job running on node1; node2's processes are all
killed (sshd included: the host is gone); node2's link goes down. Each time the job goes on, on the world that
is left or grown, and reaches the accuracy bar, the interrupted epoch's samples trained on exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from elastichooks import check_exactly_once, finish, records, train_samples, wait_for_step  # noqa: E402

HOOKS = "elastichooks:SlowSteps,elastichooks:RecordSamples"


def start(
    cluster, tmp_path: Path, hosts: str, *extra, step_sleep: float = 0.03
) -> tuple[subprocess.Popen, Path, Path, Path]:
    hosts_file, run_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "job.log"
    hosts_file.write_text(hosts)
    env = {**cluster.env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "HVDTRAIN_TEST_RECORD": str(tmp_path / "record"), "HVDTRAIN_TEST_STEP_SLEEP": str(step_sleep)}  # fmt: skip
    argv = [sys.executable, "-m", "hvdtrain", "train", "--elastic", "--hosts-file", hosts_file, "--min-np", 1,
            "--max-np", 2, "--network-interface", "eth0", "--run-dir", run_dir, "--commit-every", 5, "--log-every", 5,
            "--epochs", 6, "--hooks", HOOKS, *extra]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cluster.on("node1"), *map(str, argv)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return proc, hosts_file, run_dir, log


def the_resize(run_dir: Path) -> dict:
    return next(r for r in records(run_dir) if r.get("event") == "resize")


def test_node2_joins_a_job_on_node1(cluster, tmp_path):
    # Slow steps (45 per epoch, 0.1 s each): node2, listed at step 10, is taken in well before the epoch's end.
    proc, hosts_file, run_dir, log = start(cluster, tmp_path, "node1:1\n", step_sleep=0.1)
    wait_for_step(proc, run_dir, 10)
    hosts_file.write_text("node1:1\nnode2:1\n")
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
    resize = the_resize(run_dir)
    assert (resize["old_size"], resize["new_size"], resize["hosts"]) == (1, 2, ["node1", "node2"]), resize
    assert 0 < resize["samples_in_epoch"] < train_samples(), "node2 did not join mid-epoch"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["test_accuracy"] >= 0.9, result
    check_exactly_once(tmp_path, run_dir, resize["epoch"])
    assert "rank 1 of 2" in (run_dir / "logs" / "worker.node2.0.log").read_text()


def lose_node2(cluster, tmp_path, fault: tuple[str, ...], undo: tuple[str, ...]) -> tuple[dict, float]:
    proc, _, run_dir, log = start(cluster, tmp_path, "node1:1\nnode2:1\n", "--elastic-timeout", 120)
    try:
        wait_for_step(proc, run_dir, 32)
        cluster.fault(*fault)
        lost_at = time.time()
        out = finish(proc, log)
    finally:
        if undo:
            cluster.fault(*undo)
        cluster.restart()
    assert proc.returncode == 0, out[-3000:]
    resize = the_resize(run_dir)
    assert (resize["old_size"], resize["new_size"], resize["hosts"]) == (2, 1, ["node1"]), resize
    assert 0 <= resize["steps_redone"] <= 5
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 1 and result["test_accuracy"] >= 0.9, result
    check_exactly_once(tmp_path, run_dir, resize["epoch"])
    return resize, resize["time"] - lost_at


def test_node2_killed_the_job_goes_on_on_node1(cluster, tmp_path):
    """Every process on node2 is SIGKILLed (its sshd too): the case Horovod's CI skips for torch."""
    resize, took = lose_node2(cluster, tmp_path, ("kill", "node2"), ())
    assert took < 120
    print(f"node2 killed: training again on node1 {took:.1f} s later, {resize['steps_redone']} step(s) redone")


def test_node2_link_down_the_job_goes_on_on_node1(cluster, tmp_path):
    """node2's link goes down: no connection is reset, peers just stop answering. Gloo's timeout ends the
    collective, ssh's keep-alive ends node2's session; the job goes on on node1 within --elastic-timeout."""
    resize, took = lose_node2(cluster, tmp_path, ("link", "node2", "down"), ("link", "node2", "up"))
    assert took < 120
    print(f"node2 link down: training again on node1 {took:.1f} s later, {resize['steps_redone']} step(s) redone")
