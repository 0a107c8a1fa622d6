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
from fakempi import MPICH_4_0_2, OPEN_MPI_4_1_4, make_fake_launcher
from launchspecs import spec_of

from hvdtrain.errors import LaunchError, UsageError
from hvdtrain.launching import argv as launch_argv
from hvdtrain.launching import spec as launch_spec
from hvdtrain.launching import supervise
from hvdtrain.launching.argv import (
    build_horovodrun_argv,
    build_mpiexec_argv,
    build_mpirun_argv,
    build_srun_argv,
    forwarded_names,
    placement,
    rank_env,
    stall_env,
    wrapped_command,
)
from hvdtrain.launching.hosts import Host, parse_hostfile, parse_hosts, ranks_per_host
from hvdtrain.launching.options import DEFAULT_STALL_TIMEOUT
from hvdtrain.launching.preflight import ssh_shim_args
from hvdtrain.launching.spec import parse_nics
from hvdtrain.launching.supervise import run_job

NO_SLURM: dict = {}


def spec(command=("python", "-c", "pass"), environ=NO_SLURM, **kw):
    return spec_of(command, environ=environ, **kw)


# --- hosts ----------------------------------------------------------------------------------------


def test_parse_hosts():
    assert parse_hosts("a:2,b.example.org:4,c") == [
        Host("a", 2),
        Host("b.example.org", 4),
        Host("c", 1),
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
        parse_hosts(text)


def test_parse_hostfile(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\n\nnode1 slots=4  # big one\nnode2 slots=2\nnode3:3\nnode4\n")
    assert parse_hostfile(str(f)) == [
        Host("node1", 4),
        Host("node2", 2),
        Host("node3", 3),
        Host("node4", 1),
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
        parse_hostfile(str(f))


def test_missing_hostfile(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        parse_hostfile(str(tmp_path / "nope"))


# --- spec validation --------------------------------------------------------------------------------


def test_defaults():
    s = spec(np=2)
    assert (s.np, s.hosts, s.launcher, s.controller) == (2, [Host("localhost", 2)], "mpirun", "mpi")
    s = spec(np=2, launcher="horovodrun")
    assert (s.launcher, s.controller) == ("horovodrun", None)  # horovodrun's own choice


def test_default_launcher_is_horovodrun_where_it_adds_something(monkeypatch):
    """mpirun for a static job on this machine; horovodrun for Gloo, elastic, or hosts that are not this machine
    (its ssh and interface checks); srun inside an allocation; horovodrun when there is no mpirun."""
    here = socket.gethostname()
    assert spec(np=2, hosts=f"localhost:1,127.0.0.1:1,{here}:1").launcher == "mpirun"
    assert spec(np=2, mpi=True).launcher == "mpirun"
    assert spec(np=2, gloo=True).launcher == "horovodrun"
    assert spec(np=2, hosts="localhost:1,n2:1").launcher == "horovodrun"
    assert spec(np=2, hosts="n1:1,n2:1", mpi=True).launcher == "horovodrun"
    assert spec(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}).launcher == "srun"
    monkeypatch.setattr(launch_spec.shutil, "which", lambda name: None)
    assert spec(np=2).launcher == "horovodrun"


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


ALLOCATION = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "node[01-02]",
              "SLURM_TASKS_PER_NODE": "2(x2)"}  # fmt: skip


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_inside_an_allocation_its_hosts_without_a_hostfile(launcher):
    """mpirun or horovodrun inside an allocation, no -H: the allocation's hosts and tasks (SLURM_JOB_NODELIST,
    SLURM_TASKS_PER_NODE), not this machine alone; -np within them. Given hosts win."""
    s = spec(environ=ALLOCATION, launcher=launcher)
    assert (s.np, s.hosts) == (4, [Host("node01", 2), Host("node02", 2)])
    assert placement(spec(environ=ALLOCATION, launcher=launcher, np=3)) == {0: "node01", 1: "node01", 2: "node02"}
    with pytest.raises(UsageError, match="-np 5 is more than the 4 tasks of Slurm job 7"):
        spec(environ=ALLOCATION, launcher=launcher, np=5)
    assert spec(environ=ALLOCATION, launcher=launcher, hosts="a:1").hosts == [Host("a", 1)]
    # Slurm did not say its hosts (the batch step always does): this machine, as before.
    assert spec(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, launcher=launcher).hosts == [Host("localhost", 2)]


def test_an_allocations_hostlist_that_does_not_parse_is_one_line():
    with pytest.raises(UsageError, match=r"SLURM_JOB_NODELIST 'node\[02-01\]' is not a Slurm host list"):
        spec(environ={**ALLOCATION, "SLURM_JOB_NODELIST": "node[02-01]"}, launcher="mpirun")


def test_srun_gets_the_chosen_plugin_and_the_jobs_cpus_per_task(srun_offers):
    """srun's --mpi from srunmpi (pmix here: srun offers it, Open MPI speaks it), asked for by --mpi-plugin,
    HVDTRAIN_SRUN_MPI or SLURM_MPI_TYPE; SRUN_CPUS_PER_TASK from the job's --cpus-per-task (Slurm >= 22.05's srun no
    longer takes it by itself) unless set."""
    assert srun_offers == ("pmix", "none", "cray_shasta", "pmi2", "pmix_v4")
    s = spec(environ={**ALLOCATION, "SLURM_CPUS_PER_TASK": "2"})
    assert s.mpi_plugin == "pmix" and "--mpi=pmix" in build_srun_argv(s, "/l")
    assert s.env == {"SRUN_CPUS_PER_TASK": "2"} and rank_env(s, False, {})["SRUN_CPUS_PER_TASK"] == "2"
    assert spec(environ={**ALLOCATION, "SLURM_CPUS_PER_TASK": "2", "SRUN_CPUS_PER_TASK": "1"}).env == {}
    assert spec(environ=ALLOCATION).env == {}
    assert spec(environ=ALLOCATION, mpi_plugin="pmix_v4").mpi_plugin == "pmix_v4"
    assert spec(environ={**ALLOCATION, "HVDTRAIN_SRUN_MPI": "pmi2"}).mpi_plugin == "pmi2"
    assert spec(environ={**ALLOCATION, "SLURM_MPI_TYPE": "none"}).mpi_plugin == "none"
    assert spec(environ={**ALLOCATION, "SLURM_MPI_TYPE": "none"}, mpi_plugin="pmix").mpi_plugin == "pmix"
    assert launch_spec.make_spec(["python", "-c", "pass"], environ=ALLOCATION, mpi_flavour="mpich").mpi_plugin == "pmi2"
    assert spec(environ=ALLOCATION, launcher="mpirun").mpi_plugin is None


def test_srun_plugin_follows_the_mpi_on_path(fake_mpich):
    """Nobody says which MPI: the one on PATH does (an MPICH module: pmi2), as in the job scripts' choice."""
    assert launch_spec.make_spec(["python", "-c", "pass"], environ=ALLOCATION).mpi_plugin == "pmi2"


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"environ": ALLOCATION, "mpi_plugin": "pmi3"}, "srun's MPI plugin 'pmi3' is not offered here"),
        ({"environ": {**ALLOCATION, "HVDTRAIN_SRUN_MPI": "pmix_v9"}}, "'pmix_v9' is not offered here"),
        ({"environ": ALLOCATION, "mpi_plugin": "PMI 2"}, "--mpi-plugin 'PMI 2': not an MPI plugin's name"),
        ({"environ": ALLOCATION, "mpi_plugin": "pmi2", "launcher": "mpirun"}, "--mpi-plugin applies to srun only"),
        ({"mpi_plugin": "pmix", "np": 2}, "--mpi-plugin applies to srun only"),
    ],
)
def test_srun_plugin_rejects(kw, needle):
    with pytest.raises(UsageError, match=needle):
        spec(**kw)


