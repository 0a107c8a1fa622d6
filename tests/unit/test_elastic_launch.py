"""The launching side of elastic training: the options (through the real CLI: one line, exit 2, nothing started),
the spec, horovodrun's elastic argv (as horovodrun 0.28.1 parses it, and its discovery run through its own shell),
the hosts file as a discovery script, the preflight, the per-worker records of the wrapper, and the failure
report from horovodrun's own lines.

The files in golden/elastic/ are horovodrun 0.28.1's output (stdout and stderr, as run_job copies them) of real
elastic jobs run by `hvdtrain run --elastic` on this machine, workers on `localhost` and `127.0.0.1`:
  failed.out               the only worker (localhost[0]) exits 1
  blacklisted.out          localhost:2, worker localhost[0] exits 1 (its host is blacklisted, no host is left)
  reset-limit.out          localhost:1 + 127.0.0.1:1, --reset-limit 0, worker localhost[0] exits 1
  min-np-at-start.out      localhost:1 with -np 2, --elastic-timeout 2
  min-np-after-reset.out   localhost:1 + 127.0.0.1:1 with -np 2 --min-np 2 --elastic-timeout 3, localhost[0] exits 1
  discovery-first-run.out  the discovery script fails at horovodrun's first run (exit 4)
  discovery-transient.out  the discovery fails three times while the job runs (exit 5), then the worker exits 3
  stopped.out              hvdtrain got SIGTERM while the worker slept
"""

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner
from launchspecs import spec_of

from hvdtrain.cli import cli
from hvdtrain.errors import LaunchError, UsageError
from hvdtrain.launching import argv as launch_argv
from hvdtrain.launching import discover, elastic_failures, failures, rank
from hvdtrain.launching.argv import build_horovodrun_argv, placement, wrapped_command
from hvdtrain.launching.elastic import ElasticSpec
from hvdtrain.launching.hosts import Host, interface_addresses, parse_hostfile, parse_hosts_file
from hvdtrain.launching.preflight import ELASTIC_SSH_OPTIONS, make_ssh_shim, preflight, ssh_shim_args
from hvdtrain.launching.supervise import _Tee, run_job
from hvdtrain.rundir import RankLogs

NO_SLURM: dict = {}
GOLDEN = Path(__file__).parent / "golden" / "elastic"


def spec(command=("python", "-c", "pass"), environ=NO_SLURM, **kw):
    return spec_of(command, environ=environ, elastic=True, **kw)


@pytest.fixture
def hosts_file(tmp_path):
    def make(text, name="hosts"):
        f = tmp_path / name
        f.write_text(text)
        return str(f)

    return make


@pytest.fixture
def script(tmp_path):
    """An executable discovery script printing `text` (exit status `status`)."""

    def make(text="localhost:2\n", status=0, name="discover.sh", executable=True):
        f = tmp_path / name
        f.write_text(f"#!/bin/sh\nprintf '%s' {shlex.quote(text)}\nexit {status}\n")
        f.chmod(0o755 if executable else 0o644)
        return str(f)

    return make


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


