"""Launching a command on N ranks with horovodrun, mpirun or srun.

The user's launch options become a validated LaunchSpec (`make_spec`); everything that builds a command from it
is a pure function returning ``list[str]``; `run_job` is the only place that starts the job. Every rank runs
under ``python -m hvdtrain.rank``, which writes one log per rank and records the rank's host and exit status.
What concerns the hosts before the launch (the ssh preflight, the ssh shim) is `hvdtrain.hosts`; reading the
rank records after a failure ("rank 1 failed", "host node2 was lost", "rank 1 stalled") is `hvdtrain.failures`.
"""

from __future__ import annotations

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
from hvdtrain.failures import diagnose, log_sizes
from hvdtrain.hosts import is_local_host, make_ssh_shim
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
    return _host(name, slots, where)


def _host(name: str, slots: int, where: str) -> Host:
    """A Host of -H or a hostfile line (`where`), which must have at least one slot."""
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
        hosts.append(_host(fields[0], int(m.group(1)), where))
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
    What needs the hosts themselves (ssh, their interfaces) is checked by `hosts.preflight`."""
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
# Running (the only part that starts the job)
# --------------------------------------------------------------------------------------------------


def describe(argv: Sequence[str], env: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """What --dry-run prints: notes (as # comments), the environment additions, then the exact command."""
    lines = [f"# {note}" for note in notes] + [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    return "\n".join([*lines, shlex.join(argv)])


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
    shim = make_ssh_shim(spec, env.get("PATH", os.defpath))
    if shim:
        env["PATH"] = shim + os.pathsep + env.get("PATH", os.defpath)
    import psutil  # noqa: F401  (here, not in a signal handler: an import there can be interrupted by the next signal)

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
                if stopping:  # a second SIGTERM (Slurm sends one per step and one to the batch shell): once is enough
                    return
                stopping.extend(_signal_tree(proc.pid, signum) or [None])
            elif signum != signal.SIGINT:
                proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, forward)
        try:
            status = proc.wait()
            if stopping:  # let mpirun (or horovodrun) finish ending the ranks, so that their records are there
                _reap([p for p in stopping[1:] if p is not None], STOP_GRACE_S)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        if shim:
            shutil.rmtree(shim, ignore_errors=True)
    if status != 0:
        where = placement(spec)
        here = _this_machine(set(where.values()))
        found = diagnose(log_dir, status, spec.np, where, here, starts, stops[0] if stops else None)
        raise LaunchError(found.message, status if status > 0 else 128 - status, found.cause)
    if keep_logs or any(is_local_host(h.name) for h in spec.hosts):
        # Where the records must be (a chosen directory, or ranks on this machine): a launcher that says success
        # although no rank started (srun does, when a step is aborted before its tasks launch) is a failure.
        if not any(True for _ in logs.exit_records()) and not any(True for _ in logs.host_records()):
            raise LaunchError(
                f"{spec.launcher} exited with status 0 but no rank started (no rank records in {log_dir}); see "
                f"{spec.launcher}'s messages above"
            )
    if keep_logs:
        echo(f"per-rank logs: {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0