def test_ranks_per_host_and_placement():
    assert ranks_per_host(5, [Host("a", 2), Host("b", 4)]) == [2, 3]
    assert placement(spec(np=5, hosts="a:2,b:4")) == {0: "a", 1: "a", 2: "b", 3: "b", 4: "b"}
    assert placement(spec(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})) == {}


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
    argv = build_horovodrun_argv(s, "/logs dir", "horovodrun")
    assert argv == [
        "horovodrun", "-np", "3", "-H", "n1:2,n2:2", "--gloo",
        "/venv/bin/python", "-m", "hvdtrain.launching.rank", "--log-dir", "/logs dir", "--threads", "2", "--", *HOSTILE,
    ]  # fmt: skip
    # The displayed form round-trips through a shell unchanged.
    assert shlex.split(shlex.join(argv)) == argv


def test_mpirun_argv():
    s = spec(HOSTILE, np=4, env=["NCCL_DEBUG=INFO"], threads_per_rank=1)
    s.python = "/venv/bin/python"
    names = rank_env(s, is_root=True, environ={}).keys()
    argv = build_mpirun_argv(s, "/logs", names, cores=2)
    assert argv == [
        "mpirun", "-np", "4", "-H", "localhost:4", "--bind-to", "none", "--map-by", "slot", "--tag-output",
        "--oversubscribe",
        "-x", "HOROVOD_STALL_CHECK_TIME_SECONDS", "-x", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "-x", "NCCL_DEBUG",
        "-x", "OMPI_ALLOW_RUN_AS_ROOT", "-x", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "-x", "OMPI_MCA_mpi_yield_when_idle",
        "/venv/bin/python", "-m", "hvdtrain.launching.rank", "--log-dir", "/logs", "--threads", "1", "--", *HOSTILE,
    ]  # fmt: skip
    assert "--oversubscribe" not in build_mpirun_argv(s, "/logs", names, cores=8)


