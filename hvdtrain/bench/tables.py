"""The benchmarks' text tables, from their results (allreduce.json, train.json) alone."""

from __future__ import annotations

from typing import Any, Optional

from hvdtrain.bench import plans, report
from hvdtrain.render import render_table


def allreduce(result: dict) -> str:
    """Time per call (us) and busbw (GB/s) per implementation, one line per size; memcpy's copy GB/s."""
    rows = result["rows"]
    impls = [i for i in plans.IMPLS if any(r["impl"] == i for r in rows)]
    has_memcpy = any(r["impl"] == "memcpy" for r in rows)
    headers = ["size"]
    for impl in impls:
        headers += [f"{plans.IMPL_LABELS[impl]} us", f"{plans.IMPL_LABELS[impl]} bus"]
    if has_memcpy:
        headers.append("memcpy GB/s")
    by = {(r["impl"], r["bytes"]): r for r in rows}
    lines = []
    for size in result["meta"]["sizes"]:
        line: list[Any] = [report.format_bytes(size)]
        for impl in impls:
            r = by.get((impl, size))
            line += [r["time_us"], r["busbw_GBps"]] if r else [None, None]
        if has_memcpy:
            r = by.get(("memcpy", size))
            line.append(r["algbw_GBps"] if r else None)
        lines.append(line)
    s = result["summary"]
    n = result["meta"]["np"]
    title = f"allreduce on {n} ranks: time per call (us) and bus bandwidth busbw = algbw x 2(n-1)/n (GB/s)"
    out = [render_table(headers, lines, title)]
    ref = report.format_bytes(s["reference_bytes"])
    for key, label in (
        ("horovod_mpi_over_mpi4py_busbw", "Horovod (MPI, in place) / mpi4py busbw"),
        ("horovod_mpi_oop_over_mpi4py_busbw", "Horovod (MPI, out of place) / mpi4py busbw"),
        ("horovod_gloo_over_torch_gloo_busbw", "Horovod (Gloo) / torch.distributed gloo busbw"),
    ):
        if s.get(key) is not None:
            out.append(f"{label} at {ref}: {s[key]:.3f}")
    if s.get("target_met") is not None:
        target = s["target_horovod_mpi_over_mpi4py"]
        verdict = "met" if s["target_met"] else "NOT met"
        at = s.get("horovod_mpi_over_mpi4py_busbw_at") or {str(s["reference_bytes"]): None}
        where = " and ".join(report.format_bytes(int(k)) for k in at)
        out.append(f"target Horovod (MPI, in place) busbw >= {target} x mpi4py at {where}: {verdict}")
        for k in at:
            size, paired = report.format_bytes(int(k)), (s.get("paired_at") or {}).get(k)
            if paired:
                (lo, hi), sweep = paired["range"], (s.get("sweep_horovod_mpi_over_mpi4py_busbw_at") or {}).get(k)
                line = f"  at {size}: {paired['median']:.3f}, median of {paired['pairs']} pairs of back-to-back blocks"
                out.append(
                    f"{line} ({lo:.2f}-{hi:.2f})" + (f"; the sweep above: {sweep:.3f}" if sweep is not None else "")
                )
    return "\n".join(out)


def _with_rounds(line: dict, key: str) -> Optional[str]:
    """A side-by-side ratio, pooled, then the median of its per-round ratios and their range when it has rounds."""
    pooled, rounds = line.get(key), line.get(f"{key}_per_round") or []
    if pooled is None:
        return None
    if not rounds or None in rounds:
        return f"{pooled:.3f}"
    return f"{pooled:.3f} [{line[f'{key}_median_round']:.2f}: {min(rounds):.2f}-{max(rounds):.2f}]"


def _pm(mean: float, conf: float) -> str:
    return f"{mean:,.0f} +- {conf:,.0f}"


def _efficiency(e: Optional[dict]) -> Optional[str]:
    if e is None:
        return None
    if e["efficiency_conf"] is None:
        return f"{e['efficiency']:.3f}"
    return f"{e['efficiency']:.3f} +- {e['efficiency_conf']:.3f}"


def _per_stage(values) -> Optional[str]:
    return None if not values else " / ".join(f"{v:,}" for v in values)


def train(result: dict) -> str:
    """Throughput per (model, config, np) with weak-scaling efficiency; side by side; ablations."""
    eff = {(s["model"], s["config"], s["np"]): s for s in result["scaling"]}
    lines = [
        [r["model"], r["config"], r["np"], _pm(r["per_rank_mean"], r["per_rank_conf"]), _pm(r["total"], r["total_conf"]),
         _efficiency(eff.get((r["model"], r["config"], r["np"])))]
        for r in result["rows"]
    ]  # fmt: skip
    out = [render_table(
        ["model", "config", "np", "samples/s per rank", "total samples/s", "weak-scaling eff."], lines,
        "throughput (mean +- 1.96 sigma over iterations; total = np x per rank, as pytorch_synthetic_benchmark)",
    )]  # fmt: skip
    out += _side_by_side(result["side_by_side"])
    pipe = result.get("pipeline") or []
    if pipe:
        out.append("")
        out.append(render_table(
            ["model", "schedule", "P", "M", "samples/s", "speed-up", "bubble", "ideal speed-up",
             "activation peak bytes per stage", "micro-batches held"],
            [[p["model"], p["schedule"], p["stages"], p["micro_batches"], _pm(p["total"], p["total_conf"]),
              p["speedup"], p["bubble"], p["ideal_speedup"], _per_stage(p["activation_peak_bytes"]),
              _per_stage(p["micro_in_flight_peak"])] for p in pipe],
            "pipeline across ranks, one replica of P = np stages (samples/s of the replica; speed-up over P = 1, "
            "M = 1; bubble (P-1)/(M+P-1), ideal speed-up P*M/(M+P-1) with stages computing at once)",
        ))  # fmt: skip
    abl = result["ablations"]
    if abl and any(a["no_fusion_total"] is not None or a["fp16_total"] is not None for a in abl):
        out.append("")
        out.append(render_table(
            ["model", "np", "horovod", "no fusion", "ratio", "fp16", "ratio"],
            [[a["model"], a["np"], a["base_total"], a["no_fusion_total"], a["no_fusion_over_base"], a["fp16_total"],
              a["fp16_over_base"]] for a in abl],
            "ablations of the Horovod loop (total samples/s; ratio to fusion on, no compression)",
        ))  # fmt: skip
    return "\n".join(out)


