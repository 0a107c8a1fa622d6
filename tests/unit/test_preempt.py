"""The preemption flag and the requeue that follows the checkpoint inside Slurm (scontrol faked on PATH)."""

import os
import signal

import pytest

from hvdtrain import preempt
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import LaunchError, UsageError

ARRAY_TASK = {"SLURM_JOB_ID": "13", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "3"}


def test_signal_sets_the_flag_instead_of_killing():
    preempt.reset()
    preempt.install("USR1")
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested()
    finally:
        preempt.uninstall()
        preempt.reset()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_slurm_env_job_label():
    assert SlurmEnv.read({"SLURM_JOB_ID": "12"}).job_label == "12"
    assert SlurmEnv.read(ARRAY_TASK).job_label == "10_3"
    assert SlurmEnv.read({}).job_label is None
    env = SlurmEnv.read(
        {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_RESTART_COUNT": "2"}
    )
    assert (env.in_allocation, env.ntasks, env.ntasks_per_node, env.restart_count) == (True, 4, 2, 2)
    assert not SlurmEnv.read({"SLURM_JOB_ID": "5"}).in_allocation


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    log = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\n[ "$2" = "99" ] && {{ echo "Requested operation is disabled" >&2; exit 1; }}\nexit 0\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return log


def test_requeue_job_runs_scontrol(fake_scontrol, tmp_path, monkeypatch):
    assert preempt.requeue_job(SlurmEnv.read(ARRAY_TASK)) == "10_3"
    assert fake_scontrol.read_text() == "requeue 10_3\n"
    with pytest.raises(LaunchError, match="Requested operation is disabled"):
        preempt.requeue_job(SlurmEnv.read({"SLURM_JOB_ID": "99"}))
    with pytest.raises(UsageError, match="not inside a Slurm job"):
        preempt.requeue_job(SlurmEnv.read({}))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(LaunchError, match="scontrol is not on PATH"):
        preempt.requeue_job(SlurmEnv.read({"SLURM_JOB_ID": "1"}))


def test_requeue_after_preemption_respects_the_limit(fake_scontrol):
    said = []
    assert preempt.requeue_after_preemption(True, 3, said.append, SlurmEnv.read({})) is None  # not in Slurm
    assert preempt.requeue_after_preemption(False, 3, said.append, SlurmEnv.read({"SLURM_JOB_ID": "7"})) is None
    assert not fake_scontrol.exists() and said == []
    limit = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3"}
    assert preempt.requeue_after_preemption(True, 3, said.append, SlurmEnv.read(limit)) is None
    assert said == ["not requeueing: the job was already requeued 3 times (--max-requeues 3)"]
    assert (
        preempt.requeue_after_preemption(
            True, 3, said.append, SlurmEnv.read({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"})
        )
        == "7"
    )
    assert fake_scontrol.read_text() == "requeue 7\n"


def test_a_training_job_that_stalled_hung_or_lost_a_host_requeues_inside_slurm(fake_scontrol):
    """hvdtrain train inside Slurm: a stall (or lost host) ends the launch; the report is said first, then the
    job is requeued like a preempted one. Outside Slurm, or with --no-requeue, nothing is requeued."""
    from hvdtrain import jobs
    from hvdtrain.config import TrainConfig
    from hvdtrain.errors import LaunchError

    error = LaunchError("rank 1 stalled: rank 0 waited more than 8 s", 1, "stall")
    said = []
    assert jobs.requeue_after_fault(TrainConfig(), error, said.append, SlurmEnv.read({"SLURM_JOB_ID": "7"}))
    assert said[0] == "hvdtrain: error: rank 1 stalled: rank 0 waited more than 8 s"
    assert "requeued Slurm job 7" in said[1]
    assert fake_scontrol.read_text() == "requeue 7\n"
    said.clear()
    assert not jobs.requeue_after_fault(TrainConfig(), error, said.append, SlurmEnv.read({}))
    assert not jobs.requeue_after_fault(
        TrainConfig(requeue=False), error, said.append, SlurmEnv.read({"SLURM_JOB_ID": "7"})
    )
    assert said == [] and fake_scontrol.read_text() == "requeue 7\n"
    # At --max-requeues: the report once, and why it was not requeued (the CLI then prints nothing more).
    assert jobs.requeue_after_fault(
        TrainConfig(), error, said.append, SlurmEnv.read({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3"})
    )
    assert said[0].startswith("hvdtrain: error: rank 1 stalled") and said[1].startswith("not requeueing")
    assert fake_scontrol.read_text() == "requeue 7\n"
    assert set(jobs.REQUEUE_CAUSES) == {"stall", "hang", "lost_host"}
