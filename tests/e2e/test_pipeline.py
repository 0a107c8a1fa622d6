"""`hvdtrain train --strategy pipeline` for real: the default digits job on 2 stages reaches the accuracy bar;
2 stages x 2 replicas equal data parallelism on 2 ranks (1e-6, through their checkpoints, which share a format);
a resumed pipeline ends bitwise where the straight one does, and its checkpoint resumed by a data-parallel job
ends where the pipeline does; a killed stage ends the job fast with its rank and stage named."""

import json
import signal

import torch

from hvdtrain.train import checkpoint


def result_of(run_dir):
    return json.loads((run_dir / "result.json").read_text())


def last_checkpoint(run_dir):
    return checkpoint.load(checkpoint.list_checkpoints(run_dir / "checkpoints")[-1])


def assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6, rtol=0), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, entry in a["optimizer"]["state"].items():
        assert torch.allclose(entry["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"], atol=1e-6)


def test_the_default_job_on_two_stages_reaches_the_accuracy_bar(hvdtrain, tmp_path):
    run_dir = tmp_path / "run"
    proc = hvdtrain("train", "-np", 2, "--strategy", "pipeline", "--stages", 2, "--micro-batches", 4,
                    "--run-dir", run_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = result_of(run_dir)
    assert res["test_accuracy"] >= 0.95, res
    assert (res["stages"], res["schedule"], res["world_size"]) == (2, "1f1b", 1)
    assert res["micro_batches_in_flight_peak"] == [2, 1]  # 1F1B: P - s micro-batches per stage
    assert "1 replica(s) of 2 pipeline stages (1f1b, 4 micro-batch(es) per batch)" in proc.stdout
    logs = run_dir / "logs"
    assert "this rank is stage 0 of replica 0 (layers 0-" in (logs / "rank.0.log").read_text()
    assert "this rank is stage 1 of replica 0 (layers " in (logs / "rank.1.log").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in r for r in rows) and any("test_accuracy" in r for r in rows)


COMMON = ["--model", "mlp", "--epochs", 2, "--deterministic", "--batch-size", 20]


def test_two_stages_by_two_replicas_equal_data_parallelism_on_two_ranks(hvdtrain, tmp_path):
    proc = hvdtrain("train", "-np", 4, "--strategy", "pipeline", "--stages", 2, "--micro-batches", 3,
                    "--schedule", "gpipe", *COMMON, "--run-dir", tmp_path / "pipe")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = hvdtrain("train", "-np", 2, *COMMON, "--run-dir", tmp_path / "data")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    piped, data = result_of(tmp_path / "pipe"), result_of(tmp_path / "data")
    assert piped["steps"] == data["steps"] and (piped["world_size"], piped["ranks"]) == (2, 4)
    assert abs(piped["test_loss"] - data["test_loss"]) < 1e-6
    assert_same_state(last_checkpoint(tmp_path / "pipe"), last_checkpoint(tmp_path / "data"))
    # The windows' per-rank seconds: every rank of the pipeline (4 stages' ranks), of the data job its 2.
    for run, ranks in (("pipe", 4), ("data", 2)):
        windows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        windows = [w for w in windows if "train_loss" in w]
        assert windows and all(len(w["rank_compute_s"]) == len(w["rank_wait_s"]) == ranks for w in windows)


def test_exact_resume_and_a_data_parallel_job_resuming_a_pipeline_checkpoint(hvdtrain, tmp_path):
    pipe = ["train", "-np", 2, "--strategy", "pipeline", "--stages", 2, "--micro-batches", 4, *COMMON]
    proc = hvdtrain(*pipe, "--max-steps", 60, "--run-dir", tmp_path / "straight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = hvdtrain(*pipe, "--max-steps", 30, "--run-dir", tmp_path / "split")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    half = checkpoint.list_checkpoints(tmp_path / "split" / "checkpoints")[-1]
    proc = hvdtrain(*pipe, "--max-steps", 60, "--run-dir", tmp_path / "split", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout
    assert result_of(tmp_path / "split")["params_sha256"] == result_of(tmp_path / "straight")["params_sha256"]
    # The step-30 checkpoint is a data-parallel one: a one-rank data job goes on from it to the same end.
    proc = hvdtrain("train", "-np", 1, *COMMON, "--max-steps", 60, "--run-dir", tmp_path / "data",
                    "--resume-from", half)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_state(last_checkpoint(tmp_path / "data"), last_checkpoint(tmp_path / "straight"))


def test_a_killed_stage_ends_the_job_fast_with_rank_and_stage_named(kill_rank_mid_training, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "-np", 4, "--strategy", "pipeline", "--stages", 2, "--epochs", 500, "--log-every", 5,
            "--run-dir", run_dir]  # fmt: skip
    status, elapsed, err = kill_rank_mid_training(args, run_dir, rank=3)
    assert status != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    expected = f"hvdtrain: error: rank 3 (stage 1 of replica 1) failed with exit status {128 + signal.SIGKILL}"
    assert err.startswith(expected), err
