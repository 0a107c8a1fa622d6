"""`hvdtrain bench train`: training throughput, weak scaling, ablations and the side-by-side comparison.

For every np in 1..N (one OpenMP thread per rank unless --threads-per-rank says otherwise) it launches
hvdtrain.bench.throughput_worker twice:
  run "fusion"    (Horovod's defaults): torch DDP (gloo) first, then, alternating their order every round,
                  the minimal Horovod loop and the hvdtrain Trainer, and the Horovod loop with fp16 compression
  run "no-fusion" (HOROVOD_FUSION_THRESHOLD=0): the minimal Horovod loop
for each model shape: deep_mlp (many small tensors) and wide_mlp (few large tensors). Workers return every
rank's per-iteration samples/s; this side computes mean +- 1.96 sigma per rank and the total (np x mean,
as Horovod's pytorch_synthetic_benchmark), weak-scaling efficiency against np=1, and the ratios.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hvdtrain import launch as L
from hvdtrain.bench import report as R
from hvdtrain.errors import UsageError

ARMS = ("horovod", "trainer", "ddp", "trainer_lean")  # trainer_lean: a diagnostic, only when asked for
DEFAULT_ARMS = ("horovod", "trainer", "ddp")
MODELS = {
    # name: how hvdtrain.train.models.build makes it (input 1x8x8, 10 classes)
    "deep_mlp": {"model": "deep_mlp", "hidden": 128, "depth": 16, "about": "many small tensors (36)"},
    "wide_mlp": {"model": "mlp", "hidden": 1024, "depth": 1, "about": "few large tensors (6)"},
}
TINY_MODELS = {
    "deep_mlp": {"model": "deep_mlp", "hidden": 32, "depth": 4, "about": "many small tensors (12)"},
    "wide_mlp": {"model": "mlp", "hidden": 256, "depth": 1, "about": "few large tensors (6)"},
}
DEFAULTS = {"batch_size": 32, "warmup": 10, "iters": 10, "batches_per_iter": 10, "rounds": 2}
TINY = {"batch_size": 16, "warmup": 2, "iters": 3, "batches_per_iter": 2, "rounds": 1}
TARGETS = {"trainer_over_horovod": 0.98, "trainer_over_ddp": 1.0}


@dataclasses.dataclass
class Run:
    np: int
    fusion: bool  # False: HOROVOD_FUSION_THRESHOLD=0
    spec: L.LaunchSpec
    measurements: list[dict]

    @property
    def name(self) -> str:
        return f"np{self.np}-{'fusion' if self.fusion else 'nofusion'}"


@dataclasses.dataclass
class TrainBenchPlan:
    out: Path
    np_list: list[int]
    models: dict[str, dict]
    arms: list[str]
    ablations: bool
    controller: str
    settings: dict[str, int]  # batch_size, warmup, iters, batches_per_iter, rounds
    runs: list[Run]
    tiny: bool = False


def _csv(text: Optional[str], valid: Sequence[str], flag: str) -> Optional[list[str]]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    bad = [t for t in items if t not in valid]
    if not text.strip() or bad:
        raise UsageError(
            f"{flag}: unknown {', '.join(repr(b) for b in bad) or 'empty list'}; choose from {', '.join(valid)}"
        )
    return list(dict.fromkeys(items))


def measurement_order(models: Sequence[str], arms: Sequence[str], rounds: int, fp16: bool) -> list[dict]:
    """The "fusion" run's measurements: every ddp one first (before Horovod starts), then per round and
    model the Horovod loop and the Trainer(s), their order reversed every other round, then the fp16 loop."""
    out = []
    if "ddp" in arms:
        out += [{"arm": "ddp", "model": m, "compression": "none", "round": r} for r in range(rounds) for m in models]
    pair = [a for a in ("horovod", "trainer", "trainer_lean") if a in arms]
    for r in range(rounds):
        for m in models:
            for arm in pair if r % 2 == 0 else pair[::-1]:
                out.append({"arm": arm, "model": m, "compression": "none", "round": r})
            if fp16 and "horovod" in arms:
                out.append({"arm": "horovod", "model": m, "compression": "fp16", "round": r})
    return out


def worker_command(plan_path: Path, part_path: Path) -> list[str]:
    return [sys.executable, "-m", "hvdtrain.bench.throughput_worker", str(plan_path), str(part_path)]


def make_plan(
    out: str,
    *,
    max_np: Optional[int] = None,
    models: Optional[str] = None,
    arms: Optional[str] = None,
    batch_size: Optional[int] = None,
    warmup: Optional[int] = None,
    iters: Optional[int] = None,
    batches_per_iter: Optional[int] = None,
    rounds: Optional[int] = None,
    ablations: bool = True,
    tiny: bool = False,
    launch: dict[str, Any],
) -> TrainBenchPlan:
    """Validate every option and build one launch spec per (np, fusion); raises UsageError before any run."""
    given = {
        "batch_size": batch_size,
        "warmup": warmup,
        "iters": iters,
        "batches_per_iter": batches_per_iter,
        "rounds": rounds,
    }
    base = TINY if tiny else DEFAULTS
    settings = {k: base[k] if v is None else v for k, v in given.items()}
    for key, low in (("batch_size", 1), ("warmup", 0), ("iters", 1), ("batches_per_iter", 1), ("rounds", 1)):
        if settings[key] < low:
            raise UsageError(f"--{key.replace('_', '-')} {settings[key]}: must be at least {low}")
    catalogue = TINY_MODELS if tiny else MODELS
    model_names = _csv(models, list(catalogue), "--models") or list(catalogue)
    arm_names = _csv(arms, ARMS, "--arms") or list(DEFAULT_ARMS)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; give a directory")

    launch = dict(launch)
    np_flag, logs = launch.pop("np", None), launch.pop("output_dir", None)
    if max_np is not None and np_flag is not None and max_np != np_flag:
        raise UsageError(f"-np {np_flag} and --max-np {max_np} disagree: give one (the sweep runs np = 1..N)")
    top = max_np if max_np is not None else np_flag
    if top is None:
        top = int(os.environ.get("SLURM_NTASKS", 0)) if L.in_slurm_allocation(os.environ) else (os.cpu_count() or 1)
    if top < 1:
        raise UsageError(f"--max-np {top}: must be at least 1")
    gloo, mpi = launch.pop("gloo", False), launch.pop("mpi", False)
    if gloo and mpi:
        raise UsageError("--gloo and --mpi exclude each other: pick one controller")
    launcher = launch.get("launcher")
    in_slurm = L.in_slurm_allocation(os.environ) and not (launch.get("hosts") or launch.get("hostfile"))
    horovodrun = launcher == "horovodrun" or (launcher is None and not in_slurm)
    # MPI unless --gloo (horovodrun's own default when Horovod has MPI): on this 2-core machine it gave the
    # Horovod loop a better 2-rank throughput than Gloo in both final runs (docs/performance.md).
    controller = "gloo" if gloo else "mpi"
    if launch.get("threads_per_rank") is None:
        launch["threads_per_rank"] = 1
    user_env = list(launch.pop("env", ()) or ())

    runs = []
    for np in range(1, top + 1):
        for fusion in (True, False) if ablations and "horovod" in arm_names else (True,):
            name = f"np{np}-{'fusion' if fusion else 'nofusion'}"
            env = user_env + ([] if fusion else ["HOROVOD_FUSION_THRESHOLD=0"])
            spec = L.make_spec(
                worker_command(out_dir / "parts" / f"plan-{name}.json", out_dir / "parts" / f"{name}.json"),
                np=np, gloo=controller == "gloo", mpi=controller == "mpi" and horovodrun, env=env,
                output_dir=str(Path(logs or out_dir / "logs") / name), **launch,
            )  # fmt: skip
            if fusion:
                todo = measurement_order(model_names, arm_names, settings["rounds"], ablations)
            else:
                todo = [
                    {"arm": "horovod", "model": m, "compression": "none", "round": r}
                    for r in range(settings["rounds"])
                    for m in model_names
                ]
            runs.append(Run(np=np, fusion=fusion, spec=spec, measurements=todo))
    return TrainBenchPlan(
        out=out_dir, np_list=list(range(1, top + 1)), models={m: catalogue[m] for m in model_names}, arms=arm_names,
        ablations=ablations, controller=controller, settings=settings, runs=runs, tiny=tiny,
    )  # fmt: skip


def run(plan: TrainBenchPlan, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Launch every (np, fusion) run in turn (or print the commands), then collect, report and plot."""
    if dry_run:
        for r in plan.runs:
            echo(
                f"# np={r.np} {'fusion on' if r.fusion else 'HOROVOD_FUSION_THRESHOLD=0'}: "
                + ", ".join(_label(m) for m in r.measurements)
            )
            L.run_job(r.spec, dry_run=True, echo=echo)
        return {}
    parts = plan.out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for r in plan.runs:
        store = parts / f".torch-store-{r.name}-{os.getpid()}-{time.time_ns()}"
        worker_plan = {
            **plan.settings, "models": plan.models, "measurements": r.measurements, "lr": 0.01,
            "controller": plan.controller, "store": str(store.resolve()),
            "run_root": str((plan.out / "trainer-runs").resolve()),
        }  # fmt: skip
        R.write_json(parts / f"plan-{r.name}.json", worker_plan)
        (parts / f"{r.name}.json").unlink(missing_ok=True)
        echo(
            f"hvdtrain bench train: np={r.np} {'' if r.fusion else 'HOROVOD_FUSION_THRESHOLD=0 '}({len(r.measurements)} measurements) ..."
        )
        try:
            L.run_job(r.spec, echo=lambda _line: None)
        finally:
            store.unlink(missing_ok=True)
    shutil.rmtree(plan.out / "trainer-runs", ignore_errors=True)
    loaded = [(r.fusion, R.read_json(parts / f"{r.name}.json")) for r in plan.runs]
    result = collect(loaded, plan)
    R.write_json(plan.out / "train.json", result)
    plot(result, plan.out / "train.png")
    echo(table(result))
    echo(f"wrote {plan.out / 'train.json'} and {plan.out / 'train.png'}")
    return result


