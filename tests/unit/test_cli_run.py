"""`hvdtrain run` and `doctor` through click's CliRunner: bad input is one line, exit 2, nothing started."""

import subprocess
import sys

import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def hostfile(tmp_path):
    def make(text):
        f = tmp_path / "hostfile"
        f.write_text(text)
        return str(f)

    return make


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-np", "0"], "at least 1"),
        (["-np", "-2"], "at least 1"),
        (["-np", "3", "-H", "localhost:2"], "more than the 2 slots"),
        (["-np", "2", "-H", "localhost:2,,x:1"], "bad host list"),
        (["-np", "2", "-H", "localhost:two"], "bad slot count"),
        (["-np", "2", "--gloo", "--mpi"], "exclude each other"),
        (["-np", "2", "--launcher", "pdsh"], "unknown launcher 'pdsh'"),
        (["-np", "2", "--launcher", "srun"], "needs a Slurm allocation"),
        (["-np", "2", "--hostfile", "/nonexistent/hosts"], "no such file"),
        (["-np", "abc"], "is not a valid integer"),
    ],
)
def test_bad_flags(args, needle, no_processes, clean_env):
    assert_usage_error(invoke("run", *args, "--", "python", "-c", "pass"), needle)
    assert no_processes == []


@pytest.mark.parametrize(
    "content,needle",
    [
        ("localhost slots=2\nbroken line here\n", "hostfile:2: cannot parse"),
        ("localhost slots=2\nlocalhost slots=1\n", "listed twice"),
        ("localhost slots=0\n", "hostfile:1: host 'localhost' has 0 slots"),
    ],
)
def test_bad_hostfile(hostfile, content, needle, no_processes, clean_env):
    assert_usage_error(invoke("run", "--hostfile", hostfile(content), "--", "python", "-c", "pass"), needle)
    assert no_processes == []


def test_missing_script(no_processes, clean_env):
    assert_usage_error(invoke("run", "-np", "2", "--", "python", "missing_script.py"), "script not found")
    assert no_processes == []


def test_no_command(no_processes):
    result = invoke("run", "-np", "2")
    assert result.exit_code == 2 and "Missing argument" in result.output


def test_dry_run_prints_exact_command(tmp_path, no_processes, clean_env):
    script = tmp_path / "my script.py"
    script.write_text("")
    result = invoke(
        "run", "-np", "2", "--gloo", "--env", "A=x y", "--threads-per-rank", "1", "--output-dir", str(tmp_path / "logs"),
        "--dry-run", "--", sys.executable, str(script), "--lr", "0.1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "export A='x y'" in lines and "export OMP_NUM_THREADS=1" in lines
    cmd = lines[-1]
    assert " -np 2 -H localhost:2 --gloo " in cmd
    assert cmd.endswith(f"-m hvdtrain.rank --log-dir {tmp_path}/logs -- {sys.executable} '{script}' --lr 0.1")
    assert no_processes == []


def test_dry_run_mpirun(no_processes, clean_env):
    result = invoke("run", "-np", "2", "--launcher", "mpirun", "--dry-run", "--", "python", "-c", "pass")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("mpirun -np 2 -H localhost:2 --bind-to none")


def test_srun_inside_allocation_dry_run(monkeypatch, no_processes):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    result = invoke("run", "--dry-run", "--", "python", "-c", "pass")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("srun --ntasks=3 --mpi=pmix")
    assert_usage_error(invoke("run", "-np", "4", "--", "python", "-c", "pass"), "more than the 3 tasks")


HEAVY = ("torch", "horovod", "numpy", "mpi4py", "matplotlib", "tqdm")


@pytest.mark.parametrize(
    "args",
    [["--help"], ["train", "--help"], ["train", "-np", "2", "--run-dir", "r", "--dry-run"],
     ["run", "-np", "2", "--dry-run", "--", "true"], ["submit", "--dry-run", "--run-dir", "s", "--", "true"]],
)  # fmt: skip
def test_cli_stays_light(args, tmp_path):
    """`hvdtrain --help` stays instant, and so does the launching side of a command up to starting the ranks:
    neither importing the CLI nor running its commands' paths up to the launch imports torch or horovod."""
    code = (
        "import sys; from click.testing import CliRunner; from hvdtrain.cli import cli\n"
        f"r = CliRunner().invoke(cli, {args!r}, catch_exceptions=False)\n"
        "assert r.exit_code == 0, r.output\n"
        f"heavy = sorted(set({HEAVY!r}) & {{m.split('.')[0] for m in sys.modules}})\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "doctor"):
        assert command in result.output
