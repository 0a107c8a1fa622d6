"""RunDir owns every name of a run directory; these are the names users, scripts and docs rely on."""

from pathlib import Path

from hvdtrain.rundir import RankLogs, RunDir, checkpoint_step


def test_names():
    run = RunDir("runs/a b")
    base = Path("runs/a b")
    assert (run.config, run.metrics, run.result, run.job_script) == (
        base / "config.json",
        base / "metrics.jsonl",
        base / "result.json",
        base / "job.sbatch",
    )
    assert run.tensorboard == base / "tensorboard" and run.checkpoints == base / "checkpoints"
    assert run.checkpoint(42) == base / "checkpoints" / "step-00000042.pt"
    assert run.logs.log(3) == base / "logs" / "rank.3.log" and run.logs.exit(3) == base / "logs" / "rank.3.exit"
    assert run.logs.host(3) == base / "logs" / "rank.3.host"
    assert run.logs.task("2").log(0) == base / "logs" / "task-2" / "rank.0.log" and run.logs.task(None) == run.logs
    assert run.slurm_output("77") == base / "slurm-77.out"
    assert run.slurm_output("77", "2") == base / "slurm-77_2.out"


def test_checkpoint_step_and_exit_records(tmp_path):
    assert checkpoint_step(RunDir(tmp_path).checkpoint(7)) == 7
    assert checkpoint_step(".step-00000007.pt.x.tmp") is None and checkpoint_step("step-7.pt") is None
    logs = RankLogs(tmp_path)
    for rank in (0, 11):
        logs.exit(rank).write_text("0\n")
    (tmp_path / "rank.x.exit").write_text("1\n")
    logs.host(4).write_text("node2\n")
    (tmp_path / ".rank.5.host.tmp").write_text("half")  # an atomic write in progress is not a record
    assert sorted(rank for rank, _ in logs.exit_records()) == [0, 11]
    assert [rank for rank, _ in logs.host_records()] == [4]
