"""`hvdtrain bench train`: training throughput, weak scaling, ablations and the side-by-side comparison.

For every np in 1..N (one OpenMP thread per rank unless --threads-per-rank says otherwise) it launches
hvdtrain.bench.throughput_worker twice:
  run "fusion"    (Horovod's defaults): torch DDP (gloo) first, then, alternating their order every round,
                  the minimal Horovod loop and the hvdtrain Trainer, and the Horovod loop with fp16 compression
  run "no-fusion" (HOROVOD_FUSION_THRESHOLD=0): the minimal Horovod loop
for each model shape: deep_mlp (many small tensors) and wide_mlp (few large tensors). Workers return every
rank's per-iteration samples/s; this side computes mean +- 1.96 sigma per rank and the total (np x mean,
as Horovod's pytorch_synthetic_benchmark), weak-scaling efficiency against np=1, and the ratios. The launches
and the output files are hvdtrain.bench.runner's; the table and the PNG, tables.py's and plots.py's.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hvdtrain.bench import plans, plots, report, runner, tables
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError
from hvdtrain.launching.argv import rank_env, wrapped_command
from hvdtrain.launching.options import LaunchOptions
from hvdtrain.launching.spec import make_spec

WORKER = "hvdtrain.bench.throughput_worker"
LR = 0.01  # for one rank; every arm scales it by np
TRAINER_RUNS = "trainer-runs"  # the Trainer arms' run directories, under --out; removed after the last job


@dataclasses.dataclass
class Run:
    fusion: bool  # False: HOROVOD_FUSION_THRESHOLD=0
    job: runner.Job

    @property
    def np(self) -> int:
        return self.job.spec.np


@dataclasses.dataclass
class TrainBenchPlan:
    settings: plans.TrainSettings
    out: Path
    np_list: list[int]
    controller: Optional[str]  # make_spec's decision: --gloo, --mpi, MPI for mpirun/srun, else MPI
    runs: list[Run]  # one per (np, fusion), in launch order


def measurement_order(
    models: Sequence[str],
    arms: Sequence[str],
    rounds: int,
    fp16: bool,
    pipelines: Sequence[tuple[str, int]] = (),
    piped: Sequence[str] = (),
) -> list[plans.Measurement]:
    """The "fusion" run's measurements: every DDP one first, then round after round, so that the arms of a round
    meet the machine in about one state (a shared machine's speed comes and goes over seconds): the mpi4py loop,
    the no-communication loop and the pipeline arm's (schedule, M) `pipelines` on the `piped` models (these
    references run with Horovod shut down: its background thread would take their cores), then the Horovod loop
    and the Trainer(s) (Horovod initialised again); each group's order reversed every other round; the fp16 loop
    last in its round."""
    measure = plans.Measurement
    references = [a for a in plans.MPI_ARMS if a in arms]
    pair = [a for a in ("horovod", "trainer", "sharded", "trainer_lean", "trainer_unwatched") if a in arms]
    out = [measure("ddp", model, "none", r) for r in range(rounds) for model in models] if "ddp" in arms else []
    for r in range(rounds):
        for model in models:
            group: list[plans.Measurement] = []
            for arm in references:
                if arm != "pipeline":
                    group.append(measure(arm, model, "none", r))
                elif model in piped:
                    group += [measure(arm, model, "none", r, schedule, m) for schedule, m in pipelines]
            out += group if r % 2 == 0 else group[::-1]
        for model in models:
            out += [measure(arm, model, "none", r) for arm in (pair if r % 2 == 0 else pair[::-1])]
            if fp16 and "horovod" in arms:
                out.append(measure("horovod", model, "fp16", r))
    return out


def sweep_top(max_np: Optional[int], np_flag: Optional[int], slurm: SlurmEnv) -> int:
    """The largest np of the sweep: --max-np, else -np, else SLURM_NTASKS inside an allocation, else the cores."""
    if max_np is not None and np_flag is not None and max_np != np_flag:
        raise UsageError(f"-np {np_flag} and --max-np {max_np} disagree: give one (the sweep runs np = 1..N)")
    top = max_np if max_np is not None else np_flag
    if top is None:
        top = slurm.ntasks if slurm.in_allocation else (os.cpu_count() or 1)
    if top < 1:
        raise UsageError(f"-np {top}: the number of ranks must be at least 1")
    if top > plans.MAX_RANKS:
        given = "--max-np" if max_np is not None else "-np" if np_flag is not None else "SLURM_NTASKS"
        raise UsageError(
            f"{given} {top}: the sweep runs a job for every np = 1..N, {top} jobs; give --max-np {plans.MAX_RANKS} or less"
        )
    return top


def mpi_arms_checked(settings: plans.TrainSettings, arms_given: bool, launch: LaunchOptions, slurm: SlurmEnv):
    """The mpi4py and no-communication arms need the MPI controller (MPI's Allreduce and Barrier): under Gloo
    they are left out of the default arms, and named in --arms they are an error."""
    probe = make_spec(
        ["true"], dataclasses.replace(launch, np=1), default_controller="mpi", check_cmd=False, slurm=slurm
    )
    named = [a for a in plans.MPI_ARMS if a in settings.arms]
    if probe.controller == "mpi" or not named:
        return settings
    if arms_given:
        raise UsageError(
            f"--arms {','.join(named)}: the reference loops run on MPI (mpi4py), not under Gloo; drop --gloo, or "
            f"drop {'it' if len(named) == 1 else 'them'} from --arms"
        )
    return dataclasses.replace(settings, arms=tuple(a for a in settings.arms if a not in plans.MPI_ARMS))


def make_plan(options: Mapping[str, Any], *, launch: LaunchOptions) -> TrainBenchPlan:
    """Validate every option (TrainSettings' fields; None: not given) and build one job per (np, fusion);
    raises UsageError before any run."""
    settings = plans.resolve(plans.TrainSettings, options)
    out = runner.out_dir(settings.out)
    slurm = SlurmEnv.read()  # once: the sweep's top and every job's launcher see the same job
    top = sweep_top(settings.max_np, launch.np, slurm)
    logs = runner.logs_dir(out, launch.output_dir)
    user_env = tuple(launch.env)
    launch = dataclasses.replace(
        launch,
        np=None,
        output_dir=None,
        env=(),
        threads_per_rank=1 if launch.threads_per_rank is None else launch.threads_per_rank,
    )
    settings = mpi_arms_checked(settings, options.get("arms") is not None, launch, slurm)
    shapes, run_root = settings.model_shapes, str((out / TRAINER_RUNS).resolve())
    pipelines = [(schedule, m) for schedule in settings.schedules for m in settings.micro_counts()]
    runs = []
    for np in range(1, top + 1):
        for fusion in (True, False) if settings.ablations and "horovod" in settings.arms else (True,):
            name = f"np{np}-{'fusion' if fusion else 'nofusion'}"
            env = user_env + (() if fusion else ("HOROVOD_FUSION_THRESHOLD=0",))
            spec = make_spec(
                runner.worker_command(WORKER, out, name),
                dataclasses.replace(launch, np=np, env=env, output_dir=str(logs / name)),
                # MPI unless --gloo (horovodrun's own default when Horovod has MPI): on this 2-core machine it
                # gave the Horovod loop a better 2-rank throughput than Gloo (docs/performance-methods.md).
                default_controller="mpi",
                slurm=slurm,
            )
            if fusion:
                todo = measurement_order(
                    settings.models, settings.arms, settings.rounds, settings.ablations, pipelines,
                    [m for m, shape in shapes.items() if pipeline_fits(shape, np)],
                )  # fmt: skip
            else:
                todo = [plans.Measurement("horovod", m, "none", r) for r in range(settings.rounds) for m in shapes]
            worker_plan = plans.TrainWorkerPlan(
                settings.timing, LR, spec.controller, shapes, todo, run_root, pipeline_batch=settings.pipeline_batch
            )
            about = f"np={np} {'fusion on' if fusion else 'HOROVOD_FUSION_THRESHOLD=0'} ({len(todo)} measurements)"
            detail = ", ".join(m.label for m in todo)
            runs.append(Run(fusion, runner.Job(name, spec, worker_plan, about, detail)))
    controller = runs[0].job.spec.controller
    return TrainBenchPlan(settings, out, list(range(1, top + 1)), controller, runs)


def pipeline_fits(shape: plans.ModelShape, stages: int) -> bool:
    """Whether the model splits into `stages` pipeline stages, each with a layer holding parameters."""
    from hvdtrain.config import TrainConfig

    return stages <= len(TrainConfig(model=shape.model, depth=shape.depth).layers()[1])


def run(plan: TrainBenchPlan, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Launch every (np, fusion) job in turn (or print the commands), then collect, report and plot."""
    bench = runner.Bench(
        "train",
        lambda parts: collect([(r.fusion, part) for r, part in zip(plan.runs, parts)], plan),
        tables.train,
        plots.train,
        scratch=[plan.out / TRAINER_RUNS],
    )
    return runner.run(bench, plan.out, [r.job for r in plan.runs], dry_run=dry_run, echo=echo)


# --------------------------------------------------------------------------------------------------
# Pure: from per-iteration rates to the report
# --------------------------------------------------------------------------------------------------


def config_name(arm: str, compression: str, fusion: bool, schedule: str = "", micro: int = 0) -> str:
    """'horovod', 'horovod+fp16', 'horovod-nofusion', 'trainer', 'ddp', 'pipeline-1f1b-m4'."""
    if arm == "pipeline":
        return f"pipeline-{schedule}-m{micro}"
    return arm + ("+fp16" if compression == "fp16" else "") + ("" if fusion else "-nofusion")


PIPELINE_EXTRA = ("stages", "schedule", "micro", "activation_peak_bytes", "micro_in_flight_peak")


def throughput_rows(parts: Sequence[tuple[bool, dict]]) -> list[dict]:
    """Pool rounds per (np, config, model); per rank: rank 0's mean +- 1.96 sigma; total = np x mean (a pipeline
    arm's np ranks are one replica, every rank steps the same samples: total = mean)."""
    pooled: dict[tuple, dict] = {}
    for fusion, part in parts:
        n = part["meta"]["np"]
        for m in part["measurements"]:
            config = config_name(m["arm"], m["compression"], fusion, m.get("schedule", ""), m.get("micro", 0))
            key = (n, config, m["model"])
            entry = pooled.setdefault(
                key, {"rank_rates": [[] for _ in range(n)], "extra": {}, "arm": m["arm"], "rounds": {}}
            )
            for rank, rates in enumerate(m["rank_rates"]):
                entry["rank_rates"][rank].extend(rates)
            entry["rounds"][m["round"]] = report.summary_stats(m["rank_rates"][0])["mean"]
            entry["extra"].update(
                {k: v for k, v in m.items()
                 if k in ("method", "fit_samples_per_s", "optimizer_state_bytes", "wrapper_cpu_s_per_step",
                          "progress_us_per_step") or (k in PIPELINE_EXTRA and m[k])}
            )  # fmt: skip
            entry.update(compression=m["compression"], fusion=fusion, threads=part["meta"]["threads_per_rank"])
    rows = []
    for (n, config, model), e in sorted(pooled.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        s = report.summary_stats(e["rank_rates"][0])
        replicas = 1 if e["arm"] == "pipeline" else n
        rows.append({
            "np": n, "config": config, "arm": e["arm"], "model": model, "compression": e["compression"],
            "fusion": e["fusion"], "threads_per_rank": e["threads"], "iterations": s["n"],
            "per_rank_mean": s["mean"], "per_rank_sd": s["sd"], "per_rank_conf": s["conf"],
            "total": replicas * s["mean"], "total_conf": replicas * s["conf"],
            "rank_means": [report.summary_stats(r)["mean"] for r in e["rank_rates"]],
            "round_means": [e["rounds"][k] for k in sorted(e["rounds"])], **e["extra"],
        })  # fmt: skip
    return rows


def scaling_rows(rows: Sequence[dict]) -> list[dict]:
    """Weak-scaling efficiency of every config against its own np=1 throughput, with a propagated spread."""
    out = []
    for r in rows:
        if r["arm"] == "pipeline":
            continue  # one replica at every np: its speed-up against M is pipeline_rows'
        one = next((o for o in rows if o["np"] == 1 and o["config"] == r["config"] and o["model"] == r["model"]), None)
        if one is None:
            continue
        total = {"mean": r["total"], "conf": r["total_conf"]}
        single = {"mean": one["total"], "conf": one["total_conf"]}
        out.append({
            "model": r["model"], "config": r["config"], "np": r["np"], "total": r["total"],
            "efficiency": report.efficiency(r["total"], r["np"], one["total"]),
            # np=1 is the reference itself: efficiency 1 by definition, no spread of its own.
            "efficiency_conf": None if r["np"] == 1 else report.efficiency_spread(total, r["np"], single),
        })  # fmt: skip
    return out


# Arms that run in every round (DDP runs first, all its rounds: its ratios are the pooled means').
PAIRED_RATIOS = (("trainer", "horovod"), ("trainer", "mpi4py"), ("trainer", "nocomm"), ("horovod", "mpi4py"),
                 ("horovod", "nocomm"), ("mpi4py", "nocomm"))  # fmt: skip


def side_by_side(rows: Sequence[dict]) -> list[dict]:
    """Trainer, minimal Horovod loop, DDP, the sharded-optimizer loop and the two references (the minimal mpi4py
    loop: what the communication allows; no communication: the hardware ceiling) at the same np and model: totals
    and their ratios; the two Horovod loops' optimizer state per rank."""
    out = []
    configs = ("trainer", "horovod", "ddp", "sharded", "mpi4py", "nocomm")
    for np, model in sorted({(r["np"], r["model"]) for r in rows}):
        got = {c: report.find(rows, np=np, model=model, config=c) for c in configs}
        if sum(r is not None for r in got.values()) < 2:
            continue  # nothing to compare
        totals = {c: (r["total"] if r else None) for c, r in got.items()}
        line = {"np": np, "model": model, **{f"{c}_total": v for c, v in totals.items()}}
        line["trainer_over_horovod"] = report.ratio(totals["trainer"], totals["horovod"])
        line["trainer_over_ddp"] = report.ratio(totals["trainer"], totals["ddp"])
        line["horovod_over_ddp"] = report.ratio(totals["horovod"], totals["ddp"])
        line["sharded_over_horovod"] = report.ratio(totals["sharded"], totals["horovod"])
        for c in ("trainer", "horovod", "mpi4py"):
            line[f"{c}_over_nocomm"] = report.ratio(totals[c], totals["nocomm"])
        for c in ("trainer", "horovod"):
            line[f"{c}_over_mpi4py"] = report.ratio(totals[c], totals["mpi4py"])
        for c in ("horovod", "sharded"):
            line[f"{c}_state_bytes"] = got[c].get("optimizer_state_bytes") if got[c] else None
        line["state_sharded_over_horovod"] = report.ratio(line["sharded_state_bytes"], line["horovod_state_bytes"])
        # Every arm runs once per round, the rounds one after another: the median of per-round ratios resists
        # load that comes and goes on a shared machine better than the ratio of the pooled means.
        for a, b in PAIRED_RATIOS:
            if got[a] and got[b]:
                paired = [report.ratio(x, y) for x, y in zip(got[a]["round_means"], got[b]["round_means"])]
                line[f"{a}_over_{b}_per_round"] = paired
                line[f"{a}_over_{b}_median_round"] = statistics.median(paired) if paired else None
        # The verdicts: the median of rounds where there are rounds to pair, else the pooled ratio.
        for key, target in plans.TRAIN_TARGETS.items():
            value = line.get(f"{key}_median_round", line[key])
            line[f"{key}_target_met"] = None if value is None else value >= target
        out.append(line)
    return out


def ablation_rows(rows: Sequence[dict]) -> list[dict]:
    """The Horovod loop without tensor fusion and with fp16 compression, against the loop with neither."""
    out = []
    for np, model in sorted({(r["np"], r["model"]) for r in rows}):
        base = report.find(rows, np=np, model=model, config="horovod")
        if base is None:
            continue
        line = {"np": np, "model": model, "base_total": base["total"]}
        for label, config in (("no_fusion", "horovod-nofusion"), ("fp16", "horovod+fp16")):
            r = report.find(rows, np=np, model=model, config=config)
            line[f"{label}_total"] = r["total"] if r else None
            line[f"{label}_over_base"] = report.ratio(r["total"] if r else None, base["total"])
        out.append(line)
    return out


def pipeline_rows(rows: Sequence[dict]) -> list[dict]:
    """The pipeline arm against M: each (model, schedule, P = np, M) with its samples/s, the speed-up over the
    unsplit model on one rank (P = 1, M = 1, the same schedule's row), the bubble model's (P-1)/(M+P-1) and the
    speed-up it allows with concurrent stages, P x M / (M + P - 1); each stage's peak activation bytes."""
    out = []
    for r in rows:
        if r["arm"] != "pipeline":
            continue
        p, m, schedule = r["np"], r["micro"], r["schedule"]
        one = report.find(rows, np=1, model=r["model"], config=config_name("pipeline", "none", True, schedule, 1))
        out.append({
            "model": r["model"], "schedule": schedule, "stages": p, "micro_batches": m, "total": r["total"],
            "total_conf": r["total_conf"], "speedup": report.ratio(r["total"], one["total"] if one else None),
            "bubble": (p - 1) / (m + p - 1), "ideal_speedup": p * m / (m + p - 1),
            "activation_peak_bytes": r.get("activation_peak_bytes"),
            "micro_in_flight_peak": r.get("micro_in_flight_peak"),
        })  # fmt: skip
    return sorted(out, key=lambda x: (x["model"], x["schedule"], x["stages"], x["micro_batches"]))


def collect(parts: Sequence[tuple[bool, dict]], plan: Optional[TrainBenchPlan] = None) -> dict:
    rows = throughput_rows(parts)
    meta: dict[str, Any] = {"machine": report.machine_info(), "workers": [p["meta"] for _, p in parts]}
    if plan is not None:
        s = plan.settings
        meta.update(np_list=plan.np_list, models={m: dataclasses.asdict(v) for m, v in s.model_shapes.items()})
        meta.update(arms=list(s.arms), controller=plan.controller, tiny=s.tiny, targets=plans.TRAIN_TARGETS)
        meta["settings"] = {**dataclasses.asdict(s.timing), "rounds": s.rounds, "pipeline_batch": s.pipeline_batch}
        meta["commands"] = [
            {"np": r.np, "fusion": r.fusion, "env": rank_env(r.job.spec, False),
             "command": shlex.join(wrapped_command(r.job.spec, "LOGDIR"))}
            for r in plan.runs
        ]  # fmt: skip
    return {
        "meta": meta,
        "rows": rows,
        "scaling": scaling_rows(rows),
        "side_by_side": side_by_side(rows),
        "ablations": ablation_rows(rows),
        "pipeline": pipeline_rows(rows),
    }
