"""`hvdtrain train` for real: the default job's accuracy, exact resume after SIGKILL, model and hybrid jobs."""

import json
import signal
import sys
import time

import pytest
import torch

from hvdtrain.train import checkpoint


def result_of(run_dir):
    return json.loads((run_dir / "result.json").read_text())


def test_default_job_reaches_the_accuracy_bar(hvdtrain, tmp_path):
    """The README's main command: the CNN on digits, data parallel on 2 ranks, >= 95% test accuracy."""
    start = time.monotonic()
    proc = hvdtrain("train", "-np", "2", "--run-dir", tmp_path / "run", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = result_of(tmp_path / "run")
    assert res["test_accuracy"] >= 0.95, res
    assert f"test accuracy: {res['test_accuracy']:.4f}" in proc.stdout
    assert res["world_size"] == 2 and not res["preempted"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in r for r in rows) and any("test_accuracy" in r for r in rows)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == f"step-{res['steps']:08d}.pt"
    # Launched by mpirun (the default for a job on this machine), output tagged by rank as horovodrun's was; the
    # start-up said by rank 0 in phases from hvdtrain's launch on.
    assert "[1,0]<stdout>:test accuracy: " in proc.stdout
    phases = ["launch", "imports", "hvd.init", "data", "model", "broadcast", "first step"]
    assert list(res["startup_s"]) == sorted(phases) and all(v >= 0 for v in res["startup_s"].values())  # JSON: sorted
    assert 0 < res["startup_s"]["launch"] < time.monotonic() - start
    assert proc.stdout.count("start-up: ") == 1
    print(f"default job: {res['test_accuracy']:.4f} in {time.monotonic() - start:.1f} s wall")


@pytest.mark.parametrize("np_", [1, 2])
def test_resume_after_sigkill_is_bitwise_exact(hvdtrain, spawn, tmp_path, np_):
    """N steps straight through == k steps, SIGKILL, resume to N (deterministic mode, CPU)."""
    common = ["-np", np_, "--deterministic", "--max-steps", 80, "--epochs", 20, "--checkpoint-every", 10,
              "--keep-checkpoints", 50, "--log-every", 5]  # fmt: skip
    straight = hvdtrain("train", *common, "--run-dir", tmp_path / "straight", timeout=300)
    assert straight.returncode == 0, straight.stderr
    expected = result_of(tmp_path / "straight")

    run_dir = tmp_path / "killed"
    proc, kill = spawn("train", *common, "--run-dir", run_dir)
    try:
        deadline = time.monotonic() + 180
        while len(checkpoint.list_checkpoints(run_dir / "checkpoints")) < 3:  # killed somewhere after step 30
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        kill(str(run_dir))
    assert not (run_dir / "result.json").exists(), "the job finished before the kill: nothing was tested"
    newest = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    resumed = hvdtrain("train", *common, "--run-dir", run_dir, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {newest}" in resumed.stdout
    got = result_of(run_dir)
    assert got["steps"] == expected["steps"] == 80
    assert got["params_sha256"] == expected["params_sha256"]
    assert got["test_loss"] == expected["test_loss"]


def final_params(run_dir):
    state = checkpoint.load(checkpoint.list_checkpoints(run_dir / "checkpoints")[-1])["model"]
    return torch.cat([state[k].flatten() for k in sorted(state)])


def test_model_parallel_and_hybrid_jobs_match_data_parallel(hvdtrain, tmp_path):
    """Same seed, same data order: a pipelined replica (2 CPU stages, 4 micro-batches) trains like one
    unsplit replica. mlp has no dropout, so the only difference is float summation order."""
    common = ["--model", "mlp", "--max-steps", 40, "--deterministic", "--no-scale-lr", "--lr", 0.05]
    runs = {
        "data1": ["-np", 1],
        "model1": ["-np", 1, "--strategy", "model", "--devices-per-rank", 2, "--micro-batches", 4],
        "data2": ["-np", 2],
        "hybrid2": ["-np", 2, "--strategy", "hybrid", "--devices-per-rank", 2, "--micro-batches", 4],
    }
    for name, args in runs.items():
        proc = hvdtrain("train", *common, *args, "--run-dir", tmp_path / name, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert torch.allclose(final_params(tmp_path / "model1"), final_params(tmp_path / "data1"), atol=1e-5)
    assert torch.allclose(final_params(tmp_path / "hybrid2"), final_params(tmp_path / "data2"), atol=1e-5)
    assert result_of(tmp_path / "hybrid2")["test_accuracy"] > 0.5  # 40 steps; chance is 0.1


def test_preempt_signal_to_one_rank_stops_all_at_one_step_and_resumes_exactly(hvdtrain, spawn, tmp_path):
    """USR2 reaches only rank 1: both ranks agree on the step (its vote travels in the reporting window's sum,
    read one step after it closed), rank 0 checkpoints it, the job exits 0; resuming ends bitwise equal to an
    uninterrupted run."""
    import psutil

    common = ["-np", 2, "--launcher", "mpirun", "--deterministic", "--max-steps", 150, "--epochs", 20,
              "--log-every", 5]  # fmt: skip
    run_dir = tmp_path / "preempted"
    proc, kill = spawn("train", *common, "--run-dir", run_dir)
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and '"step": 10,' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        ranks = [p for p in psutil.process_iter(["cmdline"])
                 if (p.info["cmdline"] or [])[1:3] == ["-m", "hvdtrain.worker"] and str(run_dir) in p.info["cmdline"][3]]  # fmt: skip
        rank1 = [p for p in ranks if p.environ().get("OMPI_COMM_WORLD_RANK") == "1"]
        assert len(rank1) == 1, ranks
        rank1[0].send_signal(signal.SIGUSR2)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            kill(str(run_dir))
    res = result_of(run_dir)
    assert res["preempted"] and 10 <= res["steps"] < 150
    assert checkpoint.list_checkpoints(run_dir / "checkpoints")[-1].name == f"step-{res['steps']:08d}.pt"
    assert f"preempted at step {res['steps']}" in (run_dir / "logs" / "rank.0.log").read_text()

    resumed = hvdtrain("train", *common, "--run-dir", run_dir, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = hvdtrain("train", *common, "--run-dir", tmp_path / "straight", timeout=300)
    assert straight.returncode == 0, straight.stderr
    assert result_of(run_dir)["params_sha256"] == result_of(tmp_path / "straight")["params_sha256"]
    assert result_of(run_dir)["steps"] == 150


@pytest.mark.parametrize("mode", [[], ["--async-checkpoint"]], ids=["sync", "async"])
def test_a_checkpoint_onto_a_full_disk_ends_the_job_in_one_line_and_the_last_one_resumes_exactly(
    hvdtrain, child_env, tmp_path, mode
):
    """The run directory on a small real file system (a tmpfs in a private mount namespace: tests/fullfs.py) that
    fills up after the first checkpoint (the hook fullfs.FillDisk): rank 0's next checkpoint write finds it full.
    The job fails with the cause in one line (the checkpoint, the space left, the last complete checkpoint to
    resume from), no traceback, no temporary file left; with the space given back, --resume from that checkpoint
    ends bitwise equal to a run straight through. The same with --async-checkpoint: the background write fails, and
    the job fails at its next checkpoint with the same line."""
    import fullfs

    common = ["-np", "2", "--deterministic", "--max-steps", "40", "--epochs", "20", "--checkpoint-every", "10",
              "--log-every", "5", "--model", "mlp", "--hidden", "256"]  # a checkpoint of 700 KB  # fmt: skip
    straight = hvdtrain("train", *common, "--run-dir", tmp_path / "straight", timeout=300)
    assert straight.returncode == 0, straight.stderr
    mnt, ckpts = tmp_path / "mnt", tmp_path / "mnt" / "run" / "checkpoints"
    train = f"{sys.executable} -m hvdtrain train {' '.join(common + mode)} --run-dir {mnt / 'run'}"
    said = fullfs.train_onto_a_full_disk(train, mnt, tmp_path / "out", child_env, tmp_path)

    full_err = said["full.err"]
    assert "Traceback" not in full_err + said["full.out"]
    assert int(said["full.rc"]) not in (0, 2), full_err  # the job's status: its launcher's
    assert full_err.startswith("hvdtrain: error: rank 0 failed with exit status 1"), full_err
    cause = full_err.strip().splitlines()[-1]
    assert cause.startswith(
        f"  | hvdtrain: error: cannot write {ckpts}/step-00000020.pt: the file system is full (only "
    ), cause
    assert cause.endswith(
        f"free on {mnt}); the last complete checkpoint {ckpts}/step-00000010.pt is intact: free some space, then "
        "resume with --resume"
    ), cause
    assert said["left"].split() == [".", "..", "step-00000010.pt"]  # no temporary file

    assert int(said["resumed.rc"]) == 0, said["resumed.err"]
    assert f"resumed from {ckpts}/step-00000010.pt" in said["resumed.out"]
    got, expected = json.loads(said["result.json"]), result_of(tmp_path / "straight")
    assert got["steps"] == expected["steps"] == 40
    assert got["params_sha256"] == expected["params_sha256"]
