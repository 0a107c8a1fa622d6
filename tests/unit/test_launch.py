"""The launcher's pure parts: host parsing, spec validation, golden argv for each launcher."""

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakessh import make_fake_ssh

from hvdtrain import launch
from hvdtrain.errors import UsageError

NO_SLURM: dict = {}


def spec(command=("python", "-c", "pass"), environ=NO_SLURM, **kw):
    return launch.make_spec(list(command), environ=environ, **kw)


# --- hosts ----------------------------------------------------------------------------------------


def test_parse_hosts():
    assert launch.parse_hosts("a:2,b.example.org:4,c") == [
        launch.Host("a", 2),
        launch.Host("b.example.org", 4),
        launch.Host("c", 1),
    ]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("a:x", "bad slot count"),
        ("a:0", "slots must be at least 1"),
        ("a:-3", "slots must be at least 1"),
        ("a:2,,b:2", "bad host list"),
        ("", "bad host list"),
        ("a b:2", "bad host"),
        ("a:2,a:2", "listed twice"),
    ],
)
def test_parse_hosts_rejects(text, needle):
    with pytest.raises(UsageError, match=needle):
        launch.parse_hosts(text)


def test_parse_hostfile(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\n\nnode1 slots=4  # big one\nnode2 slots=2\nnode3:3\nnode4\n")
    assert launch.parse_hostfile(str(f)) == [
        launch.Host("node1", 4),
        launch.Host("node2", 2),
        launch.Host("node3", 3),
        launch.Host("node4", 1),
    ]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("node1 slots=2\nnode2 slots two\n", ":2: cannot parse 'node2 slots two'"),
        ("node1 slots=2\n\nnode2 slots=0\n", ":3: host 'node2' has 0 slots"),
        ("node1 slots=2\nnode1 slots=2\n", "listed twice"),
        ("# only comments\n\n", "lists no hosts"),
        ("node1 slots=2 extra\n", ":1: cannot parse"),
    ],
)
def test_parse_hostfile_rejects(tmp_path, content, needle):
    f = tmp_path / "hosts"
    f.write_text(content)
    with pytest.raises(UsageError, match=needle):
        launch.parse_hostfile(str(f))


def test_missing_hostfile(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        launch.parse_hostfile(str(tmp_path / "nope"))


# --- spec validation --------------------------------------------------------------------------------


def test_defaults():
    s = spec(np=2)
    assert (s.np, s.hosts, s.launcher, s.controller) == (2, [launch.Host("localhost", 2)], "horovodrun", None)


def test_np_defaults_to_all_slots():
    assert spec(hosts="a:2,b:3").np == 5


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"np": 0}, "at least 1"),
        ({"np": -1}, "at least 1"),
        ({"np": 5, "hosts": "a:2,b:2"}, "more than the 4 slots"),
        ({"np": 2, "gloo": True, "mpi": True}, "exclude each other"),
        ({"np": 2, "launcher": "pbsdsh"}, "unknown launcher 'pbsdsh'"),
        ({"np": 2, "launcher": "srun"}, "needs a Slurm allocation"),
        ({"np": 2, "launcher": "mpirun", "gloo": True}, "--gloo needs horovodrun"),
        ({"np": 2, "threads_per_rank": 0}, "at least 1"),
        ({"np": 2, "env": ["1BAD=x"]}, "bad variable name"),
        ({"np": 2, "env": ["HVDTRAIN_SURELY_UNSET_VAR"]}, "is not set here"),
    ],
)
def test_spec_rejects(kw, needle):
    with pytest.raises(UsageError, match=needle):
        spec(**kw)


def test_missing_script(tmp_path):
    with pytest.raises(UsageError, match="script not found: 'nope.py'"):
        spec(["python", "-u", "nope.py"], np=1)
    (tmp_path / "s.py").write_text("")
    assert spec(["python3", "-u", str(tmp_path / "s.py")], np=1).command[-1].endswith("s.py")
    assert spec(["python", "-m", "some.module"], np=1)  # modules are not files


def test_env_forwarding():
    s = spec(np=1, env=["A=1", "B"], environ={"B": "from caller"})
    assert s.env == {"A": "1", "B": "from caller"}


def test_slurm_allocation_defaults():
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NNODES": "2"}
    s = spec(environ=env)
    assert (s.launcher, s.np) == ("srun", 4)
    assert spec(environ=env, np=2).np == 2
    with pytest.raises(UsageError, match="more than the 4 tasks of Slurm job 7"):
        spec(environ=env, np=8)
    # An explicit other launcher inside the allocation still takes np from it.
    assert spec(environ=env, launcher="mpirun").np == 4


def test_ranks_per_host_and_placement():
    assert launch.ranks_per_host(5, [launch.Host("a", 2), launch.Host("b", 4)]) == [2, 3]
    assert launch.placement(spec(np=5, hosts="a:2,b:4")) == {0: "a", 1: "a", 2: "b", 3: "b", 4: "b"}
    assert launch.placement(spec(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})) == {}


