"""hvdtrain.slurm without a cluster: golden job scripts (hostile paths included, the same in processes with
other hash seeds), the templates are the rendered ones, the shell templates fill and parse, the fixed script
body run by bash against fake srun/mpirun, validation, `submit`'s options come from SlurmSpec, and
`submit`/`status`/`logs` bad input through CliRunner (one line, exit 2, nothing submitted)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain import slurm
from hvdtrain.cli import cli, submit
from hvdtrain.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("HVDTRAIN_UPDATE_GOLDEN") == "1"

CASES = {
    "basic": (dict(ntasks_per_node=2, time="01:00:00"), ["hvdtrain", "train", "--run-dir", "/runs/basic/train"]),
    "array-space": (
        dict(
            array="0-2%2",
            job_name="sweep job",
            mem="4G",
            partition="debug",
            account="proj-1",
            signal="B:USR2@300",
            mpi_plugin="pmi2",
        ),
        ["hvdtrain", "train", "-np", "1", "--seed", "{task}", "--run-dir", "/runs/a b/{task}"],
    ),
    "quote": (dict(nodes=2, requeue=False, signal=None), ["python", "-c", "print('hi'); import os", "a'; echo x"]),
    "hybrid": (
        dict(nodes=2, gpus_per_node=4, gpus_per_rank=2, cpus_per_task=8, launcher="mpirun"),
        ["python", "my.py"],
    ),
}
RUN_DIRS = {"basic": "/runs/basic", "array-space": "/runs/a b", "quote": "/runs/a'; echo x", "hybrid": "/runs/100%"}


def spec_for(name: str, tmp_path: Path) -> slurm.SlurmSpec:
    opts, _ = CASES[name]
    spec = slurm.make_spec(run_dir=str(tmp_path / "x"), **opts)
    spec.run_dir = RUN_DIRS[name]  # fixed absolute paths, so the golden files do not depend on tmp_path
    return spec


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden(name, tmp_path):
    text = slurm.render_script(spec_for(name, tmp_path), CASES[name][1])
    golden = GOLDEN / f"{name}.sbatch"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"re-render with HVDTRAIN_UPDATE_GOLDEN=1 if the change is intended: {golden}"
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert lines == sorted(lines) and len(lines) == len({line.split("=")[0] for line in lines})


RENDER_CASES = """
import json, sys
from hvdtrain import slurm
cases, run_dirs, parent, reverse = json.loads(sys.argv[1])
out = {}
for name, (opts, command) in cases.items():
    items = list(opts.items())[::-1] if reverse else list(opts.items())
    spec = slurm.make_spec(**dict(items), run_dir=parent)
    spec.run_dir = run_dirs[name]
    out[name] = slurm.render_script(spec, command)
