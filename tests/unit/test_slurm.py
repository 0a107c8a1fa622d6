"""hvdtrain.slurm without a cluster: golden job scripts (hostile paths included), the templates are the
rendered ones, the fixed script body run by bash against fake srun/mpirun, validation, requeue ids, and
`submit`/`status`/`logs` bad input through CliRunner (one line, exit 2, nothing submitted)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain import slurm as S
from hvdtrain.cli import cli
from hvdtrain.errors import LaunchError, UsageError

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("HVDTRAIN_UPDATE_GOLDEN") == "1"

CASES = {
    "basic": (dict(ntasks_per_node=2, time="01:00:00"), ["hvdtrain", "train", "--run-dir", "/runs/basic/train"]),
    "array-space": (
        dict(array="0-2%2", job_name="sweep job", mem="4G", partition="debug", account="proj-1", signal="B:USR2@300"),
        ["hvdtrain", "train", "-np", "1", "--seed", "{task}", "--run-dir", "/runs/a b/{task}"],
    ),
    "quote": (dict(nodes=2, requeue=False, signal=None), ["python", "-c", "print('hi'); import os", "a'; echo x"]),
    "hybrid": (dict(nodes=2, gpus_per_node=4, gpus_per_rank=2, cpus_per_task=8, launcher="mpirun"), ["python", "my.py"]),
}
RUN_DIRS = {"basic": "/runs/basic", "array-space": "/runs/a b", "quote": "/runs/a'; echo x", "hybrid": "/runs/100%"}


def spec_for(name: str, tmp_path: Path) -> S.SlurmSpec:
    opts, _ = CASES[name]
    spec = S.make_spec(run_dir=str(tmp_path / "x"), **opts)
    spec.run_dir = RUN_DIRS[name]  # fixed absolute paths, so the golden files do not depend on tmp_path
    return spec


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden(name, tmp_path):
    text = S.render_script(spec_for(name, tmp_path), CASES[name][1])
    golden = GOLDEN / f"{name}.sbatch"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"re-render with HVDTRAIN_UPDATE_GOLDEN=1 if the change is intended: {golden}"
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert lines == sorted(lines) and len(lines) == len({line.split("=")[0] for line in lines})


def test_rendering_is_deterministic(tmp_path):
    a = S.render_script(spec_for("array-space", tmp_path), CASES["array-space"][1])
    assert a == S.render_script(spec_for("array-space", tmp_path), CASES["array-space"][1])


def test_hostile_values_are_quoted(tmp_path):
    spec = spec_for("quote", tmp_path)
    text = S.render_script(spec, CASES["quote"][1])
    assert "#SBATCH --output='/runs/a'\"'\"'; echo x/slurm-%j.out'" in text
    assert "export HVDTRAIN_RUN_DIR='/runs/a'\"'\"'; echo x'" in text
    hybrid = S.render_script(spec_for("hybrid", tmp_path), ["python", "my.py"])
    assert "#SBATCH --output=/runs/100%%/slurm-%j.out" in hybrid  # sbatch's % patterns escaped


@pytest.mark.parametrize("name", sorted(S.TEMPLATES))
def test_templates_in_slurm_dir_are_the_rendered_ones(name):
    path = REPO / "slurm" / name
    assert path.read_text() == S.render_template(name), "run: python -m hvdtrain.slurm write-templates slurm"
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert S.RUN_BODY in path.read_text()


# --- the fixed body, run by bash against fake launchers ---------------------------------------------------


@pytest.fixture
def fake_bin(tmp_path):
    """srun and mpirun that record their argv as JSON, then run nothing."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("srun", "mpirun"):
        f = d / name
        f.write_text(f'#!/usr/bin/env python3\nimport json, sys\nprint("ARGV " + json.dumps(["{name}", *sys.argv[1:]]))\n')
        f.chmod(0o755)
    return d


def run_script(text: str, tmp_path: Path, fake_bin: Path, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "job.sh"
    script.write_text(text)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and not k.startswith("HVDTRAIN_")}
    full = {**base, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", **env}
    return subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=30)


def recorded(proc) -> list[str]:
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("ARGV ")]
    return json.loads(line[5:])


def test_body_substitutes_task_and_starts_ranks_with_srun_pmix(tmp_path, fake_bin):
    spec = S.make_spec(run_dir=str(tmp_path / "r d"), array="0-3", ntasks_per_node=2)
    text = S.render_script(spec, ["python", "t.py", "--seed", "{task}", "--out", "x-{job}-{task}", "a'b"])
    proc = run_script(text, tmp_path, fake_bin, SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="3")
    assert proc.returncode == 0, proc.stderr
    argv = recorded(proc)
    assert argv[:5] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--open-mode=append",
                        f"--output={tmp_path}/r d/logs/task-3/rank.%t.log"]  # fmt: skip
    assert argv[5:9] == ["bash", "-c", S._PIN, "hvdtrain-pin"]
    assert argv[-7:] == ["python", "t.py", "--seed", "3", "--out", "x-5-3", "a'b"]
    assert "command exited with status 0" in proc.stdout