def test_threads_are_left_to_each_host_unless_given():
    assert spec(np=2, hosts="big:2,small:1").threads_per_rank is None  # the wrapper works it out on each host
    assert spec(np=2, threads_per_rank=3).threads_per_rank == 3
    # --env OMP_NUM_THREADS=N is --threads-per-rank N (the wrapper sets the variable, so it is not forwarded).
    s = spec(np=2, env=["OMP_NUM_THREADS=4", "A=1"])
    assert (s.threads_per_rank, s.env) == (4, {"A": "1"})
    with pytest.raises(UsageError, match="give one"):
        spec(np=2, env=["OMP_NUM_THREADS=4"], threads_per_rank=2)
    with pytest.raises(UsageError, match="OMP_NUM_THREADS=x: must be a whole number"):
        spec(np=2, env=["OMP_NUM_THREADS=x"])


# --- golden argv ----------------------------------------------------------------------------------

HOSTILE = ["python", "-c", "print('a b'); import sys", "arg with space", "it's", 'q"uote', "$(rm -rf /)"]


def test_horovodrun_argv():
    s = spec(HOSTILE, np=3, hosts="n1:2,n2:2", gloo=True, threads_per_rank=2)
    s.python = "/venv/bin/python"
    argv = launch.build_horovodrun_argv(s, "/logs dir", "horovodrun")
    assert argv == [
        "horovodrun", "-np", "3", "-H", "n1:2,n2:2", "--gloo",
        "/venv/bin/python", "-m", "hvdtrain.rank", "--log-dir", "/logs dir", "--threads", "2", "--", *HOSTILE,
    ]  # fmt: skip
    # The displayed form round-trips through a shell unchanged.
    assert shlex.split(shlex.join(argv)) == argv


def test_mpirun_argv():
    s = spec(HOSTILE, np=4, env=["NCCL_DEBUG=INFO"], threads_per_rank=1)
    s.python = "/venv/bin/python"
    names = launch.rank_env(s, is_root=True).keys()
    argv = launch.build_mpirun_argv(s, "/logs", names, cores=2)
    assert argv == [
        "mpirun", "-np", "4", "-H", "localhost:4", "--bind-to", "none", "--map-by", "slot", "--oversubscribe",
        "-x", "HOROVOD_STALL_CHECK_TIME_SECONDS", "-x", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "-x", "NCCL_DEBUG",
        "-x", "OMPI_ALLOW_RUN_AS_ROOT", "-x", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
        "/venv/bin/python", "-m", "hvdtrain.rank", "--log-dir", "/logs", "--threads", "1", "--", *HOSTILE,
    ]  # fmt: skip
    assert "--oversubscribe" not in launch.build_mpirun_argv(s, "/logs", names, cores=8)


