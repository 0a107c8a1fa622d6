"""srun's MPI plugins (`srun --mpi=NAME`): what this machine's srun offers, which one a job's ranks use, and the
check that a task of an srun step got the step's world from it.

An MPI learns its world under srun from the plugin: Open MPI from PMIx, MPICH's simple PMI from Slurm's pmi2
plugin (which also speaks the PMI-1 wire protocol). The wrong plugin either aborts in MPI_Init (Open MPI without
PMIx: "OMPI was not built with SLURM's PMI support", twenty lines a rank) or, worse, starts N singletons: each task
rank 0 of 1, training alone (MPICH under pmix or none). Measured here, Slurm 22.05.8, 2 tasks (docs/slurm.md):

    --mpi=         Debian's Open MPI 4.1.4      Debian's MPICH 4.0.2
    pmix, pmix_v4  works                        N singletons
    pmi2           aborts in MPI_Init           works
    none           aborts in MPI_Init           N singletons

On the ground floor: the launching side (srun's argv), the job scripts (`python -m hvdtrain.srunmpi` prints the
choice on the compute node) and the Trainer (the check after hvd.init) use it.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from typing import Mapping, Optional, Sequence

from hvdtrain import mpi
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError

PLUGIN_ENV = "HVDTRAIN_SRUN_MPI"  # the plugin asked for: hvdtrain's srun jobs and the job scripts' srun read it
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# The plugins an MPI flavour works with, best first ("pmix" stands for srun's pmix, else its newest pmix_vN); an
# unknown flavour takes Open MPI's order (the MPI Horovod is built with here). cray_shasta: Cray MPICH's own.
_OPENMPI = ("pmix", "pmi2", "cray_shasta")
_MPICH = ("pmi2", "pmix", "cray_shasta")
_ORDER = {"openmpi": _OPENMPI, "mpich": _MPICH, "intel": _MPICH, "mvapich": _MPICH}


def parse_mpi_list(text: str) -> list[str]:
    """The plugin names `srun --mpi=list` prints, in its order. Slurm 22.05 and 23.x: a header line, the types
    one a line (tab-indented), then `specific pmix plugin versions available: pmix_v4[,pmix_v5]`; older ones put
    `srun: ` before every line (on stderr)."""
    names: list[str] = []
    for raw in text.splitlines():
        line = raw.strip().removeprefix("srun:").strip()
        head, _, rest = line.partition(":")
        if head.endswith("versions available"):
            names += [n for n in re.split(r"[,\s]+", rest) if _NAME.match(n)]
        elif _NAME.match(line):
            names.append(line)
    return list(dict.fromkeys(names))


@functools.cache
def offered_plugins() -> tuple[str, ...]:
    """What this machine's srun offers, read once per process (`read_offered`)."""
    return read_offered()


def read_offered() -> tuple[str, ...]:
    """What this machine's srun offers (`srun --mpi=list`); () when there is no srun or it cannot say (no
    configuration: a SLURM_CONF naming a missing file would make it retry for a minute)."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        return ()
    try:
        proc = subprocess.run(
            ["srun", "--mpi=list"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(parse_mpi_list(proc.stdout + "\n" + proc.stderr))


def _same(a: str, b: str) -> bool:
    """The same plugin: pmix and its versions (pmix_v4) are one."""
    return a == b or (a.startswith("pmix") and b.startswith("pmix"))


def _offered_as(want: str, offered: Sequence[str]) -> Optional[str]:
    """`want` as srun here names it (pmix: itself, else the newest pmix_vN offered); None when not offered. With
    nothing known of srun (`offered` empty), `want` itself."""
    if not offered or want in offered:
        return want
    versions = sorted((n for n in offered if _same(n, want)), key=lambda n: int(re.sub(r"\D", "", n) or 0))
    return versions[-1] if versions else None


def candidates(offered: Sequence[str], flavour: Optional[str]) -> list[str]:
    """The plugins to try for an MPI of `flavour` (openmpi, mpich, ...; None: unknown), best first, among those
    srun offers (`offered`; empty: unknown, then the flavour's order as it is)."""
    order = _ORDER.get((flavour or "").lower(), _OPENMPI)
    return [n for n in (_offered_as(want, offered) for want in order) if n is not None]


def check_name(name: str) -> str:
    """A plugin's name as srun spells them (pmix, pmi2, pmix_v4); UsageError otherwise."""
    if not _NAME.match(name):
        raise UsageError(f"--mpi-plugin '{name}': not an MPI plugin's name; see srun --mpi=list (e.g. pmix, pmi2)")
    return name


def choose_mpi_plugin(offered: Sequence[str], flavour: Optional[str], override: Optional[str]) -> str:
    """srun's --mpi for a job's ranks (pure): `override` when given (it must be a plugin srun offers, when that is
    known: UsageError otherwise), else the best of `candidates`; pmix when srun offers none of them."""
    if override:
        check_name(override)
        if offered and override not in offered:
            raise UsageError(
                f"srun's MPI plugin '{override}' is not offered here (srun --mpi=list: {', '.join(offered)}); "
                f"give one of those with --mpi-plugin or {PLUGIN_ENV}"
            )
        return override
    return next(iter(candidates(offered, flavour)), "pmix")


def requested(given: Optional[str], environ: Mapping[str, str], slurm: SlurmEnv) -> Optional[str]:
    """The plugin asked for: `given` (--mpi-plugin), else $HVDTRAIN_SRUN_MPI, else $SLURM_MPI_TYPE (srun's own
    input variable, which an explicit --mpi would otherwise override); None: hvdtrain chooses."""
    return given or environ.get(PLUGIN_ENV) or slurm.mpi_type


def path_flavour() -> Optional[str]:
    """The flavour of the MPI on PATH (mpi.find_launcher: what its mpirun/mpiexec says of itself, cached); None
    where there is none (a site with srun only) or it is no MPI hvdtrain knows."""
    try:
        return mpi.find_launcher().flavour
    except UsageError:
        return None


def wire_up_problem(slurm: SlurmEnv, world_size: Optional[int] = None, flavour: Optional[str] = None) -> Optional[str]:
    """Why this task of an srun step is not in a world of the step's tasks, in one line naming the plugin in use
    and the one to try; None when it is, or when it is no srun task of a step of several (`slurm`, read before
    MPI started). Before MPI starts (`world_size` None): the plugin left the task nothing to find the others by
    (--mpi=none). After (`world_size`, what MPI says): a world smaller than the step (N singletons)."""
    tasks = slurm.srun_tasks
    if tasks is None or tasks < 2 or (slurm.wired_up if world_size is None else world_size >= tasks):
        return None
    in_use = slurm.mpi_type or "none"
    seen = "no PMI to find the others by" if world_size is None else f"a world of {world_size}"
    flavour = flavour or path_flavour()
    other = next((n for n in candidates(offered_plugins(), flavour) if not _same(n, in_use)), "pmix")
    return (
        f"srun started {tasks} tasks with --mpi={in_use} and each MPI rank has {seen}: they would run as "
        f"{tasks} singletons (rank 0 of 1 each); try --mpi={other} (--mpi-plugin {other}, or {PLUGIN_ENV}={other})"
    )


def main() -> int:
    """`python -m hvdtrain.srunmpi`: the plugin for this node's srun, as `choose_mpi_plugin` picks it with what the
    environment asks for (the job scripts run it on the compute node)."""
    try:
        print(choose_mpi_plugin(offered_plugins(), path_flavour(), requested(None, os.environ, SlurmEnv.read())))
    except UsageError as e:
        print(f"hvdtrain: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
