"""`hvdtrain run` and `doctor` through click's CliRunner: bad input is one line, exit 2, nothing started."""

import re
import subprocess
import sys

import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain import mpi
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
        (["-np", "2", "--network-interface", "eth0;reboot"], "bad interface name 'eth0;reboot'"),
        (["-np", "2", "--network-interface", ""], "--network-interface: bad list"),
        (["-np", "2", "--stall-timeout", "-1"], "--stall-timeout -1: give a number of seconds"),
        (["-np", "2", "--stall-timeout", "soon"], "'soon' is not a valid integer"),
        (
            ["-np", "2", "--hang-timeout", "soon"],
            "--hang-timeout soon: give a number of seconds (e.g. 600), auto, or 0",
        ),
        (["-np", "2", "--hang-timeout", "-3"], "--hang-timeout -3: give a number of seconds"),
        (["-np", "2", "--ssh-config", "/nonexistent/ssh_config"], "--ssh-config: no such file"),
        (["-np", "2", "--timeline", "--elastic"], "--timeline cannot follow an elastic job"),
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
    assert "export A='x y'" in lines and "export HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=600" in lines
    cmd = lines[-1]
    assert " -np 2 -H localhost:2 --gloo " in cmd
    assert cmd.endswith(
        f"-m hvdtrain.launching.rank --log-dir {tmp_path}/logs --threads 1 -- {sys.executable} '{script}' --lr 0.1"
    )
    assert no_processes == []


def test_timeline_and_autotune_go_into_a_kept_output_dir(tmp_path, monkeypatch, no_processes, clean_env):
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "-np", "2", "--timeline", "--autotune", "--dry-run", "--", "python", "-c", "pass")
    assert result.exit_code == 0, result.output
    env = sorted(line for line in result.output.splitlines() if line.startswith("export HOROVOD_"))
    run = rf"{tmp_path}/runs/run-\d{{8}}-\d{{6}}"
    assert env[0] == "export HOROVOD_AUTOTUNE=1"
    assert re.fullmatch(rf"export HOROVOD_AUTOTUNE_LOG={run}/autotune.csv", env[1])
    assert re.fullmatch(rf"export HOROVOD_TIMELINE={run}/timeline.json", env[-1])
    assert f"--log-dir {tmp_path}/runs/run-" in result.output  # the logs go there too, and are kept
    assert not (tmp_path / "runs").exists() and no_processes == []


def test_dry_run_leaves_threads_to_each_host(no_processes, clean_env):
    result = invoke("run", "-np", "2", "-H", "big:1,small:1", "--dry-run", "--", "python", "-c", "pass")
    assert result.exit_code == 0, result.output
    assert " --threads auto -- python -c pass" in result.output and "OMP_NUM_THREADS" not in result.output


def test_ssh_config_from_the_environment(tmp_path, monkeypatch, no_processes, clean_env):
    monkeypatch.setenv("HVDTRAIN_SSH_CONFIG", str(tmp_path / "missing"))
    assert_usage_error(invoke("run", "-np", "2", "--", "python", "-c", "pass"), "or unset HVDTRAIN_SSH_CONFIG")
    (tmp_path / "missing").write_text("")
    mpirun = invoke("run", "-np", "2", "-H", "n2:2", "--launcher", "mpirun", "--dry-run", "--", "python", "-c", "1")
    assert f"--mca plm_rsh_agent 'ssh -F {tmp_path / 'missing'}'" in mpirun.output, mpirun.output


@pytest.fixture
def launches(monkeypatch):
    """Records every job run_job would start (the preflight's own ssh still runs, against the fake ssh)."""
    from hvdtrain.launching import supervise

    started = []
    monkeypatch.setattr(supervise, "run_job", lambda spec, dry_run=False, echo=print: started.append(spec) or 0)
    return started


def test_unreachable_host_stops_run_before_the_launch(fake_ssh, launches, clean_env, tmp_path):
    result = invoke(
        "run", "-np", "2", "-H", "node1.invalid:1,down2.invalid:1", "--output-dir", tmp_path / "logs",
        "--", "python", "-c", "pass",
    )  # fmt: skip
    assert_usage_error(result, "cannot reach host down2.invalid over ssh: ssh: connect to host 192.0.2.9 port 22")
    assert launches == [] and not (tmp_path / "logs").exists()
    assert "node1.invalid" in fake_ssh.read_text()  # every other host was asked, in parallel
    ok = invoke("run", "-np", "2", "-H", "node1.invalid:2", "--", "python", "-c", "pass")
    assert ok.exit_code == 0 and len(launches) == 1, ok.output


