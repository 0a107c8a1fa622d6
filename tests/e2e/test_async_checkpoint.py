"""--async-checkpoint: rank 0 writes checkpoints in a background thread while training goes on.

The write is made slow by faulthooks.SlowWrite (rank 0's torch.save pauses inside the checkpoint of step 20, its
whole state in the temporary file, not yet renamed), so the tests see training overlap the write, and can kill the
job in the middle of it.
"""

import json
import os
import subprocess
import time
from pathlib import Path

from jobprocs import kill_all

from hvdtrain.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
HVDTRAIN = [str(REPO / ".venv" / "bin" / "python"), "-m", "hvdtrain"]
COMMON = ["train", "-np", "2", "--model", "mlp", "--deterministic", "--max-steps", 40, "--epochs", 20,
          "--checkpoint-every", 10, "--keep-checkpoints", 10, "--log-every", 5]  # fmt: skip
TEST_ENV = ("HVDTRAIN_TEST_STEP_SLEEP", "HVDTRAIN_TEST_STEP", "HVDTRAIN_TEST_MARK")


def result_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def train(env, cwd, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([*HVDTRAIN, *map(str, COMMON), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return max([r["step"] for r in rows if "train_loss" in r], default=0)


def test_an_async_run_writes_the_same_checkpoints_as_a_sync_one(child_env, tmp_path):
    """Bitwise the same training and the same checkpoint contents; each write recorded once it is done."""
    train(child_env, tmp_path, "--run-dir", tmp_path / "sync")
    train(child_env, tmp_path, "--run-dir", tmp_path / "async", "--async-checkpoint")
    sync, background = result_of(tmp_path / "sync"), result_of(tmp_path / "async")
    assert background["params_sha256"] == sync["params_sha256"] and background["steps"] == 40
    assert len(background["checkpoint_stall_s"]) == len(sync["checkpoint_stall_s"]) == 4
    for step in (10, 20, 30, 40):
        a = checkpoint.load(tmp_path / "async" / "checkpoints" / checkpoint.checkpoint_name(step))
        b = checkpoint.load(tmp_path / "sync" / "checkpoints" / checkpoint.checkpoint_name(step))
        assert a["step"] == step and all(a["model"][k].equal(b["model"][k]) for k in b["model"])
    rows = [json.loads(line) for line in (tmp_path / "async" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "checkpoint"] == [10, 20, 30, 40]


def test_training_goes_on_during_a_write_and_a_kill_in_it_resumes_from_the_one_before(child_env, tmp_path):
    """The checkpoint of step 20 is being written (paused in the temporary file): training has gone past step 20,
    and waits at the checkpoint of step 30 (one write in flight at most). SIGKILL then: --resume passes over the unfinished write,
    resumes from step 10 and ends bitwise equal to the run straight through."""
    straight = train(child_env, tmp_path, "--run-dir", tmp_path / "straight")
    assert straight.returncode == 0
    run_dir, mark = tmp_path / "killed", tmp_path / "mark"
    env = {**child_env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "HVDTRAIN_TEST_STEP": "20",
           "HVDTRAIN_TEST_MARK": str(mark), "HVDTRAIN_TEST_STEP_SLEEP": "0.05"}  # fmt: skip
    passed = [a for name in TEST_ENV for a in ("--env", name)]
    argv = [*HVDTRAIN, *COMMON, "--run-dir", run_dir, "--async-checkpoint", "--hooks", "faulthooks:SlowWrite", *passed]
    proc = subprocess.Popen(list(map(str, argv)), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        # Past the checkpoint being written (a step's record is read one step after it: 25 means 26 was taken).
        while steps_logged(run_dir) < 25:
            assert proc.poll() is None, f"the job ended (status {proc.returncode}) during the write"
            assert time.monotonic() < deadline, f"training stopped at step {steps_logged(run_dir)} during the write"
            time.sleep(0.1)
        assert mark.exists(), "the write of step 20 was not under way"
        time.sleep(2.0)  # 40 steps' sleep: the checkpoint of step 30 waits for the write in flight
        assert steps_logged(run_dir) == 25, "training went past the next checkpoint with a write in flight"
        assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == ["step-00000010.pt"]
        assert checkpoint.interrupted_writes(run_dir / "checkpoints"), "no write in flight"
    finally:
        kill_all(proc, str(run_dir))
    resumed = subprocess.run([*HVDTRAIN, *map(str, COMMON), "--run-dir", str(run_dir), "--resume"], cwd=tmp_path,
                             env=child_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "unfinished checkpoint write of a killed job" in resumed.stderr
    assert f"resumed from {run_dir}/checkpoints/step-00000010.pt at step 10" in resumed.stdout
    assert result_of(run_dir)["params_sha256"] == result_of(tmp_path / "straight")["params_sha256"]
    assert not checkpoint.interrupted_writes(run_dir / "checkpoints")
