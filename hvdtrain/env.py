"""Where this process stands in the job: rank, size and local rank, read from the launcher's environment
(Horovod, OpenMPI, PMIx, Slurm, PMI), without initialising Horovod; what Slurm says of the job (SlurmEnv), its
compressed host lists and task counts expanded."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Mapping, Optional

from hvdtrain.errors import UsageError

# (rank, size, local_rank, local_size) variable names per launcher, most specific first.
_SOURCES = (
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int
    size: int
    local_rank: int
    local_size: int


def int_var(environ: Mapping[str, str], name: str) -> Optional[int]:
    """An integer launcher variable; Slurm's compressed forms like '2(x3)' or '4,2' give their first value."""
    try:
        return int(environ[name].split("(")[0].split(",")[0])
    except (KeyError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class SlurmEnv:
    """What Slurm tells a process of a job about it (the one reader of ``SLURM_*`` besides rank_info).
    Outside Slurm every field is None (restart_count 0)."""

    job_id: Optional[str] = None
    array_job_id: Optional[str] = None
    array_task_id: Optional[str] = None
    restart_count: int = 0  # times the job was requeued (SLURM_RESTART_COUNT)
    ntasks: Optional[int] = None  # tasks of the allocation (SLURM_NTASKS)
    ntasks_per_node: Optional[int] = None  # first value of SLURM_NTASKS_PER_NODE, e.g. '2(x3)' -> 2
    nnodes: Optional[int] = None
    job_name: Optional[str] = None
    cpus_per_task: Optional[int] = None  # the job's --cpus-per-task (SLURM_CPUS_PER_TASK)
    nodelist: Optional[str] = None  # the allocation's hosts, compressed (SLURM_JOB_NODELIST: node[01-04],gpu7)
    tasks_per_node: Optional[str] = None  # its tasks on each host, compressed (SLURM_TASKS_PER_NODE: 2(x3),1)
    # srun's MPI plugin (SLURM_MPI_TYPE): in a task of a step the one in use (None: --mpi=none), in the batch step
    # srun's input variable, the one asked for.
    mpi_type: Optional[str] = None
    # This process as a task of an srun step (None when srun did not start it directly: mpirun, horovodrun or
    # Horovod's own variables say another launcher did): the step's tasks, and whether the plugin left the MPI
    # anything to find its world by (PMIx or PMI).
    srun_tasks: Optional[int] = None
    wired_up: bool = False

    @classmethod
    def read(cls, environ: Optional[Mapping[str, str]] = None) -> SlurmEnv:
        environ = os.environ if environ is None else environ
        return cls(
            job_id=environ.get("SLURM_JOB_ID") or None,
            array_job_id=environ.get("SLURM_ARRAY_JOB_ID") or None,
            array_task_id=environ.get("SLURM_ARRAY_TASK_ID") or None,
            restart_count=int_var(environ, "SLURM_RESTART_COUNT") or 0,
            ntasks=int_var(environ, "SLURM_NTASKS"),
            ntasks_per_node=int_var(environ, "SLURM_NTASKS_PER_NODE"),
            nnodes=int_var(environ, "SLURM_NNODES"),
            job_name=environ.get("SLURM_JOB_NAME") or None,
            cpus_per_task=int_var(environ, "SLURM_CPUS_PER_TASK"),
            nodelist=environ.get("SLURM_JOB_NODELIST") or None,
            tasks_per_node=environ.get("SLURM_TASKS_PER_NODE") or None,
            mpi_type=environ.get("SLURM_MPI_TYPE") or None,
            srun_tasks=_srun_tasks(environ),
            wired_up=any(v in environ for v in _WIRE_UP),
        )

    @property
    def in_job(self) -> bool:
        return self.job_id is not None

    @property
    def in_allocation(self) -> bool:
        """Inside a job whose tasks srun can start (sbatch or salloc)."""
        return self.job_id is not None and self.ntasks is not None

    @property
    def job_label(self) -> Optional[str]:
        """``<array job id>_<task id>`` for an array task, else the job id: what squeue shows, what
        ``scontrol requeue`` takes, and what names a job's default run directory."""
        if self.array_job_id and self.array_task_id:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id

    def hosts(self) -> list[tuple[str, int]]:
        """The allocation's hosts and the tasks Slurm gave each, e.g. [("node01", 2), ("node02", 2)]; [] outside an
        allocation or when Slurm did not say. UsageError when the two variables do not agree."""
        if not self.in_allocation or not self.nodelist or not self.tasks_per_node:
            return []
        names = expand_hostlist(self.nodelist, "SLURM_JOB_NODELIST")
        slots = expand_tasks_per_node(self.tasks_per_node)
        if len(slots) != len(names):
            raise UsageError(
                f"SLURM_TASKS_PER_NODE '{self.tasks_per_node}' does not give one count for each of the "
                f"{len(names)} hosts of SLURM_JOB_NODELIST '{self.nodelist}'; give the hosts with -H or --hostfile"
            )
        return list(zip(names, slots))


# Variables of launchers that start ranks under an srun step of their own (mpirun's daemons, horovodrun, Horovod's
# Gloo workers): their ranks are not the step's tasks.
_OTHER_LAUNCHERS = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "HOROVOD_RANK")