# --- options: every bad input is one line, exit 2, nothing started -----------------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--min-np", "2"], "--min-np is an elastic option: add --elastic for elastic training, or drop it"),
        (["--reset-limit", "1", "--slots-per-host", "2"], "--slots-per-host, --reset-limit are elastic options"),
        (["--blacklist-cooldown-range", "1", "2"], "--blacklist-cooldown-range is an elastic option"),
        (["--elastic"], "--elastic needs its hosts: --hosts-file FILE"),
        (["--elastic", "--hosts-file", "{hosts}", "--mpi"], "needs Horovod's Gloo controller (horovodrun's rendezvous"),
        (["--elastic", "--hosts-file", "{hosts}", "--launcher", "mpirun"], "drop --launcher mpirun"),
        (["--elastic", "--hosts-file", "{hosts}", "--launcher", "srun"], "drop --launcher srun"),
        (["--elastic", "-H", "localhost:2"], "-H does not apply to --elastic: list the hosts in --hosts-file FILE"),
        (["--elastic", "--hostfile", "{hosts}"], "--hostfile does not apply to --elastic"),
        (["--elastic", "--hosts-file", "{hosts}", "--host-discovery-script", "{script}"], "exclude each other"),
        (["--elastic", "--host-discovery-script", "nope.sh"], "--host-discovery-script: no such file 'nope.sh'"),
        (["--elastic", "--host-discovery-script", "{plain}"], "is not executable: chmod +x"),
        (["--elastic", "--hosts-file", "nope"], "--hosts-file: no such file 'nope'"),
        (["--elastic", "--hosts-file", "{broken}"], "broken:2: cannot parse 'node2 slots two'"),
        (["--elastic", "--hosts-file", "{twice}"], "host 'localhost' is listed twice"),
        (["--elastic", "--hosts-file", "{colon}"], "bad host 'a:b': horovodrun reads 'host:slots'"),
        (["--elastic", "--hosts-file", "{hosts}", "--min-np", "0"], "--min-np 0: the fewest ranks"),
        (["--elastic", "--hosts-file", "{hosts}", "--min-np", "3", "--max-np", "2"], "--max-np 2 is less than"),
        (["--elastic", "--hosts-file", "{hosts}", "-np", "1", "--min-np", "2"], "-np 1 is less than --min-np 2"),
        (["--elastic", "--hosts-file", "{hosts}", "-np", "4", "--max-np", "3"], "-np 4 is more than --max-np 3"),
        (["--elastic", "--hosts-file", "{hosts}", "-np", "0"], "-np 0: the number of ranks must be at least 1"),
        (["--elastic", "--hosts-file", "{hosts}", "--max-np", "0"], "--max-np 0: the most ranks must be at least 1"),
        (["--elastic", "--hosts-file", "{hosts}", "--slots-per-host", "0"], "--slots-per-host 0: must be at least"),
        (["--elastic", "--hosts-file", "{hosts}", "--elastic-timeout", "0"], "--elastic-timeout 0: give the seconds"),
        (["--elastic", "--hosts-file", "{hosts}", "--reset-limit", "-1"], "--reset-limit -1: give the number"),
        (["--elastic", "--hosts-file", "{hosts}", "--blacklist-cooldown-range", "5", "2"], "1 <= MIN <= MAX <= 3600"),
        (["--elastic", "--hosts-file", "{hosts}", "--blacklist-cooldown-range", "0", "2"], "1 <= MIN <= MAX"),
        (["--elastic", "--hosts-file", "{hosts}", "--blacklist-cooldown-range", "1", "4000"], "<= 3600"),
        (["--elastic", "--hosts-file", "{hosts}", "--blacklist-cooldown-range", "1"], "'--blacklist-cooldown-range'"),
        (["--elastic", "--hosts-file", "{remote}"], "--elastic needs --network-interface IFACE: the interface every"),
        (["--elastic", "--hosts-file", "{empty}"], "--elastic needs --network-interface IFACE"),
        (["--elastic", "--host-discovery-script", "{script}"], "--elastic needs --network-interface IFACE"),
    ],
)
def test_bad_elastic_options(args, needle, hosts_file, script, tmp_path, no_processes, clean_env):
    files = {
        "hosts": hosts_file("localhost:2\n"),
        "script": script(),
        "plain": script(name="plain.sh", executable=False),
        "broken": hosts_file("localhost:2\nnode2 slots two\n", "broken"),
        "twice": hosts_file("localhost:2\nlocalhost slots=1\n", "twice"),
        "colon": hosts_file("a:b:2\n", "colon"),
        "remote": hosts_file("localhost:1\nnode2.invalid:2\n", "remote"),
        "empty": hosts_file("# nothing yet\n", "empty"),
    }
    args = [a.format(**files) for a in args]
    for command in (["run", *args, "--", "python", "-c", "pass"], ["train", *args, "--run-dir", tmp_path / "r"]):
        assert_usage_error(invoke(*command), needle)
    assert no_processes == [] and not (tmp_path / "r").exists()


def test_model_strategy_cannot_be_elastic(hosts_file, tmp_path, monkeypatch, no_processes, clean_env):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--elastic", "--hosts-file", hosts_file("localhost:1\n"), "--strategy", "model",
                    "--devices-per-rank", "2", "--run-dir", "r")  # fmt: skip
    assert_usage_error(result, "--strategy model runs one replica on one rank, so it cannot be elastic")
    assert not (tmp_path / "r").exists()


def test_elastic_options_are_run_and_train_only():
    elastic = {"elastic", "min_np", "host_discovery_script", "hosts_file", "reset_limit", "blacklist_cooldown_range"}
    for name in ("run", "train"):
        assert elastic <= {p.name for p in cli.commands[name].params}
    assert not elastic & {p.name for p in cli.commands["bench"].commands["allreduce"].params}


