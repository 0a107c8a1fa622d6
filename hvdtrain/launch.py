"""Launching a command on N ranks with horovodrun, mpirun or srun.

The user's launch options become a validated LaunchSpec (`make_spec`); everything that builds a command from it
is a pure function returning ``list[str]``; `run_job` is the only place that starts the job. Every rank runs
under ``python -m hvdtrain.rank``, which writes one log per rank and records the rank's host and exit status.
What concerns the hosts before the launch (the ssh preflight, the ssh shim) is `hvdtrain.hosts`; reading the
rank records after a failure ("rank 1 failed", "host node2 was lost", "rank 1 stalled") is `hvdtrain.failures`.

An elastic job (`--elastic`, LaunchSpec.elastic) is horovodrun's elastic mode under the Gloo controller: its
driver runs a host discovery every second (the user's --host-discovery-script, or ``python -m hvdtrain.discover
FILE`` for a --hosts-file) and starts, and restarts, workers between --min-np and --max-np as hosts come and go.
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
import time
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional, Sequence

from hvdtrain import procs, startup
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import LaunchError, UsageError
from hvdtrain.failures import diagnose, diagnose_elastic, log_sizes, worker_log_sizes
from hvdtrain.hosts import is_local_host, make_ssh_shim, ssh_shim_args
from hvdtrain.rundir import RankLogs

LAUNCHERS = ("horovodrun", "mpirun", "srun")
UNKNOWN_LAUNCHER = "unknown launcher '{value}'; choose one of {choices}"
_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A network interface name as `ip link` shows it: Linux allows at most 15 bytes and no '/', ':' or spaces;
# we take the portable subset (it also goes unquoted into Open MPI's and horovodrun's argument strings).
_NIC_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
# Variables that every rank needs whatever the launcher.
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
# --stall-timeout's default. Horovod's own is 0: a rank that stops calling collectives (a deadlock, a rank
# stuck in I/O, a frozen host) makes every other rank wait forever, holding the allocation. 600 s is far
# above the longest legitimate gap between ranks at one collective that we know of (rank 0 writing a large
# checkpoint or evaluating while the others wait at the next allreduce; a slow first batch), and bounds the
# loss to about ten minutes of the job's nodes.
DEFAULT_STALL_TIMEOUT = 600
SSH_CONFIG_ENV = "HVDTRAIN_SSH_CONFIG"
STOP_GRACE_S = 30.0  # after SIGTERM, how long the launcher may take to end the job before it is SIGKILLed
# Elastic jobs: horovodrun's own default for --elastic-timeout (elastic/driver.py ELASTIC_TIMEOUT_SECS, unless
# $HOROVOD_ELASTIC_TIMEOUT), and the range its blacklist cooldown accepts (elastic/discovery.py; outside it, its
# discovery thread raises when it first meets a host).
DEFAULT_ELASTIC_TIMEOUT = 600
COOLDOWN_LIMITS = (1, 3600)
# What run_job keeps of an elastic launcher's output (the failure report reads horovodrun's own lines in it).
ELASTIC_OUTPUT_LINES = 300


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    slots: int


@dataclasses.dataclass(frozen=True)
class ElasticSpec:
    """How an elastic job finds its hosts and how far it may shrink or grow (horovodrun's elastic arguments)."""

    min_np: int  # fewest ranks it trains with; below, it waits `timeout` for hosts
    max_np: Optional[int]  # most ranks; None: unbounded
    discovery: str  # the shell command horovodrun runs every second: prints one 'host[:slots]' line per host
    hosts_file: Optional[str] = None  # --hosts-file (absolute), read by `discovery`; None: --host-discovery-script
    slots_per_host: int = 1  # slots of a host listed without a count
    timeout: Optional[int] = None  # --elastic-timeout, seconds; None: horovodrun's ($HOROVOD_ELASTIC_TIMEOUT, 600)
    reset_limit: Optional[int] = None  # resets after which the job ends; None: no limit
    cooldown_range: Optional[tuple[int, int]] = None  # seconds a failed host stays blacklisted; None: for good


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
    # An elastic job (horovodrun, Gloo): np is the number it starts with, hosts what --hosts-file listed when the
    # job was made (empty for a discovery script): the discovery decides while it runs.
    elastic: Optional[ElasticSpec] = None
    warnings: tuple[str, ...] = ()  # legal but rarely meant (e.g. far more ranks than cores): said, not refused
    roles: tuple[str, ...] = ()  # what each rank is (a pipeline's stage and replica): a failure report names it


# --------------------------------------------------------------------------------------------------
# Parsing and validation (pure; raise UsageError naming the problem and the fix)
# --------------------------------------------------------------------------------------------------


IPV6_HOSTS = (
    "IPv6 addresses cannot be passed on: horovodrun and mpirun split host lists at ':'; give the host a name "
    "(in /etc/hosts or ~/.ssh/config) or use its IPv4 address"
)


def _is_ipv6(token: str) -> bool:
    """An IPv6 address, bracketed or not, with or without a :slots suffix."""
    import ipaddress

    token = token.strip()
    for candidate in (token, token.rpartition(":")[0]):
        try:
            ipaddress.IPv6Address(candidate.removeprefix("[").removesuffix("]"))
            return True
        except ValueError:
            pass
    return "[" in token


def _parse_host(token: str, where: str) -> Host:
    if _is_ipv6(token):
        raise UsageError(f"{where}: bad host '{token.strip()}': {IPV6_HOSTS}")
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
    hosts = parse_hostfile_text(p.read_text(), path)
    if not hosts:
        raise UsageError(f"{path}: the hostfile lists no hosts; add lines like 'localhost slots=2'")
    return hosts


def parse_hostfile_text(text: str, path: str, slots_per_host: int = 1) -> list[Host]:
    """The hosts of a hostfile's text (`path` names it in errors): ``host slots=N``, ``host:N`` or a bare
    ``host`` (`slots_per_host` slots) a line, `#` comments, blank lines; each host once."""
    hosts = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        fields = line.split()
        if _is_ipv6(fields[0]):
            raise UsageError(f"{where}: bad host '{fields[0]}': {IPV6_HOSTS}")
        if len(fields) == 1:
            host = _parse_host(fields[0], where)
            hosts.append(host if ":" in fields[0] else _host(host.name, slots_per_host, where))
            continue
        m = re.fullmatch(r"(?:max_)?slots=(-?\d+)", fields[1]) if len(fields) == 2 else None
        if not m or not _HOST_RE.match(fields[0]) or ":" in fields[0]:
            raise UsageError(f"{where}: cannot parse '{raw.strip()}': expected 'host slots=N'")
        hosts.append(_host(fields[0], int(m.group(1)), where))
    _check_duplicates(hosts, path)
    return hosts


def parse_hosts_file(path: str, slots_per_host: int = 1) -> list[Host]:
    """An elastic job's --hosts-file, as `parse_hostfile` reads a hostfile, but it may be empty (the job waits for
    hosts) and a host name cannot hold ':' (horovodrun splits each discovered line at ':')."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(
            f"--hosts-file: no such file '{path}'; give the path of a file of 'host:slots' or 'host slots=N' lines"
        ) from None
    except OSError as e:
        raise UsageError(f"--hosts-file: cannot read '{path}': {e.strerror}") from None
    hosts = parse_hostfile_text(text, path, slots_per_host)
    for h in hosts:
        if ":" in h.name:
            raise UsageError(f"{path}: bad host '{h.name}': horovodrun reads 'host:slots', so a name cannot hold ':'")
    return hosts


def parse_discovered(text: str, where: str, slots_per_host: int = 1) -> list[Host]:
    """The hosts a discovery script printed: one ``host`` or ``host:slots`` line per host (blank lines skipped),
    as horovodrun reads them. `where` names the script in errors."""
    hosts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)(?::(\d+))?", line)
        if not m:
            raise UsageError(
                f"{where} printed '{line.strip()}': expected one 'host' or 'host:slots' line per host, e.g. node1:4"
            )
        hosts.append(_host(m.group(1), int(m.group(2)) if m.group(2) else slots_per_host, where))
    _check_duplicates(hosts, where)
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


def resolve_launcher(launcher: Optional[str], in_allocation: bool, horovodrun_adds: bool = True) -> str:
    """The launcher a job uses: the one asked for; else srun inside a Slurm allocation; else horovodrun where it
    adds something (`horovodrun_adds`: see horovodrun_adds); else mpirun when it is on PATH. mpirun starts a static
    job on this machine in the time plain mpirun takes; horovodrun, which runs that same mpirun after importing
    itself and checking the hosts, takes about 2.5 s longer (docs/performance.md, "Launch")."""
    if launcher is not None and launcher not in LAUNCHERS:
        raise UsageError("--launcher: " + UNKNOWN_LAUNCHER.format(value=launcher, choices=", ".join(LAUNCHERS)))
    if launcher is None:
        if in_allocation:
            return "srun"
        return "horovodrun" if horovodrun_adds or shutil.which("mpirun") is None else "mpirun"
    return launcher


def horovodrun_adds(gloo: bool, elastic: bool, hosts: Sequence[Host]) -> bool:
    """Whether horovodrun brings something a job needs: Gloo's rendezvous (--gloo), elastic training, or for hosts
    other than this machine its own checks (ssh to each, the interfaces they have in common, which it gives MPI).
    A host counts as this machine by its name alone here (localhost, 127.0.0.1, this host's name): no DNS."""
    if gloo or elastic:
        return True
    here = socket.gethostname()
    return any(h.name not in ("localhost", "127.0.0.1", here, here.split(".")[0]) for h in hosts)


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


def _elastic_only(**given) -> None:
    """Elastic options given without --elastic: one line naming them."""
    names = ["--" + name.replace("_", "-") for name, value in given.items() if value is not None]
    if names:
        what = f"{names[0]} is an elastic option" if len(names) == 1 else f"{', '.join(names)} are elastic options"
        raise UsageError(f"{what}: add --elastic for elastic training, or drop {'it' if len(names) == 1 else 'them'}")


def _check_elastic_launch(hosts: Optional[str], hostfile: Optional[str], launcher: Optional[str], mpi: bool) -> None:
    """What an elastic job cannot be launched with: fixed hosts, MPI, a launcher other than horovodrun."""
    if hosts or hostfile:
        raise UsageError(
            f"{'-H' if hosts else '--hostfile'} does not apply to --elastic: list the hosts in --hosts-file FILE (a "
            "file hvdtrain re-reads while the job runs: edit it to add or remove hosts), or give "
            "--host-discovery-script"
        )
    needs = "--elastic needs Horovod's Gloo controller (horovodrun's rendezvous, which elastic training runs on)"
    if mpi:
        raise UsageError(f"{needs}: drop --mpi")
    if launcher in ("mpirun", "srun"):
        raise UsageError(f"{needs}, which {launcher} does not start: drop --launcher {launcher}")


def make_elastic(
    np: Optional[int],
    *,
    min_np: Optional[int] = None,
    max_np: Optional[int] = None,
    host_discovery_script: Optional[str] = None,
    hosts_file: Optional[str] = None,
    slots_per_host: Optional[int] = None,
    elastic_timeout: Optional[int] = None,
    reset_limit: Optional[int] = None,
    blacklist_cooldown_range: Optional[Sequence[int]] = None,
) -> tuple[ElasticSpec, int, list[Host]]:
    """The elastic options checked: (ElasticSpec, the number of ranks the job starts with, the hosts the
    --hosts-file lists now, [] for a discovery script). -np defaults to --min-np, --min-np to -np, else 1."""
    if host_discovery_script is not None and hosts_file is not None:
        raise UsageError("--host-discovery-script and --hosts-file exclude each other: give the hosts one way")
    if host_discovery_script is None and hosts_file is None:
        raise UsageError(
            "--elastic needs its hosts: --hosts-file FILE ('host:slots' lines, re-read while the job runs) or "
            "--host-discovery-script FILE (a program that prints them)"
        )
    slots = 1 if slots_per_host is None else slots_per_host
    if slots < 1:
        raise UsageError(f"--slots-per-host {slots}: must be at least 1")
    if min_np is not None and min_np < 1:
        raise UsageError(f"--min-np {min_np}: the fewest ranks to train with must be at least 1")
    if max_np is not None and max_np < 1:
        raise UsageError(f"--max-np {max_np}: the most ranks must be at least 1 (or leave it out: no limit)")
    given_min = min_np
    min_np = min_np if min_np is not None else np if np is not None else 1
    np = min_np if np is None else np
    if max_np is not None and max_np < min_np:
        if given_min is None:  # --min-np is -np's
            raise UsageError(
                f"-np {np} is more than --max-np {max_np}: the job starts with -np ranks, at most --max-np"
            )
        raise UsageError(
            f"--max-np {max_np} is less than --min-np {min_np}: raise --max-np, or leave it out (no limit)"
        )
    if np < min_np:
        raise UsageError(
            f"-np {np} is less than --min-np {min_np}: the job starts with -np ranks, at least --min-np; raise -np "
            "or lower --min-np"
        )
    if max_np is not None and np > max_np:
        raise UsageError(f"-np {np} is more than --max-np {max_np}: the job starts with -np ranks, at most --max-np")
    if elastic_timeout is not None and elastic_timeout < 1:
        raise UsageError(
            f"--elastic-timeout {elastic_timeout}: give the seconds to wait for --min-np slots, at least 1 "
            f"[default: {DEFAULT_ELASTIC_TIMEOUT}]"
        )
    if reset_limit is not None and reset_limit < 0:
        raise UsageError(f"--reset-limit {reset_limit}: give the number of resets allowed, 0 or more")
    cooldown = None
    if blacklist_cooldown_range is not None:
        cooldown = (int(blacklist_cooldown_range[0]), int(blacklist_cooldown_range[1]))
        low, high = COOLDOWN_LIMITS
        if not low <= cooldown[0] <= cooldown[1] <= high:
            raise UsageError(
                f"--blacklist-cooldown-range {cooldown[0]} {cooldown[1]}: give MIN MAX seconds with {low} <= MIN <= "
                f"MAX <= {high} (horovodrun's limits), e.g. 60 300"
            )
    hosts: list[Host] = []
    if host_discovery_script is not None:
        script = Path(host_discovery_script).expanduser()
        if not script.is_file():
            raise UsageError(
                f"--host-discovery-script: no such file '{host_discovery_script}'; give the path of an executable that "
                "prints one 'host:slots' line per available host"
            )
        if not os.access(script, os.X_OK):
            raise UsageError(
                f"--host-discovery-script {host_discovery_script} is not executable: "
                f"chmod +x {shlex.quote(str(script))}"
            )
        discovery, hosts_path = shlex.quote(str(script.resolve())), None
    else:
        hosts = parse_hosts_file(hosts_file, slots)
        hosts_path = str(Path(hosts_file).expanduser().resolve())
        discovery = shlex.join([sys.executable, "-m", "hvdtrain.discover", hosts_path, "--slots-per-host", str(slots)])
    elastic = ElasticSpec(
        min_np=min_np,
        max_np=max_np,
        discovery=discovery,
        hosts_file=hosts_path,
        slots_per_host=slots,
        timeout=elastic_timeout,
        reset_limit=reset_limit,
        cooldown_range=cooldown,
    )
    return elastic, np, hosts


def elastic_nics(hosts: Sequence[Host]) -> list[str]:
    """An elastic job's interface when --network-interface is not given. Horovod's elastic driver finds a common
    interface only once two hosts are up (it waits for them, then times out); when every host of the --hosts-file
    is this machine, the loopback is the one horovodrun takes (the job then stays on this machine). Otherwise the
    user must name it."""
    if hosts and all(is_local_host(h.name, by_name=False) for h in hosts):
        return ["lo"]
    raise UsageError(
        "--elastic needs --network-interface IFACE: the interface every host, present and future, talks over (e.g. "
        "eth0); Horovod's elastic driver cannot find a common one before two hosts are up"
    )


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
    elastic: bool = False,
    min_np: Optional[int] = None,
    max_np: Optional[int] = None,
    host_discovery_script: Optional[str] = None,
    hosts_file: Optional[str] = None,
    slots_per_host: Optional[int] = None,
    elastic_timeout: Optional[int] = None,
    reset_limit: Optional[int] = None,
    blacklist_cooldown_range: Optional[Sequence[int]] = None,
    environ: Optional[Mapping[str, str]] = None,
    check_cmd: bool = True,
    default_controller: Optional[str] = None,
) -> LaunchSpec:
    """Validate everything the user gave and return a LaunchSpec; raises UsageError before anything runs.
    The launcher and the controller are decided here, once (resolve_launcher, resolve_controller): with
    horovodrun and neither --gloo nor --mpi the controller is `default_controller` (None: horovodrun's); an
    elastic job is always horovodrun with Gloo (`make_elastic` checks its options).
    What needs the hosts themselves (ssh, their interfaces, the discovery's answer) is checked by `hosts.preflight`."""
    warnings: list[str] = []
    environ = os.environ if environ is None else environ
    command = list(command)
    elastic_options = dict(
        min_np=min_np, max_np=max_np, host_discovery_script=host_discovery_script, hosts_file=hosts_file,
        slots_per_host=slots_per_host, elastic_timeout=elastic_timeout, reset_limit=reset_limit,
        blacklist_cooldown_range=blacklist_cooldown_range,
    )  # fmt: skip
    if not elastic:
        _elastic_only(**elastic_options)
    if check_cmd:
        check_command(command)
    if hosts and hostfile:
        raise UsageError("-H and --hostfile exclude each other: give the hosts one way")
    if elastic:
        _check_elastic_launch(hosts, hostfile, launcher, mpi)
    slurm = SlurmEnv.read(environ)
    given = parse_hostfile(hostfile) if hostfile else parse_hosts(hosts) if hosts else []
    launcher = resolve_launcher(
        launcher, slurm.in_allocation and not (given or elastic), horovodrun_adds(gloo, elastic, given)
    )
    controller = resolve_controller(launcher, gloo, mpi, default_controller)
    if np is not None and np <= 0:
        raise UsageError(f"-np {np}: the number of ranks must be at least 1")

    host_list: list[Host] = []
    elastic_spec = None
    if elastic:
        elastic_spec, np, host_list = make_elastic(np, **elastic_options)
        controller = "gloo"
    elif launcher == "srun":
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
        host_list = given
        if not host_list and slurm.in_allocation and np is None:
            np = slurm.ntasks
        if np is None:
            np = sum(h.slots for h in host_list) if host_list else 1
        if not host_list:
            host_list = [Host("localhost", np)]
            cores = os.cpu_count() or 1
            if np > OVERSUBSCRIBED * cores:
                warnings.append(
                    f"-np {np} puts {np} ranks on the {cores} cores of this machine ({np / cores:.1f} ranks a core): they "
                    "will share them (oversubscribed); lower -np, or give the hosts with -H/--hostfile"
                )
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
    if elastic_spec is not None and not nics:
        nics = elastic_nics(host_list)
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
        elastic=elastic_spec,
        warnings=tuple(warnings),
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


# Open MPI's defaults for an MPI job, unless the caller's environment or --env sets them: a process waiting in MPI
# (Horovod's background thread at every cycle's coordination, the ranks' collectives) yields its core to a
# runnable thread now and then instead of only spinning. On CPU ranks the thread waiting for it is the other
# ranks' compute: on 2 ranks the Trainer went from 0.45 to 0.62 of a minimal mpi4py loop's samples/s (medians of
# 4 launches of bench train; docs/performance.md, "Step time"). Open MPI turns this on by itself only when a host is oversubscribed.
MPI_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}


