"""Launching a command on N ranks with horovodrun, mpirun or srun.

Everything that builds a command is a pure function returning ``list[str]``; `run_job` is the only place
that starts the job, and `preflight` (ssh to every other host, before anything is launched) the only other
place that starts processes. Every rank runs under ``python -m hvdtrain.rank`` which writes one log per rank
and records the rank's host and exit status, so a failure can be reported as "rank 1 failed" with its last
lines, "host node2 was lost", or "rank 1 stalled", whichever launcher ran it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional, Sequence

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import LaunchError, UsageError
from hvdtrain.rundir import RankLogs

LAUNCHERS = ("horovodrun", "mpirun", "srun")
UNKNOWN_LAUNCHER = "unknown launcher '{value}'; choose one of {choices}"
_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A network interface name as `ip link` shows it: Linux allows at most 15 bytes and no '/', ':' or spaces;
# we take the portable subset (it also goes unquoted into Open MPI's and horovodrun's argument strings).
_NIC_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
# Variables that every rank needs whatever the launcher.
_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
# --stall-timeout's default. Horovod's own is 0: a rank that stops calling collectives (a deadlock, a rank
# stuck in I/O, a frozen host) makes every other rank wait forever, holding the allocation. 600 s is far
# above the longest legitimate gap between ranks at one collective that we know of (rank 0 writing a large
# checkpoint or evaluating while the others wait at the next allreduce; a slow first batch), and bounds the
# loss to about ten minutes of the job's nodes.
DEFAULT_STALL_TIMEOUT = 600
SSH_CONFIG_ENV = "HVDTRAIN_SSH_CONFIG"
# What the preflight runs on every other host: its name, and its network interfaces (one per line).
PROBE = "hostname; ls /sys/class/net"
SSH_CONNECT_TIMEOUT_S = 10
PREFLIGHT_TIMEOUT_S = 20.0
STOP_GRACE_S = 30.0  # after SIGTERM, how long the launcher may take to end the job before it is SIGKILLed


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    slots: int


@dataclasses.dataclass
class LaunchSpec:
    """What to run and where; built and validated by `make_spec`, turned into argv by `build_argv`."""

    command: list[str]  # the user's command, passed through untouched
    np: int  # number of ranks
    hosts: list[Host]  # empty for srun (Slurm places the ranks)
    launcher: str  # horovodrun | mpirun | srun
    controller: Optional[str]  # "gloo" | "mpi" (always for mpirun/srun) | None (horovodrun's default)
    env: dict[str, str]  # variables set for (and forwarded to) every rank
    output_dir: Optional[str]  # per-rank logs; None -> a temporary directory kept only on failure
    threads_per_rank: Optional[int]  # OMP_NUM_THREADS everywhere; None -> each rank works it out on its host
    nics: list[str] = dataclasses.field(default_factory=list)  # --network-interface; [] -> the launcher's choice
    stall_timeout: int = DEFAULT_STALL_TIMEOUT  # Horovod's stall shutdown, seconds; 0 -> never
    ssh_config: Optional[str] = None  # absolute path of an ssh client config (ssh -F); None -> the user's own
    python: str = sys.executable  # interpreter that runs the rank wrapper


# --------------------------------------------------------------------------------------------------
# Parsing and validation (pure; raise UsageError naming the problem and the fix)
# --------------------------------------------------------------------------------------------------


def _parse_host(token: str, where: str) -> Host:
    name, sep, slots_text = token.strip().rpartition(":")
    if not sep:
        name, slots_text = token.strip(), "1"
    if not name or not _HOST_RE.match(name):
        raise UsageError(f"{where}: bad host '{token}': expected host:slots, e.g. node1:4")
    try:
        slots = int(slots_text)
    except ValueError:
        raise UsageError(f"{where}: bad slot count in '{token}': expected host:slots, e.g. node1:4") from None
    if slots <= 0:
        raise UsageError(f"{where}: host '{name}' has {slots} slots; slots must be at least 1")
    return Host(name, slots)


def _check_duplicates(hosts: Sequence[Host], where: str) -> None:
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise UsageError(f"{where}: host '{h.name}' is listed twice; give each host once with its total slots")
        seen.add(h.name)


def parse_hosts(text: str) -> list[Host]:
    """Parse ``-H host1:4,host2:4`` (a missing `:slots` means 1 slot, as in horovodrun)."""
    tokens = text.split(",")
    if not text.strip() or any(not t.strip() for t in tokens):
        raise UsageError(f"-H: bad host list '{text}': expected host:slots[,host:slots...], e.g. localhost:2")
    hosts = [_parse_host(t, "-H") for t in tokens]
    _check_duplicates(hosts, "-H")
    return hosts


def parse_hostfile(path: str) -> list[Host]:
    """Parse a hostfile of ``host slots=N`` lines (also ``host:N`` or a bare host); `#` starts a comment."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--hostfile: no such file '{path}'; give the path of a file of 'host slots=N' lines")
    hosts = []
    for lineno, raw in enumerate(p.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        fields = line.split()
        if len(fields) == 1:
            hosts.append(_parse_host(fields[0], where))
            continue
        m = re.fullmatch(r"(?:max_)?slots=(-?\d+)", fields[1]) if len(fields) == 2 else None
        if not m or not _HOST_RE.match(fields[0]) or ":" in fields[0]:
            raise UsageError(f"{where}: cannot parse '{raw.strip()}': expected 'host slots=N'")
        slots = int(m.group(1))
        if slots <= 0:
            raise UsageError(f"{where}: host '{fields[0]}' has {slots} slots; slots must be at least 1")
        hosts.append(Host(fields[0], slots))
    if not hosts:
        raise UsageError(f"{path}: the hostfile lists no hosts; add lines like 'localhost slots=2'")
    _check_duplicates(hosts, path)
    return hosts


def parse_env(items: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """``--env NAME=VALUE`` sets a value; ``--env NAME`` forwards the caller's value of NAME."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not _ENV_NAME_RE.match(name):
            raise UsageError(f"--env: bad variable name in '{item}': expected NAME or NAME=VALUE")
        if not sep:
            if name not in environ:
                raise UsageError(f"--env {name}: {name} is not set here; set it or give --env {name}=VALUE")
            value = environ[name]
        out[name] = value
    return out


def parse_nics(text: str) -> list[str]:
    """``--network-interface eth0[,eth1]``: interface names as `ip link` shows them, in order, each once."""
    names = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise UsageError(f"--network-interface: bad list '{text}': expected IFACE[,IFACE...], e.g. eth0")
    for name in names:
        if not _NIC_RE.match(name) or name in (".", ".."):
            raise UsageError(
                f"--network-interface: bad interface name '{name}': expected a name as 'ip link' shows it "
                "(at most 15 letters, digits, '.', '-' or '_'), e.g. eth0"
            )
    return list(dict.fromkeys(names))


def resolve_ssh_config(ssh_config: Optional[str], environ: Mapping[str, str], launcher: str) -> Optional[str]:
    """The ssh client config every ssh of the job uses: --ssh-config, else $HVDTRAIN_SSH_CONFIG, else None (ssh
    reads the user's own). Returned as an absolute path; srun uses no ssh (an explicit --ssh-config is an error,
    the variable is ignored)."""
    given = ssh_config
    where = "--ssh-config"
    if ssh_config is None:
        ssh_config, where = environ.get(SSH_CONFIG_ENV) or None, SSH_CONFIG_ENV
    if ssh_config is None:
        return None
    if launcher == "srun":
        if given is None:
            return None
        raise UsageError("--ssh-config does not apply to srun: Slurm starts the ranks, without ssh")
    path = Path(ssh_config).expanduser()
    if not path.is_file():
        fix = f"or unset {SSH_CONFIG_ENV}" if where == SSH_CONFIG_ENV else "or leave it out to use your own ssh config"
        raise UsageError(
            f"{where}: no such file '{ssh_config}'; give the path of an ssh client config (what 'ssh -F FILE' "
            f"reads), {fix}"
        )
    resolved = str(path.resolve())
    if launcher == "mpirun" and any(c.isspace() for c in resolved):
        raise UsageError(
            f"{where} '{ssh_config}': Open MPI splits its ssh command (plm_rsh_agent) at spaces, so the path "
            "cannot hold one; move or link the file to a path without spaces"
        )
    return resolved


def resolve_launcher(launcher: Optional[str], in_allocation: bool) -> str:
    """The launcher a job uses: the one asked for, else srun inside a Slurm allocation, else horovodrun."""
    if launcher is not None and launcher not in LAUNCHERS:
        raise UsageError("--launcher: " + UNKNOWN_LAUNCHER.format(value=launcher, choices=", ".join(LAUNCHERS)))
    if launcher is None:
        return "srun" if in_allocation else "horovodrun"
    return launcher


def resolve_controller(launcher: str, gloo: bool, mpi: bool, default: Optional[str] = None) -> Optional[str]:
    """Horovod's controller for `launcher`: --gloo or --mpi (exclusive); mpirun and srun start MPI jobs, so
    theirs is always MPI; horovodrun takes `default` (None: horovodrun's own choice, MPI when built with it)."""
    if gloo and mpi:
        raise UsageError("--gloo and --mpi exclude each other: pick one controller")
    if gloo and launcher == "srun":
        raise UsageError("--gloo is not available with srun (no rendezvous server); use --mpi or --launcher horovodrun")
    if gloo and launcher == "mpirun":
        raise UsageError("--gloo needs horovodrun's rendezvous; with --launcher mpirun the controller is MPI")
    if launcher in ("mpirun", "srun"):
        return "mpi"
    return "gloo" if gloo else "mpi" if mpi else default


def _is_python(exe: str) -> bool:
    return re.fullmatch(r"python[0-9.]*", os.path.basename(exe)) is not None


def check_command(command: Sequence[str]) -> None:
    """Fail early on an empty command, or on ``python FILE`` where FILE does not exist."""
    if not command:
        raise UsageError("no command given: put the command after --, e.g. hvdtrain run -np 2 -- python train.py")
    if _is_python(command[0]):
        for arg in command[1:]:
            if arg in ("-m", "-c", "-"):
                return
            if arg.startswith("-"):
                continue
            if not Path(arg).is_file():
                raise UsageError(f"script not found: '{arg}'; check the path (relative paths start from {os.getcwd()})")
            return
    elif shutil.which(command[0]) is None and not Path(command[0]).is_file():
        raise UsageError(f"command not found: '{command[0]}'; check its spelling or give its full path")


def ranks_per_host(np: int, hosts: Sequence[Host]) -> list[int]:
    """How many ranks land on each host when slots are filled in order (horovodrun's and mpirun's -H)."""
    left, out = np, []
    for h in hosts:
        n = min(left, h.slots)
        out.append(n)
        left -= n
    return out


def make_spec(
    command: Sequence[str],
    *,
    np: Optional[int] = None,
    hosts: Optional[str] = None,
    hostfile: Optional[str] = None,
    gloo: bool = False,
    mpi: bool = False,
    launcher: Optional[str] = None,
    env: Sequence[str] = (),
    output_dir: Optional[str] = None,
    threads_per_rank: Optional[int] = None,
    network_interface: Optional[str] = None,
    stall_timeout: Optional[int] = None,
    ssh_config: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    check_cmd: bool = True,
    default_controller: Optional[str] = None,
) -> LaunchSpec:
    """Validate everything the user gave and return a LaunchSpec; raises UsageError before anything runs.
    The launcher and the controller are decided here, once (resolve_launcher, resolve_controller): with
    horovodrun and neither --gloo nor --mpi the controller is `default_controller` (None: horovodrun's).
    What needs the hosts themselves (ssh, their interfaces) is checked by `preflight`."""
    environ = os.environ if environ is None else environ
    command = list(command)
    if check_cmd:
        check_command(command)
    if hosts and hostfile:
        raise UsageError("-H and --hostfile exclude each other: give the hosts one way")
    slurm = SlurmEnv.read(environ)
    launcher = resolve_launcher(launcher, slurm.in_allocation and not (hosts or hostfile))
    controller = resolve_controller(launcher, gloo, mpi, default_controller)
    if np is not None and np <= 0:
        raise UsageError(f"-np {np}: the number of ranks must be at least 1")

    host_list: list[Host] = []
    if launcher == "srun":
        if not slurm.in_allocation:
            raise UsageError(
                "--launcher srun needs a Slurm allocation (no SLURM_JOB_ID here): "
                "use sbatch/salloc or hvdtrain submit, or pick --launcher horovodrun"
            )
        if hosts or hostfile:
            raise UsageError("-H/--hostfile do not apply to srun: Slurm places the ranks of its allocation")
        allocated = slurm.ntasks
        np = allocated if np is None else np
        if np > allocated:
            raise UsageError(
                f"-np {np} is more than the {allocated} tasks of Slurm job {slurm.job_id}; "
                f"ask sbatch for --ntasks={np} or run with -np {allocated}"
            )
    else:
        if hostfile:
            host_list = parse_hostfile(hostfile)
        elif hosts:
            host_list = parse_hosts(hosts)
        elif slurm.in_allocation and np is None:
            np = slurm.ntasks
        if np is None:
            np = sum(h.slots for h in host_list) if host_list else 1
        if not host_list:
            host_list = [Host("localhost", np)]
        total = sum(h.slots for h in host_list)
        if np > total:
            raise UsageError(f"-np {np} is more than the {total} slots given by the hosts; add slots or lower -np")

    extra = parse_env(env, environ)
    if threads_per_rank is not None and threads_per_rank <= 0:
        raise UsageError(f"--threads-per-rank {threads_per_rank}: must be at least 1")
    if "OMP_NUM_THREADS" in extra:
        # The rank wrapper sets OMP_NUM_THREADS; --env OMP_NUM_THREADS=N is taken as --threads-per-rank N.
        value = extra.pop("OMP_NUM_THREADS")
        if threads_per_rank is not None:
            raise UsageError("--env OMP_NUM_THREADS and --threads-per-rank both set the threads; give one")
        if not value.isdigit() or int(value) <= 0:
            raise UsageError(f"--env OMP_NUM_THREADS={value}: must be a whole number of threads, at least 1")
        threads_per_rank = int(value)
    if stall_timeout is None:
        stall_timeout = DEFAULT_STALL_TIMEOUT
    elif stall_timeout < 0:
        raise UsageError(
            f"--stall-timeout {stall_timeout}: give a number of seconds (e.g. {DEFAULT_STALL_TIMEOUT}), or 0 to wait "
            "forever"
        )
    nics = parse_nics(network_interface) if network_interface is not None else []
    return LaunchSpec(
        command=command,
        np=np,
        hosts=host_list,
        launcher=launcher,
        controller=controller,
        env=extra,
        output_dir=output_dir,
        threads_per_rank=threads_per_rank,
        nics=nics,
        stall_timeout=stall_timeout,
        ssh_config=resolve_ssh_config(ssh_config, environ, launcher),
    )


# --------------------------------------------------------------------------------------------------
# argv builders (pure)
# --------------------------------------------------------------------------------------------------


def stall_env(stall_timeout: int) -> dict[str, str]:
    """Horovod's stall inspector for --stall-timeout T (read in Horovod 0.28.1's stall_inspector.cc and
    controller.cc): the coordinator (rank 0) checks every HOROVOD_STALL_CHECK_TIME_SECONDS (W) for tensors that
    some ranks submitted more than W seconds ago and others not, warns, and shuts Horovod down on every rank
    when that lag exceeds HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (T). A shutdown time below the check time turns
    the shutdown off, so W <= T; W = T/2 (at most Horovod's default 60) warns halfway and shuts down between
    T and T + W seconds after the first rank submitted. T = 0: never shut down (Horovod's default)."""
    if stall_timeout == 0:
        return {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "0"}
    check = min(60, max(1, stall_timeout // 2))
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(check), "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(stall_timeout)}


def rank_env(spec: LaunchSpec, is_root: bool) -> dict[str, str]:
    """The variables added to the environment of the launcher and every rank (--env wins over ours)."""
    env = stall_env(spec.stall_timeout)
    if spec.nics and spec.launcher != "horovodrun":  # horovodrun sets these itself from --network-interface
        env["NCCL_SOCKET_IFNAME"] = ",".join(spec.nics)
        if spec.launcher == "srun":  # no mpirun argv to carry them: Open MPI reads OMPI_MCA_* in each rank
            env["OMPI_MCA_btl_tcp_if_include"] = env["OMPI_MCA_oob_tcp_if_include"] = ",".join(spec.nics)
    env.update(spec.env)
    if is_root:
        env.update(_ROOT_ENV)
    return env


def wrapped_command(spec: LaunchSpec, log_dir: str) -> list[str]:
    """Each rank runs the user's command under the rank wrapper (host record, OMP_NUM_THREADS, per-rank log,
    exit record); the one builder of the wrapper's command line."""
    threads = "auto" if spec.threads_per_rank is None else str(spec.threads_per_rank)
    return [spec.python, "-m", "hvdtrain.rank", "--log-dir", log_dir, "--threads", threads, "--", *spec.command]


def _hosts_arg(hosts: Sequence[Host]) -> str:
    return ",".join(f"{h.name}:{h.slots}" for h in hosts)


def build_horovodrun_argv(spec: LaunchSpec, log_dir: str, horovodrun: str = "horovodrun") -> list[str]:
    argv = [horovodrun, "-np", str(spec.np), "-H", _hosts_arg(spec.hosts)]
    if spec.controller:
        argv.append(f"--{spec.controller}")
    if spec.ssh_config:
        # horovodrun caches its ssh and interface checks in ~/.horovod for an hour, keyed by -np, -H, port and
        # identity file but not by the ssh config: a result found with another config would be reused. The
        # preflight has just checked ssh, so the cache saves nothing worth that.
        argv.append("--disable-cache")
    for nic in spec.nics:
        # Gloo: HOROVOD_GLOO_IFACE and the rendezvous address; MPI: -mca btl_tcp_if_include and NCCL_SOCKET_IFNAME.
        argv += ["--network-interface", nic]
    mpi_args = []
    if spec.nics:
        # horovodrun's mpirun gets btl_tcp_if_include but not oob_tcp_if_include: Open MPI's daemons would still
        # talk over any routed interface.
        mpi_args += ["-mca", "oob_tcp_if_include", ",".join(spec.nics)]
    if spec.ssh_config:
        # With tree spawn, Open MPI's daemons start further daemons with a plain `ssh` of their own host, where
        # neither the config nor run_job's ssh wrapper exists: every daemon is started from here instead.
        mpi_args += ["-mca", "plm_rsh_no_tree_spawn", "1"]
    if mpi_args and spec.controller != "gloo":
        argv.append("--mpi-args=" + shlex.join(mpi_args))  # horovodrun pastes it into mpirun's shell command
    # horovodrun forwards the whole environment to the ranks (both controllers), so no -x here.
    return argv + wrapped_command(spec, log_dir)


# What mpirun forwards from the caller's environment besides hvdtrain's own variables: ranks on other hosts
# start from sshd's bare environment, so without these `python` would not be the venv's (horovodrun forwards
# the whole environment itself). Names, and prefixes of names.
_MPIRUN_FORWARD = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "TMPDIR")
_MPIRUN_FORWARD_PREFIXES = ("HOROVOD_", "HVDTRAIN_", "NCCL_", "OMP_", "MKL_", "TORCH_", "CUDA_")


def forwarded_names(environ: Mapping[str, str]) -> list[str]:
    """The caller's variables that mpirun passes on to every rank (-x NAME), wherever it runs."""
    return [k for k in environ if k in _MPIRUN_FORWARD or k.startswith(_MPIRUN_FORWARD_PREFIXES)]


def build_mpirun_argv(
    spec: LaunchSpec, log_dir: str, env_names: Sequence[str], cores: Optional[int] = None
) -> list[str]:
    cores = cores or os.cpu_count() or 1
    argv = ["mpirun", "-np", str(spec.np), "-H", _hosts_arg(spec.hosts)]
    # Horovod's recommended settings: no core binding (its background thread needs a core of its own
    # choosing), slot-order mapping so local ranks are contiguous.
    argv += ["--bind-to", "none", "--map-by", "slot"]
    if max(ranks_per_host(spec.np, spec.hosts)) > cores:
        argv.append("--oversubscribe")
    if spec.nics:
        nics = ",".join(spec.nics)
        argv += ["--mca", "btl_tcp_if_include", nics, "--mca", "oob_tcp_if_include", nics]
    if spec.ssh_config:
        # Open MPI splits the agent at spaces (the path has none: resolve_ssh_config); no tree spawn, so that
        # every daemon is started from here, where the config is (see build_horovodrun_argv).
        argv += ["--mca", "plm_rsh_agent", f"ssh -F {spec.ssh_config}", "--mca", "plm_rsh_no_tree_spawn", "1"]
    for name in sorted(set(env_names)):
        argv += ["-x", name]
    return argv + wrapped_command(spec, log_dir)


def build_srun_argv(spec: LaunchSpec, log_dir: str, mpi_plugin: str = "pmix") -> list[str]:
    # pmix, not pmi2: Debian's OpenMPI is built without Slurm's PMI-2 support.
    return [
        "srun",
        f"--ntasks={spec.np}",
        f"--mpi={mpi_plugin}",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        *wrapped_command(spec, log_dir),
    ]


def build_argv(spec: LaunchSpec, log_dir: str, is_root: bool, horovodrun: Optional[str] = None) -> list[str]:
    if spec.launcher == "horovodrun":
        return build_horovodrun_argv(spec, log_dir, horovodrun or find_horovodrun())
    if spec.launcher == "mpirun":
        return build_mpirun_argv(spec, log_dir, [*rank_env(spec, is_root), *forwarded_names(os.environ)])
    return build_srun_argv(spec, log_dir)


def find_horovodrun() -> str:
    """The horovodrun beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "horovodrun"
    if beside.exists():
        return str(beside)
    return shutil.which("horovodrun") or "horovodrun"


def ssh_shim_script(real_ssh: str, ssh_config: str) -> str:
    """The `ssh` that run_job puts first on horovodrun's PATH when --ssh-config is given: horovodrun (its checks,
    Gloo's rank launches) and the mpirun it starts run plain `ssh` from PATH and take no ssh config."""
    return f'#!/bin/sh\nexec {shlex.quote(real_ssh)} -F {shlex.quote(ssh_config)} "$@"\n'


def placement(spec: LaunchSpec) -> dict[int, str]:
    """rank -> the host (as named in -H/--hostfile) it runs on: horovodrun and mpirun --map-by slot both fill
    the hosts' slots in the order given. Empty for srun, where Slurm places the ranks."""
    if spec.launcher == "srun":
        return {}
    out: dict[int, str] = {}
    for host, count in zip(spec.hosts, ranks_per_host(spec.np, spec.hosts)):
        for _ in range(count):
            out[len(out)] = host.name
    return out


# --------------------------------------------------------------------------------------------------
# Preflight: the hosts themselves (ssh, network interfaces), before anything is launched
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What the preflight learned of one host of -H/--hostfile."""

    name: str  # as given in -H/--hostfile
    local: bool  # this machine: checked here, not over ssh
    hostname: str  # what `hostname` says there
    interfaces: tuple[str, ...]  # /sys/class/net there


def _own_names() -> set[str]:
    name = socket.gethostname()
    names = {"localhost", "127.0.0.1", name, name.split(".")[0]}
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    return names


def interface_addresses() -> dict[str, set[str]]:
    """This machine's interfaces and their IPv4 addresses (psutil, imported here: the CLI imports this module)."""
    import psutil

    return {
        name: {a.address for a in addrs if a.family == socket.AF_INET} for name, addrs in psutil.net_if_addrs().items()
    }


def is_local_host(name: str, by_name: bool = True) -> bool:
    """Whether `name` is this machine: localhost, 127.0.0.1, this host's name (short or full) when `by_name`,
    or a name that resolves to an IPv4 address of one of this machine's interfaces. horovodrun decides by the
    address alone (network.filter_local_addresses), so pass by_name=False to agree with it."""
    if name in ("localhost", "127.0.0.1") or (by_name and name in _own_names()):
        return True
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return False
    return any(address in addresses for addresses in interface_addresses().values())


def local_interfaces() -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir("/sys/class/net")))
    except OSError:
        return ()


def ssh_command(host: str, ssh_config: Optional[str], ssh: str = "ssh") -> list[str]:
    """The preflight's probe of one host: non-interactive (a password prompt would hang), bounded connect."""
    config = ["-F", ssh_config] if ssh_config else []
    options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}"]
    return [ssh, *config, *options, host, PROBE]


def parse_probe(name: str, stdout: str) -> HostFacts:
    """HostFacts from the probe's output: the host name on the first line, then one interface per line."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    hostname = lines[0] if lines else name
    return HostFacts(name, False, hostname, tuple(sorted(lines[1:])))


def ssh_error_line(stderr: str, returncode: int) -> str:
    """ssh's own error: the last line of its stderr that is not a warning (e.g. 'Permanently added')."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("Warning:")] or lines
    return errors[-1] if errors else f"ssh exited with status {returncode} and said nothing"


def probe_host(name: str, ssh_config: Optional[str], ssh: str, timeout: float) -> HostFacts | str:
    """Run the probe on `name` over ssh: its HostFacts, or the line that says why it failed."""
    try:
        proc = subprocess.run(
            ssh_command(name, ssh_config, ssh), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return f"cannot run {ssh}: {e.strerror}"
    if proc.returncode == 255:  # ssh's own failure (connection, authentication, host key)
        return ssh_error_line(proc.stderr, proc.returncode)
    if proc.returncode != 0:
        return f"'{PROBE}' failed there: {ssh_error_line(proc.stderr, proc.returncode)}"
    return parse_probe(name, proc.stdout)


def unreachable_message(failures: Mapping[str, str], ssh_config: Optional[str]) -> str:
    """One line for the hosts ssh could not reach (in the order given): each with ssh's own words, then the fix."""
    names = list(failures)
    ssh = f"ssh -F {ssh_config}" if ssh_config else "ssh"
    hint = "" if ssh_config else " (or give --ssh-config)"
    if len(names) == 1:
        host = names[0]
        return (
            f"cannot reach host {host} over ssh: {failures[host]}; check that {host} is up and that "
            f"'{ssh} {host}' works without a password{hint}"
        )
    detail = "; ".join(f"{host}: {failures[host]}" for host in names)
    return (
        f"cannot reach hosts {', '.join(names)} over ssh: {detail}; check that they are up and that "
        f"'{ssh} HOST' works without a password for each{hint}"
    )


def check_interfaces(nics: Sequence[str], facts: Sequence[HostFacts], here: Optional[HostFacts] = None) -> None:
    """Every host (and `here`, this machine when it runs no rank: the ranks reach the launcher through the same
    interface) has every interface of --network-interface; raises UsageError naming each host that lacks one."""
    if not nics:
        return
    checked = [*facts, *([here] if here else [])]
    problems = []
    for f in checked:
        missing = [n for n in nics if n not in f.interfaces]
        if missing:
            who = f"host {f.name}" if f is not here else f"this machine ({f.hostname}), where the launcher runs,"
            has = ", ".join(f.interfaces) or "none in /sys/class/net"
            problems.append(f"{who} has no interface {', '.join(missing)} (it has {has})")
    if not problems:
        return
    common = set.intersection(*(set(f.interfaces) for f in checked))
    if any(not f.local for f in checked):
        common.discard("lo")  # the loopback reaches no other host
    fix = f"pick one every host has: {', '.join(sorted(common))}" if common else "no interface is on every host"
    raise UsageError(f"--network-interface {','.join(nics)}: {'; '.join(problems)}; {fix}")


def preflight(spec: LaunchSpec, timeout: float = PREFLIGHT_TIMEOUT_S) -> list[HostFacts]:
    """Check the hosts before anything is launched: every host of -H/--hostfile that is not this machine answers
    a non-interactive ssh (in parallel, each bounded by `timeout`), and every host has the interfaces of
    --network-interface (this machine's from /sys/class/net, the others' from the same ssh). Raises UsageError
    naming every host that fails; returns what was learned, in host order. Nothing to do for srun."""
    if spec.launcher == "srun" or not spec.hosts:
        return []
    by_name = spec.launcher != "horovodrun"
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(spec.hosts))) as pool:
        local = dict(zip([h.name for h in spec.hosts], pool.map(lambda h: is_local_host(h.name, by_name), spec.hosts)))
        remote = [name for name, is_here in local.items() if not is_here]
        ssh = shutil.which("ssh") if remote else None
        if remote and ssh is None:
            raise UsageError(
                f"ssh is not installed here, and hosts {', '.join(remote)} are reached with it; install the "
                "OpenSSH client"
            )
        answers = dict(zip(remote, pool.map(lambda name: probe_host(name, spec.ssh_config, ssh, timeout), remote)))
    failures = {name: answer for name, answer in answers.items() if isinstance(answer, str)}
    if failures:
        raise UsageError(unreachable_message(failures, spec.ssh_config))
    this = HostFacts("localhost", True, socket.gethostname(), local_interfaces() if spec.nics else ())
    facts = [dataclasses.replace(this, name=h.name) if local[h.name] else answers[h.name] for h in spec.hosts]
    check_interfaces(spec.nics, facts, None if any(local.values()) else this)
    if spec.nics and spec.launcher in ("horovodrun", "mpirun"):
        _check_launcher_addresses(spec, all(local.values()))
    return facts


