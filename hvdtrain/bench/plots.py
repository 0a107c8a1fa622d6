"""The benchmarks' PNGs, from their results (allreduce.json, train.json) alone; matplotlib is imported by
render.save_plot only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hvdtrain.bench import plans, report
from hvdtrain.render import save_plot


def allreduce(result: dict, path: Path) -> Path:
    """busbw against size for every implementation, memcpy as this machine's limit; time against size."""
    rows = result["rows"]

    def draw(axes):
        bw, t = axes
        for impl in (*plans.IMPLS, "memcpy"):
            mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["bytes"])
            if not mine:
                continue
            xs = [r["bytes"] for r in mine]
            key = "algbw_GBps" if impl == "memcpy" else "busbw_GBps"
            style = {"linestyle": "--", "color": "black"} if impl == "memcpy" else {"marker": "o", "markersize": 3}
            label = plans.IMPL_LABELS.get(impl, impl)
            bw.plot(xs, [max(r[key], 1e-9) for r in mine], label=label, **style)
            if impl != "memcpy":
                t.plot(xs, [r["time_us"] for r in mine], label=label, marker="o", markersize=3)
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("message size (bytes)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        bw.set_ylabel("bus bandwidth (GB/s); memcpy: copy GB/s")
        t.set_ylabel("time per allreduce (us)")
        bw.set_title(f"allreduce busbw, {result['meta']['np']} ranks")
        t.set_title("allreduce time")

    return save_plot(path, draw, ncols=2, width=6.5)


def train(result: dict, path: Path) -> Path:
    """Total throughput against np (with ideal linear scaling), side-by-side and ablation bars at the largest np;
    with pipeline arms, their speed-up against M beside the bubble model's."""
    rows = result["rows"]
    top = max(r["np"] for r in rows)
    pipe = result.get("pipeline") or []

    def draw(axes):
        scale, sbs, abl = axes[:3]
        if pipe:
            _pipeline(axes[3], pipe)
        for model in sorted({r["model"] for r in rows}):
            mine = sorted((r for r in rows if r["model"] == model and r["config"] == "horovod"), key=lambda r: r["np"])
            if not mine:
                continue
            nps = [r["np"] for r in mine]
            totals = [r["total"] for r in mine]
            line = scale.errorbar(nps, totals, yerr=[r["total_conf"] for r in mine], marker="o", capsize=3, label=model)
            one = next((r["total"] for r in mine if r["np"] == 1), None)
            if one:
                ideal = [one * n for n in nps]
                scale.plot(nps, ideal, linestyle=":", color=line[0].get_color(), label=f"{model} ideal")
        scale.set_xticks(sorted({r["np"] for r in rows}))
        scale.set_xlabel("ranks (np)")
        scale.set_ylabel("total samples/s")
        scale.set_title("weak scaling, minimal Horovod loop")
        scale.legend(fontsize=8)
        _bars(sbs, rows, top, ("trainer", "horovod", "ddp", "mpi4py", "nocomm"), "side by side")
        _bars(abl, rows, top, ("horovod", "horovod-nofusion", "horovod+fp16"), "ablations")

    return save_plot(path, draw, ncols=4 if pipe else 3, width=5.0)


def _pipeline(ax, pipe: Sequence[dict]) -> None:
    """Measured speed-up over P = 1, M = 1 against M, per (model, schedule, P > 1), and the ideal P*M/(M+P-1)."""
    for key in sorted({(p["model"], p["schedule"], p["stages"]) for p in pipe if p["stages"] > 1}):
        mine = sorted(
            (p for p in pipe if (p["model"], p["schedule"], p["stages"]) == key), key=lambda p: p["micro_batches"]
        )
        ms = [p["micro_batches"] for p in mine]
        line = ax.plot(ms, [p["speedup"] or 0 for p in mine], marker="o", label=f"{key[0]} {key[1]} P={key[2]}")
        ax.plot(ms, [p["ideal_speedup"] for p in mine], linestyle=":", color=line[0].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches M")
    ax.set_ylabel("speed-up over P = 1 (dotted: P*M/(M+P-1))")
    ax.set_title("pipeline across ranks")
    ax.legend(fontsize=8)


def _bars(ax, rows: Sequence[dict], np: int, configs: Sequence[str], title: str) -> None:
    models = sorted({r["model"] for r in rows})
    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        got = [report.find(rows, np=np, model=m, config=config) for m in models]
        xs = [j + i * width for j in range(len(models))]
        totals = [g["total"] if g else 0 for g in got]
        ax.bar(xs, totals, width, yerr=[g["total_conf"] if g else 0 for g in got], capsize=3, label=config)
    ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(models))])
    ax.set_xticklabels(models)
    ax.set_ylabel("total samples/s")
    ax.set_title(f"{title}, np={np}")
    ax.legend(fontsize=8)


def updates(result: dict, path: Path) -> Path:
    """Test accuracy against training time and against step, one line per (mode, straggler), the first round."""
    runs = [r for r in result["runs"] if r["round"] == 0]

    def draw(axes):
        by_time, by_step = axes
        colours = {}
        for run in sorted(runs, key=lambda r: (r["mode"], r["straggler"])):
            xs_t = [p["seconds"] for p in run["curve"]]
            xs_s = [p["step"] for p in run["curve"]]
            ys = [p["test_accuracy"] for p in run["curve"]]
            style = {"linestyle": "-" if run["straggler"] == 1 else "--", "marker": "o", "markersize": 3}
            if run["mode"] in colours:
                style["color"] = colours[run["mode"]]
            label = run["mode"] + ("" if run["straggler"] == 1 else f", straggler x{run['straggler']:g}")
            line = by_time.plot(xs_t, ys, label=label, **style)
            colours.setdefault(run["mode"], line[0].get_color())
            by_step.plot(xs_s, ys, label=label, **{**style, "color": colours[run["mode"]]})
        for ax, xlabel in ((by_time, "training time (s, evaluations excluded)"), (by_step, "step (per worker)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_ylim(bottom=max(0.0, min((p["test_accuracy"] for r in runs for p in r["curve"]), default=0) - 0.05))
        by_time.set_title("accuracy against time")
        by_step.set_title("accuracy against step")

    return save_plot(path, draw, ncols=2, width=6.0)
