"""Submitting, status and logs: the only part of hvdtrain.slurm that starts processes (sbatch, scontrol).

Every command is a ``list[str]``; every run-directory name comes from RunDir. A small record per submitted
job (in ~/.cache/hvdtrain/slurm-jobs, or $HVDTRAIN_CACHE) lets `status` and `logs` find the files after
Slurm has forgotten the job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import HvdtrainError, LaunchError, UsageError
from hvdtrain.files import cache_dir, write_json, write_text_atomic
from hvdtrain.rundir import RankLogs, RunDir
from hvdtrain.slurm.script import render_script
from hvdtrain.slurm.spec import SlurmSpec

_JOB_ID_RE = re.compile(r"^\d+(?:_\d+)?$")


def sbatch_argv(script_path: str) -> list[str]:
    """All options live in the script; --parsable prints just the job id."""
    return ["sbatch", "--parsable", script_path]


# What Slurm's commands say when this machine has them but no configuration (no slurm.conf, no configless
# controller found through DNS SRV records).
_UNCONFIGURED = ("Could not establish a configuration source", "fetch_config", "Unable to process configuration file")


def _run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a Slurm client command; one-line errors when it is missing, hangs, or Slurm is not configured here."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # Slurm's commands would retry reading it for a minute
        raise UsageError(f"SLURM_CONF={conf}: no such file; point it at the cluster's slurm.conf, or unset it")
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 and any(s in proc.stderr for s in _UNCONFIGURED):
            raise UsageError(
                f"Slurm is installed here but not configured ({argv[0]} finds no slurm.conf and no controller): run "
                "this on a node of a Slurm cluster, or point SLURM_CONF at its slurm.conf"
            )
        return proc
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]} not found: install Slurm's client commands or run this on a login node") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"{shlex.join(argv)} did not answer in {timeout:.0f} s: is slurmctld up? (scontrol ping)"
        ) from None


def _jobs_dir(environ: Mapping[str, str]) -> Path:
    return cache_dir(environ) / "slurm-jobs"


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
    from hvdtrain.launching.spec import check_command

    check_command(command)
    text = render_script(spec, command)
    run = RunDir(spec.run_dir)
    script = str(run.job_script)
    argv = sbatch_argv(script)
    if dry_run:
        echo(text.rstrip("\n"))
        echo(f"# {script} would be submitted with:")
        echo(shlex.join(argv))
        return None
    if shutil.which("sbatch") is None:
        raise UsageError("sbatch not found: run hvdtrain submit on a Slurm login node (or install slurm-wlm)")
    new_dir = Path(spec.run_dir)  # the outermost folder this submission creates, removed again if sbatch refuses
    while not new_dir.parent.exists():
        new_dir = new_dir.parent
    new_dir = None if new_dir.exists() else new_dir
    write_text_atomic(script, text, mode=0o755)
    try:
        proc = _run(argv)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise LaunchError(f"sbatch refused the job: {detail[-1] if detail else f'exit {proc.returncode}'}")
    except HvdtrainError:
        if new_dir is not None:
            shutil.rmtree(new_dir, ignore_errors=True)
        else:
            Path(script).unlink(missing_ok=True)
        raise
    job_id = proc.stdout.strip().split(";")[0]
    output = run.slurm_output(job_id, "*" if spec.array else None)
    _remember(
        job_id, {"run_dir": spec.run_dir, "script": script, "command": list(command), "array": spec.array}, environ
    )
    echo(f"submitted job {job_id}")
    echo(f"job output: {output}")
    echo(f"rank logs: {run.logs.path} (hvdtrain logs {job_id} --rank R)")
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
    """What squeue shows for a job of `scontrol show job`: <array job id>_<task id>, else the job id."""
    env = SlurmEnv(job_id=j.get("JobId", "?"), array_job_id=j.get("ArrayJobId"), array_task_id=j.get("ArrayTaskId"))
    return str(env.job_label)


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
    """Where rank R's log may be, most likely first: the job script's srun logs (of the array task), the
    run dir's own logs (hvdtrain train), the folder itself (hvdtrain run --output-dir), mpirun's layout."""
    out = []
    for d in run_dirs:
        logs = RunDir(d).logs
        if task is not None:
            out.append(logs.task(task).log(rank))
        out += [logs.log(rank), RankLogs(d).log(rank), logs.openmpi_output(rank)]
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
            return RunDir(known["run_dir"]).slurm_output(job_id.split("_")[0], task)
        raise UsageError(
            f"job {job_id} is not known to Slurm (nor submitted by hvdtrain here): check the id with squeue"
        )
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
        run_dirs.append(
            os.path.join(workdir, "runs", f"{j.get('JobName', '')}-{j.get('ArrayJobId') or j.get('JobId')}")
        )
        cmd_dirs = _dirs_in_command(command or j.get("Command", "").split()[1:])
        run_dirs += [d if os.path.isabs(d) else os.path.join(workdir, d) for d in cmd_dirs]
    else:
        run_dirs += _dirs_in_command(command)
    if task is not None:
        run_dirs = [d.replace("{task}", task).replace("{job}", job_id.split("_")[0]) for d in run_dirs]
    if not run_dirs:
        raise UsageError(
            f"job {job_id} is not known to Slurm (nor submitted by hvdtrain here): check the id with squeue"
        )
    candidates = _rank_candidates(list(dict.fromkeys(run_dirs)), rank, task)
    for p in candidates:
        if p.is_file():
            return p
    raise UsageError(
        f"no log of rank {rank} for job {job_id} yet (looked for {', '.join(map(str, candidates[:4]))}); is the job running?"
    )


def logs(job_id: str, rank: Optional[int] = None, lines: int = 0, echo: Callable[[str], None] = print,
         environ: Optional[Mapping[str, str]] = None) -> int:  # fmt: skip
    """Print the job's output file (or rank R's log); the last `lines` lines when lines > 0."""
    path = log_path(job_id, rank, environ)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        raise UsageError(
            f"{path}: cannot read the log yet (the job may still be pending: hvdtrain status {job_id})"
        ) from None
    out = text.splitlines()
    if lines > 0:
        out = out[-lines:]
    echo(f"==> {path} <==")
    for line in out:
        echo(line)
    return 0
