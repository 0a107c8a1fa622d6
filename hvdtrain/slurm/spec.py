"""The batch job of `hvdtrain submit` and its validation (pure: nothing is written, nothing is started).

Each SlurmSpec field carries its option's default and --help text, once: the CLI builds `hvdtrain submit`'s
options from them (cli.slurm_options), and make_spec checks the values as sbatch would, raising UsageError
naming the flag and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time as _time
from pathlib import Path
from typing import Any, Optional

from hvdtrain.errors import UsageError
from hvdtrain.files import check_output_path
from hvdtrain.launching.options import UNKNOWN_LAUNCHER
from hvdtrain.rundir import SLURM_ARRAY_OUTPUT, SLURM_OUTPUT
from hvdtrain.srunmpi import check_name

# Slurm sends this to every task of the job's steps 120 s before the time limit (no `B:`: the batch shell is
# not the one that needs it; USR1 can be swallowed by NCCL). The trainer checkpoints and requeues on it.
DEFAULT_SIGNAL = "USR2@120"
LAUNCHERS = ("srun", "mpirun")

_TIME_RE = re.compile(r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_RANGE = r"\d+(?:-\d+(?::\d+)?)?"
_ARRAY_RE = re.compile(rf"^{_RANGE}(?:,{_RANGE})*(?:%\d+)?$")
_SIGNAL_RE = re.compile(r"^(?:(?:B|R|BR|RB):)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?$", re.IGNORECASE)
_SIGNALS = ("HUP", "INT", "QUIT", "USR1", "USR2", "TERM", "CONT", "URG", "ALRM")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.,\-]+$")


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A field with its `hvdtrain submit` --help text; `choices=` makes the option a click.Choice, whose error
    is `choices_error` (formatted with value and choices) when given."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class SlurmSpec:
    """One batch job: the sbatch options (sbatch's names) plus where its files go and how ranks start.

    The defaults are `hvdtrain submit`'s; the two left open (ntasks_per_node, run_dir) are filled in by
    make_spec, which every spec that is rendered or submitted comes from."""

    nodes: int = _f(1, "Nodes (sbatch --nodes).")
    ntasks_per_node: Optional[int] = _f(None, "Ranks per node [default: --gpus-per-node / --gpus-per-rank, else 1].")
    gpus_per_node: Optional[int] = _f(
        None, "GPUs per node (sbatch --gpus-per-node); one per rank unless --gpus-per-rank."
    )
    gpus_per_rank: Optional[int] = _f(None, "Hybrid jobs: GPUs pinned to each rank by local rank.")
    cpus_per_task: Optional[int] = _f(None, "Cores per rank (sbatch --cpus-per-task).")
    mem: Optional[str] = _f(None, "Memory per node, e.g. 8G (sbatch --mem).")
    time: Optional[str] = _f(None, "Time limit: minutes, HH:MM:SS or D-HH:MM:SS (sbatch --time).")
    partition: Optional[str] = _f(None, "Partition (sbatch --partition) [default: the cluster's].")
    account: Optional[str] = _f(None, "Account to charge (sbatch --account).")
    array: Optional[str] = _f(None, "Job array, e.g. 0-2; {task} in COMMAND becomes the task id (sbatch --array).")
    requeue: bool = _f(True, "Let the job requeue itself after preemption.")
    signal: Optional[str] = _f(DEFAULT_SIGNAL, "Warning signal to every rank before the time limit; '' for none.")
    job_name: str = _f("hvdtrain", "Job name (sbatch --job-name).")
    run_dir: Optional[str] = _f(
        None, "Directory for job.sbatch, slurm-<id>.out and logs/ [default: runs/slurm-<time>]."
    )  # absolute once made: the job script, slurm-<id>.out and logs/rank.R.log go here
    launcher: str = _f(
        "srun", "How ranks of a non-hvdtrain COMMAND start.", choices=LAUNCHERS, choices_error=UNKNOWN_LAUNCHER
    )
    mpi_plugin: Optional[str] = _f(
        None,
        "srun's MPI plugin (srun --mpi) [default: chosen in the job from what srun offers: pmix for Open MPI, pmi2 "
        "for MPICH].",
    )

    def sbatch_options(self) -> dict[str, Optional[str]]:
        """The #SBATCH options, name -> value (None for a flag without value)."""
        pattern = SLURM_ARRAY_OUTPUT if self.array else SLURM_OUTPUT
        out: dict[str, Optional[str]] = {
            "job-name": self.job_name,
            "nodes": str(self.nodes),
            "ntasks-per-node": str(self.ntasks_per_node),
            "open-mode": "append",
            "output": os.path.join(self.run_dir.replace("%", "%%"), pattern),
            "requeue" if self.requeue else "no-requeue": None,
        }
        for name, value in (
            ("account", self.account), ("array", self.array), ("cpus-per-task", self.cpus_per_task),
            ("gpus-per-node", self.gpus_per_node), ("mem", self.mem), ("partition", self.partition),
            ("signal", self.signal), ("time", self.time),
        ):  # fmt: skip
            if value is not None and value != "" and not (name == "gpus-per-node" and value == 0):
                out[name] = str(value)
        return out


def _valid_time(text: str) -> bool:
    """A --time in one of sbatch's forms, its fields in range (sbatch takes 99:99:99 and the job gets a limit no
    one meant)."""
    if not _TIME_RE.match(text):
        return False
    days, _, rest = text.rpartition("-") if "-" in text else ("", "", text)
    fields = [int(f) for f in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        return fields[0] < 24 and all(f < 60 for f in fields[1:])
    # M, M:S, H:M:S: the first field is unbounded, the ones after it are minutes and seconds
    return all(f < 60 for f in fields[1:])


def _valid_array(text: str) -> bool:
    """A --array: indexes and ranges start-end[:step] upwards, an optional %limit, all of them at least 1 where a
    count (step, limit)."""
    if not _ARRAY_RE.match(text):
        return False
    ranges, _, limit = text.partition("%")
    if limit and int(limit) < 1:
        return False
    for part in ranges.split(","):
        bounds, _, step = part.partition(":")
        first, _, last = bounds.partition("-")
        if (last and int(last) < int(first)) or (step and int(step) < 1):
            return False
    return True


def _positive(flag: str, value: Optional[int], minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"--{flag} {value}: must be at least {minimum}")


def make_spec(*, now: Optional[str] = None, **options: Any) -> SlurmSpec:
    """Validate SlurmSpec's fields given as keywords (the rest keep their defaults) as sbatch would, before
    anything is written or submitted; fill in ntasks_per_node and run_dir (runs/slurm-<now>, absolute)."""
    spec = SlurmSpec(**options)
    _positive("nodes", spec.nodes)
    _positive("ntasks-per-node", spec.ntasks_per_node)
    _positive("gpus-per-node", spec.gpus_per_node, 0)
    _positive("gpus-per-rank", spec.gpus_per_rank)
    _positive("cpus-per-task", spec.cpus_per_task)
    ntasks_per_node = _ranks_per_node(spec.gpus_per_node, spec.gpus_per_rank, spec.ntasks_per_node)
    _check_values(spec)
    run_dir = spec.run_dir
    if run_dir is None:
        run_dir = os.path.join("runs", f"slurm-{now or _time.strftime('%Y%m%d-%H%M%S')}")
    if not run_dir or any(c in run_dir for c in "\n\r\0"):
        raise UsageError("--run-dir: must be a non-empty single-line path")
    path = Path(run_dir).expanduser().absolute()
    check_output_path(path, "--run-dir")
    return dataclasses.replace(
        spec, run_dir=str(path), ntasks_per_node=ntasks_per_node or 1, signal=spec.signal or None
    )


def _ranks_per_node(
    gpus_per_node: Optional[int], gpus_per_rank: Optional[int], ntasks_per_node: Optional[int]
) -> Optional[int]:
    """--ntasks-per-node checked against the GPUs: gpus-per-node / gpus-per-rank, one GPU per rank by default."""
    if gpus_per_rank is not None:
        if not gpus_per_node:
            raise UsageError(f"--gpus-per-rank {gpus_per_rank} needs --gpus-per-node: give the GPUs of each node")
        if gpus_per_node % gpus_per_rank:
            raise UsageError(
                f"--gpus-per-rank {gpus_per_rank} does not divide --gpus-per-node {gpus_per_node}: "
                "each rank needs whole GPUs of one node"
            )
        fit = gpus_per_node // gpus_per_rank
        if ntasks_per_node is not None and ntasks_per_node != fit:
            raise UsageError(
                f"--ntasks-per-node {ntasks_per_node} with {gpus_per_rank} GPUs per rank needs {ntasks_per_node * gpus_per_rank} "
                f"GPUs per node, not {gpus_per_node}: drop --ntasks-per-node (it is gpus-per-node / gpus-per-rank = {fit})"
            )
        ntasks_per_node = fit
    elif gpus_per_node and ntasks_per_node is None:
        ntasks_per_node = gpus_per_node  # one GPU per rank
    if gpus_per_node and ntasks_per_node and gpus_per_node < ntasks_per_node:
        raise UsageError(
            f"--ntasks-per-node {ntasks_per_node} is more than --gpus-per-node {gpus_per_node}: "
            "give each rank a GPU, or drop --gpus-per-node for a CPU job"
        )
    return ntasks_per_node


def _check_values(spec: SlurmSpec) -> None:
    """The values sbatch would refuse: --time, --mem, --array, --signal, names, the launcher, the job name."""
    time, mem, array, signal = spec.time, spec.mem, spec.array, spec.signal
    if time is not None and time.upper() not in ("UNLIMITED", "INFINITE") and not _valid_time(time):
        raise UsageError(
            f"--time '{time}': not a Slurm time; use minutes (30), MM:SS, HH:MM:SS (01:30:00) or D-HH[:MM[:SS]] "
            "(1-12:00:00), with minutes and seconds below 60 and hours below 24 after a day count"
        )
    if mem is not None and not _MEM_RE.match(mem):
        raise UsageError(f"--mem '{mem}': not a memory size; use a number with an optional K/M/G/T suffix, e.g. 8G")
    if array is not None and not _valid_array(array):
        raise UsageError(
            f"--array '{array}': not a Slurm array; use e.g. 0-2, 1,3,5, 0-9:2 or 0-99%4 (ranges upwards, steps and "
            "%limit at least 1)"
        )
    if signal:
        m = _SIGNAL_RE.match(signal)
        if not m or not (m.group(1).isdigit() or m.group(1).upper() in _SIGNALS):
            raise UsageError(
                f"--signal '{signal}': use [B:]NAME[@SECONDS], e.g. USR2@120 (NAME one of {', '.join(_SIGNALS)})"
            )
        if m.group(2) is not None and int(m.group(2)) > 65535:
            raise UsageError(f"--signal '{signal}': Slurm allows at most 65535 seconds of warning")
    if spec.mpi_plugin is not None:
        check_name(spec.mpi_plugin)
    for flag, value in (("partition", spec.partition), ("account", spec.account)):
        if value is not None and not _NAME_RE.match(value):
            raise UsageError(f"--{flag} '{value}': not a Slurm name (letters, digits, _ . - ,)")
    if spec.launcher not in LAUNCHERS:
        raise UsageError("--launcher: " + UNKNOWN_LAUNCHER.format(value=spec.launcher, choices=", ".join(LAUNCHERS)))
    if not spec.job_name or any(c in spec.job_name for c in "\n\r\0"):
        raise UsageError("--job-name: must be a non-empty single line")