def _srun_tasks(environ: Mapping[str, str]) -> Optional[int]:
    """The tasks of the srun step that started this process itself (SLURM_STEP_NUM_TASKS); None for another's."""
    return None if any(v in environ for v in _OTHER_LAUNCHERS) else int_var(environ, "SLURM_STEP_NUM_TASKS")


# What srun's MPI plugins give a task to find its world by: PMIx (pmix, pmix_v4) or PMI-1/2 (pmi2).
_WIRE_UP = ("PMIX_RANK", "PMI_FD", "PMI_RANK")


def expand_tasks_per_node(text: str) -> list[int]:
    """Slurm's compressed per-node task counts, e.g. '2(x3),1' -> [2, 2, 2, 1]; [] when unreadable."""
    out: list[int] = []
    for part in text.split(","):
        count, _, repeat = part.strip().partition("(x")
        try:
            out += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
        except ValueError:
            return []
    return out


_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _range_values(text: str) -> list[str]:
    """The numbers of one bracket's list, e.g. '1,3-5' -> 1 3 4 5 and '009-011' -> 009 010 011: zero-padded to
    the width of each range's first bound, as Slurm does ('2-010' gives 2 .. 10, '02-4' gives 02 03 04)."""
    out = []
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"'[{text}]' is not a list of numbers and upward ranges like [1,3-5] or [009-011]")
        first, last = m.group(1), m.group(2) or m.group(1)
        out += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return out


def _expand_name(name: str) -> list[str]:
    """One name of a hostlist with any number of bracket groups: every combination, the first group outermost
    ('rack[1-2]-n[01-02]' -> rack1-n01 rack1-n02 rack2-n01 rack2-n02)."""
    if not name:
        raise ValueError("a name is empty (two commas in a row, or one at an end)")
    texts = _BRACKETS.split(name)  # literal, group, literal, group, ..., literal
    literals, groups = texts[0::2], texts[1::2]
    if any(c in literal for literal in literals for c in "[] \t"):
        raise ValueError(f"'{name}' has an unmatched bracket or a space")
    combos = itertools.product(*[_range_values(g) for g in groups])
    return ["".join(itertools.chain.from_iterable(zip(literals, (*combo, "")))) for combo in combos]


def _split_names(text: str) -> list[str]:
    """A hostlist cut at the commas outside brackets."""
    names, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if c == "," and depth == 0:
            names.append(text[start:i].strip())
            start = i + 1
    return [*names, text[start:].strip()]


def expand_hostlist(text: str, where: str = "hostlist") -> list[str]:
    """Slurm's compressed host list in full, in its order (as `scontrol show hostnames` prints it):
    'node[009-011]' -> node009 node010 node011, 'gpu2-[02-4]vm1' -> gpu2-02vm1 gpu2-03vm1 gpu2-04vm1,
    'a[1-2],b3', 'n[1,3-5]', 'rack[1-2]-n[01-02]'. UsageError naming `where` when it does not parse."""
    try:
        return [host for name in _split_names(text) for host in _expand_name(name)]
    except ValueError as e:
        raise UsageError(
            f"{where} '{text}' is not a Slurm host list: {e}; expected names like node[01-04],gpu7"
        ) from None


def slurm_step_local_size(environ: Mapping[str, str]) -> Optional[int]:
    """Tasks of this srun step on this node: SLURM_STEP_TASKS_PER_NODE (one count per node of the step,
    compressed) at SLURM_NODEID. PMIx serves the local size to MPI through its API, not as an environment
    variable, so this is where a rank started by srun --mpi=pmix learns how many share its node."""
    counts = expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    node = int_var(environ, "SLURM_NODEID")
    if not counts or node is None or not 0 <= node < len(counts):
        return None
    return counts[node]


def rank_info(environ: Optional[Mapping[str, str]] = None) -> RankInfo:
    """This process's place in the job from the launcher's variables; a lone process is rank 0 of 1. A source
    that lacks the size, local rank or local size (PMIX_RANK under srun --mpi=pmix) takes them from the srun
    step (SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the step's tasks on this node), else 1, the rank and the size."""
    environ = os.environ if environ is None else environ
    for r, s, lr, ls in _SOURCES:
        rank = int_var(environ, r)
        if rank is None:
            continue
        size = int_var(environ, s) or int_var(environ, "SLURM_STEP_NUM_TASKS") or 1
        local_rank = int_var(environ, lr)
        local_size = int_var(environ, ls)
        if local_rank is None:
            local_rank = int_var(environ, "SLURM_LOCALID")
        if local_size is None:
            local_size = slurm_step_local_size(environ)
        return RankInfo(
            rank,
            size,
            rank if local_rank is None else local_rank,
            size if local_size is None else local_size,
        )
    return RankInfo(0, 1, 0, 1)
