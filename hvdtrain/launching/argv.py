"""The commands that start a job, built from a LaunchSpec by pure functions returning ``list[str]``: mpirun
(Open MPI's, or MPICH's mpiexec when that is the MPI on PATH), horovodrun (static and elastic), srun; each rank's
command under the rank wrapper (``python -m hvdtrain.launching.rank``); the variables every rank gets; what
--dry-run prints.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from hvdtrain import procs, startup
from hvdtrain.launching.elastic import ElasticSpec
from hvdtrain.launching.hosts import Host, ranks_per_host
from hvdtrain.launching.ranklink import WATCHDOG_ENV
from hvdtrain.launching.spec import LaunchSpec

# Variables that every rank needs whatever the launcher.
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


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
    """MPI_DEFAULTS for a job that runs Open MPI (not Gloo, not elastic, not MPICH), less what `environ` already
    sets."""
    if spec.controller == "gloo" or spec.elastic is not None or spec.hydra:
        return {}
    return {k: v for k, v in MPI_DEFAULTS.items() if k not in environ}


def rank_env(spec: LaunchSpec, is_root: bool, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The variables added to the environment of the launcher and every rank: --stall-timeout's, the interfaces',
    MPI_DEFAULTS (where `environ`, the caller's environment by default, does not set them); --env wins over ours.
    Open MPI's root permission only as root, and never for MPICH's mpiexec (Hydra has no root check): an MPICH job
    gets no OMPI_* variable of ours."""
    env = stall_env(spec.stall_timeout)
    env.update(mpi_defaults(spec, os.environ if environ is None else environ))
    if spec.nics and spec.launcher != "horovodrun":  # horovodrun sets these itself from --network-interface
        env["NCCL_SOCKET_IFNAME"] = ",".join(spec.nics)
        if spec.launcher == "srun":  # no mpirun argv to carry them: Open MPI reads OMPI_MCA_* in each rank
            env["OMPI_MCA_btl_tcp_if_include"] = env["OMPI_MCA_oob_tcp_if_include"] = ",".join(spec.nics)
    env.update(spec.env)
    if is_root and not spec.hydra:
        env.update(ROOT_ENV)
    return env


def wrapped_command(spec: LaunchSpec, log_dir: str) -> list[str]:
    """Each rank runs the user's command under the rank wrapper (host record, OMP_NUM_THREADS, per-rank log,
    exit record); the one builder of the wrapper's command line."""
    threads = "auto" if spec.threads_per_rank is None else str(spec.threads_per_rank)
    return [
        spec.python,
        "-m",
        "hvdtrain.launching.rank",
        "--log-dir",
        log_dir,
        "--threads",
        threads,
        "--",
        *spec.command,
    ]


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
        # discovery thread); hvdtrain.launching.discover prints every host with its slots.
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
    """The caller's variables that mpirun passes on to every rank (-x NAME; MPICH's mpiexec: -genvlist), wherever
    it runs."""
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


def build_mpiexec_argv(spec: LaunchSpec, log_dir: str, env_names: Sequence[str]) -> list[str]:
    """MPICH's mpiexec (Hydra, as found on PATH: spec.mpi) for an mpirun job: what build_mpirun_argv asks of Open
    MPI, in Hydra's words (MPICH 4.0.2's `mpiexec -h`). The real file runs: Hydra starts its hydra_pmi_proxy from
    the directory it was run from, which a directory of links to it (a module's, Debian's alternatives) may lack."""
    argv = [spec.mpi.realpath, "-n", str(spec.np), "-hosts", _hosts_arg(spec.hosts)]
    # No core binding, as with Open MPI (Horovod's background thread needs a core of its own choosing): Hydra's
    # default, said anyway. Hydra fills each host's count in order, as --map-by slot does (rank 0 and local rank
    # 0 first), and has no slot limit to lift (no --oversubscribe).
    argv += ["-bind-to", "none"]
    # Every output line prefixed with [rank] (the rank wrapper writes whole lines).
    argv.append("-prepend-rank")
    if spec.nics:  # one interface: make_spec refuses more
        argv += ["-iface", spec.nics[0]]
    if spec.ssh_config:
        # Hydra runs `ssh` from PATH to start its proxies: run_job puts the ssh shim (-F <config>) first on it
        # (-launcher-exec takes one executable, no arguments).
        argv += ["-launcher", "ssh"]
    if env_names:
        # Hydra passes the whole environment by default (-genvall); the list says which ones the job needs.
        argv += ["-genvlist", ",".join(sorted(set(env_names)))]
    return argv + wrapped_command(spec, log_dir)


def build_srun_argv(spec: LaunchSpec, log_dir: str) -> list[str]:
    """srun's argv: the plugin make_spec chose (srunmpi: pmix for Open MPI, pmi2 for MPICH), a step that ends when
    a rank fails, the caller's environment passed on (its SRUN_CPUS_PER_TASK too)."""
    return [
        "srun",
        f"--ntasks={spec.np}",
        f"--mpi={spec.mpi_plugin}",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        *wrapped_command(spec, log_dir),
    ]


def build_argv(spec: LaunchSpec, log_dir: str, is_root: bool, horovodrun: Optional[str] = None) -> list[str]:
    if spec.launcher == "horovodrun":
        return build_horovodrun_argv(spec, log_dir, prefix=[horovodrun] if horovodrun else horovodrun_command(spec))
    if spec.launcher == "mpirun":
        names = [*rank_env(spec, is_root), *forwarded_names(os.environ), procs.LAUNCHER_ENV, startup.LAUNCHED_ENV]
        if spec.watched:
            names.append(WATCHDOG_ENV)
        return build_mpiexec_argv(spec, log_dir, names) if spec.hydra else build_mpirun_argv(spec, log_dir, names)
    return build_srun_argv(spec, log_dir)


def horovodrun_command(spec: LaunchSpec) -> list[str]:
    """What runs horovodrun: the executable (find_horovodrun), or for an elastic job horovodrun's own code through
    hvdtrain/launching/horovodrun.py, which takes --network-interface as given when the job starts on this machine alone
    (Horovod then keeps only 127.0.0.1, and a host that joins later could not reach the rendezvous)."""
    if spec.elastic is not None:
        return [spec.python, "-m", "hvdtrain.launching.horovodrun"]
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


def describe(argv: Sequence[str], env: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """What --dry-run prints: notes (as # comments), the environment additions, then the exact command."""
    lines = [f"# {note}" for note in notes] + [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    return "\n".join([*lines, shlex.join(argv)])
