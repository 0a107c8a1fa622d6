"""`hvdtrain bench updates`: the update rules side by side on the digits CNN, with and without a straggler.

For every straggler factor (the last worker's steps made that many times slower) and every mode (sync, local-sgd,
async), one launch of hvdtrain.bench.updates_worker: the built-in job with `--update MODE` on --workers ranks
(async: plus --ps-ranks server ranks), evaluated after every epoch. Reported per run: samples/s per worker, the
training time (evaluations excluded) and step at which each --targets accuracy was first reached, the final
accuracy, and the collectives (sync, local-sgd) or messages (async) per step; the PNG draws accuracy against
training time and against step. Runs alternate the modes' order every round; the launches and output files are
hvdtrain.bench.runner's.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hvdtrain.bench import plans, plots, report, runner, tables
from hvdtrain.config import TrainConfig
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError
from hvdtrain.launching.options import LaunchOptions
from hvdtrain.launching.spec import make_spec

WORKER = "hvdtrain.bench.updates_worker"
RUNS = "runs"  # the Trainer's run directories, under --out; removed after the last job


@dataclasses.dataclass
class UpdatesBenchPlan:
    settings: plans.UpdatesSettings
    out: Path
    jobs: list[runner.Job]


def train_config(settings: plans.UpdatesSettings, mode: str, run_dir: str) -> TrainConfig:
    """The built-in job's configuration for one mode (the rule's own options only for that rule)."""
    own: dict[str, Any] = {}
    if mode == "local-sgd":
        own = {"average_every": settings.average_every, "local_sgd_warmup": settings.local_sgd_warmup}
    elif mode == "async":
        own = {"ps_ranks": settings.ps_ranks, "max_staleness": settings.max_staleness}
    cfg = TrainConfig(update=mode, epochs=settings.epochs, batch_size=settings.batch_size, run_dir=run_dir,
                      preempt_signal="", **own)  # fmt: skip
    return cfg.validate().with_defaults()


def make_plan(options: Mapping[str, Any], *, launch: LaunchOptions) -> UpdatesBenchPlan:
    """Validate every option and build one job per (straggler, round, mode); raises UsageError before any run."""
    settings = plans.resolve(plans.UpdatesSettings, options)
    factors, _ = settings.factors(), settings.accuracy_targets()
    out = runner.out_dir(settings.out)
    if launch.np is not None:
        raise UsageError("-np: give --workers (async adds --ps-ranks server ranks to them)")
    if launch.gloo and "async" in settings.modes:
        raise UsageError("--gloo: the async mode needs MPI (its servers use mpi4py); drop --gloo or async")
    logs = runner.logs_dir(out, launch.output_dir)
    launch = dataclasses.replace(
        launch, threads_per_rank=1 if launch.threads_per_rank is None else launch.threads_per_rank
    )
    slurm = SlurmEnv.read()  # once for every job's launcher
    jobs = []
    for factor in factors:
        for r in range(settings.rounds):
            for mode in settings.modes if r % 2 == 0 else settings.modes[::-1]:
                name = f"{mode}-x{factor:g}-r{r}"
                cfg = train_config(settings, mode, str((out / RUNS / name).resolve()))
                ranks = settings.workers + (settings.ps_ranks if mode == "async" else 0)
                spec = make_spec(
                    runner.worker_command(WORKER, out, name),
                    dataclasses.replace(
                        launch, np=ranks, output_dir=str(logs / name), mpi=launch.mpi or mode == "async"
                    ),
                    default_controller="mpi",
                    slurm=slurm,
                )
                plan = plans.UpdatesWorkerPlan(mode, dataclasses.asdict(cfg), factor, settings.workers - 1, r)
                straggling = f", worker {settings.workers - 1} slowed x{factor:g}" if factor > 1 else ""
                jobs.append(runner.Job(name, spec, plan, f"{mode} on {ranks} ranks{straggling} (round {r + 1})"))
    return UpdatesBenchPlan(settings, out, jobs)


def run(plan: UpdatesBenchPlan, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    bench = runner.Bench(
        "updates", lambda parts: collect(parts, plan.settings), tables.updates, plots.updates,
        scratch=[plan.out / RUNS],
    )  # fmt: skip
    return runner.run(bench, plan.out, plan.jobs, dry_run=dry_run, echo=echo)


# --------------------------------------------------------------------------------------------------
# Pure: from the runs' curves to the report
# --------------------------------------------------------------------------------------------------


def first_reaching(curve: Sequence[dict], target: float) -> Optional[dict]:
    """The first point of `curve` at or above `target` accuracy, None if it never gets there."""
    return next((p for p in curve if p["test_accuracy"] >= target), None)


def rows_of(parts: Sequence[dict], targets: Sequence[float]) -> list[dict]:
    """One row per (mode, straggler): medians over rounds; time and step to each target."""
    rows = []
    for mode, factor in sorted({(p["mode"], p["straggler"]) for p in parts}, key=lambda k: (k[1], k[0])):
        mine = [p for p in parts if p["mode"] == mode and p["straggler"] == factor]
        row: dict[str, Any] = {"mode": mode, "straggler": factor, "rounds": len(mine), "workers": mine[0]["workers"]}
        for key in ("samples_per_s_per_worker", "final_accuracy", "seconds_training"):
            row[key] = statistics.median(p[key] for p in mine)
        for key in ("collectives_per_step", "messages_per_step"):
            if key in mine[0]:
                row[key] = statistics.median(p[key] for p in mine)
        for target in targets:
            hits = [first_reaching(p["curve"], target) for p in mine]
            reached = [h for h in hits if h is not None]
            label = f"{target:g}"
            row[f"seconds_to_{label}"] = statistics.median(h["seconds"] for h in reached) if reached else None
            row[f"step_to_{label}"] = statistics.median(h["step"] for h in reached) if reached else None
        rows.append(row)
    return rows


def slowdowns(rows: Sequence[dict]) -> list[dict]:
    """Each mode's samples/s per worker with a straggler over its own without one (1: immune)."""
    out = []
    for r in rows:
        base = report.find(rows, mode=r["mode"], straggler=1.0)
        if r["straggler"] != 1.0 and base is not None:
            out.append({"mode": r["mode"], "straggler": r["straggler"],
                        "throughput_kept": report.ratio(r["samples_per_s_per_worker"],
                                                        base["samples_per_s_per_worker"])})  # fmt: skip
    return out


def collect(parts: Sequence[dict], settings: plans.UpdatesSettings) -> dict:
    targets = settings.accuracy_targets()
    rows = rows_of(parts, targets)
    meta = {"machine": report.machine_info(), "settings": dataclasses.asdict(settings), "targets": targets}
    return {"meta": meta, "rows": rows, "slowdowns": slowdowns(rows), "runs": list(parts)}
