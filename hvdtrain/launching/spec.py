"""The launch options checked into a `LaunchSpec` (`make_spec`): the launcher and Horovod's controller decided once,
the hosts, the number of ranks, the ranks' environment. Pure: raises UsageError naming the problem and the fix
before anything runs; what needs the hosts themselves (ssh, their interfaces, the discovery's answer) is
`preflight`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from hvdtrain import srunmpi
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError
from hvdtrain.launching.elastic import ElasticSpec, check_elastic_launch, check_not_elastic, elastic_nics, make_elastic
from hvdtrain.launching.hosts import Host, allocation_hosts, parse_hostfile, parse_hosts
from hvdtrain.launching.options import (
    DEFAULT_STALL_TIMEOUT,
    LAUNCHERS,
    SSH_CONFIG_ENV,
    UNKNOWN_LAUNCHER,
    ElasticOptions,
    LaunchOptions,
)
from hvdtrain.mpi import Launcher, find_launcher

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A network interface name as `ip link` shows it: Linux allows at most 15 bytes and no '/', ':' or spaces;
# we take the portable subset (it also goes unquoted into Open MPI's and horovodrun's argument strings).
_NIC_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
OVERSUBSCRIBED = 2  # ranks per core on this machine, without -H/--hostfile, above which make_spec warns


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
    hang_timeout: Optional[float] = None  # the hang watchdog's bound (launching.watchdog): None auto, 0 off
    ssh_config: Optional[str] = None  # absolute path of an ssh client config (ssh -F); None -> the user's own
    python: str = sys.executable  # interpreter that runs the rank wrapper
    # An elastic job (horovodrun, Gloo): np is the number it starts with, hosts what --hosts-file listed when the
    # job was made (empty for a discovery script): the discovery decides while it runs.
    elastic: Optional[ElasticSpec] = None
    warnings: tuple[str, ...] = ()  # legal but rarely meant (e.g. far more ranks than cores): said, not refused
    roles: tuple[str, ...] = ()  # what each rank is (a pipeline's stage and replica): a failure report names it
    # launcher "mpirun": the MPI launcher on PATH and its flavour (mpi.find_launcher); None: Open MPI's mpirun
    mpi: Optional[Launcher] = None
    mpi_plugin: Optional[str] = None  # srun's --mpi (srun jobs only: srunmpi.choose_mpi_plugin)

    @property
    def watched(self) -> bool:
        """The job has a hang watchdog: not turned off, not elastic (workers come and go; the elastic driver ends
        a worker that keeps the others waiting at a reset)."""
        return self.hang_timeout != 0 and self.elastic is None

    @property
    def hydra(self) -> bool:
        """MPICH's mpiexec (Hydra) starts the ranks: launcher "mpirun" with an MPICH-family MPI on PATH."""
        return self.launcher == "mpirun" and self.mpi is not None and self.mpi.flavour == "mpich"


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


