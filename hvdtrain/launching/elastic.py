"""An elastic job's options checked into an `ElasticSpec` (horovodrun's elastic mode, Gloo controller): how it
finds its hosts (a --hosts-file, read by ``python -m hvdtrain.launching.discover``, or the user's
--host-discovery-script), how far it may shrink or grow, its timeouts. Pure but for reading the hosts file and
looking at the script; UsageError naming the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError
from hvdtrain.launching.hosts import Host, allocation_hosts, is_local_host, parse_hosts_file
from hvdtrain.launching.options import DEFAULT_ELASTIC_TIMEOUT, ElasticOptions, LaunchOptions

# The range horovodrun's blacklist cooldown accepts (elastic/discovery.py; outside it, its discovery thread raises
# when it first meets a host).
COOLDOWN_LIMITS = (1, 3600)
# `python -m hvdtrain.launching.discover ALLOCATION`: the hosts of the Slurm allocation it runs in.
ALLOCATION = "--slurm-allocation"


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


def check_not_elastic(options: ElasticOptions) -> None:
    """Elastic options given without --elastic: one line naming them."""
    names = options.given()
    if names:
        what = f"{names[0]} is an elastic option" if len(names) == 1 else f"{', '.join(names)} are elastic options"
        raise UsageError(f"{what}: add --elastic for elastic training, or drop {'it' if len(names) == 1 else 'them'}")


def check_elastic_launch(launch: LaunchOptions) -> None:
    """What an elastic job cannot be launched with: fixed hosts, MPI, a launcher other than horovodrun."""
    if launch.hosts or launch.hostfile:
        raise UsageError(
            f"{'-H' if launch.hosts else '--hostfile'} does not apply to --elastic: list the hosts in --hosts-file FILE "
            "(a file hvdtrain re-reads while the job runs: edit it to add or remove hosts), or give "
            "--host-discovery-script"
        )
    needs = "--elastic needs Horovod's Gloo controller (horovodrun's rendezvous, which elastic training runs on)"
    if launch.mpi:
        raise UsageError(f"{needs}: drop --mpi")
    if launch.launcher in ("mpirun", "srun"):
        raise UsageError(f"{needs}, which {launch.launcher} does not start: drop --launcher {launch.launcher}")


def _bounds(np: Optional[int], options: ElasticOptions) -> tuple[int, int]:
    """(--min-np, -np) checked against each other and --max-np: -np defaults to --min-np, --min-np to -np, else 1."""
    min_np, max_np = options.min_np, options.max_np
    if min_np is not None and min_np < 1:
        raise UsageError(f"--min-np {min_np}: the fewest ranks to train with must be at least 1")
    if max_np is not None and max_np < 1:
        raise UsageError(f"--max-np {max_np}: the most ranks must be at least 1 (or leave it out: no limit)")
    min_np = min_np if min_np is not None else np if np is not None else 1
    np = min_np if np is None else np
    if max_np is not None and max_np < min_np:
        if options.min_np is None:  # --min-np is -np's
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
    return min_np, np


def _limits(options: ElasticOptions) -> Optional[tuple[int, int]]:
    """--elastic-timeout and --reset-limit checked; the --blacklist-cooldown-range as (MIN, MAX), or None."""
    if options.elastic_timeout is not None and options.elastic_timeout < 1:
        raise UsageError(
            f"--elastic-timeout {options.elastic_timeout}: give the seconds to wait for --min-np slots, at least 1 "
            f"[default: {DEFAULT_ELASTIC_TIMEOUT}]"
        )
    if options.reset_limit is not None and options.reset_limit < 0:
        raise UsageError(f"--reset-limit {options.reset_limit}: give the number of resets allowed, 0 or more")
    if options.blacklist_cooldown_range is None:
        return None
    cooldown = (int(options.blacklist_cooldown_range[0]), int(options.blacklist_cooldown_range[1]))
    low, high = COOLDOWN_LIMITS
    if not low <= cooldown[0] <= cooldown[1] <= high:
        raise UsageError(
            f"--blacklist-cooldown-range {cooldown[0]} {cooldown[1]}: give MIN MAX seconds with {low} <= MIN <= "
            f"MAX <= {high} (horovodrun's limits), e.g. 60 300"
        )
    return cooldown


def _discovery(options: ElasticOptions, slots: int, slurm: SlurmEnv) -> tuple[str, Optional[str], list[Host]]:
    """(the discovery command horovodrun runs, the --hosts-file's absolute path or None, the hosts it lists now).
    Neither --hosts-file nor --host-discovery-script, inside a Slurm allocation: the allocation's hosts."""
    if options.host_discovery_script is not None:
        given = options.host_discovery_script
        script = Path(given).expanduser()
        if not script.is_file():
            raise UsageError(
                f"--host-discovery-script: no such file '{given}'; give the path of an executable that prints one "
                "'host:slots' line per available host"
            )
        if not os.access(script, os.X_OK):
            raise UsageError(f"--host-discovery-script {given} is not executable: chmod +x {shlex.quote(str(script))}")
        return shlex.quote(str(script.resolve())), None, []
    if options.hosts_file is None:
        hosts = allocation_hosts(slurm)
        return shlex.join([sys.executable, "-m", "hvdtrain.launching.discover", ALLOCATION]), None, hosts
    hosts = parse_hosts_file(options.hosts_file, slots)
    path = str(Path(options.hosts_file).expanduser().resolve())
    command = [sys.executable, "-m", "hvdtrain.launching.discover", path, "--slots-per-host", str(slots)]
    return shlex.join(command), path, hosts


def make_elastic(
    np: Optional[int], options: ElasticOptions, slurm: SlurmEnv = SlurmEnv()
) -> tuple[ElasticSpec, int, list[Host]]:
    """The elastic options checked: (ElasticSpec, the number of ranks the job starts with, the hosts the
    --hosts-file (or the Slurm allocation, `slurm`) lists now, [] for a discovery script). -np defaults to
    --min-np, --min-np to -np, else 1."""
    if options.host_discovery_script is not None and options.hosts_file is not None:
        raise UsageError("--host-discovery-script and --hosts-file exclude each other: give the hosts one way")
    if options.host_discovery_script is None and options.hosts_file is None and not slurm.hosts():
        raise UsageError(
            "--elastic needs its hosts: --hosts-file FILE ('host:slots' lines, re-read while the job runs) or "
            "--host-discovery-script FILE (a program that prints them); inside a Slurm allocation its hosts are the "
            "default"
        )
    slots = 1 if options.slots_per_host is None else options.slots_per_host
    if slots < 1:
        raise UsageError(f"--slots-per-host {slots}: must be at least 1")
    min_np, np = _bounds(np, options)
    cooldown = _limits(options)
    discovery, hosts_path, hosts = _discovery(options, slots, slurm)
    elastic = ElasticSpec(
        min_np=min_np,
        max_np=options.max_np,
        discovery=discovery,
        hosts_file=hosts_path,
        slots_per_host=slots,
        timeout=options.elastic_timeout,
        reset_limit=options.reset_limit,
        cooldown_range=cooldown,
    )
    return elastic, np, hosts


def elastic_nics(hosts: list[Host]) -> list[str]:
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