# --- the spec ---------------------------------------------------------------------------------------------


def test_spec_defaults_and_the_hosts_file_discovery(hosts_file):
    path = hosts_file("# cluster\n\nlocalhost:2\n127.0.0.1 slots=1  # same machine\n")
    s = spec(hosts_file=path)
    assert (s.np, s.launcher, s.controller, s.nics) == (1, "horovodrun", "gloo", ["lo"])  # all hosts here: lo
    assert s.hosts == [Host("localhost", 2), Host("127.0.0.1", 1)]
    assert s.elastic == ElasticSpec(
        min_np=1, max_np=None, hosts_file=path, slots_per_host=1,
        discovery=shlex.join([sys.executable, "-m", "hvdtrain.launching.discover", path, "--slots-per-host", "1"]),
    )  # fmt: skip
    # -np defaults to --min-np, --min-np to -np.
    assert (spec(hosts_file=path, min_np=3).np, spec(hosts_file=path, np=3).elastic.min_np) == (3, 3)
    s = spec(hosts_file=path, np=3, min_np=2, max_np=4, slots_per_host=2, elastic_timeout=30, reset_limit=0,
             blacklist_cooldown_range=(10, 60), network_interface="eth0")  # fmt: skip
    assert (s.np, s.elastic.min_np, s.elastic.max_np, s.nics) == (3, 2, 4, ["eth0"])
    assert (s.elastic.timeout, s.elastic.reset_limit, s.elastic.cooldown_range) == (30, 0, (10, 60))
    assert s.elastic.discovery.endswith("--slots-per-host 2")
    assert placement(s) == {}


def test_hosts_file_lines_and_slots_per_host(hosts_file):
    path = hosts_file("a\nb:3\nc slots=2\n\n# d:9\n")
    assert parse_hosts_file(path, 4) == [Host("a", 4), Host("b", 3), Host("c", 2)]
    assert parse_hosts_file(hosts_file("", "empty"), 1) == []  # empty: the job waits for hosts
    # The static hostfile keeps its rules: a bare host is one slot, an empty file is an error.
    assert parse_hostfile(path) == [Host("a", 1), Host("b", 3), Host("c", 2)]
    with pytest.raises(UsageError, match="lists no hosts"):
        parse_hostfile(hosts_file("# nothing\n"))