def make_spec(
    command: Sequence[str],
    launch: LaunchOptions = LaunchOptions(),
    elastic: ElasticOptions = ElasticOptions(),
    *,
    environ: Optional[Mapping[str, str]] = None,
    check_cmd: bool = True,
    default_controller: Optional[str] = None,
    slurm: Optional[SlurmEnv] = None,
    mpi_flavour: Optional[str] = None,
) -> LaunchSpec:
    """Validate everything the user gave and return a LaunchSpec; raises UsageError before anything runs.
    The launcher and the controller are decided here, once (resolve_launcher, resolve_controller), and for mpirun
    the MPI on PATH and its flavour (mpi.find_launcher: Open MPI's mpirun or MPICH's mpiexec, from what it says
    of itself, cached by the file; UsageError for another, or none): with
    horovodrun and neither --gloo nor --mpi the controller is `default_controller` (None: horovodrun's); an
    elastic job is always horovodrun with Gloo (`elastic.make_elastic` checks its options).
    What needs the hosts themselves (ssh, their interfaces, the discovery's answer) is checked by `preflight`.
    `slurm`: the Slurm job this process is in, when the caller has read it (else read from `environ`).
    `mpi_flavour`: the MPI's flavour (openmpi, mpich; None: unknown), for srun's plugin (`srunmpi`)."""
    environ = os.environ if environ is None else environ
    command = list(command)
    _check_given(command if check_cmd else None, launch, elastic)
    slurm = SlurmEnv.read(environ) if slurm is None else slurm
    given = parse_hostfile(launch.hostfile) if launch.hostfile else parse_hosts(launch.hosts) if launch.hosts else []
    launcher = resolve_launcher(
        launch.launcher,
        slurm.in_allocation and not (given or elastic.elastic),
        horovodrun_adds(launch.gloo, elastic.elastic, given),
    )
    controller = resolve_controller(launcher, launch.gloo, launch.mpi, default_controller)
    if launch.np is not None and launch.np <= 0:
        raise UsageError(f"-np {launch.np}: the number of ranks must be at least 1")
    warnings: list[str] = []
    elastic_spec = None
    if elastic.elastic:
        elastic_spec, np, hosts = make_elastic(launch.np, elastic, slurm)
        controller = "gloo"
    elif launcher == "srun":
        np, hosts = _srun_ranks(launch, slurm), []
    else:
        np, hosts = _slot_ranks(launch.np, given, slurm, warnings)
    env, threads = _rank_variables(launch, environ)
    if launcher == "srun":
        env = {**_srun_variables(slurm, environ), **env}
    nics = parse_nics(launch.network_interface) if launch.network_interface is not None else []
    if elastic_spec is not None and not nics:
        nics = elastic_nics(hosts)
    mpi = _mpi_launcher(launcher, nics)
    return LaunchSpec(
        command=command,
        np=np,
        hosts=hosts,
        launcher=launcher,
        controller=controller,
        env=env,
        output_dir=launch.output_dir,
        threads_per_rank=threads,
        nics=nics,
        stall_timeout=_stall_timeout(launch.stall_timeout),
        hang_timeout=parse_hang_timeout(launch.hang_timeout),
        ssh_config=resolve_ssh_config(launch.ssh_config, environ, launcher),
        elastic=elastic_spec,
        warnings=tuple(warnings),
        mpi=mpi,
        mpi_plugin=_srun_plugin(launch.mpi_plugin, launcher, environ, slurm, mpi_flavour),
    )


def _mpi_launcher(launcher: str, nics: Sequence[str]) -> Optional[Launcher]:
    """The MPI launcher an mpirun job runs (None for the other launchers), and what it cannot take."""
    if launcher != "mpirun":
        return None
    mpi = find_launcher()
    if mpi.flavour == "mpich" and len(nics) > 1:
        raise UsageError(
            f"--network-interface {','.join(nics)}: {mpi.label}'s mpiexec (Hydra) takes one interface (-iface); "
            "give one"
        )
    return mpi


def _check_given(command: Optional[list[str]], launch: LaunchOptions, elastic: ElasticOptions) -> None:
    """What is wrong whatever the hosts: elastic options without --elastic, a command that cannot run (when
    given), -H with --hostfile, an elastic job with fixed hosts or MPI."""
    if not elastic.elastic:
        check_not_elastic(elastic)
    if command is not None:
        check_command(command)
    if launch.hosts and launch.hostfile:
        raise UsageError("-H and --hostfile exclude each other: give the hosts one way")
    if elastic.elastic:
        check_elastic_launch(launch)


def _srun_ranks(launch: LaunchOptions, slurm: SlurmEnv) -> int:
    """-np of an srun job: at most the allocation's tasks (all of them by default)."""
    if not slurm.in_allocation:
        raise UsageError(
            "--launcher srun needs a Slurm allocation (no SLURM_JOB_ID here): "
            "use sbatch/salloc or hvdtrain submit, or pick --launcher horovodrun"
        )
    if launch.hosts or launch.hostfile:
        raise UsageError("-H/--hostfile do not apply to srun: Slurm places the ranks of its allocation")
    np = slurm.ntasks if launch.np is None else launch.np
    _check_allocated(np, slurm)
    return np


def _check_allocated(np: int, slurm: SlurmEnv) -> None:
    """-np within the tasks of the allocation the job runs in."""
    if np > slurm.ntasks:
        raise UsageError(
            f"-np {np} is more than the {slurm.ntasks} tasks of Slurm job {slurm.job_id}; "
            f"ask sbatch for --ntasks={np} or run with -np {slurm.ntasks}"
        )