def test_body_runs_hvdtrain_commands_directly_and_mpirun_on_request(tmp_path, fake_bin):
    spec = S.make_spec(run_dir=str(tmp_path / "r"), launcher="mpirun")
    proc = run_script(S.render_script(spec, ["python", "x.py"]), tmp_path, fake_bin)
    assert recorded(proc)[:3] == ["mpirun", "-np", "2"]
    fake = fake_bin / "hvdtrain"
    fake.write_text("#!/bin/sh\necho \"HVD $*\"\n")
    fake.chmod(0o755)
    proc = run_script(S.render_script(spec, ["hvdtrain", "train", "--lr", "0.1"]), tmp_path, fake_bin)
    assert "HVD train --lr 0.1" in proc.stdout and "ARGV" not in proc.stdout


def test_body_sweep_values_and_missing_value(tmp_path, fake_bin):
    text = S.render_template("array-sweep.sbatch")
    proc = run_script(text, tmp_path, fake_bin, SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="1",
                      HVDTRAIN_RUN_DIR=str(tmp_path / "r"))  # fmt: skip
    assert proc.returncode == 2 and "no command given" in proc.stderr
    script = tmp_path / "t.sh"
    script.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HVDTRAIN_"))}
    env.update(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="9", SLURM_NTASKS="1",
               SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="1", HVDTRAIN_RUN_DIR=str(tmp_path / "r"))  # fmt: skip
    proc = subprocess.run(["bash", str(script), "python", "--lr={value}"], env=env, capture_output=True, text=True, timeout=30)
    assert recorded(proc)[-1] == "--lr=0.03", proc.stdout
    env["SLURM_ARRAY_TASK_ID"] = "7"
    proc = subprocess.run(["bash", str(script), "python", "--lr={value}"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "task 7 has no entry" in proc.stderr


@pytest.mark.parametrize(
    "k,env,want",
    [
        ("1", {"SLURM_LOCALID": "1"}, "1"),
        ("2", {"SLURM_LOCALID": "1"}, "2,3"),
        ("2", {"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, "6,7"),
        ("1", {"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}, "3"),
        ("0", {"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "4,5"}, "4,5"),
    ],
)
def test_gpu_pinning_by_local_rank(k, env, want):
    base = {k2: v for k2, v in os.environ.items() if k2 not in ("CUDA_VISIBLE_DEVICES", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")}
    proc = subprocess.run(["bash", "-c", S._PIN, "pin", k, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"'],
                          env={**base, **env}, capture_output=True, text=True, timeout=10)  # fmt: skip
    assert proc.stdout.strip() == want, proc.stderr


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts,needle",
    [
        (dict(nodes=0), "--nodes 0: must be at least 1"),
        (dict(ntasks_per_node=0), "--ntasks-per-node 0"),
        (dict(cpus_per_task=0), "--cpus-per-task 0"),
        (dict(time="1:2:3:4"), "not a Slurm time"),
        (dict(time="ten"), "not a Slurm time"),
        (dict(mem="4X"), "not a memory size"),
        (dict(array="a-b"), "not a Slurm array"),
        (dict(signal="FOO@10"), "--signal 'FOO@10'"),
        (dict(signal="USR2@99999"), "at most 65535"),
        (dict(partition="a b"), "--partition 'a b'"),
        (dict(launcher="horovodrun"), "unknown launcher"),
        (dict(gpus_per_rank=2), "needs --gpus-per-node"),
        (dict(gpus_per_node=4, gpus_per_rank=3), "does not divide"),
        (dict(gpus_per_node=4, gpus_per_rank=2, ntasks_per_node=4), "drop --ntasks-per-node"),
        (dict(gpus_per_node=2, ntasks_per_node=4), "more than --gpus-per-node"),
        (dict(job_name="a\nb"), "--job-name"),
    ],
)
def test_bad_options(opts, needle, tmp_path):
    with pytest.raises(UsageError, match=None) as e:
        S.make_spec(run_dir=str(tmp_path / "r"), **opts)
    assert needle in str(e.value)


def test_good_options(tmp_path):
    for t in ("30", "30:00", "01:30:00", "1-12", "1-12:00", "1-12:00:00", "UNLIMITED"):
        S.make_spec(run_dir=str(tmp_path / "r"), time=t)
    for a in ("0-2", "1,3,5", "0-9:2", "0-99%4", "1-3,7"):
        S.make_spec(run_dir=str(tmp_path / "r"), array=a)
    hybrid = S.make_spec(run_dir=str(tmp_path / "r"), gpus_per_node=8, gpus_per_rank=2)
    assert hybrid.ntasks_per_node == 4
    assert S.make_spec(run_dir=str(tmp_path / "r"), gpus_per_node=4).ntasks_per_node == 4


def test_run_dir_checks(tmp_path):
    with pytest.raises(UsageError, match="parent directory .* does not exist"):
        S.make_spec(run_dir=str(tmp_path / "missing" / "r"))
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        S.make_spec(run_dir=str(tmp_path / "f"))
    assert S.make_spec(run_dir="rel", now="x").run_dir == os.path.abspath("rel")


# --- requeue ------------------------------------------------------------------------------------------------


def test_requeue_id():
    assert S.requeue_id({"SLURM_JOB_ID": "12"}) == "12"
    assert S.requeue_id({"SLURM_JOB_ID": "13", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "3"}) == "10_3"
    with pytest.raises(UsageError):
        S.requeue_id({})


def test_requeue_job_runs_scontrol(tmp_path, monkeypatch):
    log = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n[ "$2" = "99" ] && {{ echo "Requested operation is disabled" >&2; exit 1; }}\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert S.requeue_job({"SLURM_JOB_ID": "13", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "3"}) == "10_3"
    assert log.read_text() == "requeue 10_3\n"
    with pytest.raises(LaunchError, match="Requested operation is disabled"):
        S.requeue_job({"SLURM_JOB_ID": "99"})
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(LaunchError, match="scontrol is not on PATH"):
        S.requeue_job({"SLURM_JOB_ID": "1"})


def test_parse_scontrol():
    jobs = S.parse_scontrol("JobId=5 JobName=a ArrayJobId=4 ArrayTaskId=1 JobState=RUNNING Reason=None\nJobId=6 JobState=PENDING\n")
    assert [j["JobId"] for j in jobs] == ["5", "6"] and S._job_label(jobs[0]) == "4_1"
    (job,) = S.parse_scontrol("JobId=7 Command=/s/dp.sbatch hvdtrain train --run-dir /r WorkDir=/w StdOut=/w/o")
    assert job["Command"] == "/s/dp.sbatch hvdtrain train --run-dir /r" and job["WorkDir"] == "/w"
    (job,) = S.parse_scontrol("JobId=8 WorkDir=/a b StdErr=/a b/o StdIn=/dev/null StdOut=/a b/o Power= TresPerNode=x")
    assert job["StdOut"] == "/a b/o" and job["WorkDir"] == "/a b" and job["Power"] == ""
    assert S._dirs_in_command(["x", "--run-dir", "a", "--output-dir=b"]) == ["a", "b"]


# --- the CLI: bad input is one line and exit 2, nothing is submitted ----------------------------------------


@pytest.fixture
def no_sbatch(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"a process was started: {a}")

    monkeypatch.setattr(S.subprocess, "run", refuse)


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--time", "1:2:3:4"], "not a Slurm time"),
        (["--nodes", "0"], "--nodes 0"),
        (["--bogus"], "No such option '--bogus'"),
        (["--nodes", "two"], "'two' is not a valid integer"),
        (["--run-dir", "/nonexistent-hvdtrain/r"], "does not exist"),
        (["--array", "x"], "not a Slurm array"),
    ],
)
def test_submit_bad_input(args, needle, no_sbatch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_usage_error(invoke("submit", *args, "--", "python", "-c", "pass"), needle)
    assert list(tmp_path.iterdir()) == []


def test_submit_bad_command(no_sbatch, tmp_path):
    assert_usage_error(invoke("submit", "--run-dir", tmp_path / "r", "--", "no-such-command-x"), "command not found")
    assert_usage_error(invoke("submit", "--run-dir", tmp_path / "r", "--", "python", "missing.py"), "script not found")
    result = invoke("submit", "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and "Missing argument" in result.output


def test_submit_dry_run_prints_script_and_argv_and_writes_nothing(no_sbatch, tmp_path):
    run = tmp_path / "a b"
    result = invoke("submit", "--dry-run", "--ntasks-per-node", "2", "--run-dir", run, "--", "python", "-c", "pass")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/bin/bash\n")
    assert "#SBATCH --ntasks-per-node=2" in result.output
    assert "set -- python -c pass" in result.output
    assert result.output.strip().splitlines()[-1] == f"sbatch --parsable '{run}/job.sbatch'"
    assert not run.exists()


@pytest.mark.parametrize("cmd", [["status", "abc"], ["logs", "12x"], ["logs", "1;2"]])
def test_status_logs_bad_job_id(cmd, no_sbatch):
    assert_usage_error(invoke(*cmd), "is not a Slurm job id")


def test_status_logs_unknown_job(tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(S, "_run", lambda argv, timeout=60: subprocess.CompletedProcess(argv, 1, "", "slurm_load_jobs error: Invalid job id specified"))
    assert_usage_error(invoke("status", "424242"), "not known to Slurm")
    assert_usage_error(invoke("logs", "424242"), "not known to Slurm")
    assert_usage_error(invoke("logs", "424242", "--rank", "0"), "not known to Slurm")