def _check_launcher_addresses(spec: LaunchSpec, all_local: bool) -> None:
    """What the launcher needs of --network-interface on this machine. All hosts here: horovodrun then keeps
    only interfaces holding 127.0.0.1 (driver_service.get_local_interfaces) and fails without one. Otherwise
    the ranks connect back to this machine through the interface (Gloo's rendezvous server, Open MPI's
    out-of-band channel), so it needs an IPv4 address here."""
    addresses = interface_addresses()
    nics = ",".join(spec.nics)
    if all_local:
        if spec.launcher == "horovodrun" and not any("127.0.0.1" in addresses.get(n, ()) for n in spec.nics):
            loopback = sorted(n for n, a in addresses.items() if "127.0.0.1" in a) or ["lo"]
            raise UsageError(
                f"--network-interface {nics}: every host is this machine, and then horovodrun only takes an "
                f"interface holding 127.0.0.1 (here: {', '.join(loopback)}); give --network-interface "
                f"{loopback[0]}, leave the option out, or use --launcher mpirun"
            )
        return
    bare = [n for n in spec.nics if not addresses.get(n)]
    if bare:
        usable = sorted(n for n, a in addresses.items() if a and "127.0.0.1" not in a)
        raise UsageError(
            f"--network-interface {nics}: this machine ({socket.gethostname()}) has no IPv4 address on "
            f"{', '.join(bare)}, and the ranks connect back to the launcher through it; pick an interface with "
            f"an address{' (here: ' + ', '.join(usable) + ')' if usable else ''}"
        )