def _slot_ranks(np: Optional[int], given: list[Host], slurm: SlurmEnv, warnings: list[str]) -> tuple[int, list[Host]]:
    """(-np, the hosts) of an mpirun or horovodrun job: -np defaults to the slots given, else SLURM_NTASKS inside an
    allocation, else 1. No hosts given: inside an allocation its hosts (SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE),
    else this machine (a warning when that puts far more ranks than cores on it)."""
    allocation = not given and slurm.in_allocation
    hosts = given or allocation_hosts(slurm)
    if allocation and np is None:
        np = slurm.ntasks
    if allocation and hosts:
        _check_allocated(np, slurm)
    if np is None:
        np = sum(h.slots for h in hosts) if hosts else 1
    if not hosts:
        hosts = [Host("localhost", np)]
        cores = os.cpu_count() or 1
        if np > OVERSUBSCRIBED * cores:
            warnings.append(
                f"-np {np} puts {np} ranks on the {cores} cores of this machine ({np / cores:.1f} ranks a core): they "
                "will share them (oversubscribed); lower -np, or give the hosts with -H/--hostfile"
            )
    total = sum(h.slots for h in hosts)
    if np > total:
        raise UsageError(f"-np {np} is more than the {total} slots given by the hosts; add slots or lower -np")
    return np, hosts


def _rank_variables(launch: LaunchOptions, environ: Mapping[str, str]) -> tuple[dict[str, str], Optional[int]]:
    """(--env's variables, --threads-per-rank): --env OMP_NUM_THREADS=N is taken as --threads-per-rank N (the rank
    wrapper sets OMP_NUM_THREADS)."""
    extra = parse_env(launch.env, environ)
    threads = launch.threads_per_rank
    if threads is not None and threads <= 0:
        raise UsageError(f"--threads-per-rank {threads}: must be at least 1")
    if "OMP_NUM_THREADS" in extra:
        value = extra.pop("OMP_NUM_THREADS")
        if threads is not None:
            raise UsageError("--env OMP_NUM_THREADS and --threads-per-rank both set the threads; give one")
        if not value.isdigit() or int(value) <= 0:
            raise UsageError(f"--env OMP_NUM_THREADS={value}: must be a whole number of threads, at least 1")
        threads = int(value)
    return extra, threads


def _srun_variables(slurm: SlurmEnv, environ: Mapping[str, str]) -> dict[str, str]:
    """What srun needs from the job besides its options: Slurm >= 22.05's srun no longer takes the job's
    --cpus-per-task by itself, so SRUN_CPUS_PER_TASK passes it on (unless the caller sets it)."""
    if slurm.cpus_per_task is None or "SRUN_CPUS_PER_TASK" in environ:
        return {}
    return {"SRUN_CPUS_PER_TASK": str(slurm.cpus_per_task)}


def _srun_plugin(
    given: Optional[str], launcher: str, environ: Mapping[str, str], slurm: SlurmEnv, flavour: Optional[str]
) -> Optional[str]:
    """srun's --mpi for an srun job (srunmpi: what is asked for, else what srun here offers that the MPI works
    with); None for the other launchers, which take no --mpi-plugin."""
    if launcher != "srun":
        if given is not None:
            raise UsageError(f"--mpi-plugin applies to srun only (this job starts with {launcher}); drop it")
        return None
    requested = srunmpi.requested(given, environ, slurm)
    return srunmpi.choose_mpi_plugin(srunmpi.offered_plugins(), flavour or srunmpi.path_flavour(), requested)


def parse_hang_timeout(value: Optional[str]) -> Optional[float]:
    """--hang-timeout: None for auto (or not given), 0 for off, else a number of seconds."""
    if value is None or value.strip().lower() == "auto":
        return None
    text = value.strip().lower()
    if text in ("0", "off"):
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--hang-timeout {value}: give a number of seconds (e.g. 600), auto, or 0 to turn it off")
    return seconds


def _stall_timeout(stall_timeout: Optional[int]) -> int:
    if stall_timeout is None:
        return DEFAULT_STALL_TIMEOUT
    if stall_timeout < 0:
        raise UsageError(
            f"--stall-timeout {stall_timeout}: give a number of seconds (e.g. {DEFAULT_STALL_TIMEOUT}), or 0 to wait "
            "forever"
        )
    return stall_timeout