def _side_by_side(sbs: list[dict]) -> list[str]:
    """bench train's arms side by side: the Trainer, the Horovod loop and DDP, the references, the target verdicts,
    the sharded optimizer."""
    out: list[str] = []
    if not sbs:
        return out
    targets = ", ".join(f"{k.replace('_over_', '/')} >= {v}" for k, v in plans.TRAIN_TARGETS.items())
    out.append("")
    out.append(render_table(
        ["model", "np", "trainer", "horovod", "ddp", "trainer/horovod", "(median of rounds)", "trainer/ddp", "horovod/ddp"],
        [[s["model"], s["np"], s["trainer_total"], s["horovod_total"], s["ddp_total"], s["trainer_over_horovod"],
          s.get("trainer_over_horovod_median_round"), s["trainer_over_ddp"], s["horovod_over_ddp"]] for s in sbs],
        f"side by side (total samples/s; targets: {targets})",
    ))  # fmt: skip
    refs = [s for s in sbs if s["mpi4py_total"] is not None or s["nocomm_total"] is not None]
    if refs:
        out.append("")
        out.append(render_table(
            ["model", "np", "trainer", "horovod", "mpi4py", "nocomm", "trainer/mpi4py", "horovod/mpi4py",
             "trainer/nocomm", "horovod/nocomm", "mpi4py/nocomm"],
            [[s["model"], s["np"], s["trainer_total"], s["horovod_total"], s["mpi4py_total"], s["nocomm_total"],
              *(_with_rounds(s, k) for k in ("trainer_over_mpi4py", "horovod_over_mpi4py", "trainer_over_nocomm",
                                             "horovod_over_nocomm", "mpi4py_over_nocomm"))] for s in refs],
            "against the references (total samples/s; ratios: pooled, then [median of rounds: their range]; the "
            "verdicts take the median of rounds): mpi4py = one flat MPI Allreduce per step, what the "
            "communication allows; nocomm = the same processes not communicating, the hardware ceiling",
        ))  # fmt: skip
    for s in sbs:
        verdicts = [
            f"{k} {'met' if s[f'{k}_target_met'] else 'NOT met'}"
            for k in plans.TRAIN_TARGETS
            if s[f"{k}_target_met"] is not None
        ]
        if verdicts:
            out.append(f"  {s['model']} np={s['np']}: " + "; ".join(verdicts))
    sharded = [s for s in sbs if s["sharded_total"] is not None]
    if sharded:
        out.append("")
        out.append(render_table(
            ["model", "np", "horovod", "sharded", "ratio", "state bytes/rank: horovod", "sharded", "ratio"],
            [[s["model"], s["np"], s["horovod_total"], s["sharded_total"], s["sharded_over_horovod"],
              s["horovod_state_bytes"], s["sharded_state_bytes"], s["state_sharded_over_horovod"]] for s in sharded],
            "sharded optimizer (ZeRO-1) vs DistributedOptimizer, SGD-momentum (total samples/s; optimizer state "
            "bytes per rank)",
        ))  # fmt: skip
    return out


def updates(result: dict) -> str:
    """Per (straggler, mode): samples/s per worker, training seconds and steps to each target accuracy, the final
    accuracy and what the rule exchanged per step; then how much throughput each mode kept under a straggler."""
    targets = [f"{t:g}" for t in result["meta"]["targets"]]
    headers = ["straggler", "mode", "workers", "samples/s/worker"]
    headers += [f"s to {t}" for t in targets] + [f"step to {t}" for t in targets]
    headers += ["final acc.", "exchanges/step"]
    lines = []
    for r in result["rows"]:
        if "messages_per_step" in r:
            exchanged = f"{r['messages_per_step']:.2f} msgs"
        else:
            exchanged = f"{r['collectives_per_step']:.2f} coll."
        lines.append(
            [f"x{r['straggler']:g}", r["mode"], r["workers"], r["samples_per_s_per_worker"]]
            + [r[f"seconds_to_{t}"] for t in targets] + [r[f"step_to_{t}"] for t in targets]
            + [r["final_accuracy"], exchanged]
        )  # fmt: skip
    out = [render_table(headers, lines, "update rules on the digits CNN (medians over rounds; seconds of "
                        "training, evaluations excluded; - : not reached)")]  # fmt: skip
    if result["slowdowns"]:
        out.append("")
        out.append(render_table(
            ["straggler", "mode", "throughput kept"],
            [[f"x{s['straggler']:g}", s["mode"], s["throughput_kept"]] for s in result["slowdowns"]],
            "samples/s per worker with the straggler / without (1.0: unaffected)",
        ))  # fmt: skip
    return "\n".join(out)