# --------------------------------------------------------------------------------------------------
# After a failure: what the rank records say (pure but for reading the log directory)
# --------------------------------------------------------------------------------------------------

# A rank whose log ends with one of these failed because another rank did: Horovod shuts down everywhere, or
# Gloo's transport lost a peer ("terminate called after throwing an instance of 'gloo::IoException'",
# "Connection reset by peer": the rank aborts, 134, when another rank or its host went away).
_CONSEQUENCES = ("Horovod has been shut down", "HorovodInternalError", "HorovodShutdownError", "gloo::IoException")
# Exit statuses of a rank the launcher (or a scheduler) ended with a signal after something else went wrong.
# SIGKILL is not here: a wrapper that records 137 saw its command killed alone, typically by the OOM killer.
_KILLED = {128 + int(signal.SIGTERM), 128 + int(signal.SIGINT), 128 + int(signal.SIGHUP)}
# Horovod 0.28.1's stall report (stall_inspector.cc), logged by the coordinator, rank 0:
#   [<time>: E .../stall_inspector.cc:105] One or more tensors were submitted ... for more than W seconds. ...
#   Missing ranks:
#   1!: [allreduce.grad.3, allreduce.grad.4 ...]     (rank, "!" when past the shutdown time, <= 6 names + " ...")
#   One or more rank (marked by "!") is stalled for longer than T seconds. Will shutdown.
_STALL_SHUTDOWN_RE = re.compile(r"is stalled for longer than (\d+) seconds\. Will shutdown\.")
_STALL_RANK_RE = re.compile(r"^(\d+)(!?): \[(.*)\]\s*$")
_LOG_TAIL_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class RankRecord:
    """What the rank wrapper left for one rank: the host it started on, and its exit status."""

    rank: int
    host: Optional[str] = None  # rank.R.host; None: no record here (not started, or logs on another host)
    status: Optional[int] = None  # rank.R.exit; None: the wrapper never finished (killed, or its host is gone)
    when: int = 0  # the exit record's mtime, ns
    consequence: bool = False  # it failed because another rank did, or was killed by the launcher