print(json.dumps(out))
"""


def test_rendering_is_the_same_in_other_processes_and_orders(tmp_path):
    """Two interpreters with different hash seeds (so sets iterate in other orders), one given each spec's
    options in reverse order: both render every golden case byte for byte."""
    renders = []
    for seed, reverse in (("0", False), ("4242", True)):
        arg = json.dumps([CASES, RUN_DIRS, str(tmp_path / "x"), reverse])
        env = {**os.environ, "PYTHONHASHSEED": seed}
        argv = [sys.executable, "-c", RENDER_CASES, arg]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert proc.returncode == 0, proc.stderr
        renders.append(json.loads(proc.stdout))
    assert renders[0] == renders[1]
    for name in CASES:
        assert renders[0][name] == (GOLDEN / f"{name}.sbatch").read_text(), name


def test_hostile_values_are_quoted(tmp_path):
    spec = spec_for("quote", tmp_path)
    text = slurm.render_script(spec, CASES["quote"][1])
    assert "#SBATCH --output='/runs/a'\"'\"'; echo x/slurm-%j.out'" in text
    assert "export HVDTRAIN_RUN_DIR='/runs/a'\"'\"'; echo x'" in text
    hybrid = slurm.render_script(spec_for("hybrid", tmp_path), ["python", "my.py"])
    assert "#SBATCH --output=/runs/100%%/slurm-%j.out" in hybrid  # sbatch's % patterns escaped


@pytest.mark.parametrize("name", sorted(slurm.TEMPLATES))
def test_templates_in_slurm_dir_are_the_rendered_ones(name):
    path = REPO / "slurm" / name
    assert path.read_text() == slurm.render_template(name), "run: python -m hvdtrain.slurm write-templates slurm"
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert slurm.RUN_BODY in path.read_text()
    assert "@@" not in path.read_text()


# --- the shell templates (package data) ---------------------------------------------------------------------

SHELL_TEMPLATES = sorted((REPO / "hvdtrain" / "slurm" / "templates").glob("*.sh"))


@pytest.mark.parametrize("path", SHELL_TEMPLATES, ids=lambda p: p.name)
def test_shell_templates_parse(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shell_templates_are_filled_from_rundir_names(tmp_path):
    body = slurm.RUN_BODY
    assert "@@" not in body and "@@" in slurm.script.read_template("run.sh")
    assert "pin=" + shlex.quote(slurm.PIN) in body and slurm.PIN in slurm.script.read_template("pin.sh")
    assert "log_dir=$HVDTRAIN_RUN_DIR/logs${task:+/task-$task}" in body
    assert '--output="${log_dir//%/%%}/rank.%t.log"' in body
    for name in CASES:
        assert "@@" not in slurm.render_script(spec_for(name, tmp_path), CASES[name][1])
    with pytest.raises(ValueError):
        slurm.script.fill("a @@X@@ b", {})
    with pytest.raises(ValueError):
        slurm.script.fill("a @@X@@ b", {"X": "1", "Y": "2"})
    with pytest.raises(ValueError):
        slurm.script.fill("a @@x@@ b", {})
    assert slurm.script.fill("@@X@@ @@Y@@", {"X": "@@Y@@", "Y": "y"}) == "@@Y@@ y"  # one pass


def test_shell_templates_are_package_data():
    """setup.py's package_data names every templates/*.sh, so that a (non-editable) wheel carries them."""
    tree = ast.parse((REPO / "setup.py").read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    shipped = {
        p
        for package, globs in package_data.items()
        for pattern in globs
        for p in (REPO / package.replace(".", "/")).glob(pattern)
    }
    assert SHELL_TEMPLATES and set(SHELL_TEMPLATES) <= shipped


# --- the fixed body, run by bash against fake launchers ---------------------------------------------------


@pytest.fixture
def fake_bin(tmp_path):
    """srun and mpirun that record their argv (and the variables srun and OpenMP read) as JSON, then run nothing."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("srun", "mpirun"):
        f = d / name
        f.write_text(
            f'#!/usr/bin/env python3\nimport json, os, sys\nprint("ARGV " + json.dumps(["{name}", *sys.argv[1:]]))\n'
            'print("ENV " + json.dumps({k: os.environ.get(k) for k in ("SRUN_CPUS_PER_TASK", "OMP_NUM_THREADS")}))\n'
        )
        f.chmod(0o755)
    return d


def run_script(text: str, tmp_path: Path, fake_bin: Path, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "job.sh"
    script.write_text(text)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and not k.startswith("HVDTRAIN_")}
    full = {
        **base,
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "2",
        **env,
    }
    return subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=30)


def recorded(proc) -> list[str]:
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("ARGV ")]
    return json.loads(line[5:])


def test_body_substitutes_task_and_starts_ranks_with_srun_pmix(tmp_path, fake_bin):
    spec = slurm.make_spec(run_dir=str(tmp_path / "r d"), array="0-3", ntasks_per_node=2)
    text = slurm.render_script(spec, ["python", "t.py", "--seed", "{task}", "--out", "x-{job}-{task}", "a'b"])
    proc = run_script(text, tmp_path, fake_bin, SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="3")
    assert proc.returncode == 0, proc.stderr
    argv = recorded(proc)
    assert argv[:5] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--open-mode=append",
                        f"--output={tmp_path}/r d/logs/task-3/rank.%t.log"]  # fmt: skip
    assert argv[5:9] == ["bash", "-c", slurm.PIN, "hvdtrain-pin"]
    assert argv[-7:] == ["python", "t.py", "--seed", "3", "--out", "x-5-3", "a'b"]
    assert "command exited with status 0" in proc.stdout


def recorded_env(proc) -> dict:
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("ENV ")]
    return json.loads(line[4:])


def test_body_passes_cpus_per_task_on_to_srun_and_openmp(tmp_path, fake_bin):
    """Slurm >= 22.05's srun does not take the job's --cpus-per-task by itself: the script exports
    SRUN_CPUS_PER_TASK and OMP_NUM_THREADS from SLURM_CPUS_PER_TASK, unless they are set."""
    text = slurm.render_script(slurm.make_spec(run_dir=str(tmp_path / "r"), cpus_per_task=2), ["python", "x.py"])
    assert "#SBATCH --cpus-per-task=2" in text
    proc = run_script(text, tmp_path, fake_bin, SLURM_CPUS_PER_TASK="2")
    assert recorded_env(proc) == {"SRUN_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "2"}, proc.stderr
    kept = run_script(text, tmp_path, fake_bin, SLURM_CPUS_PER_TASK="2", SRUN_CPUS_PER_TASK="1", OMP_NUM_THREADS="5")
    assert recorded_env(kept) == {"SRUN_CPUS_PER_TASK": "1", "OMP_NUM_THREADS": "5"}
    assert recorded_env(run_script(text, tmp_path, fake_bin)) == {"SRUN_CPUS_PER_TASK": None, "OMP_NUM_THREADS": None}


def test_body_chooses_srun_mpi_plugin_on_the_node(tmp_path, fake_bin):
    """srun's --mpi is chosen when the job runs (python -m hvdtrain.srunmpi: this fake srun offers nothing it can
    read, so pmix); HVDTRAIN_SRUN_MPI (from the environment, or `submit --mpi-plugin`) or SLURM_MPI_TYPE win; a
    plugin srun does not offer ends the job in one line, exit 2."""
    text = slurm.render_script(slurm.make_spec(run_dir=str(tmp_path / "r")), ["python", "x.py"])
    assert recorded(run_script(text, tmp_path, fake_bin))[1] == "--mpi=pmix"
    assert recorded(run_script(text, tmp_path, fake_bin, HVDTRAIN_SRUN_MPI="pmi2"))[1] == "--mpi=pmi2"
    assert recorded(run_script(text, tmp_path, fake_bin, SLURM_MPI_TYPE="pmix_v4"))[1] == "--mpi=pmix_v4"
    given = slurm.render_script(slurm.make_spec(run_dir=str(tmp_path / "r"), mpi_plugin="pmi2"), ["python", "x.py"])
    assert (
        "export HVDTRAIN_SRUN_MPI=pmi2" in given and recorded(run_script(given, tmp_path, fake_bin))[1] == "--mpi=pmi2"
    )
    offers = fake_bin / "srun"
    offers.write_text("#!/bin/sh\nprintf 'MPI plugin types are...\\n\\tnone\\n\\tpmix\\n'\n")
    bad = run_script(given, tmp_path, fake_bin)
    assert bad.returncode == 2 and bad.stderr.startswith("hvdtrain: error: srun's MPI plugin 'pmi2' is not offered")
    assert "running:" not in bad.stdout


def test_body_runs_hvdtrain_commands_directly_and_mpirun_on_request(tmp_path, fake_bin):
    spec = slurm.make_spec(run_dir=str(tmp_path / "r"), launcher="mpirun")
    proc = run_script(slurm.render_script(spec, ["python", "x.py"]), tmp_path, fake_bin)
    assert recorded(proc)[:3] == ["mpirun", "-np", "2"]
    fake = fake_bin / "hvdtrain"
    fake.write_text('#!/bin/sh\necho "HVD $*"\n')
    fake.chmod(0o755)
    proc = run_script(slurm.render_script(spec, ["hvdtrain", "train", "--lr", "0.1"]), tmp_path, fake_bin)
    assert "HVD train --lr 0.1" in proc.stdout and "ARGV" not in proc.stdout


def test_body_sweep_values_and_missing_value(tmp_path, fake_bin):
    text = slurm.render_template("array-sweep.sbatch")
    proc = run_script(text, tmp_path, fake_bin, SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="1",
                      HVDTRAIN_RUN_DIR=str(tmp_path / "r"))  # fmt: skip
    assert proc.returncode == 2 and "no command given" in proc.stderr
    script = tmp_path / "t.sh"
    script.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HVDTRAIN_"))}
    env.update(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="9", SLURM_NTASKS="1",
               SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="1", HVDTRAIN_RUN_DIR=str(tmp_path / "r"))  # fmt: skip
    proc = subprocess.run(
        ["bash", str(script), "python", "--lr={value}"], env=env, capture_output=True, text=True, timeout=30
    )
    assert recorded(proc)[-1] == "--lr=0.03", proc.stdout
    env["SLURM_ARRAY_TASK_ID"] = "7"
    proc = subprocess.run(
        ["bash", str(script), "python", "--lr={value}"], env=env, capture_output=True, text=True, timeout=30
    )
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
    base = {
        k2: v
        for k2, v in os.environ.items()
        if k2 not in ("CUDA_VISIBLE_DEVICES", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
    }
    proc = subprocess.run(["bash", "-c", slurm.PIN, "pin", k, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"'],
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
        slurm.make_spec(run_dir=str(tmp_path / "r"), **opts)
    assert needle in str(e.value)


def test_good_options(tmp_path):
    for t in ("30", "30:00", "01:30:00", "1-12", "1-12:00", "1-12:00:00", "UNLIMITED"):
        slurm.make_spec(run_dir=str(tmp_path / "r"), time=t)
    for a in ("0-2", "1,3,5", "0-9:2", "0-99%4", "1-3,7"):
        slurm.make_spec(run_dir=str(tmp_path / "r"), array=a)
    hybrid = slurm.make_spec(run_dir=str(tmp_path / "r"), gpus_per_node=8, gpus_per_rank=2)
    assert hybrid.ntasks_per_node == 4
    assert slurm.make_spec(run_dir=str(tmp_path / "r"), gpus_per_node=4).ntasks_per_node == 4


def test_run_dir_checks(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="f is a file, not a directory"):
        slurm.make_spec(run_dir=str(tmp_path / "f" / "r"))
    with pytest.raises(UsageError, match="not a directory"):
        slurm.make_spec(run_dir=str(tmp_path / "f"))
    with pytest.raises(UsageError, match="cannot create directories in /proc"):
        slurm.make_spec(run_dir="/proc/hvdtrain-r")
    assert slurm.make_spec(run_dir=str(tmp_path / "missing" / "r")).run_dir == str(tmp_path / "missing" / "r")
    assert not (tmp_path / "missing").exists()  # checked, not made
    assert slurm.make_spec(run_dir="rel", now="x").run_dir == os.path.abspath("rel")


def test_parse_scontrol():
    jobs = slurm.parse_scontrol(
        "JobId=5 JobName=a ArrayJobId=4 ArrayTaskId=1 JobState=RUNNING Reason=None\nJobId=6 JobState=PENDING\n"
    )
    assert [j["JobId"] for j in jobs] == ["5", "6"] and slurm.jobs._job_label(jobs[0]) == "4_1"
    (job,) = slurm.parse_scontrol("JobId=7 Command=/s/dp.sbatch hvdtrain train --run-dir /r WorkDir=/w StdOut=/w/o")
    assert job["Command"] == "/s/dp.sbatch hvdtrain train --run-dir /r" and job["WorkDir"] == "/w"
    (job,) = slurm.parse_scontrol(
        "JobId=8 WorkDir=/a b StdErr=/a b/o StdIn=/dev/null StdOut=/a b/o Power= TresPerNode=x"
    )
    assert job["StdOut"] == "/a b/o" and job["WorkDir"] == "/a b" and job["Power"] == ""
    assert slurm.jobs._dirs_in_command(["x", "--run-dir", "a", "--output-dir=b"]) == ["a", "b"]


# --- the CLI: bad input is one line and exit 2, nothing is submitted ----------------------------------------


@pytest.fixture
def no_sbatch(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"a process was started: {a}")

    monkeypatch.setattr(slurm.jobs.subprocess, "run", refuse)


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--time", "1:2:3:4"], "not a Slurm time"),
        (["--nodes", "0"], "--nodes 0"),
        (["--bogus"], "No such option '--bogus'"),
        (["--nodes", "two"], "'two' is not a valid integer"),
        (["--run-dir", "/proc/hvdtrain-r"], "cannot create directories in /proc"),
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


def test_submit_options_are_the_spec_fields():
    """Each SlurmSpec field is one `submit` option with the field's default and help, written once."""
    params = {p.name: p for p in submit.params}
    for field in dataclasses.fields(slurm.SlurmSpec):
        param = params[field.name]
        assert param.default == field.default and param.help == field.metadata["help"], field.name
    assert tuple(params["launcher"].type.choices) == slurm.LAUNCHERS
    assert set(params) == {f.name for f in dataclasses.fields(slurm.SlurmSpec)} | {"dry_run", "command"}


def test_submit_bad_launcher_is_a_usage_error(no_sbatch, tmp_path):
    assert_usage_error(
        invoke("submit", "--launcher", "horovodrun", "--run-dir", tmp_path / "r", "--", "python", "-c", "pass"),
        "--launcher: unknown launcher 'horovodrun'; choose one of srun, mpirun",
    )


@pytest.mark.parametrize("cmd", [["status", "abc"], ["logs", "12x"], ["logs", "1;2"]])
def test_status_logs_bad_job_id(cmd, no_sbatch):
    assert_usage_error(invoke(*cmd), "is not a Slurm job id")


def test_status_logs_unknown_job(tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(
        slurm.jobs,
        "_run",
        lambda argv, timeout=60: subprocess.CompletedProcess(
            argv, 1, "", "slurm_load_jobs error: Invalid job id specified"
        ),
    )
    assert_usage_error(invoke("status", "424242"), "not known to Slurm")
    assert_usage_error(invoke("logs", "424242"), "not known to Slurm")
    assert_usage_error(invoke("logs", "424242", "--rank", "0"), "not known to Slurm")
