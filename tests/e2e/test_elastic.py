"""Elastic training for real on this machine, the way Horovod's own elastic tests make two hosts of one: workers on
`localhost` and on `127.0.0.1` (two host names to horovodrun's driver, both run here without ssh). A host joins
mid-epoch, a host's workers are SIGKILLed, the job goes on; the samples of an interrupted epoch are trained on
exactly once (but for the rolled-back uncommitted steps); a run without events equals the static run bitwise;
and the ways an elastic job cannot go on end it with the cause named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hvdtrain.train import datasets

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from elastichooks import check_exactly_once, finish, records, wait_for_step  # noqa: E402

HVDTRAIN = [sys.executable, "-m", "hvdtrain"]
TRAIN_SAMPLES = len(datasets.digits().train)
HOOKS = "elastichooks:SlowSteps,elastichooks:RecordSamples"


@pytest.fixture
def elastic_env(child_env, tmp_path):
    return {
        **child_env,
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
        "HVDTRAIN_TEST_RECORD": str(tmp_path / "record"),
        "HVDTRAIN_TEST_STEP_SLEEP": "0.03",
    }


def elastic_args(run_dir: Path, hosts_file: Path, *extra) -> list[str]:
    return ["train", "--elastic", "--hosts-file", hosts_file, "--min-np", "1", "--max-np", "2", "--run-dir", run_dir,
            "--commit-every", "5", "--log-every", "5", "--hooks", HOOKS, "--env", "HVDTRAIN_TEST_RECORD",
            "--env", "HVDTRAIN_TEST_STEP_SLEEP", *extra]  # fmt: skip


def start(args, env, cwd, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*HVDTRAIN, *map(str, args)], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def kill_host(host: str) -> list[int]:
    """SIGKILL every process of a worker on `host` (horovodrun gives each worker HOROVOD_HOSTNAME): the rank
    wrapper and the training process both, as when a host's processes are killed by an OOM killer or a user."""
    killed = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("HOROVOD_HOSTNAME") == host:
                p.kill()
                killed.append(p.pid)
        except psutil.Error:
            continue
    return killed


def no_job_processes(marker: str) -> list[str]:
    left = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and p.pid != os.getpid():
            left.append(f"{p.pid}: {cmd[:100]}")
    return left


def test_a_host_joins_mid_epoch_and_training_goes_on(elastic_env, tmp_path):
    hosts_file, run_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "job.log"
    hosts_file.write_text("localhost:1\n")
    # 45 steps per epoch on one rank, 0.1 s each: the host is listed at step 10 and taken in at a commit about
    # 1-2 s later (discovery every second, then the next commit), well before the epoch's end at step 45.
    env = {**elastic_env, "HVDTRAIN_TEST_STEP_SLEEP": "0.1"}
    proc = start(elastic_args(run_dir, hosts_file, "--epochs", "6"), env, tmp_path, log)
    wait_for_step(proc, run_dir, 10)
    hosts_file.write_text("localhost:1\n127.0.0.1:1\n")
    added = time.monotonic()
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
    resize = next(r for r in records(run_dir) if r.get("event") == "resize")
    assert (resize["old_size"], resize["new_size"]) == (1, 2), resize
    assert resize["hosts"] == ["127.0.0.1", "localhost"] and resize["old_hosts"] == ["localhost"]
    assert resize["steps_redone"] == 0  # a host change is taken at a commit: nothing to roll back
    assert resize["lr"] == pytest.approx(2 * 0.05)  # lr scaling follows the world
    assert 0 < resize["samples_in_epoch"] < TRAIN_SAMPLES, "the host did not join mid-epoch"
    # The windows' per-rank seconds follow the world: one rank's before the resize, both after.
    windows = [r for r in records(run_dir) if "train_loss" in r]
    assert {len(r["rank_compute_s"]) for r in windows if r["time"] < resize["time"]} == {1}
    assert {len(r["rank_compute_s"]) for r in windows if r["time"] > resize["time"]} == {2}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["test_accuracy"] >= 0.9, result
    check_exactly_once(tmp_path, run_dir, resize["epoch"])
    # Each worker has its own log; the new one's says which rank it is.
    assert "rank 1 of 2" in (run_dir / "logs" / "worker.127.0.0.1.0.log").read_text()
    assert (run_dir / "logs" / "worker.localhost.0.log").exists()
    print(f"scale up: resize recorded {resize['time'] - (time.time() - (time.monotonic() - added)):.1f} s after "
          "the hosts file changed")  # fmt: skip