@dataclasses.dataclass(frozen=True)
class Stall:
    """Horovod's stall shutdown, as rank 0 logged it."""

    shutdown_s: int  # T: the stall lasted longer than this
    missing: dict[int, tuple[str, ...]]  # every rank listed -> the tensors it had not submitted ("..." when cut)
    stalled: tuple[int, ...]  # the ranks marked "!": past the shutdown time, the cause of the shutdown


def _read_tail(path: Path, start: int = 0, limit: int = _LOG_TAIL_BYTES) -> str:
    """The end of a log, at most `limit` bytes and nothing before byte `start` (where this job's part begins:
    the wrapper appends, so a log kept in --output-dir or a run directory also holds earlier jobs)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def tail(path: Path, n: int = 15, start: int = 0) -> list[str]:
    return _read_tail(path, start).splitlines()[-n:]


def log_sizes(log_dir: str) -> dict[int, int]:
    """rank -> size of its log now: run_job takes it before launching, so that the report reads this job's part."""
    out = {}
    for p in Path(log_dir).glob("rank.*.log"):
        try:
            out[int(p.name.split(".")[1])] = p.stat().st_size
        except (ValueError, IndexError, OSError):
            continue
    return out


def read_records(log_dir: str, starts: Optional[Mapping[int, int]] = None) -> dict[int, RankRecord]:
    """Every rank with a host or exit record in `log_dir` (`starts`: where this job's part of each log begins)."""
    starts = starts or {}
    logs = RankLogs(log_dir)
    hosts: dict[int, str] = {}
    for rank, p in logs.host_records():
        try:
            hosts[rank] = p.read_text().strip() or "?"
        except OSError:
            continue
    exits: dict[int, tuple[int, int]] = {}
    for rank, p in logs.exit_records():
        try:
            exits[rank] = int(p.read_text().strip()), p.stat().st_mtime_ns
        except (ValueError, OSError):
            continue
    out = {}
    for rank in sorted(set(hosts) | set(exits)):
        status, when = exits.get(rank, (None, 0))
        consequence = False
        if status not in (None, 0):
            last = "\n".join(tail(logs.log(rank), 5, starts.get(rank, 0)))
            consequence = status in _KILLED or any(marker in last for marker in _CONSEQUENCES)
        out[rank] = RankRecord(rank, hosts.get(rank), status, when, consequence)
    return out


