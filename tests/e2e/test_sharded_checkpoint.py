"""--shard-optimizer checkpoints: every rank writes its own part of the optimizer state, in parallel, into the
checkpoint's directory; rank 0 names the directory once every file is whole. A kill or a full disk in the middle
leaves the previous checkpoint the one resumed."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from jobprocs import kill_all

from hvdtrain.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
HVDTRAIN = [str(REPO / ".venv" / "bin" / "python"), "-m", "hvdtrain"]
COMMON = ["train", "-np", "2", "--model", "mlp", "--deterministic", "--max-steps", "40", "--epochs", "20",
          "--checkpoint-every", "10", "--keep-checkpoints", "10", "--log-every", "5", "--shard-optimizer",
          "--optimizer", "adam"]  # fmt: skip


def result_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def straight_run(child_env, tmp_path, *extra) -> dict:
    proc = subprocess.run([*HVDTRAIN, *COMMON, *extra, "--run-dir", str(tmp_path / "straight")], cwd=tmp_path,
                          env=child_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return result_of(tmp_path / "straight")


def test_a_kill_during_a_sharded_save_resumes_from_the_one_before(child_env, tmp_path):
    """Rank 0's part of the checkpoint of step 20 is held in its temporary file (faulthooks.SlowWrite), rank 1's is
    written: the job is killed. --resume passes over the unfinished directory, resumes from step 10 (its files
    resharded over the ranks' slices) and ends bitwise equal to the run straight through."""
    expected = straight_run(child_env, tmp_path)
    run_dir, mark = tmp_path / "killed", tmp_path / "mark"
    env = {**child_env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "HVDTRAIN_TEST_STEP": "20",
           "HVDTRAIN_TEST_MARK": str(mark), "HVDTRAIN_TEST_STEP_SLEEP": "0.02"}  # fmt: skip
    passed = [
        a for name in ("HVDTRAIN_TEST_STEP", "HVDTRAIN_TEST_MARK", "HVDTRAIN_TEST_STEP_SLEEP") for a in ("--env", name)
    ]
    argv = [*HVDTRAIN, *COMMON, "--run-dir", str(run_dir), "--hooks", "faulthooks:SlowWrite", *passed]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    tmp = run_dir / "checkpoints" / ".step-00000020.shards.tmp"
    try:
        deadline = time.monotonic() + 180
        while not (mark.exists() and (tmp / "optimizer.1.pt").exists()):
            assert proc.poll() is None, f"the job ended (status {proc.returncode}) before the write"
            assert time.monotonic() < deadline, "the checkpoint of step 20 was never under way"
            time.sleep(0.1)
    finally:
        kill_all(proc, str(run_dir))
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == ["step-00000010"]
    assert checkpoint.interrupted_writes(run_dir / "checkpoints") == [tmp]
    resumed = subprocess.run([*HVDTRAIN, *COMMON, "--run-dir", str(run_dir), "--resume"], cwd=tmp_path,
                             env=child_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert ".step-00000020.shards.tmp (unfinished checkpoint write of a killed job" in resumed.stderr
    assert f"resumed from {run_dir}/checkpoints/step-00000010 at step 10" in resumed.stdout
    got = result_of(run_dir)
    assert got["params_sha256"] == expected["params_sha256"] and got["test_loss"] == expected["test_loss"]
    assert not checkpoint.interrupted_writes(run_dir / "checkpoints")
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-00000040").iterdir()) == [
        "manifest.json", "meta.pt", "optimizer.0.pt", "optimizer.1.pt"
    ]  # fmt: skip


def test_a_full_disk_during_a_sharded_save_is_one_line_and_the_last_one_resumes(child_env, tmp_path):
    """The run directory on a small tmpfs that fills up after the first checkpoint (tests/fullfs.py): the ranks'
    writes of step 20 find it full; every rank fails with the same line, no traceback, no directory left; with the
    space given back, --resume from step 10 ends bitwise equal to the run straight through."""
    import fullfs

    model = ["--hidden", "256"]  # each rank's part about 170 KB, more than the 64 KB left
    expected = straight_run(child_env, tmp_path, *model)
    mnt, ckpts = tmp_path / "mnt", tmp_path / "mnt" / "run" / "checkpoints"
    train = f"{sys.executable} -m hvdtrain {' '.join(COMMON + model)} --run-dir {mnt / 'run'}"
    said = fullfs.train_onto_a_full_disk(train, mnt, tmp_path / "out", child_env, tmp_path)
    full_err = said["full.err"]
    assert "Traceback" not in full_err + said["full.out"]
    assert re.match(r"hvdtrain: error: rank [01] failed with exit status 1", full_err), full_err
    # The report's line ends with the cause, on it or under it (rank 0's log's last line), whichever rank was first.
    cause = full_err.strip().splitlines()[-1]
    assert f": cannot write {ckpts}/step-00000020: the file system is full (only " in cause, cause
    assert cause.endswith(
        f"the last complete checkpoint {ckpts}/step-00000010 is intact: free some space, then resume with --resume"
    ), cause
    assert said["left"].split() == [".", "..", "step-00000010"]  # no temporary directory
    assert int(said["resumed.rc"]) == 0, said["resumed.err"]
    assert f"resumed from {ckpts}/step-00000010" in said["resumed.out"]
    assert json.loads(said["result.json"])["params_sha256"] == expected["params_sha256"]