def _label(m: dict) -> str:
    return f"{m['arm']}/{m['model']}" + ("/fp16" if m["compression"] == "fp16" else "")


# --------------------------------------------------------------------------------------------------
# Pure: from per-iteration rates to the report
# --------------------------------------------------------------------------------------------------


def config_name(arm: str, compression: str, fusion: bool) -> str:
    """'horovod', 'horovod+fp16', 'horovod-nofusion', 'trainer', 'ddp'."""
    return arm + ("+fp16" if compression == "fp16" else "") + ("" if fusion else "-nofusion")


def throughput_rows(parts: Sequence[tuple[bool, dict]]) -> list[dict]:
    """Pool rounds per (np, config, model); per rank: rank 0's mean +- 1.96 sigma; total = np x mean."""
    pooled: dict[tuple, dict] = {}
    for fusion, part in parts:
        n = part["meta"]["np"]
        for m in part["measurements"]:
            key = (n, config_name(m["arm"], m["compression"], fusion), m["model"])
            entry = pooled.setdefault(
                key, {"rank_rates": [[] for _ in range(n)], "extra": {}, "arm": m["arm"], "rounds": {}}
            )
            for rank, rates in enumerate(m["rank_rates"]):
                entry["rank_rates"][rank].extend(rates)
            entry["rounds"][m["round"]] = R.summary_stats(m["rank_rates"][0])["mean"]
            entry["extra"].update({k: v for k, v in m.items() if k in ("method", "fit_samples_per_s")})
            entry.update(compression=m["compression"], fusion=fusion, threads=part["meta"]["threads_per_rank"])
    rows = []
    for (n, config, model), e in sorted(pooled.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        s = R.summary_stats(e["rank_rates"][0])
        rows.append({
            "np": n, "config": config, "arm": e["arm"], "model": model, "compression": e["compression"],
            "fusion": e["fusion"], "threads_per_rank": e["threads"], "iterations": s["n"],
            "per_rank_mean": s["mean"], "per_rank_sd": s["sd"], "per_rank_conf": s["conf"],
            "total": n * s["mean"], "total_conf": n * s["conf"],
            "rank_means": [R.summary_stats(r)["mean"] for r in e["rank_rates"]],
            "round_means": [e["rounds"][k] for k in sorted(e["rounds"])], **e["extra"],
        })  # fmt: skip
    return rows


def scaling_rows(rows: Sequence[dict]) -> list[dict]:
    """Weak-scaling efficiency of every config against its own np=1 throughput, with a propagated spread."""
    out = []
    for r in rows:
        one = next((o for o in rows if o["np"] == 1 and o["config"] == r["config"] and o["model"] == r["model"]), None)
        if one is None:
            continue
        total = {"mean": r["total"], "conf": r["total_conf"]}
        single = {"mean": one["total"], "conf": one["total_conf"]}
        out.append({
            "model": r["model"], "config": r["config"], "np": r["np"], "total": r["total"],
            "efficiency": R.efficiency(r["total"], r["np"], one["total"]),
            # np=1 is the reference itself: efficiency 1 by definition, no spread of its own.
            "efficiency_conf": None if r["np"] == 1 else R.efficiency_spread(total, r["np"], single),
        })  # fmt: skip
    return out


def _find(rows: Sequence[dict], np: int, model: str, config: str) -> Optional[dict]:
    return next((r for r in rows if r["np"] == np and r["model"] == model and r["config"] == config), None)


def side_by_side(rows: Sequence[dict]) -> list[dict]:
    """Trainer, minimal Horovod loop and DDP at the same np and model: totals and their ratios."""
    out = []
    for np, model in sorted({(r["np"], r["model"]) for r in rows}):
        got = {c: _find(rows, np, model, c) for c in ("trainer", "horovod", "ddp")}
        if sum(r is not None for r in got.values()) < 2:
            continue  # nothing to compare
        totals = {c: (r["total"] if r else None) for c, r in got.items()}
        line = {"np": np, "model": model, **{f"{c}_total": v for c, v in totals.items()}}
        line["trainer_over_horovod"] = R.ratio(totals["trainer"], totals["horovod"])
        line["trainer_over_ddp"] = R.ratio(totals["trainer"], totals["ddp"])
        line["horovod_over_ddp"] = R.ratio(totals["horovod"], totals["ddp"])
        # The Trainer and the loop alternate within each round: the median of per-round ratios resists
        # load that comes and goes on a shared machine better than the ratio of the pooled means.
        if got["trainer"] and got["horovod"]:
            paired = [R.ratio(a, b) for a, b in zip(got["trainer"]["round_means"], got["horovod"]["round_means"])]
            line["trainer_over_horovod_per_round"] = paired
            line["trainer_over_horovod_median_round"] = statistics.median(paired) if paired else None
        for key, target in TARGETS.items():
            line[f"{key}_target_met"] = None if line[key] is None else line[key] >= target
        out.append(line)
    return out


def ablation_rows(rows: Sequence[dict]) -> list[dict]:
    """The Horovod loop without tensor fusion and with fp16 compression, against the loop with neither."""
    out = []
    for np, model in sorted({(r["np"], r["model"]) for r in rows}):
        base = _find(rows, np, model, "horovod")
        if base is None:
            continue
        line = {"np": np, "model": model, "base_total": base["total"]}
        for label, config in (("no_fusion", "horovod-nofusion"), ("fp16", "horovod+fp16")):
            r = _find(rows, np, model, config)
            line[f"{label}_total"] = r["total"] if r else None
            line[f"{label}_over_base"] = R.ratio(r["total"] if r else None, base["total"])
        out.append(line)
    return out


def collect(parts: Sequence[tuple[bool, dict]], plan: Optional[TrainBenchPlan] = None) -> dict:
    rows = throughput_rows(parts)
    meta: dict[str, Any] = {"machine": R.machine_info(), "workers": [p["meta"] for _, p in parts]}
    if plan is not None:
        meta.update(np_list=plan.np_list, models=plan.models, arms=plan.arms, controller=plan.controller)
        meta.update(settings=plan.settings, tiny=plan.tiny, targets=TARGETS)
        meta["commands"] = [
            {"np": r.np, "fusion": r.fusion, "env": L.rank_env(r.spec, False), "command": shlex.join(L.wrapped_command(r.spec, "LOGDIR"))}
            for r in plan.runs
        ]  # fmt: skip
    return {
        "meta": meta,
        "rows": rows,
        "scaling": scaling_rows(rows),
        "side_by_side": side_by_side(rows),
        "ablations": ablation_rows(rows),
    }


def _pm(mean: float, conf: float) -> str:
    return f"{mean:,.0f} +- {conf:,.0f}"


def table(result: dict) -> str:
    rows = result["rows"]
    eff = {(s["model"], s["config"], s["np"]): s for s in result["scaling"]}
    lines = []
    for r in rows:
        e = eff.get((r["model"], r["config"], r["np"]))
        spread = (
            None
            if e is None
            else f"{e['efficiency']:.3f}"
            if e["efficiency_conf"] is None
            else f"{e['efficiency']:.3f} +- {e['efficiency_conf']:.3f}"
        )
        lines.append(
            [
                r["model"],
                r["config"],
                r["np"],
                _pm(r["per_rank_mean"], r["per_rank_conf"]),
                _pm(r["total"], r["total_conf"]),
                spread,
            ]
        )
    out = [R.render_table(
        ["model", "config", "np", "samples/s per rank", "total samples/s", "weak-scaling eff."], lines,
        "throughput (mean +- 1.96 sigma over iterations; total = np x per rank, as pytorch_synthetic_benchmark)",
    )]  # fmt: skip
    sbs = result["side_by_side"]
    if sbs:
        out.append("")
        out.append(R.render_table(
            ["model", "np", "trainer", "horovod", "ddp", "trainer/horovod", "(median of rounds)", "trainer/ddp", "horovod/ddp"],
            [[s["model"], s["np"], s["trainer_total"], s["horovod_total"], s["ddp_total"], s["trainer_over_horovod"],
              s.get("trainer_over_horovod_median_round"), s["trainer_over_ddp"], s["horovod_over_ddp"]] for s in sbs],
            "side by side (total samples/s; targets: trainer/horovod >= 0.98, trainer/ddp >= 1.0)",
        ))  # fmt: skip
        for s in sbs:
            verdicts = [
                f"{k} {'met' if s[f'{k}_target_met'] else 'NOT met'}"
                for k in TARGETS
                if s[f"{k}_target_met"] is not None
            ]
            if verdicts:
                out.append(f"  {s['model']} np={s['np']}: " + "; ".join(verdicts))
    abl = result["ablations"]
    if abl and any(a["no_fusion_total"] is not None or a["fp16_total"] is not None for a in abl):
        out.append("")
        out.append(R.render_table(
            ["model", "np", "horovod", "no fusion", "ratio", "fp16", "ratio"],
            [[a["model"], a["np"], a["base_total"], a["no_fusion_total"], a["no_fusion_over_base"], a["fp16_total"],
              a["fp16_over_base"]] for a in abl],
            "ablations of the Horovod loop (total samples/s; ratio to fusion on, no compression)",
        ))  # fmt: skip
    return "\n".join(out)


def plot(result: dict, path: Path) -> Path:
    """Total throughput against np (with ideal linear scaling), side-by-side and ablation bars at the largest np."""
    rows = result["rows"]
    top = max(r["np"] for r in rows)

    def draw(axes):
        scale, sbs, abl = axes
        for model in sorted({r["model"] for r in rows}):
            mine = sorted((r for r in rows if r["model"] == model and r["config"] == "horovod"), key=lambda r: r["np"])
            if not mine:
                continue
            nps = [r["np"] for r in mine]
            line = scale.errorbar(
                nps,
                [r["total"] for r in mine],
                yerr=[r["total_conf"] for r in mine],
                marker="o",
                capsize=3,
                label=model,
            )
            one = next((r["total"] for r in mine if r["np"] == 1), None)
            if one:
                scale.plot(
                    nps, [one * n for n in nps], linestyle=":", color=line[0].get_color(), label=f"{model} ideal"
                )
        scale.set_xticks(sorted({r["np"] for r in rows}))
        scale.set_xlabel("ranks (np)")
        scale.set_ylabel("total samples/s")
        scale.set_title("weak scaling, minimal Horovod loop")
        scale.legend(fontsize=8)
        _bars(sbs, rows, top, ("trainer", "horovod", "ddp"), "side by side")
        _bars(abl, rows, top, ("horovod", "horovod-nofusion", "horovod+fp16"), "ablations")

    return R.save_plot(path, draw, ncols=3, width=5.0)


def _bars(ax, rows: Sequence[dict], np: int, configs: Sequence[str], title: str) -> None:
    models = sorted({r["model"] for r in rows})
    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        got = [_find(rows, np, m, config) for m in models]
        xs = [j + i * width for j in range(len(models))]
        ax.bar(
            xs,
            [g["total"] if g else 0 for g in got],
            width,
            yerr=[g["total_conf"] if g else 0 for g in got],
            capsize=3,
            label=config,
        )
    ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(models))])
    ax.set_xticklabels(models)
    ax.set_ylabel("total samples/s")
    ax.set_title(f"{title}, np={np}")
    ax.legend(fontsize=8)