def failed_ranks(log_dir: str, starts: Optional[Mapping[int, int]] = None) -> list[tuple[int, int]]:
    """(rank, exit status) of every rank whose wrapper recorded a non-zero exit, the likely cause first.

    When one rank raises, Horovod shuts down and the other ranks fail too ("Horovod has been shut down"), or the
    launcher ends them (SIGTERM: 143), sometimes before the first one has finished exiting: ranks whose last
    lines show only that consequence, or that were killed so, come after the others; then the order of the exit
    records, then the rank."""
    return [(r.rank, r.status) for r in _failed(read_records(log_dir, starts).values())]


def _failed(records: Collection[RankRecord]) -> list[RankRecord]:
    failed = [r for r in records if r.status not in (None, 0)]
    return sorted(failed, key=lambda r: (r.consequence, r.when, r.rank))


def parse_stall(text: str) -> Optional[Stall]:
    """The last stall shutdown Horovod reported in `text` (a rank's log), or None."""
    lines = text.splitlines()
    for end in range(len(lines) - 1, -1, -1):
        m = _STALL_SHUTDOWN_RE.search(lines[end])
        if not m:
            continue
        missing: dict[int, tuple[str, ...]] = {}
        stalled = []
        i = end - 1
        while i >= 0 and (row := _STALL_RANK_RE.match(lines[i].strip())):
            names = [n.strip() for n in row.group(3).split(", ")]
            if names and names[-1].endswith(" ..."):
                names[-1:] = [names[-1][: -len(" ...")], "..."]
            missing[int(row.group(1))] = tuple(names)
            if row.group(2):
                stalled.append(int(row.group(1)))
            i -= 1
        if i >= 0 and lines[i].rstrip().endswith("Missing ranks:") and stalled:
            return Stall(int(m.group(1)), missing, tuple(sorted(stalled)))
    return None