def test_srun_argv():
    s = spec(HOSTILE, environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
    s.python = "/venv/bin/python"
    assert build_srun_argv(s, "/l") == [
        "srun", "--ntasks=2", "--mpi=pmix", "--kill-on-bad-exit=1", "--export=ALL",
        "/venv/bin/python", "-m", "hvdtrain.launching.rank", "--log-dir", "/l", "--threads", "auto", "--", *HOSTILE,
    ]  # fmt: skip


def test_rank_env():
    s = spec(np=2, threads_per_rank=3, env=["X=1"])
    stall = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600"}
    yield_ = {"OMPI_MCA_mpi_yield_when_idle": "1"}  # MPI's waits give the core away now and then
    assert rank_env(s, is_root=False, environ={}) == {**stall, **yield_, "X": "1"}
    assert rank_env(s, is_root=True)["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    # --env wins over hvdtrain's own settings, and so does the caller's environment over its MPI defaults.
    mine = spec(np=2, env=["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=5", "OMPI_MCA_mpi_yield_when_idle=0"])
    assert rank_env(mine, is_root=False)["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "5"
    assert rank_env(mine, is_root=False, environ={})["OMPI_MCA_mpi_yield_when_idle"] == "0"
    exported = rank_env(s, is_root=False, environ={"OMPI_MCA_mpi_yield_when_idle": "0"})
    assert "OMPI_MCA_mpi_yield_when_idle" not in exported  # the exported 0 reaches the ranks as it is
    elastic = spec(elastic=True, min_np=1, host_discovery_script="/bin/true", network_interface="lo")
    for no_mpi in (spec(np=2, gloo=True), elastic):
        assert "OMPI_MCA_mpi_yield_when_idle" not in rank_env(no_mpi, is_root=False, environ={})


# --- network interfaces ---------------------------------------------------------------------------


def test_parse_nics():
    assert parse_nics("eth0, ib0,eth0") == ["eth0", "ib0"]
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
    assert build_horovodrun_argv(hr, "/l", "horovodrun") == [
        "horovodrun", "-np", "2", "-H", "n1:1,n2:1", "--network-interface", "eth0", "--network-interface", "ib0",
        "--mpi-args=-mca oob_tcp_if_include eth0,ib0",
        "/py", "-m", "hvdtrain.launching.rank", "--log-dir", "/l", "--threads", "1", "--", *HOSTILE,
    ]  # fmt: skip
    gloo = spec(np=2, hosts="n1:1,n2:1", network_interface="eth0", gloo=True)
    assert not any(a.startswith("--mpi-args") for a in build_horovodrun_argv(gloo, "/l"))
    mp = spec(HOSTILE, np=2, hosts="n1:1,n2:1", network_interface="eth0,ib0", launcher="mpirun", threads_per_rank=1)
    mp.python = "/py"
    names = rank_env(mp, is_root=False, environ={}).keys()
    assert build_mpirun_argv(mp, "/l", names, cores=8) == [
        "mpirun", "-np", "2", "-H", "n1:1,n2:1", "--bind-to", "none", "--map-by", "slot", "--tag-output",
        "--mca", "btl_tcp_if_include", "eth0,ib0", "--mca", "oob_tcp_if_include", "eth0,ib0",
        "-x", "HOROVOD_STALL_CHECK_TIME_SECONDS", "-x", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
        "-x", "NCCL_SOCKET_IFNAME", "-x", "OMPI_MCA_mpi_yield_when_idle",
        "/py", "-m", "hvdtrain.launching.rank", "--log-dir", "/l", "--threads", "1", "--", *HOSTILE,
    ]  # fmt: skip
    assert rank_env(mp, is_root=False)["NCCL_SOCKET_IFNAME"] == "eth0,ib0"
    srun = spec(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, network_interface="ib0")
    env = rank_env(srun, is_root=False)
    assert (env["OMPI_MCA_btl_tcp_if_include"], env["OMPI_MCA_oob_tcp_if_include"]) == ("ib0", "ib0")
    assert "OMPI_MCA_btl_tcp_if_include" not in rank_env(hr, is_root=False)  # horovodrun's own business


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
    argv = build_horovodrun_argv(s, "/l", "horovodrun")
    args, mpirun = _horovodrun_would_run(argv, monkeypatch)
    assert args.nics == {"eth0", "ib0"} and args.disable_cache
    assert args.command == wrapped_command(s, "/l")
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
    assert spec(np=2, ssh_config=str(spaced), gloo=True).ssh_config.endswith("a b.ssh")  # horovodrun: the shim
    with pytest.raises(UsageError, match="splits its ssh command"):
        spec(np=2, ssh_config=str(spaced))  # mpirun


def test_ssh_config_argv(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("")
    s = spec(np=2, hosts="n1:1,n2:1", ssh_config=str(config), launcher="mpirun")
    argv = build_mpirun_argv(s, "/l", [], cores=8)
    agent = argv.index("plm_rsh_agent")
    assert argv[agent - 1 : agent + 5] == [
        "--mca", "plm_rsh_agent", f"ssh -F {config}", "--mca", "plm_rsh_no_tree_spawn", "1",
    ]  # fmt: skip
    hr = build_horovodrun_argv(dataclasses.replace(s, launcher="horovodrun", controller=None), "/l")
    assert "--disable-cache" in hr and "--mpi-args=-mca plm_rsh_no_tree_spawn 1" in hr
    assert "--disable-cache" not in build_horovodrun_argv(spec(np=2), "/l")


def test_run_job_puts_the_ssh_shim_first_on_horovodruns_path(tmp_path, fake_ssh, monkeypatch):
    """horovodrun runs `ssh` from PATH: under run_job that is the shim, which adds -F; no shim is left after."""
    config = tmp_path / "ssh_config"
    config.write_text("")
    horovodrun = tmp_path / "horovodrun"
    horovodrun.write_text(
        '#!/bin/sh\nssh node2 true >/dev/null && echo "$PATH" > "$(dirname "$0")/path"\n'
        'while [ $# -gt 0 ]; do [ "$1" = --log-dir ] && echo 0 > "$2/rank.0.exit"; shift; done\n'
    )
    horovodrun.chmod(0o755)
    monkeypatch.setattr(launch_argv, "find_horovodrun", lambda: str(horovodrun))
    monkeypatch.setattr(supervise.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    s = spec(np=2, hosts="node2:2", ssh_config=str(config), output_dir=str(tmp_path / "logs"))
    assert run_job(s, echo=lambda _: None) == 0
    assert fake_ssh.read_text() == f"-F {config} node2 true\n"
    shim_dir = (tmp_path / "path").read_text().split(os.pathsep)[0]
    assert Path(shim_dir).name.startswith("hvdtrain-ssh-") and not Path(shim_dir).exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_launcher_that_says_success_without_starting_a_rank_fails(tmp_path, monkeypatch):
    """srun exits 0 when a step is aborted before its tasks launch: no rank record at all is a failure."""
    horovodrun = tmp_path / "horovodrun"
    horovodrun.write_text("#!/bin/sh\necho 'srun: error: task 0 launch failed: Unspecified error'\nexit 0\n")
    horovodrun.chmod(0o755)
    monkeypatch.setattr(launch_argv, "find_horovodrun", lambda: str(horovodrun))
    with pytest.raises(LaunchError, match=r"horovodrun exited with status 0 but no rank started \(no rank records"):
        run_job(spec(np=2, launcher="horovodrun", output_dir=str(tmp_path / "logs")), echo=lambda _: None)


def test_dry_run_names_the_ssh_shim(tmp_path, capsys):
    config = tmp_path / "ssh_config"
    config.write_text("")
    run_job(spec(np=2, hosts="node2:2", ssh_config=str(config), output_dir=str(tmp_path)), dry_run=True)
    assert f"# horovodrun runs with an 'ssh' first on its PATH that is: ssh -F {config}" in capsys.readouterr().out


# --- stall timeout ----------------------------------------------------------------------------------


def test_stall_env():
    assert stall_env(600) == {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600",
    }
    assert stall_env(30) == {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "15",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30",
    }
    assert stall_env(1) == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "1", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "1"}
    assert stall_env(0) == {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "0"}
    for t in range(1, 2000):  # Horovod turns the shutdown off when it comes before the check
        env = stall_env(t)
        assert 1 <= int(env["HOROVOD_STALL_CHECK_TIME_SECONDS"]) <= t
    assert spec(np=2).stall_timeout == DEFAULT_STALL_TIMEOUT == 600
    assert spec(np=2, stall_timeout=0).stall_timeout == 0
    with pytest.raises(UsageError, match="--stall-timeout -5: give a number of seconds"):
        spec(np=2, stall_timeout=-5)


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
        "import sys\nfrom hvdtrain.errors import LaunchError\nfrom hvdtrain.launching import argv, supervise\n"
        "from hvdtrain.launching.options import LaunchOptions\nfrom hvdtrain.launching.spec import make_spec\n"
        f"argv.find_horovodrun = lambda: {str(horovodrun)!r}\n"
        f"spec = make_spec(['true'], LaunchOptions(np=1, launcher='horovodrun', output_dir={str(tmp_path / 'logs')!r}), "
        "environ={})\n"
        "try:\n    supervise.run_job(spec)\nexcept LaunchError as e:\n    sys.exit(f'error: {e}')\n"
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
    assert sorted(forwarded_names(environ)) == ["HOROVOD_FUSION_THRESHOLD", "NCCL_DEBUG", "PATH", "PYTHONPATH"]
    s = spec_of(["true"], np=2, hosts="node1:1,node2:1", launcher="mpirun", check_cmd=False, environ={})
    argv = build_mpirun_argv(s, "/l", ["OMP_NUM_THREADS", *forwarded_names(environ), "PATH"], cores=8)
    xs = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert xs == sorted(set(xs)) and "PATH" in xs and "HOME" not in xs, argv


# --- MPICH's mpiexec (Hydra) for launcher mpirun ------------------------------------------------------------------


def test_the_mpi_on_path_decides_mpiruns_command_line(fake_mpich):
    """--launcher mpirun keeps its name; what starts the ranks is the MPI on PATH, asked what it is."""
    s = spec(HOSTILE, np=4, hosts="n1:2,n2:2", env=["NCCL_DEBUG=INFO"], threads_per_rank=1, network_interface="eth0",
             launcher="mpirun")  # fmt: skip
    assert (s.launcher, s.mpi.flavour, s.mpi.label, s.hydra) == ("mpirun", "mpich", "MPICH (Hydra) 4.0.2", True)
    s.python = "/venv/bin/python"
    names = rank_env(s, is_root=True, environ={}).keys()
    argv = build_mpiexec_argv(s, "/logs", names)
    assert argv == [
        str(fake_mpich), "-n", "4", "-hosts", "n1:2,n2:2", "-bind-to", "none", "-prepend-rank", "-iface", "eth0",
        "-genvlist", "HOROVOD_STALL_CHECK_TIME_SECONDS,HOROVOD_STALL_SHUTDOWN_TIME_SECONDS,NCCL_DEBUG,NCCL_SOCKET_IFNAME",
        "/venv/bin/python", "-m", "hvdtrain.launching.rank", "--log-dir", "/logs", "--threads", "1", "--", *HOSTILE,
    ]  # fmt: skip
    assert shlex.split(shlex.join(argv)) == argv
    built = launch_argv.build_argv(s, "/logs", is_root=True)
    assert built[:6] == argv[:6] and built[-len(HOSTILE) - 8 :] == argv[-len(HOSTILE) - 8 :]
    genv = built[built.index("-genvlist") + 1].split(",")
    assert {"PATH", "HVDTRAIN_LAUNCHER", "HVDTRAIN_LAUNCHED"} <= set(genv) and not [n for n in genv if "OMPI" in n]
    assert placement(s) == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}  # Hydra fills each host's count in order


def test_an_mpich_job_gets_no_open_mpi_variable_even_as_root(fake_mpich):
    s = spec(np=2, network_interface="eth0")
    for is_root in (True, False):
        env = rank_env(s, is_root=is_root, environ={})
        assert env == {**stall_env(DEFAULT_STALL_TIMEOUT), "NCCL_SOCKET_IFNAME": "eth0"}, env
    assert "OMPI_MCA_mpi_yield_when_idle" not in launch_argv.mpi_defaults(s, {})


def test_open_mpi_on_path_keeps_open_mpis_command_line(tmp_path, monkeypatch):
    make_fake_launcher(tmp_path / "bin", "mpirun", OPEN_MPI_4_1_4)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    s = spec(np=2)
    assert (s.mpi.flavour, s.mpi.path, s.hydra) == ("openmpi", str(tmp_path / "bin" / "mpirun"), False)
    assert launch_argv.build_argv(s, "/l", is_root=False)[:3] == ["mpirun", "-np", "2"]
    assert rank_env(s, is_root=True, environ={})["OMPI_MCA_mpi_yield_when_idle"] == "1"


def test_hydra_takes_one_interface_and_unknown_mpis_are_refused(fake_mpich, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match=r"eth0,ib0: MPICH \(Hydra\) 4.0.2's mpiexec \(Hydra\) takes one interface"):
        spec(np=2, network_interface="eth0,ib0")
    assert spec(np=2, network_interface="eth0,ib0", gloo=True).mpi is None  # horovodrun: not asked
    make_fake_launcher(tmp_path / "other", "mpirun", "mpirun (Foo MPI) 1.0\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'other'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(
        UsageError, match=r"mpirun is no MPI launcher hvdtrain knows: .* printed 'mpirun \(Foo MPI\) 1.0'"
    ):
        spec(np=2)


def test_ssh_config_reaches_hydras_ssh_through_the_shim(fake_mpich, tmp_path, capsys):
    """Hydra starts its proxies with `ssh` from PATH (-launcher-exec takes no arguments): the ssh shim, -F config."""
    config = tmp_path / "ssh_config"
    config.write_text("")
    s = spec(np=2, hosts="n1:1,n2:1", ssh_config=str(config), launcher="mpirun")
    argv = build_mpiexec_argv(s, "/l", [])
    assert argv[argv.index("-launcher") : argv.index("-launcher") + 2] == ["-launcher", "ssh"]
    assert "-genvlist" not in argv
    assert ssh_shim_args(s) == ["-F", str(config)]
    run_job(dataclasses.replace(s, output_dir=str(tmp_path / "logs")), dry_run=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# mpirun: MPICH (Hydra) 4.0.2 ({fake_mpich.parent / 'mpirun'} -> {fake_mpich})"
    assert out[1] == f"# mpirun runs with an 'ssh' first on its PATH that is: ssh -F {config}"
    assert out[-1].startswith(f"{fake_mpich} -n 2 -hosts n1:1,n2:1 -bind-to none -prepend-rank -launcher ssh")


def stand_in(path: Path, version: str, np_flag: str, command_at: str, rank_vars: str, end: str) -> Path:
    """A launcher that says it is `version` and runs its command (from `command_at`, an index into its arguments)
    on `np_flag` ranks, each with its rank and the size in <rank_vars>_RANK and _SIZE, waits for them (`status`:
    the largest exit status), then runs the statement `end`."""
    make_fake_launcher(path.parent, path.name, "")
    path.write_text(
        f"#!{sys.executable}\nimport os, subprocess, sys, time\n"
        f"if sys.argv[1:] == ['--version']:\n    sys.exit(print({version!r}, end=''))\n"
        f"args = sys.argv[1:]\nn = int(args[args.index({np_flag!r}) + 1])\ncommand = args[{command_at} :]\n"
        f"ranks = [subprocess.Popen(command, env={{**os.environ, '{rank_vars}_RANK': str(r), '{rank_vars}_SIZE': "
        f"str(n)}}) for r in range(n)]\nstatus = max(p.wait() for p in ranks)\n{end}\n"
    )
    return path


@pytest.mark.parametrize("says", ["the worst", "0"])
def test_under_hydra_a_rank_that_exits_non_zero_ends_the_job_as_mpirun_would(tmp_path, monkeypatch, says):
    """MPICH's mpiexec ends a job only when an MPI process dies before MPI_Finalize (or of a signal); run_job ends
    it when a rank's exit record says it failed, and the job's status is that rank's, whatever mpiexec says (0 now
    and then after a Ctrl-C). The stand-in runs every rank as Hydra does (PMI_RANK, PMI_SIZE) and waits for all of
    them, whatever they do."""
    hydra = stand_in(tmp_path / "bin" / "mpiexec.hydra", MPICH_4_0_2, "-n", "args.index('-genvlist') + 2", "PMI",
                     f"sys.exit({'status' if says != '0' else '0'})")  # fmt: skip
    (hydra.parent / "mpirun").symlink_to(hydra.name)
    monkeypatch.setenv("PATH", f"{hydra.parent}{os.pathsep}{os.environ['PATH']}")
    job = "import os, sys, time\nif os.environ['PMI_RANK'] == '1':\n    sys.exit('rank 1 gives up')\ntime.sleep(60)\n"
    s = spec([sys.executable, "-c", job], np=2, output_dir=str(tmp_path / "logs"))
    assert s.hydra
    start = time.monotonic()
    with pytest.raises(LaunchError) as e:
        run_job(s, echo=lambda _: None)
    assert time.monotonic() - start < 15
    assert e.value.exit_code == 1 and str(e.value).startswith("rank 1 failed with exit status 1 (then also ranks 0)")
    assert (tmp_path / "logs" / "rank.0.exit").read_text() == "143\n"  # ended, not left to sleep
    quick = [sys.executable, "-c", "import os, sys; sys.exit(int(os.environ['PMI_RANK']))"]  # rank 1 exits 1 at once
    monkeypatch.setattr(supervise, "RANK_POLL_S", 60.0)  # over before run_job looks: only the records tell
    with pytest.raises(LaunchError, match="^rank 1 failed with exit status 1"):
        run_job(spec(quick, np=2, output_dir=str(tmp_path / "quick")), echo=lambda _: None)


def test_a_launcher_lingering_after_its_ranks_ended_is_ended(tmp_path, monkeypatch):
    """Every rank has ended, one failed, and the launcher does not exit (horovodrun's Gloo path once lingered 104 s
    so): run_job ends it LINGER_S later, and the job's status and report are the failed rank's. The stand-in is an
    Open MPI mpirun that runs the ranks as mpirun does (OMPI_COMM_WORLD_RANK) and then sleeps."""
    mpirun = stand_in(tmp_path / "bin" / "mpirun", OPEN_MPI_4_1_4, "-np", "args.index('-m') - 1", "OMPI_COMM_WORLD",
                      "time.sleep(600)")  # fmt: skip
    monkeypatch.setenv("PATH", f"{mpirun.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(supervise, "LINGER_S", 2.0)
    job = "import os, sys\nsys.exit(3 if os.environ['OMPI_COMM_WORLD_RANK'] == '1' else 0)\n"
    s = spec([sys.executable, "-c", job], np=2, output_dir=str(tmp_path / "logs"), launcher="mpirun")
    assert s.mpi.flavour == "openmpi" and not s.hydra
    start = time.monotonic()
    with pytest.raises(LaunchError) as e:
        run_job(s, echo=lambda _: None)
    assert 2.0 <= time.monotonic() - start < 15
    assert e.value.exit_code == 3 and str(e.value).startswith("rank 1 failed with exit status 3")
    ok = "import sys\nsys.exit(0)\n"  # every rank succeeded: a launcher taking its time is left to finish
    monkeypatch.setattr(supervise, "LINGER_S", 0.0)
    mpirun.write_text(mpirun.read_text().replace("time.sleep(600)", "time.sleep(2)"))
    assert run_job(spec([sys.executable, "-c", ok], np=2, output_dir=str(tmp_path / "ok"), launcher="mpirun"),
                   echo=lambda _: None) == 0  # fmt: skip