def test_a_host_killed_mid_epoch_leaves_the_survivors_training(elastic_env, tmp_path):
    """Horovod skips this case for torch in its own CI; SIGKILL every process of one host's workers."""
    hosts_file, run_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "job.log"
    hosts_file.write_text("localhost:1\n127.0.0.1:1\n")
    proc = start(elastic_args(run_dir, hosts_file, "--epochs", "6", "--elastic-timeout", "60"), elastic_env,
                 tmp_path, log)  # fmt: skip
    wait_for_step(proc, run_dir, 32)  # epoch 2 (23 steps per epoch on two ranks)
    killed_at = time.time()
    assert kill_host("127.0.0.1"), "no worker of 127.0.0.1 was running"
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
    resize = next(r for r in records(run_dir) if r.get("event") == "resize")
    assert (resize["old_size"], resize["new_size"]) == (2, 1) and resize["hosts"] == ["localhost"], resize
    assert 0 <= resize["steps_redone"] <= 5  # at most --commit-every steps are lost
    assert resize["time"] - killed_at < 60  # within --elastic-timeout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 1 and result["test_accuracy"] >= 0.9, result
    rolled_back, _ = check_exactly_once(tmp_path, run_dir, resize["epoch"])
    assert rolled_back >= resize["steps_redone"]
    # The lost host's log keeps its last lines.
    assert "rank" in (run_dir / "logs" / "worker.127.0.0.1.0.log").read_text()
    assert not no_job_processes(str(run_dir))
    print(f"scale down: training again {resize['time'] - killed_at:.1f} s after the kill, "
          f"{resize['steps_redone']} step(s) redone")  # fmt: skip


def test_an_elastic_run_without_events_equals_the_static_run(hvdtrain, tmp_path):
    common = ["--deterministic", "--epochs", "2", "--log-every", "5"]
    static = hvdtrain("train", "-np", "2", "--gloo", "--run-dir", tmp_path / "static", *common, timeout=300)
    assert static.returncode == 0, static.stdout[-2000:] + static.stderr
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("localhost:2\n")
    run = hvdtrain("train", "--elastic", "--hosts-file", hosts_file, "-np", "2", "--min-np", "2",
                   "--run-dir", tmp_path / "elastic", "--commit-every", "3", *common, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("static", "elastic"))
    assert a["steps"] == b["steps"] and a["params_sha256"] == b["params_sha256"], (a, b)
    assert a["test_loss"] == b["test_loss"]


def test_fewer_hosts_than_min_np_for_the_timeout_ends_the_job_with_the_cause(hvdtrain, tmp_path):
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("localhost:1\n")
    began = time.monotonic()
    run = hvdtrain("train", "--elastic", "--hosts-file", hosts_file, "--min-np", "2", "--elastic-timeout", "5",
                   "--run-dir", tmp_path / "run", timeout=120)  # fmt: skip
    assert run.returncode not in (0, 2), run.stderr
    assert "--min-np" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert time.monotonic() - began < 60


def test_the_reset_limit_ends_the_job_with_the_cause(elastic_env, tmp_path):
    hosts_file, run_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "job.log"
    hosts_file.write_text("localhost:1\n")
    proc = start(elastic_args(run_dir, hosts_file, "--epochs", "6", "--reset-limit", "0"), elastic_env, tmp_path,
                 log)  # fmt: skip
    wait_for_step(proc, run_dir, 10)
    hosts_file.write_text("localhost:1\n127.0.0.1:1\n")
    out = finish(proc, log, timeout=120)
    assert proc.returncode not in (0, 2), out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "reset" in out and "--reset-limit" in out, out[-3000:]
    assert "Traceback" not in last
    assert not (run_dir / "result.json").exists()