def find_stall(log_dir: str, ranks: Collection[int], starts: Optional[Mapping[int, int]] = None) -> Optional[Stall]:
    """Horovod's stall shutdown from this job's part of the rank logs: rank 0's (the coordinator logs it), then
    the others'."""
    starts = starts or {}
    for rank in sorted(set(ranks) | {0}):
        stall = parse_stall(_read_tail(RankLogs(log_dir).log(rank), starts.get(rank, 0)))
        if stall:
            return stall
    return None


def _ranks(ranks: Sequence[int]) -> str:
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}"


def describe_stall(stall: Stall, all_ranks: Collection[int]) -> str:
    """`rank 1 stalled: rank 0 waited more than 30 s for it to submit allreduce.grad.3 (Horovod's stall
    shutdown, --stall-timeout 30)`; stalled ranks that missed the same tensors are named together."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for rank in stall.stalled:
        groups.setdefault(stall.missing[rank], []).append(rank)
    parts = []
    for tensors, stalled in groups.items():
        named = {t for t in tensors if t != "..."}
        waiting = sorted(r for r in all_ranks if not named & set(stall.missing.get(r, ())))
        it = "it" if len(stalled) == 1 else "them"
        what = ", ".join(tensors).replace(", ...", " ...")
        if waiting:
            parts.append(
                f"{_ranks(stalled)} stalled: {_ranks(waiting)} waited more than {stall.shutdown_s} s for {it} to "
                f"submit {what}"
            )
        else:
            parts.append(f"{_ranks(stalled)} stalled: {what} waited more than {stall.shutdown_s} s")
    return "; ".join(parts) + f" (Horovod's stall shutdown, --stall-timeout {stall.shutdown_s})"


def lost_hosts(
    records: Mapping[int, RankRecord],
    placement: Optional[Mapping[int, str]] = None,
    this_machine: Collection[str] = (),
    explained: Collection[int] = (),
) -> list[tuple[str, list[int]]]:
    """The hosts that were lost, each with its ranks: (host, ranks), in host order of their first rank.

    A rank counts when it has a host record (it started, and its records are visible here) and is not
    `explained` otherwise (a stalled rank, killed by the launcher after Horovod's stall shutdown). It runs on
    the host `placement` gives (the -H name; the records' host names where there is none, as with srun). A host
    is lost when
      * every counted rank there lacks an exit record: the wrappers never finished, which only SIGKILL or the
        host going away does, and
      * no rank anywhere failed on its own account (a non-zero exit that is neither Horovod's shutdown nor a
        SIGTERM/SIGINT/SIGHUP from the launcher): when one rank fails by itself the launcher ends the others,
        and a wrapper it SIGKILLs leaves no exit record either; with one rank per host that looks exactly like
        a lost host, and the rank's own failure is the better explanation, so no host is called lost, and
      * the host is not this machine (hvdtrain runs here: ranks here without a record were killed, not lost).
    With no exit record anywhere (everything killed or gone), every other host with ranks is lost."""
    placement = placement or {}
    counted = [r for r in records.values() if r.host is not None and r.rank not in explained]
    if any(r.status not in (None, 0) and not r.consequence for r in records.values() if r.rank not in explained):
        return []
    by_host: dict[str, list[RankRecord]] = {}
    for r in sorted(counted, key=lambda r: r.rank):
        by_host.setdefault(placement.get(r.rank) or r.host, []).append(r)
    return [
        (host, [r.rank for r in ranks])
        for host, ranks in by_host.items()
        if host not in this_machine and all(r.status is None for r in ranks)
    ]


def failure_report(
    log_dir: str,
    status: int,
    np: Optional[int] = None,
    placement: Optional[Mapping[int, str]] = None,
    this_machine: Optional[Collection[str]] = None,
    starts: Optional[Mapping[int, int]] = None,
    stopped_by: Optional[str] = None,
) -> str:
    """A message naming what went wrong first, from the wrappers' records, and the last lines of the log that
    shows it best. In order: Horovod's stall shutdown (the stalled ranks first: they never exit by themselves and
    are killed by the launcher, so their own records say little); lost hosts (`lost_hosts`); then the ranks
    that failed (`failed_ranks` order). A lone failure reads as before:
    `rank 1 failed with exit status 1 (then also ranks 0); last lines of DIR/rank.1.log:` and the lines.
    `np`: the job's ranks; `placement`: rank -> host name (`placement`); `this_machine`: names of this host;
    `starts`: where this job's part of each log begins (`log_sizes` before the launch); `stopped_by`: the signal
    hvdtrain got and passed on (then that is the cause, and no host is called lost: the stop killed its ranks)."""
    starts = starts or {}
    records = read_records(log_dir, starts)
    all_ranks = set(range(np)) if np else set(records)
    stall = find_stall(log_dir, all_ranks | set(records), starts)
    explained = set(stall.stalled) if stall else set()
    here = {socket.gethostname()} if this_machine is None else set(this_machine)
    lost = [] if stopped_by else lost_hosts(records, placement, here, explained)
    failed = [r for r in _failed(records.values()) if r.rank not in explained]
    causes = [describe_stall(stall, all_ranks | set(stall.missing))] if stall else []
    if stopped_by:
        causes.append(f"the job was stopped by {stopped_by}")
    causes += [
        f"host {host} was lost: {_ranks(ranks)} ran there and left no exit status (killed, or the host went down)"
        for host, ranks in lost
    ]
    if failed and causes:
        statuses = ", ".join(str(r.status) for r in failed)
        exit_words = f"exit status {statuses}" if len(failed) == 1 else f"exit statuses {statuses}"
        causes.append(f"then {_ranks([r.rank for r in failed])} failed ({exit_words})")
    elif failed:
        first, others = failed[0], ", ".join(str(r.rank) for r in failed[1:])
        causes.append(
            f"rank {first.rank} failed with exit status {first.status}"
            + (f" (then also ranks {others})" if others else "")
        )
    if not causes:
        return f"the job failed with exit status {status}; per-rank logs are in {log_dir}"
    shown = [
        *(stall.stalled if stall else ()),
        *(r.rank for r in failed),
        *(rank for _, ranks in lost for rank in ranks),
    ]
    if not shown:  # stopped, and no rank recorded a failure
        return f"{'; '.join(causes)}; per-rank logs are in {log_dir}"
    logs = RankLogs(log_dir)
    rank = next((r for r in shown if tail(logs.log(r), 1, starts.get(r, 0))), shown[0])
    log, lines = logs.log(rank), tail(logs.log(rank), start=starts.get(rank, 0))
    first = logs.log(shown[0])
    missing = (
        "is empty"
        if first.exists()
        else "is not on this machine (each host keeps its ranks' logs unless the log directory is shared)"
    )
    if not lines:
        return f"{'; '.join(causes)}; {first} {missing}"
    if rank != shown[0]:
        causes.append(f"{first.name} {missing}")
    body = "\n".join(f"  | {line}" for line in lines)
    return f"{'; '.join(causes)}; last lines of {log}:\n{body}"


# --------------------------------------------------------------------------------------------------
# Running (the only part that starts the job)
# --------------------------------------------------------------------------------------------------


def describe(argv: Sequence[str], env: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """What --dry-run prints: notes (as # comments), the environment additions, then the exact command."""
    lines = [f"# {note}" for note in notes] + [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    return "\n".join([*lines, shlex.join(argv)])


def _make_ssh_shim(spec: LaunchSpec, path: str) -> Optional[str]:
    """A temporary directory holding an executable `ssh` that runs the real one with -F <ssh config>; None when
    there is no config, no horovodrun, or no ssh to wrap (then nothing is reached over ssh anyway)."""
    real_ssh = shutil.which("ssh", path=path) if spec.ssh_config and spec.launcher == "horovodrun" else None
    if real_ssh is None:
        return None
    shim = tempfile.mkdtemp(prefix="hvdtrain-ssh-")
    script = Path(shim) / "ssh"
    script.write_text(ssh_shim_script(real_ssh, spec.ssh_config))
    script.chmod(0o755)
    return shim


def _signal_tree(pid: int, signum: int) -> list:
    """Send `signum` to process `pid` and every process under it; returns them (psutil.Process). The launcher
    may not be the process that tears the job down: horovodrun's MPI path execs `/bin/sh -c "mpirun ..."`, and a
    signal to that shell alone kills the shell and leaves mpirun and the ranks running."""
    import psutil  # lazily: the CLI imports this module

    try:
        top = psutil.Process(pid)
        tree = [top, *top.children(recursive=True)]
    except psutil.Error:
        return []
    for p in tree:
        try:
            p.send_signal(signum)
        except psutil.Error:
            pass
    return tree


def _reap(processes: list, timeout: float) -> None:
    """Wait for `processes` to end, at most `timeout` seconds, then SIGKILL what is left."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _this_machine(hosts: Collection[str]) -> set[str]:
    return {socket.gethostname()} | {h for h in hosts if is_local_host(h)}


def run_job(spec: LaunchSpec, dry_run: bool = False, echo: Callable[[str], None] = print) -> int:
    """Run the job (or print it with dry_run); returns the job's exit status, raising LaunchError on failure.

    The launcher's own stderr goes to our stdout with the ranks' output (the wrapper merges each rank's), so
    stderr carries hvdtrain's own message only, whatever the launcher prints on its way out."""
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if sys.stdout.isatty() and "HVDTRAIN_TTY" not in spec.env:
        # The ranks' stdout is a pipe whatever happens; tell them a person is watching (progress bars).
        spec = dataclasses.replace(spec, env={**spec.env, "HVDTRAIN_TTY": "1"})
    extra = rank_env(spec, is_root)
    keep_logs = spec.output_dir is not None
    log_dir = spec.output_dir or tempfile.mkdtemp(prefix="hvdtrain-logs-")
    argv = build_argv(spec, os.path.abspath(log_dir), is_root)
    if dry_run:
        notes = []
        if spec.ssh_config and spec.launcher == "horovodrun":
            notes.append(f"horovodrun runs with an 'ssh' first on its PATH that is: ssh -F {spec.ssh_config}")
        echo(describe(argv, extra, notes))
        if not keep_logs:
            os.rmdir(log_dir)
        return 0
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    logs = RankLogs(log_dir)
    stops: list[str] = []
    stopping: list = []
    for _rank, stale in [*logs.exit_records(), *logs.host_records()]:
        stale.unlink()
    starts = log_sizes(log_dir)
    env = {**os.environ, **extra}
    shim = _make_ssh_shim(spec, env.get("PATH", os.defpath))
    if shim:
        env["PATH"] = shim + os.pathsep + env.get("PATH", os.defpath)
    try:
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.STDOUT, start_new_session=False)

        # Ctrl-C reaches the launcher from the terminal by itself; USR1/USR2 (preemption warnings) are passed on
        # to it, and it passes them to the ranks; SIGTERM (a scheduler, timeout) goes to the launcher's whole local
        # process tree (_signal_tree), waited for below. A stop (TERM, INT) is remembered: the report then says
        # so instead of guessing from the records.
        def forward(signum, _frame):
            if signum in (signal.SIGTERM, signal.SIGINT):
                stops.append(signal.Signals(signum).name)
            if signum == signal.SIGTERM:
                stopping.extend(_signal_tree(proc.pid, signum))
            elif signum != signal.SIGINT:
                proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, forward)
        try:
            status = proc.wait()
            if stopping:  # let mpirun (or horovodrun) finish ending the ranks, so that their records are there
                _reap(stopping[1:], STOP_GRACE_S)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        if shim:
            shutil.rmtree(shim, ignore_errors=True)
    if status != 0:
        where = placement(spec)
        here = _this_machine(set(where.values()))
        report = failure_report(log_dir, status, spec.np, where, here, starts, stops[0] if stops else None)
        raise LaunchError(report, status if status > 0 else 128 - status)
    if keep_logs:
        echo(f"per-rank logs: {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0