def test_discovery_script_is_absolute_and_quoted(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = script(name="my discover.sh")
    s = spec(host_discovery_script="my discover.sh", network_interface="eth0")
    assert s.elastic.discovery == shlex.quote(path) and s.elastic.hosts_file is None and s.hosts == []


def test_inside_slurm_an_elastic_job_is_horovodrun(hosts_file):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
    s = spec(hosts_file=hosts_file("localhost:4\n"), environ=slurm)
    assert (s.launcher, s.controller, s.np) == ("horovodrun", "gloo", 1)


# --- argv ------------------------------------------------------------------------------------------------


def test_elastic_horovodrun_argv(hosts_file, script, tmp_path):
    path = hosts_file("localhost:2\n")
    s = spec(["python", "-m", "train", "--lr", "0.1"], hosts_file=path, np=2, max_np=4, threads_per_rank=1)
    s.python = "/venv/bin/python"
    discovery = shlex.join([sys.executable, "-m", "hvdtrain.launching.discover", path, "--slots-per-host", "1"])
    assert build_horovodrun_argv(s, "/logs", "horovodrun") == [
        "horovodrun", "-np", "2", "--min-np", "2", "--max-np", "4", "--host-discovery-script", discovery,
        "--gloo", "--network-interface", "lo",
        "/venv/bin/python", "-m", "hvdtrain.launching.rank", "--log-dir", "/logs", "--threads", "1",
        "--", "python", "-m", "train", "--lr", "0.1",
    ]  # fmt: skip
    config = tmp_path / "ssh_config"
    config.write_text("")
    d = spec(host_discovery_script=script(), network_interface="eth0", elastic_timeout=30, reset_limit=3,
             blacklist_cooldown_range=(10, 60), slots_per_host=2, ssh_config=str(config))  # fmt: skip
    argv = build_horovodrun_argv(d, "/logs", "horovodrun")
    assert argv[: argv.index("-m")] == [
        "horovodrun", "-np", "1", "--min-np", "1", "--host-discovery-script", shlex.quote(script()),
        "--slots-per-host", "2", "--elastic-timeout", "30", "--reset-limit", "3", "--blacklist-cooldown-range", "10",
        "60", "--gloo", "--disable-cache", "--network-interface", "eth0", sys.executable,
    ]  # fmt: skip
    assert "-H" not in argv and not any(a.startswith("--mpi-args") for a in argv)


def test_horovodrun_parses_the_elastic_argv_and_runs_our_discovery(hosts_file, tmp_path, monkeypatch):
    """horovodrun 0.28.1's own parser takes the argv as elastic, and its discovery (the command string run through
    its shell by safe_shell_exec; it does not check that it is a file) reads the hosts file through
    hvdtrain.launching.discover, also from a path with a space."""
    from horovod.runner import launch as hvd_launch
    from horovod.runner.elastic import discovery as hvd_discovery

    (tmp_path / "a dir").mkdir()
    path = hosts_file("localhost\n127.0.0.1:3\n", "a dir/hosts")
    s = spec(hosts_file=path, np=2, max_np=5, slots_per_host=2, elastic_timeout=9, reset_limit=1,
             blacklist_cooldown_range=(2, 30))  # fmt: skip
    argv = build_horovodrun_argv(s, "/l", "horovodrun")
    monkeypatch.setattr("sys.argv", argv)
    args = hvd_launch.parse_args()
    assert hvd_launch._is_elastic(args) and args.use_gloo and args.nics == {"lo"}
    assert (args.num_proc, args.min_num_proc, args.max_num_proc) == (2, 2, 5)
    assert (args.elastic_timeout, args.reset_limit, args.cooldown_range) == (9, 1, [2, 30])
    assert args.hosts is None and args.command == wrapped_command(s, "/l")
    found = hvd_discovery.HostDiscoveryScript(args.host_discovery_script, args.slots).find_available_hosts_and_slots()
    assert found == {"localhost": 2, "127.0.0.1": 3}


def test_dry_run_prints_the_elastic_command_and_runs_no_discovery(script, tmp_path, no_processes, clean_env):
    marker = tmp_path / "ran"
    path = tmp_path / "d.sh"
    path.write_text(f"#!/bin/sh\ntouch {marker}\necho node2:1\n")
    path.chmod(0o755)
    result = invoke("run", "--elastic", "--min-np", "2", "--host-discovery-script", path, "--network-interface",
                    "eth0", "--dry-run", "--", "python", "-c", "pass")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == (
        "# horovodrun runs with an 'ssh' first on its PATH that is: ssh -o ServerAliveInterval=5 -o "
        "ServerAliveCountMax=3"
    )
    assert f"horovodrun -np 2 --min-np 2 --host-discovery-script {path} --slots-per-host 1 --gloo " in lines[-1]
    assert not marker.exists() and no_processes == []


def test_train_dry_run_elastic(hosts_file, tmp_path, monkeypatch, no_processes, clean_env):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--elastic", "--hosts-file", hosts_file("localhost:2\n"), "--min-np", "1",
                    "--max-np", "2", "--run-dir", "r", "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "horovodrun -np 1 --min-np 1 --max-np 2 --host-discovery-script " in result.output
    assert "-m hvdtrain.worker" in result.output and not (tmp_path / "r").exists()


def test_ssh_shim_of_an_elastic_job_adds_keepalives(hosts_file, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("")
    path = hosts_file("localhost:1\n")
    assert ssh_shim_args(spec(hosts_file=path)) == list(ELASTIC_SSH_OPTIONS)
    assert ssh_shim_args(spec(hosts_file=path, ssh_config=str(config))) == [
        "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-F", str(config),
    ]  # fmt: skip
    static = spec_of(["true"], np=1, environ={}, check_cmd=False)
    assert ssh_shim_args(static) == []
    shim = make_ssh_shim(spec(hosts_file=path), os.environ["PATH"])
    try:
        text = (Path(shim) / "ssh").read_text()
    finally:
        import shutil

        shutil.rmtree(shim)
    assert text.endswith(' -o ServerAliveInterval=5 -o ServerAliveCountMax=3 "$@"\n')


# --- the hosts file as a discovery script (run for real) ------------------------------------------------------


def run_discover(*args, env=None):
    """The discovery run for real; `env`: Slurm's variables it runs with (none of the caller's)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        [sys.executable, "-m", "hvdtrain.launching.discover", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def test_discover_prints_host_slots_lines(hosts_file):
    path = hosts_file("# cluster\nnode1\nnode2:4\n\nnode3 slots=2  # big\n")
    ok = run_discover(path, "--slots-per-host", "3")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "node1:3\nnode2:4\nnode3:2\n", "")
    assert run_discover(path).stdout.startswith("node1:1\n")
    empty = run_discover(hosts_file(""))
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, "", "")


ALLOCATION = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "gpu2-[02-3]vm1",
              "SLURM_TASKS_PER_NODE": "2,1"}  # fmt: skip


def test_inside_an_allocation_its_hosts_are_the_elastic_jobs_without_a_hosts_file(monkeypatch):
    """No --hosts-file nor discovery script inside an allocation: horovodrun's discovery prints the allocation's
    hosts (`discover --slurm-allocation`, reading the job's variables where horovodrun runs it)."""
    s = spec(environ=ALLOCATION, network_interface="eth0", min_np=2, np=3)
    command = shlex.join([sys.executable, "-m", "hvdtrain.launching.discover", "--slurm-allocation"])
    assert (s.launcher, s.np, s.elastic.discovery, s.elastic.hosts_file) == ("horovodrun", 3, command, None)
    assert s.hosts == [Host("gpu2-02vm1", 2), Host("gpu2-03vm1", 1)]
    found = run_discover("--slurm-allocation", env=ALLOCATION)
    assert (found.returncode, found.stdout, found.stderr) == (0, "gpu2-02vm1:2\ngpu2-03vm1:1\n", "")
    bad = run_discover("--slurm-allocation", env={**ALLOCATION, "SLURM_JOB_NODELIST": "gpu[3-2]"})
    assert bad.returncode == 1 and "SLURM_JOB_NODELIST 'gpu[3-2]' is not a Slurm host list" in bad.stderr
    with pytest.raises(UsageError, match="--elastic needs its hosts"):
        spec(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "3"}, network_interface="eth0")


def test_discover_fails_in_one_line_on_a_file_mid_edit(hosts_file):
    bad = run_discover(hosts_file("node1:2\nnode2 slots=\n"))
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"hvdtrain.launching.discover: {bad.args[3]}:2: cannot parse 'node2 slots=': expected "
                                       "'host slots=N'"]  # fmt: skip
    gone = run_discover(Path(bad.args[3]).parent / "nope")
    assert gone.returncode == 1 and len(gone.stderr.splitlines()) == 1 and "no such file" in gone.stderr
    usage = run_discover("a", "b")
    assert usage.returncode == 2 and usage.stderr.strip() == discover.USAGE


# --- preflight ---------------------------------------------------------------------------------------------


def test_preflight_runs_the_discovery_and_asks_the_other_hosts(fake_ssh, script, hosts_file):
    s = spec(host_discovery_script=script("localhost:1\n\nnode2.invalid:2\n"), network_interface="eth0")
    facts = preflight(s)
    assert [(f.name, f.local) for f in facts] == [("localhost", True), ("node2.invalid", False)]
    assert "node2.invalid" in fake_ssh.read_text()
    down = spec(hosts_file=hosts_file("localhost:1\ndown2.invalid:1\n"), network_interface="eth0")
    with pytest.raises(UsageError, match="cannot reach host down2.invalid over ssh"):
        preflight(down)
    assert preflight(spec(hosts_file=hosts_file("", "empty"), network_interface="eth0")) == []


@pytest.mark.parametrize(
    "text,status,needle",
    [
        ("node1 4\n", 0, "printed 'node1 4': expected one 'host' or 'host:slots' line per host"),
        ("node1:x\n", 0, "printed 'node1:x'"),
        ("node1:0\n", 0, "host 'node1' has 0 slots"),
        ("oops\n", 3, "failed with exit status 3: oops; horovodrun stops the job when its first run fails"),
    ],
)
def test_preflight_rejects_a_bad_discovery(fake_ssh, script, text, status, needle):
    with pytest.raises(UsageError, match=needle):
        preflight(spec(host_discovery_script=script(text, status), network_interface="eth0"))


def test_preflight_bounds_the_discovery(fake_ssh, tmp_path):
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(UsageError, match="slow.sh gave no answer within 0.5 s"):
        preflight(spec(host_discovery_script=str(slow), network_interface="eth0"), timeout=0.5)


def test_preflight_interfaces_of_an_elastic_job(fake_ssh, hosts_file):
    here = hosts_file("localhost:2\n")
    # Started here alone on a routed interface: hvdtrain.launching.horovodrun takes it as given, so hosts can join later.
    routed = next((n for n, a in interface_addresses().items() if any(not x.startswith("127.") for x in a)), None)
    if routed:
        assert preflight(spec(hosts_file=here, network_interface=routed))
    assert preflight(spec(hosts_file=here))  # lo, chosen by make_spec
    with pytest.raises(UsageError, match="no IPv4 address on lo that other hosts can reach"):
        preflight(spec(hosts_file=hosts_file("localhost:1\nnode2.invalid:1\n", "two"), network_interface="lo"))


# --- the wrapper's records of an elastic worker (run for real) ---------------------------------------------


def wrapper(log_dir, *command, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMIX_", "SLURM_"))}
    return subprocess.run(
        [sys.executable, "-m", "hvdtrain.launching.rank", "--log-dir", str(log_dir), "--", *command],
        env={**base, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_an_elastic_worker_keeps_its_records_by_host_and_slot(tmp_path):
    env = {"HOROVOD_ELASTIC": "1", "HOROVOD_HOSTNAME": "node-1", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_RANK": "3",
           "HOROVOD_SIZE": "4"}  # fmt: skip
    logs = RankLogs(tmp_path)
    first = wrapper(tmp_path, sys.executable, "-c", "print('first')", env=env)
    assert first.returncode == 0 and first.stdout == "first\n", first.stderr
    # Started again on the same host and slot (as rank 0 now): the old exit record is gone while it runs, and it
    # appends to the same log after a separator line.
    check = (
        f"import os, sys; print('second'); sys.exit(5 if os.path.exists({str(logs.worker_exit('node-1', 1))!r}) else 2)"
    )
    second = wrapper(tmp_path, sys.executable, "-c", check, env={**env, "HOROVOD_RANK": "0"})
    assert second.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker.node-1.1.exit", "worker.node-1.1.host",
                                                          "worker.node-1.1.log"]  # fmt: skip
    lines = logs.worker_log("node-1", 1).read_text().splitlines()
    assert [line for line in lines if not line.startswith("===")] == ["first", "second"]
    assert lines[0].startswith("=== hvdtrain: worker node-1[1] started ") and lines[0].endswith(" UTC ===")
    assert lines[2].startswith("=== hvdtrain: worker node-1[1] started ")
    assert logs.worker_exit("node-1", 1).read_text() == "2\n"
    assert logs.worker_host("node-1", 1).read_text() == socket.gethostname() + "\n"
    assert dict(logs.worker_records("exit")) == {("node-1", 1): logs.worker_exit("node-1", 1)}
    assert list(logs.exit_records()) == []
    # A host name that is no file name, and a static job's wrapper (no HOROVOD_ELASTIC): rank records as before.
    wrapper(tmp_path, "true", env={**env, "HOROVOD_HOSTNAME": "a/b c"})
    assert logs.worker_exit("a/b c", 1).name == "worker.a_b_c.1.exit" and logs.worker_exit("a/b c", 1).exists()
    wrapper(tmp_path, "true", env={"HOROVOD_RANK": "3", "HOROVOD_HOSTNAME": "node-1", "HOROVOD_LOCAL_RANK": "1"})
    assert logs.exit(3).exists()


def test_worker_records_and_names():
    assert rank.elastic_worker({"HOROVOD_ELASTIC": "1", "HOROVOD_HOSTNAME": "n1", "HOROVOD_LOCAL_RANK": "2"}) == (
        "n1",
        2,
    )
    assert rank.elastic_worker({"HOROVOD_HOSTNAME": "n1", "HOROVOD_LOCAL_RANK": "2"}) is None
    assert rank.elastic_worker({"HOROVOD_ELASTIC": "1", "HOROVOD_LOCAL_RANK": "2"}) is None


def test_worker_records_parse_dotted_host_names(tmp_path):
    logs = RankLogs(tmp_path)
    for name in ("worker.127.0.0.1.0.log", "worker.node1.example.org.12.log", "worker.x.log", "rank.0.log"):
        (tmp_path / name).write_text("")
    assert sorted(w for w, _ in logs.worker_records("log")) == [("127.0.0.1", 0), ("node1.example.org", 12)]


# --- the failure report from horovodrun's own lines ------------------------------------------------------------


def golden(name):
    return (GOLDEN / f"{name}.out").read_text().splitlines()


def worker_log(tmp_path, host, slot, text, status=None):
    logs = RankLogs(tmp_path)
    logs.worker_log(host, slot).write_text(f"=== hvdtrain: worker {host}[{slot}] started 2026-11-23 19:31:02 UTC ===\n"
                                           + text)  # fmt: skip
    if status is not None:
        logs.worker_exit(host, slot).write_text(f"{status}\n")


@pytest.mark.parametrize(
    "name,cause,first_words",
    [
        ("failed", "failed", "worker localhost[0] failed with exit status 1; last lines of "),
        ("blacklisted", "blacklisted", "every host of the job failed: horovodrun blacklisted them all and stopped; "
                                       "worker localhost[0] failed with exit status 1; last lines of "),
        ("reset-limit", "reset_limit", "the job needed more resets than --reset-limit 0 allows (a reset follows every "
                                       "failed worker and every change of hosts); the last failure: worker "
                                       "localhost[0] failed with exit status 1; last lines of "),
        ("min-np-at-start", "min_np", "fewer than 2 slots were available for 2 s (--elastic-timeout): horovodrun "
                                      "stopped waiting for hosts; list more hosts or slots, lower -np or --min-np, or "
                                      "raise --elastic-timeout; per-worker logs are in "),
        ("min-np-after-reset", "min_np", "fewer than 2 slots were available for 3 s (--elastic-timeout): "),
        ("discovery-first-run", "discovery", "the host discovery failed at its first run, and horovodrun stopped the "
                                             "job; run it by hand to see why: /x/d.sh; per-worker logs are in "),
        ("discovery-transient", "failed", "worker localhost[0] failed with exit status 3; last lines of "),
    ],
)  # fmt: skip
def test_diagnose_elastic_names_the_cause_from_horovodruns_lines(tmp_path, name, cause, first_words):
    worker_log(tmp_path, "localhost", 0, "failing localhost 0\n", status=1)
    worker_log(tmp_path, "127.0.0.1", 0, "Terminated\n", status=143)
    found = elastic_failures.diagnose_elastic(str(tmp_path), 1, golden(name), discovery="/x/d.sh")
    assert found.cause == cause and found.cause in failures.CAUSES
    assert found.message.startswith(first_words), found.message
    # horovodrun's traceback is not repeated; the failed worker's own lines are shown.
    assert "Traceback" not in found.message and "RuntimeError" not in found.message
    if "last lines of" in first_words:
        assert found.message.endswith("  | failing localhost 0")
        assert f"last lines of {tmp_path}/worker.localhost.0.log:\n" in found.message


def test_diagnose_elastic_after_a_stop_and_without_a_known_cause(tmp_path):
    stopped = elastic_failures.diagnose_elastic(str(tmp_path), 1, golden("stopped"), stopped_by="SIGTERM")
    assert (stopped.cause, stopped.message) == ("stopped", f"the job was stopped by SIGTERM; per-worker logs are in "
                                                           f"{tmp_path}")  # fmt: skip
    unknown = elastic_failures.diagnose_elastic(str(tmp_path), 7, ["something else"])
    assert unknown.cause is None and unknown.message.startswith("horovodrun failed with exit status 7 (its last lines")


def test_diagnose_elastic_reads_this_jobs_part_and_names_a_missing_log(tmp_path):
    worker_log(tmp_path, "127.0.0.1", 0, "old job\n")
    starts = failures.worker_log_sizes(str(tmp_path))
    assert starts == {("127.0.0.1", 0): (tmp_path / "worker.127.0.0.1.0.log").stat().st_size}
    with open(tmp_path / "worker.127.0.0.1.0.log", "a") as f:
        f.write("ValueError: boom\n")
    lines = ["Process name: 127.0.0.1[0]", "Exit code: 1"]
    found = elastic_failures.diagnose_elastic(str(tmp_path), 1, lines, starts)
    assert found.message.endswith(
        "last lines of " + str(tmp_path / "worker.127.0.0.1.0.log") + ":\n  | ValueError: boom"
    )
    remote = elastic_failures.diagnose_elastic(str(tmp_path), 1, ["Process name: node2[1]", "Exit code: -9"])
    assert remote.message.startswith("worker node2[1] was killed by SIGKILL; ")
    assert remote.message.endswith("worker.node2.1.log is not on this machine (each host keeps its workers' logs "
                                   "unless the log directory is shared)")  # fmt: skip


def test_parse_elastic_output():
    said = elastic_failures.parse_elastic_output(golden("min-np-after-reset"))
    assert said["min_np"] == (2, 3) and said["worker"] == elastic_failures.WorkerFailure("localhost", 0, 1)
    transient = elastic_failures.parse_elastic_output(golden("discovery-transient"))
    assert transient["discovery"].endswith("flaky.sh failed with exit status 5") and transient["all_failed"] == 1


# --- run_job's elastic path: the launcher's output through a pipe, the report -------------------------------


def fake_horovodrun(tmp_path, monkeypatch, output: str, status: int, worker_text: str = "") -> None:
    """A horovodrun that writes a worker's records into --log-dir, prints `output` on stderr, exits `status`."""
    (tmp_path / "output").write_text(output)
    horovodrun = tmp_path / "horovodrun"
    horovodrun.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = --log-dir ] && d="$2"; shift; done\n'
        f'printf %s {shlex.quote(worker_text)} >> "$d/worker.localhost.0.log"\n'
        f'echo 1 > "$d/worker.localhost.0.exit"; echo vm > "$d/worker.localhost.0.host"\n'
        f"cat {tmp_path / 'output'} >&2\nexit {status}\n"
    )
    horovodrun.chmod(0o755)
    monkeypatch.setattr(launch_argv, "horovodrun_command", lambda spec: [str(horovodrun)])


def test_run_job_reports_an_elastic_failure_from_horovodruns_lines(tmp_path, monkeypatch, capfd, hosts_file):
    fake_horovodrun(tmp_path, monkeypatch, (GOLDEN / "failed.out").read_text(), 1, "failing localhost 0\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker.localhost.0.log").write_text("an earlier job\n")
    (logs / "worker.gone.0.exit").write_text("1\n")  # stale: cleared before the launch
    s = spec(hosts_file=hosts_file("localhost:1\n"), output_dir=str(logs))
    with pytest.raises(LaunchError) as e:
        run_job(s, echo=lambda _: None)
    assert e.value.cause == "failed" and e.value.exit_code == 1
    assert str(e.value) == (
        f"worker localhost[0] failed with exit status 1; last lines of {logs}/worker.localhost.0.log:\n"
        "  | failing localhost 0"
    )
    out, err = capfd.readouterr()
    # Every line passed on to our stdout but horovodrun's closing traceback, which the report replaces.
    golden = (GOLDEN / "failed.out").read_text()
    assert out == golden[: golden.index("Traceback (most recent call last):")] and err == ""
    assert not (logs / "worker.gone.0.exit").exists()


def test_run_job_elastic_success_counts_worker_records(tmp_path, monkeypatch, hosts_file):
    fake_horovodrun(tmp_path, monkeypatch, "", 0, "done\n")
    echoed = []
    s = spec(hosts_file=hosts_file("localhost:1\n"), output_dir=str(tmp_path / "logs"))
    assert run_job(s, echo=echoed.append) == 0
    assert echoed == [f"per-worker logs: {tmp_path / 'logs'}"]


def test_horovodruns_traceback_is_held_back_unless_the_job_succeeds_or_a_rank_speaks(tmp_path, capfd):
    """_Tee passes lines on as they come, holds horovodrun's own traceback back: released by a rank's next line
    or by release() (success), dropped otherwise (the failure report replaces it)."""
    lines = ["[0]<stdout>:a", "Traceback (most recent call last):", '  File "x", line 1', "RuntimeError: boom"]
    for more, released, shown in [([], False, 1), (["[1]<stdout>:b"], False, 5), ([], True, 4)]:
        r, w = os.pipe()
        with os.fdopen(w, "wb") as f:
            f.write("".join(f"{line}\n" for line in [*lines, *more]).encode())
        tee = _Tee(os.fdopen(r, "rb"))
        assert tee.finish() == [*lines, *more]
        if released:
            tee.release()
        out, _ = capfd.readouterr()
        assert out.splitlines() == [*lines, *more][:shown] if not more else [*lines, *more]