def test_srun_argv():
    s = spec(HOSTILE, environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
    s.python = "/venv/bin/python"
    assert launch.build_srun_argv(s, "/l") == [
        "srun", "--ntasks=2", "--mpi=pmix", "--kill-on-bad-exit=1", "--export=ALL",
        "/venv/bin/python", "-m", "hvdtrain.rank", "--log-dir", "/l", "--threads", "auto", "--", *HOSTILE,
    ]  # fmt: skip


def test_rank_env():
    s = spec(np=2, threads_per_rank=3, env=["X=1"])
    stall = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600"}
    assert launch.rank_env(s, is_root=False) == {**stall, "X": "1"}
    assert launch.rank_env(s, is_root=True)["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    # --env wins over hvdtrain's own settings.
    mine = spec(np=2, env=["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=5"])
    assert launch.rank_env(mine, is_root=False)["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "5"


def test_failure_report(tmp_path):
    (tmp_path / "rank.0.exit").write_text("0\n")
    (tmp_path / "rank.1.exit").write_text("1\n")
    (tmp_path / "rank.1.log").write_text("line\n" * 30 + "ValueError: boom\n")
    report = launch.failure_report(str(tmp_path), 1)
    assert report.startswith("rank 1 failed with exit status 1")
    assert report.rstrip().endswith("ValueError: boom")
    assert report.count("\n") == 15
    assert "exit status 3" in launch.failure_report(str(tmp_path / "none"), 3)


def test_failure_report_names_the_rank_that_failed_first(tmp_path):
    import os

    (tmp_path / "rank.0.exit").write_text("1\n")  # rank 0 died of Horovod's shutdown, after rank 1 raised
    (tmp_path / "rank.1.exit").write_text("1\n")
    os.utime(tmp_path / "rank.1.exit", ns=(1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "rank.0.exit", ns=(2_000_000_000, 2_000_000_000))
    assert launch.failed_ranks(str(tmp_path)) == [(1, 1), (0, 1)]
    assert launch.failure_report(str(tmp_path), 1).startswith("rank 1 failed with exit status 1 (then also ranks 0)")


def test_failure_report_prefers_the_cause_over_horovod_shutdown(tmp_path):
    for r in (0, 1):
        (tmp_path / f"rank.{r}.exit").write_text("1\n")
    (tmp_path / "rank.0.log").write_text("HorovodInternalError: Horovod has been shut down. This was caused by...\n")
    (tmp_path / "rank.1.log").write_text("RuntimeError: boom\n")
    assert launch.failed_ranks(str(tmp_path))[0] == (1, 1)


# --- network interfaces ---------------------------------------------------------------------------


def test_parse_nics():
    assert launch.parse_nics("eth0, ib0,eth0") == ["eth0", "ib0"]
    assert spec(np=2, network_interface="eth0").nics == ["eth0"]
    assert spec(np=2).nics == []


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "bad list ''"),
        ("eth0,,ib0", "bad list"),
        ("eth0;rm -rf", "bad interface name 'eth0;rm -rf'"),
        ("averyveryverylongname", "at most 15"),
        ("..", "bad interface name '..'"),
        ("192.0.2.0/24", "bad interface name"),
    ],
)
def test_parse_nics_rejects(text, needle):
    with pytest.raises(UsageError, match=needle):
        spec(np=2, network_interface=text)


def test_network_interface_argv_per_launcher():
    hr = spec(HOSTILE, np=2, hosts="n1:1,n2:1", network_interface="eth0,ib0", threads_per_rank=1)
    hr.python = "/py"
    assert launch.build_horovodrun_argv(hr, "/l", "horovodrun") == [
        "horovodrun", "-np", "2", "-H", "n1:1,n2:1", "--network-interface", "eth0", "--network-interface", "ib0",
        "--mpi-args=-mca oob_tcp_if_include eth0,ib0",
        "/py", "-m", "hvdtrain.rank", "--log-dir", "/l", "--threads", "1", "--", *HOSTILE,
    ]  # fmt: skip
    gloo = spec(np=2, hosts="n1:1,n2:1", network_interface="eth0", gloo=True)
    assert not any(a.startswith("--mpi-args") for a in launch.build_horovodrun_argv(gloo, "/l"))
    mp = spec(HOSTILE, np=2, hosts="n1:1,n2:1", network_interface="eth0,ib0", launcher="mpirun", threads_per_rank=1)
    mp.python = "/py"
    names = launch.rank_env(mp, is_root=False).keys()
    assert launch.build_mpirun_argv(mp, "/l", names, cores=8) == [
        "mpirun", "-np", "2", "-H", "n1:1,n2:1", "--bind-to", "none", "--map-by", "slot",
        "--mca", "btl_tcp_if_include", "eth0,ib0", "--mca", "oob_tcp_if_include", "eth0,ib0",
        "-x", "HOROVOD_STALL_CHECK_TIME_SECONDS", "-x", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
        "-x", "NCCL_SOCKET_IFNAME",
        "/py", "-m", "hvdtrain.rank", "--log-dir", "/l", "--threads", "1", "--", *HOSTILE,
    ]  # fmt: skip
    assert launch.rank_env(mp, is_root=False)["NCCL_SOCKET_IFNAME"] == "eth0,ib0"
    srun = spec(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, network_interface="ib0")
    env = launch.rank_env(srun, is_root=False)
    assert (env["OMPI_MCA_btl_tcp_if_include"], env["OMPI_MCA_oob_tcp_if_include"]) == ("ib0", "ib0")
    assert "OMPI_MCA_btl_tcp_if_include" not in launch.rank_env(hr, is_root=False)  # horovodrun's own business


def _horovodrun_would_run(argv, monkeypatch):
    """What horovodrun 0.28.1 makes of our argv: its parsed arguments, and the mpirun command line its MPI path
    would exec (taken from mpi_run with os.execve intercepted)."""
    from horovod.runner import launch as hvd_launch
    from horovod.runner import mpi_run as hvd_mpi_run
    from horovod.runner.common.util import settings as hvd_settings

    monkeypatch.setattr("sys.argv", argv)
    args = hvd_launch.parse_args()
    settings = hvd_settings.Settings(
        num_proc=args.num_proc, hosts=args.hosts, extra_mpi_args=args.mpi_args, nics=args.nics, ssh_port=None,
        ssh_identity_file=None, tcp_flag=False, binding_args=None, output_filename=None, run_func_mode=False,
    )  # fmt: skip
    flags = (list(hvd_mpi_run._OMPI_FLAGS), list(hvd_mpi_run._NO_BINDING_ARGS), hvd_mpi_run._OMPI_IMPL)
    monkeypatch.setattr(hvd_mpi_run, "_get_mpi_implementation_flags", lambda *a, **k: flags)
    seen = {}
    monkeypatch.setattr(hvd_mpi_run.os, "execve", lambda path, argv, env: seen.update(command=argv[-1]))
    hvd_mpi_run.mpi_run(settings, args.nics, {}, args.command)
    return args, seen["command"]


def test_horovodrun_takes_our_interface_and_ssh_arguments(monkeypatch, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n")
    s = spec(np=2, hosts="n1:1,n2:1", network_interface="eth0,ib0", ssh_config=str(config))
    argv = launch.build_horovodrun_argv(s, "/l", "horovodrun")
    args, mpirun = _horovodrun_would_run(argv, monkeypatch)
    assert args.nics == {"eth0", "ib0"} and args.disable_cache
    assert args.command == launch.wrapped_command(s, "/l")
    # horovodrun's own -mca btl_tcp_if_include, then ours: oob_tcp_if_include and no tree spawn.
    assert "-mca btl_tcp_if_include eth0,ib0" in mpirun or "-mca btl_tcp_if_include ib0,eth0" in mpirun
    assert "-mca oob_tcp_if_include eth0,ib0 -mca plm_rsh_no_tree_spawn 1" in mpirun


# --- ssh config -----------------------------------------------------------------------------------


def test_ssh_config_from_option_or_environment(tmp_path):
    config = tmp_path / "cluster.ssh"
    config.write_text("Host *\n")
    assert spec(np=2, ssh_config=str(config)).ssh_config == str(config.resolve())
    assert spec(np=2, environ={"HVDTRAIN_SSH_CONFIG": str(config)}).ssh_config == str(config.resolve())
    assert spec(np=2).ssh_config is None
    with pytest.raises(UsageError, match="--ssh-config: no such file '/no/such'; give the path of an ssh client"):
        spec(np=2, ssh_config="/no/such")
    with pytest.raises(UsageError, match="HVDTRAIN_SSH_CONFIG: no such file '/no/such'.*or unset HVDTRAIN_SSH_CONFIG"):
        spec(np=2, environ={"HVDTRAIN_SSH_CONFIG": "/no/such"})
    slurm = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}
    assert spec(environ={**slurm, "HVDTRAIN_SSH_CONFIG": str(config)}).ssh_config is None  # srun: no ssh
    with pytest.raises(UsageError, match="--ssh-config does not apply to srun"):
        spec(environ=slurm, ssh_config=str(config))
    spaced = tmp_path / "a b.ssh"
    spaced.write_text("")
    assert spec(np=2, ssh_config=str(spaced)).ssh_config.endswith("a b.ssh")  # horovodrun: through the shim
    with pytest.raises(UsageError, match="splits its ssh command"):
        spec(np=2, ssh_config=str(spaced), launcher="mpirun")


def test_ssh_config_argv(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("")
    s = spec(np=2, hosts="n1:1,n2:1", ssh_config=str(config), launcher="mpirun")
    argv = launch.build_mpirun_argv(s, "/l", [], cores=8)
    agent = argv.index("plm_rsh_agent")
    assert argv[agent - 1 : agent + 5] == [
        "--mca", "plm_rsh_agent", f"ssh -F {config}", "--mca", "plm_rsh_no_tree_spawn", "1",
    ]  # fmt: skip
    hr = launch.build_horovodrun_argv(dataclasses.replace(s, launcher="horovodrun", controller=None), "/l")
    assert "--disable-cache" in hr and "--mpi-args=-mca plm_rsh_no_tree_spawn 1" in hr
    assert "--disable-cache" not in launch.build_horovodrun_argv(spec(np=2), "/l")


def test_ssh_shim_runs_the_real_ssh_with_the_config(tmp_path):
    log = tmp_path / "calls"
    real = make_fake_ssh(tmp_path / "bin", log)
    shim = tmp_path / "shim" / "ssh"
    shim.parent.mkdir()
    shim.write_text(launch.ssh_shim_script(str(real), str(tmp_path / "my config")))
    shim.chmod(0o755)
    out = subprocess.run([str(shim), "-o", "X=1", "node2", "echo a b"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["node2", "eth0", "lo"], out
    assert log.read_text() == f"-F {tmp_path / 'my config'} -o X=1 node2 echo a b\n"


def test_run_job_puts_the_ssh_shim_first_on_horovodruns_path(tmp_path, fake_ssh, monkeypatch):
    """horovodrun runs `ssh` from PATH: under run_job that is the shim, which adds -F; no shim is left after."""
    config = tmp_path / "ssh_config"
    config.write_text("")
    horovodrun = tmp_path / "horovodrun"
    horovodrun.write_text('#!/bin/sh\nssh node2 true >/dev/null && echo "$PATH" > "$(dirname "$0")/path"\n')
    horovodrun.chmod(0o755)
    monkeypatch.setattr(launch, "find_horovodrun", lambda: str(horovodrun))
    monkeypatch.setattr(launch.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    s = spec(np=2, hosts="node2:2", ssh_config=str(config), output_dir=str(tmp_path / "logs"))
    assert launch.run_job(s, echo=lambda _: None) == 0
    assert fake_ssh.read_text() == f"-F {config} node2 true\n"
    shim_dir = (tmp_path / "path").read_text().split(os.pathsep)[0]
    assert Path(shim_dir).name.startswith("hvdtrain-ssh-") and not Path(shim_dir).exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_dry_run_names_the_ssh_shim(tmp_path, capsys):
    config = tmp_path / "ssh_config"
    config.write_text("")
    launch.run_job(spec(np=2, hosts="node2:2", ssh_config=str(config), output_dir=str(tmp_path)), dry_run=True)
    assert f"# horovodrun runs with an 'ssh' first on its PATH that is: ssh -F {config}" in capsys.readouterr().out


# --- preflight --------------------------------------------------------------------------------------


def test_is_local_host():
    assert launch.is_local_host("localhost") and launch.is_local_host("127.0.0.1")
    assert launch.is_local_host(socket.gethostname())
    assert not launch.is_local_host("node2.invalid")  # .invalid never resolves (RFC 6761)


def test_preflight_of_local_hosts_runs_no_ssh(fake_ssh):
    facts = launch.preflight(spec(np=2, hosts="localhost:2"))
    assert [(f.name, f.local) for f in facts] == [("localhost", True)]
    assert not fake_ssh.exists()
    assert launch.preflight(spec(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})) == []


def test_preflight_asks_every_other_host_over_ssh(fake_ssh, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("")
    s = spec(np=3, hosts="localhost:1,node2.invalid:1,node3.invalid:1", ssh_config=str(config))
    facts = launch.preflight(s)
    assert [(f.name, f.local, f.hostname, f.interfaces) for f in facts[1:]] == [
        ("node2.invalid", False, "node2", ("eth0", "lo")),
        ("node3.invalid", False, "node3", ("eth0", "lo")),
    ]
    calls = sorted(fake_ssh.read_text().splitlines())
    assert calls == [
        f"-F {config} -o BatchMode=yes -o ConnectTimeout=10 {host} hostname; ls /sys/class/net"
        for host in ("node2.invalid", "node3.invalid")
    ]


def test_preflight_names_every_unreachable_host_with_sshs_words(fake_ssh):
    with pytest.raises(UsageError) as e:
        launch.preflight(spec(np=3, hosts="down2.invalid:1,ok.invalid:1,locked3.invalid:1"))
    assert str(e.value) == (
        "cannot reach hosts down2.invalid, locked3.invalid over ssh: down2.invalid: ssh: connect to host 192.0.2.9 "
        "port 22: Connection refused; locked3.invalid: root@locked: Permission denied (publickey).; check that they "
        "are up and that 'ssh HOST' works without a password for each (or give --ssh-config)"
    )
    with pytest.raises(UsageError) as one:
        launch.preflight(spec(np=1, hosts="down2.invalid:1"))
    assert str(one.value) == (
        "cannot reach host down2.invalid over ssh: ssh: connect to host 192.0.2.9 port 22: Connection refused; "
        "check that down2.invalid is up and that 'ssh down2.invalid' works without a password (or give --ssh-config)"
    )
    with pytest.raises(UsageError, match="broken.invalid over ssh: 'hostname; ls /sys/class/net' failed there: ls:"):
        launch.preflight(spec(np=1, hosts="broken.invalid:1"))


def test_preflight_is_bounded(fake_ssh):
    start = time.monotonic()
    with pytest.raises(UsageError, match="cannot reach host slow.invalid over ssh: no answer within 0.5 s"):
        launch.preflight(spec(np=2, hosts="slow.invalid:1,ok.invalid:1"), timeout=0.5)
    assert time.monotonic() - start < 5


def test_preflight_checks_the_interface_on_every_host(fake_ssh):
    assert launch.preflight(spec(np=2, hosts="localhost:1,node2.invalid:1", network_interface="eth0"))
    with pytest.raises(UsageError) as e:
        launch.preflight(spec(np=2, hosts="localhost:1,node2.invalid:1", network_interface="wlan0"))
    assert str(e.value) == (
        "--network-interface wlan0: host node2.invalid has no interface wlan0 (it has eth0, lo); pick one every host "
        "has: eth0"
    )
    with pytest.raises(UsageError) as both:
        launch.preflight(spec(np=2, hosts="localhost:1,node2.invalid:1", network_interface="eth9"))
    assert str(both.value) == (
        "--network-interface eth9: host localhost has no interface eth9 (it has eth0, lo, wlan0); host node2.invalid "
        "has no interface eth9 (it has eth0, lo); pick one every host has: eth0"
    )


def test_preflight_checks_the_launching_machine(fake_ssh, monkeypatch):
    """With no rank here, the ranks still connect back here (Gloo's rendezvous, Open MPI's daemons)."""
    remote_only = spec(np=2, hosts="node2.invalid:1,node3.invalid:1", network_interface="eth0")
    assert len(launch.preflight(remote_only)) == 2
    monkeypatch.setattr(launch, "local_interfaces", lambda: ("br0", "lo"))
    with pytest.raises(UsageError, match=r"this machine \(.*\), where the launcher runs, has no interface eth0"):
        launch.preflight(remote_only)
    monkeypatch.setattr(launch, "local_interfaces", lambda: ("eth0", "lo"))
    monkeypatch.setattr(
        launch, "interface_addresses", lambda: {"lo": {"127.0.0.1"}, "eth0": set(), "br0": {"10.1.1.1"}}
    )
    with pytest.raises(
        UsageError, match=r"has no IPv4 address on eth0.*pick an interface with an address \(here: br0\)"
    ):
        launch.preflight(remote_only)


def test_preflight_all_local_horovodrun_needs_the_loopback(fake_ssh):
    """horovodrun with every host here keeps only interfaces holding 127.0.0.1 (and fails without one)."""
    with pytest.raises(UsageError) as e:
        launch.preflight(spec(np=2, network_interface="eth0"))
    assert str(e.value) == (
        "--network-interface eth0: every host is this machine, and then horovodrun only takes an interface holding "
        "127.0.0.1 (here: lo); give --network-interface lo, leave the option out, or use --launcher mpirun"
    )
    assert launch.preflight(spec(np=2, network_interface="lo"))
    assert launch.preflight(spec(np=2, network_interface="eth0", launcher="mpirun"))


# --- stall timeout ----------------------------------------------------------------------------------


def test_stall_env():
    assert launch.stall_env(600) == {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600",
    }
    assert launch.stall_env(30) == {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "15",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30",
    }
    assert launch.stall_env(1) == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "1", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "1"}
    assert launch.stall_env(0) == {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "0"}
    for t in range(1, 2000):  # Horovod turns the shutdown off when it comes before the check
        env = launch.stall_env(t)
        assert 1 <= int(env["HOROVOD_STALL_CHECK_TIME_SECONDS"]) <= t
    assert spec(np=2).stall_timeout == launch.DEFAULT_STALL_TIMEOUT == 600
    assert spec(np=2, stall_timeout=0).stall_timeout == 0
    with pytest.raises(UsageError, match="--stall-timeout -5: give a number of seconds"):
        spec(np=2, stall_timeout=-5)


# Rank 0's log after Horovod 0.28.1 shut a job down (`--stall-timeout 4`, rank 1 asleep before grad.3), as
# captured from a real run: a warning first, then the shutdown, then the consequence in rank 0 itself.
STALL_LOG = """\
[2026-11-23 16:57:09.757005: W /tmp/horovod-0.28.1/horovod/common/stall_inspector.cc:107] One or more tensors \
were submitted to be reduced, gathered or broadcasted by subset of ranks and are waiting for remainder of ranks for \
more than 2 seconds. This may indicate that different ranks are trying to submit different tensors or that only \
subset of ranks is submitting tensors, which will cause deadlock.\x20
Missing ranks:
1: [allreduce.grad.3]
[2026-11-23 16:57:11.757325: E /tmp/horovod-0.28.1/horovod/common/stall_inspector.cc:105] One or more tensors \
were submitted to be reduced, gathered or broadcasted by subset of ranks and are waiting for remainder of ranks for \
more than 2 seconds. This may indicate that different ranks are trying to submit different tensors or that only \
subset of ranks is submitting tensors, which will cause deadlock.\x20
Missing ranks:
1!: [allreduce.grad.3]
One or more rank (marked by "!") is stalled for longer than 4 seconds. Will shutdown.
Traceback (most recent call last):
  File "/tmp/stall/st.py", line 6, in <module>
    hvd.allreduce(torch.ones(4), name=f'grad.{step}')
horovod.common.exceptions.HorovodInternalError: Horovod has been shut down. This was caused by an exception on one \
of the ranks or an attempt to allreduce, allgather or broadcast a tensor after one of the ranks finished execution.
"""


def test_parse_stall():
    stall = launch.parse_stall(STALL_LOG)
    assert stall == launch.Stall(4, {1: ("allreduce.grad.3",)}, (1,))
    assert launch.parse_stall(STALL_LOG.split("One or more rank (marked")[0]) is None  # a warning is no shutdown
    many = (
        "Missing ranks:\n0: [b]\n2!: [a.1, a.2, a.3, a.4, a.5, a.6 ...]\n3!: [a.1, a.2, a.3, a.4, a.5, a.6 ...]\n"
        'One or more rank (marked by "!") is stalled for longer than 30 seconds. Will shutdown.\n'
    )
    stall = launch.parse_stall(many)
    assert stall.stalled == (2, 3) and stall.missing[2][-2:] == ("a.6", "...")
    assert launch.describe_stall(stall, range(5)) == (
        "ranks 2, 3 stalled: ranks 0, 1, 4 waited more than 30 s for them to submit a.1, a.2, a.3, a.4, a.5, a.6 ... "
        "(Horovod's stall shutdown, --stall-timeout 30)"
    )


def _records(tmp_path, ranks):
    """Rank records as the wrapper leaves them: rank -> (host or None, exit status or None, log text)."""
    for rank, (host, status, log) in ranks.items():
        if host is not None:
            (tmp_path / f"rank.{rank}.host").write_text(f"{host}\n")
        if status is not None:
            (tmp_path / f"rank.{rank}.exit").write_text(f"{status}\n")
        (tmp_path / f"rank.{rank}.log").write_text(log)
    return str(tmp_path)


def test_failure_report_names_the_stalled_rank_first(tmp_path):
    """The stalled rank never fails by itself: the launcher kills it (143, or no record at all), after rank 0
    has failed with Horovod's shutdown; the report still starts with it."""
    for rank1 in [("vm", 143, ""), ("vm", None, "step 2\n")]:
        log_dir = _records(tmp_path, {0: ("vm", 1, STALL_LOG), 1: rank1})
        report = launch.failure_report(log_dir, 1, np=2, placement={0: "vm", 1: "vm"}, this_machine={"vm"})
        first = report.splitlines()[0]
        expected = (
            "rank 1 stalled: rank 0 waited more than 4 s for it to submit allreduce.grad.3 (Horovod's stall "
            "shutdown, --stall-timeout 4); then rank 0 failed (exit status 1); "
        )
        assert first.startswith(expected), first
        # The stalled rank's own last lines when it has any, else (said so) the first failing rank's.
        rest = first[len(expected) :]
        assert rest == (f"last lines of {tmp_path}/rank.1.log:" if rank1[2] else
                        f"rank.1.log is empty; last lines of {tmp_path}/rank.0.log:"), rest  # fmt: skip
        (tmp_path / "rank.1.exit").unlink(missing_ok=True)


def test_failure_report_names_a_lost_host_and_its_ranks(tmp_path):
    log_dir = _records(
        tmp_path,
        {
            0: ("node1", 143, "started\n"),
            1: ("node1", 143, "started\n"),
            2: ("node2", None, "started\n"),
            3: ("node2", None, "started\n"),
        },
    )
    where = {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
    report = launch.failure_report(log_dir, 1, np=4, placement=where, this_machine={"node1"})
    assert report == (
        "host node2 was lost: ranks 2, 3 ran there and left no exit status (killed, or the host went down); then "
        f"ranks 0, 1 failed (exit statuses 143, 143); last lines of {tmp_path}/rank.0.log:\n  | started"
    )
    # The host is named as in -H (placement), whatever its ranks recorded (e.g. namespaces sharing a hostname).
    shared = launch.failure_report(log_dir, 1, np=4, placement={0: "a", 1: "a", 2: "b", 3: "b"}, this_machine={"a"})
    assert shared.startswith("host b was lost: ranks 2, 3 ran there")
    # Without placement (srun), by the host records.
    assert launch.failure_report(log_dir, 1, np=4, this_machine={"node1"}).startswith("host node2 was lost")


def test_a_rank_failing_by_itself_is_no_lost_host(tmp_path):
    """One rank per host: rank 1 raises on node2, the launcher SIGKILLs rank 0 on node1 (no exit record). Node1
    looks exactly like a lost host, but rank 1's own failure is the cause."""
    log_dir = _records(tmp_path, {0: ("node1", None, "step 7\n"), 1: ("node2", 1, "ValueError: boom\n")})
    report = launch.failure_report(log_dir, 1, np=2, placement={0: "node1", 1: "node2"}, this_machine={"node0"})
    assert report.startswith("rank 1 failed with exit status 1; last lines of") and "lost" not in report
    assert report.endswith("  | ValueError: boom")


def test_lost_hosts_rule():
    rec = launch.RankRecord
    node2_gone = {0: rec(0, "n1", 143, consequence=True), 1: rec(1, "n2"), 2: rec(2, "n2")}
    assert launch.lost_hosts(node2_gone) == [("n2", [1, 2])]
    # A host with one rank that left an exit record was not lost (its others were killed).
    assert launch.lost_hosts({**node2_gone, 2: rec(2, "n2", 143, consequence=True)}) == []
    # Nothing recorded an exit anywhere: every host but this machine.
    nothing = {0: rec(0, "n1"), 1: rec(1, "n2")}
    assert launch.lost_hosts(nothing, this_machine={"n1"}) == [("n2", [1])]
    # A rank without a host record (not started, or its records are on its own host) counts for nothing.
    assert launch.lost_hosts({0: rec(0, "n1", 143, consequence=True), 1: rec(1)}) == []
    # Ranks explained otherwise (stalled) do not make their host lost.
    assert launch.lost_hosts(node2_gone, explained={1, 2}) == []


def test_failure_report_reads_only_this_jobs_part_of_the_logs(tmp_path):
    """Logs are appended to (a run directory's logs hold every attempt): an old stall is not this job's."""
    old = STALL_LOG
    log_dir = _records(tmp_path, {0: ("vm", 1, old + "ValueError: new failure\n"), 1: ("vm", 0, "")})
    starts = {0: len(old.encode())}
    report = launch.failure_report(log_dir, 1, np=2, this_machine={"vm"}, starts=starts)
    assert report.startswith("rank 0 failed with exit status 1; last lines of"), report
    assert report.splitlines()[1:] == ["  | ValueError: new failure"]
    assert launch.failure_report(log_dir, 1, np=2, this_machine={"vm"}).startswith("rank 1 stalled")


def test_failure_report_when_the_log_is_elsewhere(tmp_path):
    (tmp_path / "rank.3.exit").write_text("2\n")
    report = launch.failure_report(str(tmp_path), 2)
    assert report == f"rank 3 failed with exit status 2; {tmp_path}/rank.3.log is not on this machine " + (
        "(each host keeps its ranks' logs unless the log directory is shared)"
    )


def test_killed_ranks_come_after_the_cause(tmp_path):
    for r, status in ((0, 143), (1, 137), (2, 143)):
        (tmp_path / f"rank.{r}.exit").write_text(f"{status}\n")
    os.utime(tmp_path / "rank.1.exit", ns=(3_000_000_000, 3_000_000_000))  # recorded last, still the cause
    assert launch.failed_ranks(str(tmp_path))[0] == (1, 137)  # SIGKILLed alone: the OOM killer, say


def test_gloo_losing_a_peer_is_a_consequence(tmp_path):
    """Under Gloo the ranks that lose a peer abort (134) with gloo::IoException: the lost host is the cause."""
    io_error = (
        "terminate called after throwing an instance of 'gloo::IoException'\n"
        "  what():  [gloo/transport/tcp/pair.cc:589] Read error [192.0.2.2]:59022: Connection reset by peer\n"
    )
    log_dir = _records(tmp_path, {0: ("node1", 134, io_error), 1: ("node2", None, "started\n")})
    report = launch.failure_report(log_dir, 1, np=2, placement={0: "node1", 1: "node2"}, this_machine={"node1"})
    assert report.startswith(
        "host node2 was lost: rank 1 ran there and left no exit status (killed, or the host went down); then rank 0 "
        "failed (exit status 134); last lines of"
    ), report


def test_a_stopped_job_is_said_to_be_stopped(tmp_path):
    """hvdtrain got SIGTERM (scancel, timeout) and passed it on: no host is called lost for the ranks it killed."""
    log_dir = _records(tmp_path, {0: ("node1", 143, "step 9\n"), 1: ("node2", None, "step 9\n")})
    where = {0: "node1", 1: "node2"}
    report = launch.failure_report(log_dir, 143, np=2, placement=where, this_machine={"node1"}, stopped_by="SIGTERM")
    assert report.splitlines()[0] == (
        f"the job was stopped by SIGTERM; then rank 0 failed (exit status 143); last lines of {tmp_path}/rank.0.log:"
    )
    (tmp_path / "rank.0.exit").unlink()
    nothing = launch.failure_report(log_dir, 143, np=2, placement=where, this_machine={"node1"}, stopped_by="SIGTERM")
    assert nothing == f"the job was stopped by SIGTERM; per-rank logs are in {tmp_path}"
    assert "host node2 was lost" in launch.failure_report(log_dir, 143, np=2, placement=where, this_machine={"node1"})


def test_the_report_says_whose_lines_it_shows(tmp_path):
    """Rank 2 died silently (a segfault before its first line): its empty log is named, then rank 1's lines."""
    peer_gone = "terminate called after throwing an instance of 'gloo::IoException'\n"
    log_dir = _records(tmp_path, {1: ("a", 134, peer_gone), 2: ("b", 139, "")})
    report = launch.failure_report(log_dir, 1, np=3, this_machine={"a"})
    assert report.splitlines()[0] == (
        f"rank 2 failed with exit status 139 (then also ranks 1); rank.2.log is empty; last lines of "
        f"{tmp_path}/rank.1.log:"
    )


def test_sigterm_reaches_the_launcher_behind_a_shell(tmp_path):
    """horovodrun's MPI path is `/bin/sh -c "mpirun ..."`: SIGTERM to hvdtrain must reach mpirun itself (not only
    the shell, which would leave mpirun and the ranks running), and hvdtrain reports the stop."""
    mark = tmp_path / "mpirun-state"
    fake_mpirun = (
        "import os, pathlib, signal, sys, time\n"
        f"mark = pathlib.Path({str(mark)!r})\n"
        "signal.signal(signal.SIGTERM, lambda *a: (mark.write_text('got SIGTERM'), sys.exit(143)))\n"
        "mark.write_text(f'up {os.getpid()}')\n"
        "time.sleep(60)\n"
    )
    (tmp_path / "mpirun.py").write_text(fake_mpirun)
    horovodrun = tmp_path / "horovodrun"
    horovodrun.write_text(f"#!/bin/sh\n{sys.executable} {tmp_path / 'mpirun.py'}\necho after\n")
    horovodrun.chmod(0o755)
    driver = (
        "import sys\nfrom hvdtrain import launch\n"
        f"launch.find_horovodrun = lambda: {str(horovodrun)!r}\n"
        f"spec = launch.make_spec(['true'], np=1, environ={{}}, output_dir={str(tmp_path / 'logs')!r})\n"
        "try:\n    launch.run_job(spec)\nexcept launch.LaunchError as e:\n    sys.exit(f'error: {e}')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (mark.exists() and mark.read_text().startswith("up ")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        mpirun_pid = int(mark.read_text().split()[1])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        if mark.read_text().startswith("up "):  # it was left running: end it (only it: it is ours)
            os.kill(int(mark.read_text().split()[1]), signal.SIGKILL)
    assert mark.read_text() == "got SIGTERM" and mpirun_pid
    assert err.startswith("error: the job was stopped by SIGTERM"), err


def test_mpirun_forwards_the_callers_runtime_environment_to_every_rank():
    """Ranks on other hosts start from sshd's bare environment: PATH (the venv's python), PYTHONPATH and the
    HOROVOD_/NCCL_/OMP_ knobs are passed with -x; unrelated variables are not."""
    environ = {"PATH": "/venv/bin:/usr/bin", "PYTHONPATH": "/repo", "HOROVOD_FUSION_THRESHOLD": "0",
               "NCCL_DEBUG": "INFO", "HOME": "/root", "SSH_AUTH_SOCK": "/tmp/agent", "EDITOR": "vi"}  # fmt: skip
    assert sorted(launch.forwarded_names(environ)) == ["HOROVOD_FUSION_THRESHOLD", "NCCL_DEBUG", "PATH", "PYTHONPATH"]
    s = launch.make_spec(["true"], np=2, hosts="node1:1,node2:1", launcher="mpirun", check_cmd=False, environ={})
    argv = launch.build_mpirun_argv(s, "/l", ["OMP_NUM_THREADS", *launch.forwarded_names(environ), "PATH"], cores=8)
    xs = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert xs == sorted(set(xs)) and "PATH" in xs and "HOME" not in xs, argv