def test_every_worker_killed_ends_the_job_with_the_cause(elastic_env, tmp_path):
    hosts_file, run_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "job.log"
    hosts_file.write_text("localhost:1\n127.0.0.1:1\n")
    proc = start(elastic_args(run_dir, hosts_file, "--epochs", "6"), elastic_env, tmp_path, log)
    wait_for_step(proc, run_dir, 10)
    assert kill_host("127.0.0.1") and kill_host("localhost")
    out = finish(proc, log, timeout=120)
    assert proc.returncode not in (0, 2), out[-3000:]
    assert "hvdtrain: error:" in out and "Traceback" not in out.split("hvdtrain: error:")[-1], out[-3000:]
    assert not no_job_processes(str(run_dir))


def test_an_elastic_job_checkpoints_on_preemption_and_resumes_on_another_world(elastic_env, tmp_path):
    """USR2 (Slurm's warning) reaches the workers through horovodrun: every worker stops after the same step, rank
    0 writes the checkpoint; the job resumed with --resume on one host instead of two goes on from it."""
    hosts_file, run_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "job.log"
    hosts_file.write_text("localhost:1\n127.0.0.1:1\n")
    proc = start(elastic_args(run_dir, hosts_file, "--epochs", "4"), elastic_env, tmp_path, log)
    wait_for_step(proc, run_dir, 20)
    os.kill(proc.pid, signal.SIGUSR2)
    out = finish(proc, log, timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped = json.loads((run_dir / "result.json").read_text())
    assert stopped["preempted"] and stopped["world_size"] == 2 and stopped["steps"] < 40, stopped
    hosts_file.write_text("localhost:1\n")
    (run_dir / "result.json").unlink()
    log2 = tmp_path / "resumed.log"
    proc = start([*elastic_args(run_dir, hosts_file, "--epochs", "4"), "--resume"], elastic_env, tmp_path, log2)
    out = finish(proc, log2)
    assert proc.returncode == 0, out[-3000:]
    newest = run_dir / "checkpoints" / f"step-{stopped['steps']:08d}.pt"
    assert f"resumed from {newest}" in out, out[-3000:]
    done = json.loads((run_dir / "result.json").read_text())
    assert not done["preempted"] and done["world_size"] == 1 and done["test_accuracy"] >= 0.9, done
    # Every sample of the epoch the preemption cut is trained on once: before the stop on two ranks, after the
    # resume on one (padding aside).
    check_exactly_once(tmp_path, run_dir, stopped["epochs_done"])


def test_a_frozen_worker_is_ended_after_the_elastic_timeout_and_training_goes_on(elastic_env, tmp_path):
    """A worker stopped (SIGSTOP) on a host that stays up never rejoins nor exits; Horovod alone would wait for
    it forever. hvdtrain.launching.horovodrun ends it --elastic-timeout (+ Gloo's timeout) after the others rejoined."""
    hosts_file, run_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "job.log"
    hosts_file.write_text("localhost:1\n127.0.0.1:1\n")
    env = {**elastic_env, "HOROVOD_GLOO_TIMEOUT_SECONDS": "10"}
    proc = start(elastic_args(run_dir, hosts_file, "--epochs", "5", "--elastic-timeout", "10"), env, tmp_path, log)
    wait_for_step(proc, run_dir, 32)
    stopped = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("HOROVOD_HOSTNAME") == "127.0.0.1":
                p.suspend()
                stopped.append(p)
        except psutil.Error:
            continue
    assert stopped, "no worker of 127.0.0.1 was running"
    frozen_at = time.time()
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
    assert "worker 127.0.0.1[0] neither rejoined nor exited within 20 s" in out, out[-3000:]
    resize = next(r for r in records(run_dir) if r.get("event") == "resize")
    assert (resize["old_size"], resize["new_size"], resize["hosts"]) == (2, 1, ["localhost"]), resize
    assert resize["time"] - frozen_at < 60
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 1 and result["test_accuracy"] >= 0.9, result
    check_exactly_once(tmp_path, run_dir, resize["epoch"])
    assert not [p.pid for p in stopped if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(f"frozen worker: training again {resize['time'] - frozen_at:.1f} s after the SIGSTOP")
