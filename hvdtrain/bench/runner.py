"""The one pipeline both benchmarks run: jobs -> run_job per spec -> parts -> JSON, PNG and table.

A benchmark builds its jobs (one launch of its worker each, with the plan its ranks read) and says how to
turn the workers' parts into its result, table and plot (`Bench`); `run` does the rest: with --dry-run it
prints every job's command; otherwise it checks the hosts (launching.preflight), writes each worker plan into
OUT/parts/, launches the job, reads every part back, and writes OUT/NAME.json and OUT/NAME.png and prints the
table.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from hvdtrain import errors
from hvdtrain.bench import plans, report
from hvdtrain.files import check_output_path, write_text_atomic
from hvdtrain.launching import preflight, supervise
from hvdtrain.launching.spec import LaunchSpec
from hvdtrain.rundir import RunDir

WorkerPlan = Union[plans.AllreduceWorkerPlan, plans.TrainWorkerPlan]


@dataclasses.dataclass
class Job:
    """One launch of a benchmark worker."""

    name: str  # names its files: parts/plan-NAME.json (its plan), parts/NAME.json (its result), logs/NAME/
    spec: LaunchSpec  # whose command is worker_command(..., name)
    plan: WorkerPlan  # what its ranks read; `store` is filled in by `run`
    about: str  # one line for the progress message and the dry run's heading
    detail: str = ""  # more for the dry run's heading (the measurements, in order)


@dataclasses.dataclass(frozen=True)
class Bench:
    """What one benchmark adds to the pipeline."""

    name: str  # "allreduce": OUT/allreduce.json, OUT/allreduce.png, "hvdtrain bench allreduce: ..."
    collect: Callable[[list[dict]], dict]  # the workers' parts, in job order -> the result
    table: Callable[[dict], str]
    plot: Callable[[dict, Path], Path]
    scratch: Sequence[Path] = ()  # directories the workers write into, removed after the last job


def out_dir(out: str) -> Path:
    """--out as a Path, checked (files.check_output_path: a directory this process can write in, or create, with
    space left); raises UsageError naming --out."""
    check_output_path(out, "--out")
    return Path(out)


def logs_dir(out: Path, given: Optional[str]) -> Path:
    """Where the jobs' rank logs go (a folder per job under it): --output-dir (checked like --out), else OUT's logs
    as in a run directory."""
    if given:
        check_output_path(given, "--output-dir")
    return Path(given) if given else RunDir(out).logs.path


def plan_path(out: Path, name: str) -> Path:
    return out / "parts" / f"plan-{name}.json"


def part_path(out: Path, name: str) -> Path:
    return out / "parts" / f"{name}.json"


def worker_command(module: str, out: Path, name: str) -> list[str]:
    """`python -m MODULE PLAN.json OUT.json`: what every rank of job `name` runs."""
    return [sys.executable, "-m", module, str(plan_path(out, name)), str(part_path(out, name))]


def run(
    bench: Bench, out: Path, jobs: Sequence[Job], dry_run: bool = False, echo: Callable[[str], None] = print
) -> dict:
    """Launch every job in turn (or print their commands), then collect, write the JSON and PNG, print the
    table; returns the result ({} for a dry run)."""
    if dry_run:
        for job in jobs:
            echo(f"# {job.about}" + (f": {job.detail}" if job.detail else ""))
            supervise.run_job(job.spec, dry_run=True, echo=echo)
        return {}
    if jobs:
        preflight.preflight(jobs[0].spec)  # every job of a benchmark runs on the same hosts
    (out / "parts").mkdir(parents=True, exist_ok=True)
    errors.keep_tracebacks_in(out)
    for job in jobs:
        store = out / "parts" / f".torch-store-{job.name}-{os.getpid()}-{time.time_ns()}"
        plan = dataclasses.replace(job.plan, store=str(store.resolve()))
        write_text_atomic(plan_path(out, job.name), plan.to_json())
        part_path(out, job.name).unlink(missing_ok=True)
        echo(f"hvdtrain bench {bench.name}: {job.about} ...")
        try:
            supervise.run_job(job.spec, echo=lambda _line: None)
        finally:
            store.unlink(missing_ok=True)  # torch's FileStore file
    for scratch in bench.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    result = bench.collect([report.read_json(part_path(out, job.name)) for job in jobs])
    json_path, png_path = out / f"{bench.name}.json", out / f"{bench.name}.png"
    report.write_json(json_path, result)
    bench.plot(result, png_path)
    echo(bench.table(result))
    echo(f"wrote {json_path} and {png_path}")
    return result
