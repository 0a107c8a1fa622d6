"""Slurm: sbatch script rendering, submission, job status and logs, and the requeue helper of the trainer.

Everything that builds a command or a script is a pure function; `submit`, `status`, `logs` and
`requeue_job` are the only places that start processes (sbatch, squeue, scontrol). Nothing heavy is
imported: the CLI and the trainer both import this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import time as _time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hvdtrain.errors import LaunchError, UsageError
from hvdtrain.files import write_json, write_text_atomic

# Slurm sends this to every task of the job's steps 120 s before the time limit (no `B:`: the batch shell is
# not the one that needs it; USR1 can be swallowed by NCCL). The trainer checkpoints and requeues on it.
DEFAULT_SIGNAL = "USR2@120"


def requeue_id(environ: Mapping[str, str]) -> str:
    """The id that `scontrol requeue` needs for this job: ``<array job id>_<task id>`` for an array task
    (requeueing the plain SLURM_JOB_ID of a task works too, but the array form is what squeue shows and
    what the user sees), else SLURM_JOB_ID."""
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    job = environ.get("SLURM_JOB_ID")
    if not job:
        raise UsageError("not inside a Slurm job (no SLURM_JOB_ID): there is nothing to requeue")
    return job


def requeue_argv(job_id: str) -> list[str]:
    return ["scontrol", "requeue", job_id]


def requeue_job(environ: Mapping[str, str], timeout: float = 60.0) -> str:
    """Run ``scontrol requeue <id>`` for the job described by `environ`; returns the id.

    Raises LaunchError when scontrol is missing, fails or hangs (e.g. the job was not submitted with
    --requeue and the cluster forbids it, or slurmctld is unreachable)."""
    job = requeue_id(environ)
    argv = requeue_argv(job)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError("cannot requeue: scontrol is not on PATH; is this a Slurm node?") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"cannot requeue job {job}: scontrol did not answer in {timeout:.0f} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(
            f"cannot requeue job {job}: {' '.join(argv)} failed ({detail[-1] if detail else f'exit {proc.returncode}'}); "
            "submit with --requeue, or check that slurmctld is up (scontrol ping)"
        )
    return job


# --------------------------------------------------------------------------------------------------
# The job spec and its validation (pure; raise UsageError naming the flag and the fix)
# --------------------------------------------------------------------------------------------------

LAUNCHERS = ("srun", "mpirun")
_TIME_RE = re.compile(r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_RANGE = r"\d+(?:-\d+(?::\d+)?)?"
_ARRAY_RE = re.compile(rf"^{_RANGE}(?:,{_RANGE})*(?:%\d+)?$")
_SIGNAL_RE = re.compile(r"^(?:(?:B|R|BR|RB):)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?$", re.IGNORECASE)
_SIGNALS = ("HUP", "INT", "QUIT", "USR1", "USR2", "TERM", "CONT", "URG", "ALRM")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.,\-]+$")
_JOB_ID_RE = re.compile(r"^\d+(?:_\d+)?$")


@dataclasses.dataclass
class SlurmSpec:
    """One batch job: the sbatch options (sbatch's names) plus where its files go and how ranks start."""

    run_dir: str  # absolute: job script, slurm-<id>.out and logs/rank.R.log go here
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node, as sbatch: 4G, 500M
    time: Optional[str] = None  # as sbatch: MM, HH:MM:SS, D-HH, ...
    partition: Optional[str] = None
    account: Optional[str] = None
    array: Optional[str] = None  # as sbatch: 0-2, 1,3,5, 0-9%2
    requeue: bool = True
    signal: Optional[str] = DEFAULT_SIGNAL  # to every task of the job steps, before the time limit
    job_name: str = "hvdtrain"
    gpus_per_rank: Optional[int] = None  # pin this many GPUs to each rank by local rank
    launcher: str = "srun"  # how the script starts ranks of a command that is not `hvdtrain ...`

    def sbatch_options(self) -> dict[str, Optional[str]]:
        """The #SBATCH options, name -> value (None for a flag without value)."""
        pattern = "slurm-%A_%a.out" if self.array else "slurm-%j.out"
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


def _positive(flag: str, value: Optional[int], minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"--{flag} {value}: must be at least {minimum}")


def make_spec(
    *,
    run_dir: Optional[str] = None,
    nodes: int = 1,
    ntasks_per_node: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
    gpus_per_rank: Optional[int] = None,
    cpus_per_task: Optional[int] = None,
    mem: Optional[str] = None,
    time: Optional[str] = None,
    partition: Optional[str] = None,
    account: Optional[str] = None,
    array: Optional[str] = None,
    requeue: bool = True,
    signal: Optional[str] = DEFAULT_SIGNAL,
    job_name: Optional[str] = None,
    launcher: str = "srun",
    now: Optional[str] = None,
) -> SlurmSpec:
    """Validate the options as sbatch would (but before anything is written or submitted)."""
    _positive("nodes", nodes)
    _positive("ntasks-per-node", ntasks_per_node)
    _positive("gpus-per-node", gpus_per_node, 0)
    _positive("gpus-per-rank", gpus_per_rank)
    _positive("cpus-per-task", cpus_per_task)
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
    if time is not None and time.upper() not in ("UNLIMITED", "INFINITE") and not _TIME_RE.match(time):
        raise UsageError(
            f"--time '{time}': not a Slurm time; use minutes (30), HH:MM:SS (01:30:00) or D-HH:MM:SS (1-12:00:00)"
        )
    if mem is not None and not _MEM_RE.match(mem):
        raise UsageError(f"--mem '{mem}': not a memory size; use a number with an optional K/M/G/T suffix, e.g. 8G")
    if array is not None and not _ARRAY_RE.match(array):
        raise UsageError(f"--array '{array}': not a Slurm array; use e.g. 0-2, 1,3,5, 0-9:2 or 0-99%4")
    if signal:
        m = _SIGNAL_RE.match(signal)
        if not m or not (m.group(1).isdigit() or m.group(1).upper() in _SIGNALS):
            raise UsageError(f"--signal '{signal}': use [B:]NAME[@SECONDS], e.g. USR2@120 (NAME one of {', '.join(_SIGNALS)})")
        if m.group(2) is not None and int(m.group(2)) > 65535:
            raise UsageError(f"--signal '{signal}': Slurm allows at most 65535 seconds of warning")
    for flag, value in (("partition", partition), ("account", account)):
        if value is not None and not _NAME_RE.match(value):
            raise UsageError(f"--{flag} '{value}': not a Slurm name (letters, digits, _ . - ,)")
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher: unknown launcher '{launcher}'; choose one of {', '.join(LAUNCHERS)}")
    job_name = job_name if job_name is not None else "hvdtrain"
    if not job_name or any(c in job_name for c in "\n\r\0"):
        raise UsageError("--job-name: must be a non-empty single line")
    if run_dir is None:
        run_dir = os.path.join("runs", f"slurm-{now or _time.strftime('%Y%m%d-%H%M%S')}")
        Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    if not run_dir or any(c in run_dir for c in "\n\r\0"):
        raise UsageError("--run-dir: must be a non-empty single-line path")
    path = Path(run_dir).expanduser().absolute()
    if not path.parent.is_dir():
        raise UsageError(f"--run-dir {run_dir}: the parent directory {path.parent} does not exist; create it or choose another")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--run-dir {run_dir}: exists and is not a directory; choose another path")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UsageError(f"--run-dir {run_dir}: not writable; choose another directory")
    return SlurmSpec(
        run_dir=str(path), nodes=nodes, ntasks_per_node=ntasks_per_node or 1, gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task, mem=mem, time=time, partition=partition, account=account, array=array,
        requeue=requeue, signal=signal or None, job_name=job_name, gpus_per_rank=gpus_per_rank, launcher=launcher,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Rendering (pure): fixed sections, sorted #SBATCH lines, every value shell-quoted
# --------------------------------------------------------------------------------------------------

# Per task: pin `k` GPUs by local rank (rank r of a node gets the r-th group of k), then exec the command.
# Indices refer to the GPUs the job was given (CUDA_VISIBLE_DEVICES) when Slurm set it, else to 0..n-1.
_PIN = (
    'k=$1; shift; if [ "$k" -gt 0 ]; then lr=${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-0}}; '
    'IFS=, read -ra all <<<"${CUDA_VISIBLE_DEVICES:-}"; '
    '[ ${#all[@]} -gt 0 ] || all=($(seq 0 $(((lr + 1) * k - 1)))); '
    'CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${all[*]:$((lr * k)):$k}"); export CUDA_VISIBLE_DEVICES; fi; exec "$@"'
)

RUN_BODY = f"""\
# --- run (fixed: the same in every hvdtrain job script) -------------------------------------------------
set -uo pipefail
job=${{SLURM_ARRAY_JOB_ID:-${{SLURM_JOB_ID:?submit this script with sbatch}}}}
task=${{SLURM_ARRAY_TASK_ID:-}}
if [ $# -eq 0 ]; then
  echo "hvdtrain job: no command given; usage: sbatch SCRIPT COMMAND [ARGS...]" >&2
  exit 2
fi
# {{job}}, {{task}} and {{value}} in the arguments become the job id, the array task id and this task's
# entry of HVDTRAIN_SWEEP_VALUES (space-separated, indexed by the task id).
read -ra values <<<"${{HVDTRAIN_SWEEP_VALUES:-}}"
value=
if [ -n "$task" ] && [ ${{#values[@]}} -gt 0 ]; then
  if [ "$task" -ge ${{#values[@]}} ]; then
    echo "hvdtrain job: array task $task has no entry in HVDTRAIN_SWEEP_VALUES (${{#values[@]}} values)" >&2
    exit 2
  fi
  value=${{values[$task]}}
fi
cmd=()
for arg in "$@"; do
  arg=${{arg//"{{job}}"/"$job"}}
  arg=${{arg//"{{task}}"/"$task"}}
  cmd+=("${{arg//"{{value}}"/"$value"}}")
done
log_dir=$HVDTRAIN_RUN_DIR/logs${{task:+/task-$task}}
mkdir -p "$log_dir"
gpus_per_rank=${{HVDTRAIN_GPUS_PER_RANK:-$((${{SLURM_GPUS_ON_NODE:-0}} / ${{SLURM_NTASKS_PER_NODE:-1}}))}}
pin={shlex.quote(_PIN)}
case ${{cmd[0]##*/}} in
  hvdtrain)
    # `hvdtrain run/train` start the ranks themselves: srun inside the allocation, -np = SLURM_NTASKS,
    # per-rank logs in their own --run-dir/--output-dir, GPUs by local rank.
    step=("${{cmd[@]}}") ;;
  *)
    case $HVDTRAIN_LAUNCHER in
      srun) step=(srun --mpi=pmix --kill-on-bad-exit=1 --open-mode=append --output="${{log_dir//%/%%}}/rank.%t.log"
                  bash -c "$pin" hvdtrain-pin "$gpus_per_rank" "${{cmd[@]}}") ;;
      mpirun) step=(mpirun -np "$SLURM_NTASKS" --bind-to none --map-by slot --output-filename "$log_dir"
                    bash -c "$pin" hvdtrain-pin "$gpus_per_rank" "${{cmd[@]}}") ;;
      *) echo "hvdtrain job: HVDTRAIN_LAUNCHER must be srun or mpirun, not '$HVDTRAIN_LAUNCHER'" >&2; exit 2 ;;
    esac ;;
esac
echo "hvdtrain job $job${{task:+ task $task}} on ${{SLURM_JOB_NODELIST:-?}}, restart ${{SLURM_RESTART_COUNT:-0}}, $(date -u +%FT%TZ)"
echo "hvdtrain job: rank logs in $log_dir; running: ${{step[*]@Q}}"
# The step runs in the background so that signals sent to this shell (--signal=B:..., scancel --batch) are
# trapped at once and passed on; signals sent to the steps (--signal=USR2@T, scancel -s USR2) reach the
# ranks directly.
"${{step[@]}}" &
child=$!
for s in USR1 USR2 TERM INT HUP; do
  trap "kill -s $s $child 2>/dev/null" "$s"
done
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break
done
echo "hvdtrain job: command exited with status $status, $(date -u +%FT%TZ)"
exit "$status"
"""


def sbatch_lines(options: Mapping[str, Optional[str]]) -> list[str]:
    """Sorted ``#SBATCH --name=value`` lines, each value shell-quoted (sbatch unquotes them)."""
    return [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={shlex.quote(v)}" for k, v in sorted(options.items())]


def _script(head: Sequence[str], options: Mapping[str, Optional[str]], settings: Sequence[str], command: Sequence[str]) -> str:
    rule = "# " + "-" * 100
    parts = ["#!/bin/bash", *head, rule, *sbatch_lines(options), rule]
    parts += ["# --- settings " + "-" * 88, *settings]
    parts += ["# --- command " + "-" * 89, *command]
    return "\n".join(parts) + "\n" + RUN_BODY


def render_script(spec: SlurmSpec, command: Sequence[str]) -> str:
    """The job script of `hvdtrain submit`: deterministic for a given spec and command."""
    if not command:
        raise UsageError("no command given: put it after --, e.g. hvdtrain submit -- hvdtrain train --run-dir runs/a")
    head = [
        "# Rendered by `hvdtrain submit`. Submit it again as it is with: sbatch THIS_FILE",
        "# (sbatch flags on the command line override the #SBATCH lines below).",
    ]
    settings = [
        f"export HVDTRAIN_RUN_DIR={shlex.quote(spec.run_dir)}",
        f"export HVDTRAIN_LAUNCHER={shlex.quote(spec.launcher)}",
        f"export HVDTRAIN_GPUS_PER_RANK={'' if spec.gpus_per_rank is None else spec.gpus_per_rank}",
        "export HVDTRAIN_SWEEP_VALUES=${HVDTRAIN_SWEEP_VALUES:-}",
    ]
    return _script(head, spec.sbatch_options(), settings, ["set -- " + shlex.join(command)])


def sbatch_argv(script_path: str) -> list[str]:
    """All options live in the script; --parsable prints just the job id."""
    return ["sbatch", "--parsable", script_path]


# The templates in slurm/ are rendered by the same code (a unit test checks the files are up to date;
# `python -m hvdtrain.slurm write-templates slurm` rewrites them).
_TEMPLATE_SETTINGS = [
    "# Where rank logs go (and, by convention, the run directory to give `hvdtrain train --run-dir`).",
    'export HVDTRAIN_RUN_DIR=${HVDTRAIN_RUN_DIR:-$PWD/runs/$SLURM_JOB_NAME-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}',
    "# srun (default; --mpi=pmix) or mpirun (OpenMPI reads the allocation) for commands other than hvdtrain.",
    "export HVDTRAIN_LAUNCHER=${HVDTRAIN_LAUNCHER:-srun}",
]
_TEMPLATE_OPTIONS = {"nodes": "1", "signal": DEFAULT_SIGNAL, "requeue": None, "open-mode": "append"}


def _template_settings(gpus_comment: str, gpus_default: str = "", sweep: Optional[str] = None) -> list[str]:
    sweep_lines = ["# The sweep: one value per array task (task i gets the i-th)."] if sweep else []
    return [
        *_TEMPLATE_SETTINGS, f"# GPUs per rank{gpus_comment}", f"export HVDTRAIN_GPUS_PER_RANK=${{HVDTRAIN_GPUS_PER_RANK:-{gpus_default}}}",
        *sweep_lines, f"export HVDTRAIN_SWEEP_VALUES=${{HVDTRAIN_SWEEP_VALUES:-{sweep or ''}}}",
    ]  # fmt: skip


_PER_NODE = ": default (GPUs on the node) / (tasks per node)."
TEMPLATES: dict[str, dict[str, Any]] = {
    "data-parallel.sbatch": {
        "head": [
            "# Data-parallel training on one or more nodes: one rank per task, on CPUs or with one GPU per rank.",
            "#",
            "#   sbatch slurm/data-parallel.sbatch hvdtrain train --run-dir runs/dp",
            "#   sbatch --nodes=4 --ntasks-per-node=4 --gpus-per-node=4 slurm/data-parallel.sbatch python train.py",
            "#",
            "# Change: --nodes and --ntasks-per-node (ranks = nodes x tasks per node); for GPUs add",
            "# --gpus-per-node equal to --ntasks-per-node (each rank sees only its GPU, as cuda:0); --time and",
            "# --signal (USR2 reaches every rank that many seconds before the limit); --partition/--account",
            "# for your site. Flags given to sbatch override these lines.",
        ],
        "options": {**_TEMPLATE_OPTIONS, "job-name": "hvdtrain-dp", "ntasks-per-node": "2", "cpus-per-task": "1",
                    "time": "01:00:00", "output": "%x-%j.out"},  # fmt: skip
        "settings": _template_settings(_PER_NODE),
    },
    "hybrid.sbatch": {
        "head": [
            "# Hybrid GPU job: k GPUs per rank (the model split over them), data parallel across ranks.",
            "#",
            "#   sbatch slurm/hybrid.sbatch hvdtrain train --strategy hybrid --devices-per-rank 2 --run-dir runs/hy",
            "#   HVDTRAIN_GPUS_PER_RANK=4 sbatch --gpus-per-node=8 --ntasks-per-node=2 slurm/hybrid.sbatch python my.py",
            "#",
            "# Change: keep --ntasks-per-node = --gpus-per-node / HVDTRAIN_GPUS_PER_RANK (4 GPUs, 2 per rank: 2",
            "# tasks); --cpus-per-task to the cores per rank; --nodes, --time, --partition/--account for your",
            "# site. Rank r of a node sees its GPUs r*k .. r*k+k-1 as cuda:0 .. cuda:k-1 (hvdtrain train pins",
            "# by local rank itself). Flags given to sbatch override these lines.",
        ],
        "options": {**_TEMPLATE_OPTIONS, "job-name": "hvdtrain-hybrid", "ntasks-per-node": "2", "gpus-per-node": "4",
                    "cpus-per-task": "4", "time": "04:00:00", "output": "%x-%j.out"},  # fmt: skip
        "settings": _template_settings(" (k): --gpus-per-node / --ntasks-per-node.", "2"),
    },
    "array-sweep.sbatch": {
        "head": [
            "# Hyperparameter sweep as a job array: one training job per array task, {value} in the arguments",
            "# becomes the task's entry of HVDTRAIN_SWEEP_VALUES, {task} the task id, {job} the array job id.",
            "#",
            "#   sbatch slurm/array-sweep.sbatch hvdtrain train -np 1 --lr {value} --run-dir 'runs/sweep-{job}/lr-{value}'",
            "#   HVDTRAIN_SWEEP_VALUES='1 2 3 4' sbatch --array=0-3 slurm/array-sweep.sbatch hvdtrain train --seed {value}",
            "#",
            "# Change: HVDTRAIN_SWEEP_VALUES and --array to match (0-N for N+1 values; %M runs at most M at",
            "# once); the resources of ONE task (--ntasks-per-node, --gpus-per-node, --time) below.",
            "# Flags given to sbatch override these lines.",
        ],
        "options": {**_TEMPLATE_OPTIONS, "job-name": "hvdtrain-sweep", "array": "0-2", "ntasks-per-node": "1",
                    "cpus-per-task": "1", "time": "01:00:00", "output": "%x-%A_%a.out"},  # fmt: skip
        "settings": _template_settings(_PER_NODE, sweep="0.01 0.03 0.1"),
    },
}


def render_template(name: str) -> str:
    t = TEMPLATES[name]
    command = ["# The command is this script's arguments: sbatch TEMPLATE COMMAND [ARGS...]"]
    return _script(t["head"], t["options"], t["settings"], command)


# --------------------------------------------------------------------------------------------------
# Submitting, status and logs (the only part besides requeue_job that starts processes)
# --------------------------------------------------------------------------------------------------


def _run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]} not found: install Slurm's client commands or run this on a login node") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{shlex.join(argv)} did not answer in {timeout:.0f} s: is slurmctld up? (scontrol ping)") from None


def _jobs_dir(environ: Mapping[str, str]) -> Path:
    cache = environ.get("HVDTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hvdtrain")
    return Path(cache) / "slurm-jobs"


def _remember(job_id: str, record: dict[str, Any], environ: Mapping[str, str]) -> None:
    """A small record per submitted job, so that `logs` finds the files after Slurm has forgotten the job."""
    try:
        write_json(_jobs_dir(environ) / f"{job_id}.json", record)
    except OSError:
        pass  # only a convenience


def _recall(job_id: str, environ: Mapping[str, str]) -> Optional[dict[str, Any]]:
    base = job_id.split("_")[0]
    try:
        return json.loads((_jobs_dir(environ) / f"{base}.json").read_text())
    except (OSError, ValueError):
        return None


def submit(
    spec: SlurmSpec,
    command: Sequence[str],
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    environ: Optional[Mapping[str, str]] = None,
) -> Optional[str]:
    """Render the job script into the run directory and submit it with sbatch; returns the job id.

    With dry_run, print the script and the sbatch argv; nothing is written or submitted."""
    environ = os.environ if environ is None else environ
    from hvdtrain.launch import check_command

    check_command(command)
    text = render_script(spec, command)
    script = os.path.join(spec.run_dir, "job.sbatch")
    argv = sbatch_argv(script)
    if dry_run:
        echo(text.rstrip("\n"))
        echo(f"# {script} would be submitted with:")
        echo(shlex.join(argv))
        return None
    if shutil.which("sbatch") is None:
        raise UsageError("sbatch not found: run hvdtrain submit on a Slurm login node (or install slurm-wlm)")
    write_text_atomic(script, text, mode=0o755)
    proc = _run(argv)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(f"sbatch refused the job: {detail[-1] if detail else f'exit {proc.returncode}'} (script: {script})")
    job_id = proc.stdout.strip().split(";")[0]
    output = os.path.join(spec.run_dir, f"slurm-{job_id}_*.out" if spec.array else f"slurm-{job_id}.out")
    _remember(job_id, {"run_dir": spec.run_dir, "script": script, "command": list(command), "array": spec.array}, environ)
    echo(f"submitted job {job_id}")
    echo(f"job output: {output}")
    echo(f"rank logs: {os.path.join(spec.run_dir, 'logs')} (hvdtrain logs {job_id} --rank R)")
    return job_id


def check_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.match(job_id):
        raise UsageError(f"'{job_id}' is not a Slurm job id: give the number sbatch printed, e.g. 1234 or 1234_0")
    return job_id


def parse_scontrol(text: str) -> list[dict[str, str]]:
    """`scontrol show job -o` output: one job per line of Key=Value fields."""
    jobs = []
    for line in text.splitlines():
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        # Paths may contain spaces: a path runs up to the next " Key=". Command is the script and its
        # arguments joined by spaces (so only a hint: arguments may contain spaces).
        for m in re.finditer(r"(?:^| )(Command|WorkDir|StdErr|StdIn|StdOut)=(.*?)(?= [A-Z][A-Za-z:/]*=|$)", line):
            fields[m.group(1)] = m.group(2)
        if fields:
            jobs.append(fields)
    return jobs


def show_job(job_id: str) -> list[dict[str, str]]:
    """The jobs slurmctld knows under this id (several for an array); [] when it does not know it."""
    proc = _run(["scontrol", "show", "job", "-o", check_job_id(job_id)])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return []
        raise LaunchError(f"scontrol show job {job_id} failed: {proc.stderr.strip() or proc.returncode}")
    return parse_scontrol(proc.stdout)


def _job_label(j: Mapping[str, str]) -> str:
    if j.get("ArrayJobId") and j.get("ArrayTaskId"):
        return f"{j['ArrayJobId']}_{j['ArrayTaskId']}"
    return j.get("JobId", "?")


def status(job_id: str, echo: Callable[[str], None] = print, environ: Optional[Mapping[str, str]] = None) -> int:
    """One line per job (array: per task): state, reason, run time of the limit, restarts, node, output."""
    environ = os.environ if environ is None else environ
    jobs = show_job(job_id)
    if not jobs:
        known = _recall(job_id, environ)
        if known is None:
            raise UsageError(
                f"job {job_id} is not known to Slurm (nor submitted by hvdtrain here): check the id with squeue"
            )
        echo(f"job {job_id}: no longer known to Slurm (finished; no accounting here); run dir {known['run_dir']}")
        return 0
    for j in jobs:
        reason = j.get("Reason", "None")
        echo(
            f"job {_job_label(j)} ({j.get('JobName', '?')}): {j.get('JobState', '?')}"
            + (f" ({reason})" if reason not in ("None", "(null)") else "")
            + f", {j.get('RunTime', '?')} of {j.get('TimeLimit', '?')}, restarts {j.get('Restarts', '0')}"
            + f", nodes {j.get('NodeList', '(null)')}, exit {j.get('ExitCode', '?')}, output {j.get('StdOut', '?')}"
        )
    return 0


def _rank_candidates(run_dirs: Sequence[str], rank: int, task: Optional[str]) -> list[Path]:
    out = []
    for d in run_dirs:
        base = Path(d) / "logs"
        if task is not None:
            out.append(base / f"task-{task}" / f"rank.{rank}.log")
        out += [base / f"rank.{rank}.log", Path(d) / f"rank.{rank}.log", base / "1" / f"rank.{rank}" / "stdout"]
    return out


def _dirs_in_command(command: Sequence[str]) -> list[str]:
    """--run-dir / --output-dir values of an `hvdtrain train/run` command, where its rank logs go."""
    out = []
    for i, arg in enumerate(command):
        for flag in ("--run-dir", "--output-dir"):
            if arg == flag and i + 1 < len(command):
                out.append(command[i + 1])
            elif arg.startswith(flag + "="):
                out.append(arg.split("=", 1)[1])
    return out


def log_path(job_id: str, rank: Optional[int] = None, environ: Optional[Mapping[str, str]] = None) -> Path:
    """The job's output file, or with `rank` the rank's log; UsageError naming where it looked."""
    environ = os.environ if environ is None else environ
    check_job_id(job_id)
    jobs = show_job(job_id)
    known = _recall(job_id, environ)
    if known and jobs and jobs[0].get("StdOut") and Path(jobs[0]["StdOut"]).parent != Path(known["run_dir"]):
        known = None  # a record of an older job with the same id (the local test cluster restarts its ids)
    if len(jobs) > 1:
        raise UsageError(f"job {job_id} is an array of {len(jobs)} tasks: give one task, e.g. {_job_label(jobs[0])}")
    task = job_id.split("_")[1] if "_" in job_id else (jobs[0].get("ArrayTaskId") if jobs else None)
    if task is not None and not task.isdigit():
        task = None
    if rank is None:
        if jobs and jobs[0].get("StdOut"):
            return Path(jobs[0]["StdOut"])
        if known:
            base = job_id.split("_")[0]
            name = f"slurm-{base}_{task}.out" if task is not None else f"slurm-{base}.out"
            return Path(known["run_dir"]) / name
        raise UsageError(f"job {job_id} is not known to Slurm (nor submitted by hvdtrain here): check the id with squeue")
    if rank < 0:
        raise UsageError(f"--rank {rank}: ranks count from 0")
    run_dirs: list[str] = []
    command: list[str] = []
    if known:
        run_dirs.append(known["run_dir"])
        command = known.get("command", [])
    if jobs:
        j = jobs[0]
        workdir = j.get("WorkDir", ".")
        if j.get("StdOut"):
            run_dirs.append(str(Path(j["StdOut"]).parent))
        # The templates' default HVDTRAIN_RUN_DIR.
        run_dirs.append(os.path.join(workdir, "runs", f"{j.get('JobName', '')}-{j.get('ArrayJobId') or j.get('JobId')}"))
        cmd_dirs = _dirs_in_command(command or j.get("Command", "").split()[1:])
        run_dirs += [d if os.path.isabs(d) else os.path.join(workdir, d) for d in cmd_dirs]
    else:
        run_dirs += _dirs_in_command(command)
    if task is not None:
        run_dirs = [d.replace("{task}", task).replace("{job}", job_id.split("_")[0]) for d in run_dirs]
    if not run_dirs:
        raise UsageError(f"job {job_id} is not known to Slurm (nor submitted by hvdtrain here): check the id with squeue")
    candidates = _rank_candidates(list(dict.fromkeys(run_dirs)), rank, task)
    for p in candidates:
        if p.is_file():
            return p
    raise UsageError(f"no log of rank {rank} for job {job_id} yet (looked for {', '.join(map(str, candidates[:4]))}); is the job running?")


def logs(job_id: str, rank: Optional[int] = None, lines: int = 0, echo: Callable[[str], None] = print,
         environ: Optional[Mapping[str, str]] = None) -> int:  # fmt: skip
    """Print the job's output file (or rank R's log); the last `lines` lines when lines > 0."""
    path = log_path(job_id, rank, environ)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        raise UsageError(f"{path}: cannot read the log yet (the job may still be pending: hvdtrain status {job_id})") from None
    out = text.splitlines()
    if lines > 0:
        out = out[-lines:]
    echo(f"==> {path} <==")
    for line in out:
        echo(line)
    return 0


def write_templates(directory: str) -> list[str]:
    written = []
    for name in sorted(TEMPLATES):
        path = Path(directory) / name
        path.write_text(render_template(name))
        os.chmod(path, 0o755)
        written.append(str(path))
    return written


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "write-templates":
        print("\n".join(write_templates(sys.argv[2])))
    else:
        print("usage: python -m hvdtrain.slurm write-templates DIR", file=sys.stderr)
        sys.exit(2)
