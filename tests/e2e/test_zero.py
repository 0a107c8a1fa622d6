"""`hvdtrain train --shard-optimizer` for real (2 ranks): the accuracy bar, exact resume, checkpoints that load with
or without sharding, and the hybrid strategy."""

import json

import torch

from hvdtrain.train import checkpoint


def result_of(run_dir):
    return json.loads((run_dir / "result.json").read_text())


def final_params(run_dir):
    state = checkpoint.load(checkpoint.list_checkpoints(run_dir / "checkpoints")[-1])["model"]
    return torch.cat([state[k].flatten() for k in sorted(state)])


def test_default_job_with_a_sharded_adam_reaches_the_accuracy_bar(hvdtrain, tmp_path):
    proc = hvdtrain("train", "-np", 2, "--shard-optimizer", "--optimizer", "adam", "--run-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = result_of(tmp_path / "run")
    assert res["test_accuracy"] >= 0.95, res
    # The checkpoint is the directory of the ranks' own files; consolidated, the whole Adam state in torch's format:
    # one entry per parameter.
    newest = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert sorted(p.name for p in newest.iterdir()) == ["manifest.json", "meta.pt", "optimizer.0.pt", "optimizer.1.pt"]
    saved = checkpoint.consolidate_optimizer(checkpoint.load(newest))
    assert len(saved["optimizer"]["state"]) == len(saved["model"])
    for i, name in enumerate(saved["model"]):
        assert saved["optimizer"]["state"][i]["exp_avg"].shape == saved["model"][name].shape


def test_sharded_resume_is_exact_and_its_checkpoint_resumes_unsharded(hvdtrain, tmp_path):
    """40 steps straight == 20 steps, then resumed to 40 (bitwise); the step-20 checkpoint resumed without
    --shard-optimizer ends where the sharded run does (at np 2 the two take the same arithmetic)."""
    common = ["-np", 2, "--deterministic", "--model", "mlp", "--optimizer", "adamw", "--epochs", 20,
              "--checkpoint-every", 20, "--log-every", 5]  # fmt: skip
    sharded = [*common, "--shard-optimizer"]
    for name, args in [("straight", [*sharded, "--max-steps", 40]), ("split", [*sharded, "--max-steps", 20])]:
        proc = hvdtrain("train", *args, "--run-dir", tmp_path / name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    half = checkpoint.list_checkpoints(tmp_path / "split" / "checkpoints")[-1]
    proc = hvdtrain("train", *sharded, "--max-steps", 40, "--run-dir", tmp_path / "split", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result_of(tmp_path / "split")["params_sha256"] == result_of(tmp_path / "straight")["params_sha256"]
    proc = hvdtrain("train", *common, "--max-steps", 40, "--run-dir", tmp_path / "plain", "--resume-from", half)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resumed from {half} at step 20" in proc.stdout
    assert torch.allclose(final_params(tmp_path / "plain"), final_params(tmp_path / "straight"), atol=1e-6, rtol=0)


def test_hybrid_with_a_sharded_optimizer_matches_hybrid(hvdtrain, tmp_path):
    """Each rank's replica is a 2-stage pipeline; the optimizer state is sharded across the 2 replicas."""
    common = ["-np", 2, "--strategy", "hybrid", "--devices-per-rank", 2, "--micro-batches", 2, "--model", "mlp",
              "--max-steps", 30, "--deterministic", "--optimizer", "adam"]  # fmt: skip
    for name, extra in [("plain", []), ("sharded", ["--shard-optimizer"])]:
        proc = hvdtrain("train", *common, *extra, "--run-dir", tmp_path / name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert torch.allclose(final_params(tmp_path / "sharded"), final_params(tmp_path / "plain"), atol=1e-6, rtol=0)