def test_dry_run_asks_no_host(fake_ssh, no_processes, clean_env):
    result = invoke("run", "-np", "2", "-H", "down2.invalid:2", "--dry-run", "--", "python", "-c", "pass")
    assert result.exit_code == 0 and not fake_ssh.exists(), result.output


def test_network_interface_missing_on_a_host_stops_the_launch(fake_ssh, launches, clean_env):
    result = invoke(
        "run", "-np", "2", "-H", "localhost:1,node2.invalid:1", "--network-interface", "wlan0", "--", "true"
    )  # fmt: skip
    assert_usage_error(result, "--network-interface wlan0: host node2.invalid has no interface wlan0 (it has eth0, lo)")
    assert launches == []


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
     ["run", "-np", "2", "--dry-run", "--", "true"], ["submit", "--dry-run", "--run-dir", "s", "--", "true"],
     ["run", "--elastic", "--host-discovery-script", "/bin/true", "--network-interface", "eth0", "--dry-run", "--",
      "true"]],
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


def test_every_launching_command_takes_the_launch_options_declared_once():
    """run, train and the benchmarks that start ranks take one option per LaunchOptions field (run and train also
    one per ElasticOptions field), generated from the field: same flags, type, help. So a launch option's errors,
    tested above through `run`, are the same in every command (make_spec checks them all)."""
    import dataclasses

    from hvdtrain.launching.options import ElasticOptions, LaunchOptions

    commands = {
        "run": cli.commands["run"],
        "train": cli.commands["train"],
        **{f"bench {n}": cli.commands["bench"].commands[n] for n in ("allreduce", "train", "updates")},
    }
    reference = {p.name: p for p in cli.commands["run"].params}
    for kind in (LaunchOptions, ElasticOptions):
        for field in dataclasses.fields(kind):
            param = reference[field.name]
            assert (
                param.help == field.metadata["help"]
                and param.opts[0] == (field.metadata["flags"] or ["--" + field.name.replace("_", "-")])[0]
            )
            takers = [n for n, c in commands.items() if field.name in {p.name for p in c.params}]
            if kind is LaunchOptions:
                assert takers == list(commands), field.name
            else:  # the benchmarks are not elastic (bench train's --max-np is its own: the sweep's top)
                assert takers[:2] == ["run", "train"] and "elastic" not in {
                    p.name for p in commands["bench train"].params
                }
                takers = ["run", "train"]
            for name in takers:
                param2 = next(p for p in commands[name].params if p.name == field.name)
                assert (param2.opts, param2.help, param2.type.to_info_dict(), param2.multiple) == (
                    param.opts,
                    param.help,
                    param.type.to_info_dict(),
                    param.multiple,
                ), (name, field.name)


def test_run_warns_of_a_horovod_or_mpi4py_built_for_another_mpi(fake_mpich, no_processes, clean_env, monkeypatch):
    """The command may use neither: said, not refused; the command shown is Hydra's."""
    monkeypatch.setattr(mpi, "built_with", lambda package: mpi.Linked(f"/venv/{package}.so", "openmpi", "libmpi.so.40"))
    result = invoke("run", "-np", "2", "--dry-run", "--", "python", "-c", "pass")
    assert result.exit_code == 0, result.output
    where = f"MPICH (Hydra) 4.0.2 ({fake_mpich.parent / 'mpirun'} -> {fake_mpich})"
    assert result.stderr.splitlines() == [
        f"hvdtrain: warning: {name} was built against Open MPI (libmpi.so.40) but mpirun on PATH is {where}: a command "
        f"using it fails; load the MPI module {name} was built with (Open MPI), or build this venv against MPICH: "
        "with it loaded, run scripts/setup.sh (docs/install.md)"
        for name in ("Horovod", "mpi4py")
    ]
    assert result.stdout.splitlines()[-1].startswith(
        f"{fake_mpich} -n 2 -hosts localhost:2 -bind-to none -prepend-rank"
    )
    assert "OMPI_" not in result.stdout
