"""Horovod's timeline for real: a window of steps recorded by a 2-rank `hvdtrain train`, summarized by
`hvdtrain timeline` (its phases and the model's tensors appear, the totals add up); `hvdtrain run --timeline`
for any Horovod script; a job killed while recording leaves a file that reads."""

import json

import pytest
from patchcheck import patched

from hvdtrain.rundir import RunDir

MLP_PARAMS = ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]


def summary_of(hvdtrain, target):
    proc = hvdtrain("timeline", target, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_a_window_of_steps_is_recorded_and_summarized(hvdtrain, tmp_path):
    run = tmp_path / "run"
    proc = hvdtrain("train", "-np", 2, "--model", "mlp", "--max-steps", 12, "--timeline-steps", "5:8", "--run-dir", run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"hvdtrain: timeline {run}/timeline.json; `hvdtrain timeline {run}` summarizes it" in proc.stdout
    events = json.loads((run / "timeline.json").read_text())  # whole: stop_timeline closed it
    # One group per step (the default on CPU). With hvdtrain's patch its gradients live in one flat buffer reduced as
    # one tensor, named allreduce.<first parameter>+<the other parameters' count>; a stock Horovod reduces the group
    # through its fusion buffer, a tensor per gradient named grouped_allreduce.<first parameter>_<i>of<n>.
    n = len(MLP_PARAMS)
    if patched():
        group = {f"allreduce.{MLP_PARAMS[0]}+{n - 1}"}
    else:
        group = {f"grouped_allreduce.{MLP_PARAMS[0]}_{i}of{n}" for i in range(1, n + 1)}
    assert group <= {e.get("args", {}).get("name", "") for e in events}
    assert [int(line.split(",")[0]) for line in RunDir(run).timeline_steps.read_text().splitlines()[1:]] == [5, 6, 7, 8]

    s = summary_of(hvdtrain, run)
    assert s["steps"] == [5, 6, 7, 8] and s["repaired_bytes"] == 0 and s["ops"] == ["ALLREDUCE"]
    assert {"NEGOTIATE", "MPI_ALLREDUCE"} <= set(s["phases"])
    # Every gradient in that group (patched: in one tensor, none on its own or through the fusion buffer).
    assert {t for t in s["tensors"] if any(p in t for p in MLP_PARAMS)} == group
    if not patched():  # a group is one response, its tensors fused: through the fusion buffer
        assert "MEMCPY_IN_FUSION_BUFFER" in s["phases"]
    for phase, total in s["totals"].items():  # the totals add up: per phase over tensors, per tensor over phases
        assert total == pytest.approx(sum(row.get(phase, 0.0) for row in s["tensors"].values()))
    for row in s["tensors"].values():
        assert row["total"] == pytest.approx(sum(v for k, v in row.items() if k != "total"))
    assert s["step_ms"] == pytest.approx(sum(s["step_ms_each"]) / 4, rel=1e-3)
    for row in s["phases"].values():  # a phase's wall time lies within the steps, and within communication
        assert 0 < row["wall_ms"] <= s["communication_ms"] + 1e-9 and 0 < row["share"] <= 1
    assert 0 < s["communication_share"] <= 1
    assert s["plot_step"] in [5, 6, 7, 8] and (run / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = hvdtrain("timeline", run).stdout
    assert "steps 5-8 (4)" in text and "MPI_ALLREDUCE" in text and "allreduce.1.weight" in text


def test_run_records_any_horovod_script(hvdtrain, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import horovod.torch as hvd, torch\nhvd.init()\n"
        "for i in range(3):\n    hvd.allreduce(torch.ones(1000) * hvd.rank(), name=f'tensor{i}')\n"
    )
    proc = hvdtrain("run", "-np", 2, "--timeline", "--output-dir", tmp_path / "out", "--", "python", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"hvdtrain: timeline {tmp_path}/out/timeline.json" in proc.stdout
    s = summary_of(hvdtrain, tmp_path / "out" / "timeline.json")
    assert s["steps"] == [] and {"allreduce.tensor0", "allreduce.tensor1", "allreduce.tensor2"} <= set(s["tensors"])
    assert "MPI_ALLREDUCE" in s["phases"]


def test_a_killed_job_leaves_a_timeline_that_reads(kill_rank_mid_training, tmp_path, hvdtrain):
    run = tmp_path / "run"
    args = ["train", "-np", 2, "--model", "mlp", "--epochs", 40, "--log-every", 5, "--timeline", "--run-dir", run]
    status, _, err = kill_rank_mid_training(args, run, rank=0)
    assert status != 0 and "rank 0 failed" in err, err
    json.loads((run / "timeline.json").read_text())  # repaired after the job, if the kill cut an event
    s = summary_of(hvdtrain, run)
    assert s["steps"][0] == 1 and len(s["steps"]) >= 10 and "MPI_ALLREDUCE" in s["phases"]