def mpi_defaults(spec: LaunchSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """MPI_DEFAULTS for a job that runs MPI (not Gloo, not elastic), less what `environ` already sets."""
    if spec.controller == "gloo" or spec.elastic is not None:
        return {}
    return {k: v for k, v in MPI_DEFAULTS.items() if k not in environ}


def rank_env(spec: LaunchSpec, is_root: bool, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The variables added to the environment of the launcher and every rank: --stall-timeout's, the interfaces',
    MPI_DEFAULTS (where `environ`, the caller's environment by default, does not set them); --env wins over ours."""
    env = stall_env(spec.stall_timeout)
    env.update(mpi_defaults(spec, os.environ if environ is None else environ))
    if spec.nics and spec.launcher != "horovodrun":  # horovodrun sets these itself from --network-interface
        env["NCCL_SOCKET_IFNAME"] = ",".join(spec.nics)
        if spec.launcher == "srun":  # no mpirun argv to carry them: Open MPI reads OMPI_MCA_* in each rank
            env["OMPI_MCA_btl_tcp_if_include"] = env["OMPI_MCA_oob_tcp_if_include"] = ",".join(spec.nics)
    env.update(spec.env)
    if is_root:
        env.update(ROOT_ENV)
    return env


def wrapped_command(spec: LaunchSpec, log_dir: str) -> list[str]:
    """Each rank runs the user's command under the rank wrapper (host record, OMP_NUM_THREADS, per-rank log,
    exit record); the one builder of the wrapper's command line."""
    threads = "auto" if spec.threads_per_rank is None else str(spec.threads_per_rank)
    return [spec.python, "-m", "hvdtrain.rank", "--log-dir", log_dir, "--threads", threads, "--", *spec.command]


def _hosts_arg(hosts: Sequence[Host]) -> str:
    return ",".join(f"{h.name}:{h.slots}" for h in hosts)


def elastic_args(elastic: ElasticSpec) -> list[str]:
    """horovodrun's elastic arguments (in place of -H): the discovery, the bounds, the timeouts."""
    argv = ["--min-np", str(elastic.min_np)]
    if elastic.max_np is not None:
        argv += ["--max-np", str(elastic.max_np)]
    argv += ["--host-discovery-script", elastic.discovery]
    if elastic.hosts_file is None:
        # horovodrun's own default is None, and a bare host line then breaks its slot count (a TypeError in its
        # discovery thread); hvdtrain.discover prints every host with its slots.
        argv += ["--slots-per-host", str(elastic.slots_per_host)]
    if elastic.timeout is not None:
        argv += ["--elastic-timeout", str(elastic.timeout)]
    if elastic.reset_limit is not None:
        argv += ["--reset-limit", str(elastic.reset_limit)]
    if elastic.cooldown_range is not None:
        argv += ["--blacklist-cooldown-range", *map(str, elastic.cooldown_range)]
    return argv


def build_horovodrun_argv(
    spec: LaunchSpec, log_dir: str, horovodrun: Optional[str] = "horovodrun", prefix: Sequence[str] = ()
) -> list[str]:
    """horovodrun's argv (`prefix` in place of the horovodrun executable when given)."""
    argv = [*(prefix or [horovodrun]), "-np", str(spec.np)]
    if spec.elastic is not None:  # horovodrun runs the discovery through a shell (safe_shell_exec)
        argv += elastic_args(spec.elastic)
    else:
        argv += ["-H", _hosts_arg(spec.hosts)]
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
    # Every output line prefixed with [jobid,rank]<stdout|stderr>: as horovodrun's MPI path does (the ranks' own
    # logs are untagged).
    argv.append("--tag-output")
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
        return build_horovodrun_argv(spec, log_dir, prefix=[horovodrun] if horovodrun else horovodrun_command(spec))
    if spec.launcher == "mpirun":
        names = [*rank_env(spec, is_root), *forwarded_names(os.environ), procs.LAUNCHER_ENV, startup.LAUNCHED_ENV]
        return build_mpirun_argv(spec, log_dir, names)
    return build_srun_argv(spec, log_dir)


def horovodrun_command(spec: LaunchSpec) -> list[str]:
    """What runs horovodrun: the executable (find_horovodrun), or for an elastic job horovodrun's own code through
    hvdtrain/horovodrun.py, which takes --network-interface as given when the job starts on this machine alone
    (Horovod then keeps only 127.0.0.1, and a host that joins later could not reach the rendezvous)."""
    if spec.elastic is not None:
        return [spec.python, "-m", "hvdtrain.horovodrun"]
    return [find_horovodrun()]


def find_horovodrun() -> str:
    """The horovodrun beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "horovodrun"
    if beside.exists():
        return str(beside)
    return shutil.which("horovodrun") or "horovodrun"


def placement(spec: LaunchSpec) -> dict[int, str]:
    """rank -> the host (as named in -H/--hostfile) it runs on: horovodrun and mpirun --map-by slot both fill
    the hosts' slots in the order given. Empty for srun, where Slurm places the ranks, and elastic jobs."""
    if spec.launcher == "srun" or spec.elastic is not None:
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


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _say(line: str) -> None:
    """One line on stderr from a signal handler (os.write: not the buffered stream the handler may have cut into)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


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


class _Tee:
    """horovodrun's output (Gloo path, elastic; stdout and stderr, one pipe) copied line by line to our stdout as it comes,
    its last `keep` lines kept for the failure report; read by a thread, so that run_job waits on the launcher
    itself (and its signals) as for any job."""

    def __init__(self, pipe, keep: int = ELASTIC_OUTPUT_LINES):
        import collections
        import threading

        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._held: list[bytes] = []
        self._pipe = pipe
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        for line in iter(self._pipe.readline, b""):
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            # horovodrun's own traceback (its lines carry no rank prefix such as "[0]<stdout>:") is held back: when
            # the job fails, the report replaces it; a rank's line after it, or success, lets it through.
            if text == "Traceback (most recent call last):" and not self._held:
                self._held.append(line)
            elif self._held and not text.startswith("["):
                self._held.append(line)
            else:
                self.release()
                self._write(line)

    @staticmethod
    def _write(line: bytes) -> None:
        try:
            out = getattr(sys.stdout, "buffer", None)
            if out is not None:
                out.write(line)
            else:
                sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # our stdout is gone; keep reading, or the launcher blocks on a full pipe

    def release(self) -> None:
        """Pass on the lines held back."""
        held, self._held = self._held, []
        for line in held:
            self._write(line)

    def finish(self, timeout: float = 5.0) -> list[str]:
        """The kept lines, once the pipe is drained (or after `timeout`: a process the launcher left behind may
        hold it open). Lines still held back (horovodrun's closing traceback) are not passed on: call release()
        to show them."""
        self._thread.join(timeout)
        return list(self.lines)


_TRACKER_QUIET = "ignore::UserWarning:multiprocessing.resource_tracker"
OVERSUBSCRIBED = 2  # ranks per core on this machine, without -H/--hostfile, above which make_spec warns
INTERRUPTED = 130  # the exit status of a job stopped by Ctrl-C (128 + SIGINT), as a shell reports it


def run_job(
    spec: LaunchSpec,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    on_interrupt: Optional[Callable[[], bool]] = None,
) -> int:
    """Run the job (or print it with dry_run); returns the job's exit status, raising LaunchError on failure.
    A job stopped by Ctrl-C ends with status 130 (INTERRUPTED); `on_interrupt`, called at the first Ctrl-C,
    asks the ranks to stop gracefully and returns True, or returns False: then the launcher ends them.

    The launcher's own stderr goes to our stdout with the ranks' output (the wrapper merges each rank's), so
    stderr carries hvdtrain's own message only, whatever the launcher prints on its way out. horovodrun's Gloo
    path (and every elastic job) ends a failed job with a Python traceback: its output passes through a pipe
    (`_Tee`) that holds the traceback back, and the report (failures.diagnose, diagnose_elastic) names the cause
    instead."""
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if sys.stdout.isatty() and "HVDTRAIN_TTY" not in spec.env:
        # The ranks' stdout is a pipe whatever happens; tell them a person is watching (progress bars).
        spec = dataclasses.replace(spec, env={**spec.env, "HVDTRAIN_TTY": "1"})
    extra = rank_env(spec, is_root)
    keep_logs = spec.output_dir is not None
    log_dir = spec.output_dir or tempfile.mkdtemp(prefix="hvdtrain-logs-")
    argv = build_argv(spec, os.path.abspath(log_dir), is_root)
    if dry_run:
        shim_args = ssh_shim_args(spec)
        notes = []
        if shim_args:
            notes.append(f"horovodrun runs with an 'ssh' first on its PATH that is: ssh {shlex.join(shim_args)}")
        if spec.elastic is not None and shim_args:
            notes.append(
                "(ServerAlive*: the ssh to a host whose link goes down ends within ~15 s, and the elastic driver "
                "drops that host)"
            )
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
    for _worker, stale in [*logs.worker_records("exit"), *logs.worker_records("host")]:
        stale.unlink()
    starts = log_sizes(log_dir)
    worker_starts = worker_log_sizes(log_dir)
    env = {**os.environ, **extra}
    shim = make_ssh_shim(spec, env.get("PATH", os.defpath))
    if shim:
        env["PATH"] = shim + os.pathsep + env.get("PATH", os.defpath)
    import psutil  # noqa: F401  (here, not in a signal handler: an import there can be interrupted by the next signal)

    # The job names its launcher: a rank on this machine ends itself when this process is gone (hvdtrain.rank).
    env[procs.LAUNCHER_ENV] = procs.identity()
    env[startup.LAUNCHED_ENV] = f"{time.time():.6f}"  # the start of the "launch" phase (hvdtrain.startup)
    # The launcher runs in a process group of its own, so that Ctrl-C reaches this process alone and is turned into
    # a stop here (below); no stdin, which a background group may not read; and it gets a signal from the kernel
    # when this process dies, however (SIGKILL, OOM killer): mpirun ends its ranks on SIGTERM; horovodrun's Gloo
    # path is SIGKILLed (its per-rank middlemen end their ranks when it is gone; on SIGTERM it would first print a
    # traceback of its own into a terminal that hvdtrain no longer holds).
    gloo = spec.launcher == "horovodrun" and (spec.controller == "gloo" or spec.elastic is not None)
    if gloo:  # ... and its multiprocessing resource tracker, which then frees its semaphores, not warn about them
        warnings = [w for w in [env.get("PYTHONWARNINGS", ""), _TRACKER_QUIET] if w]
        env["PYTHONWARNINGS"] = ",".join(warnings)
    popen = {
        "env": env,
        "stdin": subprocess.DEVNULL,
        "process_group": 0,
        "preexec_fn": procs.die_with_parent(signal.SIGKILL if gloo else signal.SIGTERM),
    }
    # horovodrun driving the ranks itself (Gloo, elastic) ends a failed job with a Python traceback of its own: its
    # output passes through a pipe (_Tee) that holds that back; with MPI it execs mpirun, whose output is passed on.
    tee = None
    try:
        if spec.launcher == "horovodrun" and spec.controller != "mpi":
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
            tee = _Tee(proc.stdout)
        else:
            proc = subprocess.Popen(argv, stderr=subprocess.STDOUT, **popen)

        # USR1/USR2 (preemption warnings) are passed on to the launcher, and it passes them to the ranks. SIGTERM (a
        # scheduler, timeout) goes to the launcher's whole local process tree (_signal_tree), waited for below. The
        # first Ctrl-C (SIGINT) asks for a graceful stop when the job has one (`on_interrupt`: a training job
        # checkpoints and stops), else goes to the launcher's group as a terminal's would; another is a SIGTERM.
        # A stop (TERM, INT) is remembered: the report then says so.
        def forward(signum, _frame):
            if signum in (signal.SIGTERM, signal.SIGINT):
                stops.append(signal.Signals(signum).name)
            if signum == signal.SIGINT and stops.count("SIGINT") == 1:
                if on_interrupt is not None and on_interrupt():
                    _say("hvdtrain: interrupted: the ranks checkpoint and stop (Ctrl-C again to end them at once)")
                else:
                    _signal_group(proc.pid, signal.SIGINT)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                if stopping:  # a second SIGTERM (Slurm sends one per step and one to the batch shell): once is enough
                    return
                stopping.extend(_signal_tree(proc.pid, signal.SIGTERM) or [None])
            else:
                proc.send_signal(signum)

        previous = {
            s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
        }
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
    output = tee.finish() if tee is not None else []
    if tee is not None and status == 0:
        tee.release()
    if status != 0:
        stopped_by = stops[0] if stops else None
        if spec.elastic is not None:
            found = diagnose_elastic(log_dir, status, output, worker_starts, stopped_by, spec.elastic.discovery)
            if found.cause is None:  # nothing known explains it: horovodrun's traceback may
                tee.release()
        else:
            where = placement(spec)
            here = _this_machine(set(where.values()))
            found = diagnose(log_dir, status, spec.np, where, here, starts, stopped_by, spec.roles)
            if tee is not None and found.cause is None:
                tee.release()
        code = INTERRUPTED if stopped_by == "SIGINT" else status if status > 0 else 128 - status
        raise LaunchError(found.message, code, found.cause)
    if keep_logs or any(is_local_host(h.name) for h in spec.hosts):
        # Where the records must be (a chosen directory, or ranks on this machine): a launcher that says success
        # although no rank started (srun does, when a step is aborted before its tasks launch) is a failure.
        records = [
            *logs.exit_records(), *logs.host_records(), *logs.worker_records("exit"), *logs.worker_records("host")
        ]  # fmt: skip
        if not records:
            raise LaunchError(
                f"{spec.launcher} exited with status 0 but no rank started (no rank records in {log_dir}); see "
                f"{spec.launcher}'s messages above"
            )
    if keep_logs:
        echo(f"per-{'rank' if spec.elastic is None else 'worker'} logs: {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return INTERRUPTED if "SIGINT" in stops else 0
