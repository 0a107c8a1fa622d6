"""A job never outlives hvdtrain: SIGKILL of `hvdtrain train` (or of its whole process group) mid-training leaves
no process of the job behind, under every local launcher; Ctrl-C (SIGINT to the foreground group, as a terminal
sends it) checkpoints, stops every rank and exits 130; a run directory in use by a live job is refused to a
second one, and a lock left by a killed job does not block its --resume."""

import os
import signal
import subprocess
import time

import pytest
from conftest import HVDTRAIN
from jobprocs import job_processes, kill_all, wait_gone

from hvdtrain.train import checkpoint

LAUNCHERS = {"horovodrun-gloo": ["--gloo"], "horovodrun-mpi": ["--mpi"], "mpirun": ["--launcher", "mpirun"]}
TRAIN = ["train", "-np", "2", "--epochs", "500", "--log-every", "5", "--checkpoint-every", "20"]
GONE_WITHIN_S = 10.0


def start(child_env, cwd, run_dir, *extra, stderr=subprocess.DEVNULL):
    """`hvdtrain train` in a session of its own (its process group stands for a terminal's foreground group);
    returns once rank 0 has trained a few steps and both ranks run."""
    with open(cwd / "stdout.txt", "w") as stdout:  # what a terminal would show, beside stderr
        proc = subprocess.Popen(
            [*HVDTRAIN, *TRAIN, "--run-dir", str(run_dir), *extra], env=child_env, cwd=cwd, stdout=stdout,
            stderr=stderr, text=True, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    log = run_dir / "logs" / "rank.0.log"
    while not (log.exists() and "step 10/" in log.read_text() and (run_dir / "logs" / "rank.1.log").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_all(proc, str(run_dir))
            pytest.fail(f"training did not start (exit {proc.returncode})")
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("target", ["process", "group"])
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sigkill_of_hvdtrain_leaves_no_rank_behind(launcher, target, child_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(child_env, tmp_path, run_dir, *LAUNCHERS[launcher])
    try:
        ranks = [p for p in job_processes(str(run_dir)) if p.cmdline()[1:3] == ["-m", "hvdtrain.worker"]]
        assert len(ranks) == 2, ranks
        if target == "process":
            os.kill(proc.pid, signal.SIGKILL)
        else:  # the OOM killer, or `kill -9 -PGID`
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        left = wait_gone(str(run_dir), GONE_WITHIN_S)
        assert not left, [(p.pid, p.cmdline()[:4]) for p in left]
    finally:
        kill_all(proc, str(run_dir))


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_ctrl_c_checkpoints_stops_every_rank_and_exits_130(launcher, child_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(child_env, tmp_path, run_dir, *LAUNCHERS[launcher], stderr=subprocess.PIPE)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "hvdtrain: interrupted: the ranks checkpoint and stop" in err and "Traceback" not in err, err
        assert not wait_gone(str(run_dir), GONE_WITHIN_S)
    finally:
        kill_all(proc, str(run_dir))
    result = (run_dir / "result.json").read_text()
    assert '"interrupted": true' in result and '"requeued": null' in result, result
    last = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    assert f"interrupted at step {checkpoint.checkpoint_step(last)}" in (run_dir / "logs" / "rank.0.log").read_text()
    assert not (run_dir / "interrupted").exists() and not (run_dir / "hvdtrain.lock").exists()


def test_a_run_dir_in_use_is_refused_and_a_killed_jobs_lock_is_taken_over(child_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(child_env, tmp_path, run_dir, "--launcher", "mpirun")
    try:
        while not checkpoint.list_checkpoints(run_dir / "checkpoints"):
            assert proc.poll() is None
            time.sleep(0.1)
        config = (run_dir / "config.json").stat().st_mtime_ns
        second = subprocess.run(
            [*HVDTRAIN, *TRAIN, "--run-dir", str(run_dir), "--resume", "--launcher", "mpirun"], env=child_env,
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(f"hvdtrain: error: --run-dir {run_dir}: a job is already running there (pid ")
        assert len(second.stderr.splitlines()) == 1
        assert (run_dir / "config.json").stat().st_mtime_ns == config  # the second job wrote nothing
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert not wait_gone(str(run_dir), GONE_WITHIN_S)
    finally:
        kill_all(proc, str(run_dir))
    assert (run_dir / "hvdtrain.lock").exists()  # left by the SIGKILL: stale, its holder is gone
    resumed = subprocess.run(
        [*HVDTRAIN, *TRAIN, "--run-dir", str(run_dir), "--resume", "--launcher", "mpirun", "--max-steps", "45"],
        env=child_env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr
    assert not (run_dir / "hvdtrain.lock").exists()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_rank_killed_by_a_signal_is_reported_without_a_traceback(launcher, signum, child_env, tmp_path):
    """Rank 1's worker dies of a signal the user did not cause: the report names it; the survivors (Horovod shut
    down under them, with Gloo) and horovodrun (its closing RuntimeError) print no traceback."""
    run_dir = tmp_path / "run"
    proc = start(child_env, tmp_path, run_dir, *LAUNCHERS[launcher], stderr=subprocess.PIPE)
    try:
        workers = [p for p in job_processes(str(run_dir)) if p.cmdline()[1:3] == ["-m", "hvdtrain.worker"]]
        rank = {p.environ().get("OMPI_COMM_WORLD_RANK", p.environ().get("HOROVOD_RANK")): p for p in workers}
        rank["1"].send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_all(proc, str(run_dir))
    assert proc.returncode != 0
    assert err.startswith(f"hvdtrain: error: rank 1 failed with exit status {128 + signum}"), err
    out = (tmp_path / "stdout.txt").read_text()
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("rank.*.log"))
    assert "Traceback" not in err + out + logs, err + out + logs
