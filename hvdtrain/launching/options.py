"""The launch options, declared once: every command that starts ranks (run, train, bench) takes `LaunchOptions`,
and run and train also `ElasticOptions`. The CLI generates its click options from these fields (their flags, help,
metavar and choices are written here, on the field), and `spec.make_spec` checks them into a LaunchSpec.

Pure and light: the CLI imports this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

LAUNCHERS = ("horovodrun", "mpirun", "srun")
UNKNOWN_LAUNCHER = "unknown launcher '{value}'; choose one of {choices}"
# --stall-timeout's default. Horovod's own is 0: a rank that stops calling collectives (a deadlock, a rank
# stuck in I/O, a frozen host) makes every other rank wait forever, holding the allocation. 600 s is far
# above the longest legitimate gap between ranks at one collective that we know of (rank 0 writing a large
# checkpoint or evaluating while the others wait at the next allreduce; a slow first batch), and bounds the
# loss to about ten minutes of the job's nodes.
DEFAULT_STALL_TIMEOUT = 600
SSH_CONFIG_ENV = "HVDTRAIN_SSH_CONFIG"
# Elastic jobs: horovodrun's own default for --elastic-timeout (elastic/driver.py ELASTIC_TIMEOUT_SECS, unless
# $HOROVOD_ELASTIC_TIMEOUT).
DEFAULT_ELASTIC_TIMEOUT = 600


def _option(help: str, *flags: str, metavar: Optional[str] = None, default: Any = None, **more):
    """A field whose option is `flags` (default: --field-name), with its help; None when not given. `more`: other
    metadata the CLI reads (choices, choices_error)."""
    meta = {"help": help, "flags": flags, "metavar": metavar, "show_default": False, **more}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """Where and how to start the ranks, as the user gave it (None: not given)."""

    np: Optional[int] = _option("Number of ranks [default: all slots, or SLURM_NTASKS].", "-np", "--num-proc")
    hosts: Optional[str] = _option("Hosts and slots, e.g. node1:4,node2:4 [default: localhost:NP].", "-H", "--hosts")
    hostfile: Optional[str] = _option("File of 'host slots=N' lines ('#' comments allowed).")
    gloo: bool = _option("Use Horovod's Gloo controller (horovodrun only).", default=False)
    mpi: bool = _option("Use Horovod's MPI controller.", default=False)
    launcher: Optional[str] = _option(
        "[default: srun inside a Slurm allocation; horovodrun for --gloo, --elastic or other hosts; else mpirun].",
        choices=LAUNCHERS,
        choices_error=UNKNOWN_LAUNCHER,
    )
    env: tuple[str, ...] = _option(
        "Forward NAME (or set it) on every rank; repeatable.", metavar="NAME[=VALUE]", default=()
    )
    output_dir: Optional[str] = _option("Directory for per-rank logs rank.R.log [default: temporary, kept on failure].")
    threads_per_rank: Optional[int] = _option(
        "OMP_NUM_THREADS of every rank [default: on each host, its cores / the ranks on that host]."
    )
    network_interface: Optional[str] = _option(
        "Network interface(s) the ranks talk over, e.g. eth0 (Gloo and Open MPI); every host must have it "
        "[default: the launcher's choice].",
        metavar="IFACE[,IFACE]",
    )
    ssh_config: Optional[str] = _option(
        f"ssh client config for every ssh of the job (ssh -F FILE) [default: ${SSH_CONFIG_ENV}, else your own ssh "
        "config].",
        metavar="FILE",
    )
    mpi_plugin: Optional[str] = _option(
        "srun's MPI plugin for the ranks (srun --mpi=NAME) [default: $HVDTRAIN_SRUN_MPI, else $SLURM_MPI_TYPE, else "
        "what srun --mpi=list offers that the MPI works with: pmix for Open MPI, pmi2 for MPICH].",
        metavar="NAME",
    )
    stall_timeout: Optional[int] = _option(
        "End the job when a rank has kept the others waiting at a collective this long (Horovod's stall shutdown; "
        f"the MPI controller only: Horovod 0.28's Gloo path never fires it); 0: wait forever [default: "
        f"{DEFAULT_STALL_TIMEOUT}].",
        metavar="SECONDS",
    )
    hang_timeout: Optional[str] = _option(
        "End the job when a rank has made no progress for this long (any controller, launcher or host; a script "
        "of yours reports its steps with hvdtrain.progress.step), with every rank's stack and the rank that held "
        "the others up named; auto: 10 x the slowest step, at least 300 s; 0: off [default: auto].",
        metavar="SECONDS|auto",
    )


@dataclasses.dataclass(frozen=True)
class ElasticOptions:
    """An elastic job's options (horovodrun's names), as the user gave them (None: not given)."""

    elastic: bool = _option(
        "Elastic training: workers come and go between --min-np and --max-np as hosts join, leave or fail "
        "(horovodrun, Gloo controller); needs --hosts-file or --host-discovery-script, and --network-interface "
        "unless the hosts file lists only this machine.",
        default=False,
    )
    min_np: Optional[int] = _option(
        "Elastic: the fewest ranks to train with; with fewer slots the job waits --elastic-timeout for hosts "
        "[default: -np, else 1].",
        metavar="N",
    )
    max_np: Optional[int] = _option("Elastic: the most ranks [default: no limit].", metavar="N")
    hosts_file: Optional[str] = _option(
        "Elastic: the available hosts, one 'host:slots', 'host slots=N' or 'host' a line ('#' comments); re-read "
        "every second while the job runs: edit it to add or remove hosts.",
        metavar="FILE",
    )
    host_discovery_script: Optional[str] = _option(
        "Elastic: an executable that prints the available hosts, one 'host[:slots]' a line; run every second.",
        metavar="FILE",
    )
    slots_per_host: Optional[int] = _option(
        "Elastic: slots of a host listed without a count [default: 1].", metavar="N"
    )
    elastic_timeout: Optional[int] = _option(
        "Elastic: how long to wait for enough slots (-np at the start, --min-np after a reset) before failing; "
        "also, plus Gloo's timeout, how long a worker may keep the others waiting at a reset before it is ended "
        f"(frozen) [default: {DEFAULT_ELASTIC_TIMEOUT}].",
        metavar="SECONDS",
    )
    reset_limit: Optional[int] = _option(
        "Elastic: end the job after N resets (one follows every failed worker and every change of hosts) "
        "[default: no limit].",
        metavar="N",
    )
    blacklist_cooldown_range: Optional[tuple[int, int]] = _option(
        "Elastic: a failed host may come back after a cooldown growing from MIN to MAX seconds [default: never].",
        metavar="MIN MAX",
    )

    def given(self) -> list[str]:
        """The flags of the elastic-only options that were given (every field but `elastic`)."""
        return [
            flag(field)
            for field in dataclasses.fields(self)
            if field.name != "elastic" and getattr(self, field.name) is not None
        ]


def flag(field: dataclasses.Field) -> str:
    """The option's first flag, as error messages name it (-np, -H, --min-np)."""
    flags = field.metadata.get("flags") or ()
    return flags[0] if flags else "--" + field.name.replace("_", "-")


def split(values: Mapping[str, Any], *kinds: type) -> tuple:
    """`values` (a command's keyword arguments) cut into one instance of each options dataclass in `kinds`, and a
    dict of the rest: e.g. ``launch, elastic, rest = split(kwargs, LaunchOptions, ElasticOptions)``."""
    rest = dict(values)
    out = []
    for kind in kinds:
        names = {f.name for f in dataclasses.fields(kind)}
        out.append(kind(**{name: rest.pop(name) for name in list(rest) if name in names}))
    return (*out, rest)
