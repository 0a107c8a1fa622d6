"""`hvdtrain bench allreduce`: allreduce time, algorithm and bus bandwidth against message size.

One launch per Horovod controller, each running hvdtrain.bench.allreduce_worker on N ranks:
  mpi  (horovodrun --mpi, or mpirun/srun): memcpy, mpi4py Allreduce, Horovod allreduce (MPI controller)
  gloo (horovodrun --gloo):                torch.distributed gloo all_reduce, Horovod allreduce (Gloo)
Both with horovodrun and neither --gloo nor --mpi; otherwise the one controller make_spec decided.
Workers write raw times; this side computes algbw = S / t and busbw = algbw x 2(n-1)/n (nccl-tests),
and fits the ring cost model t = 2(n-1)/n x S / B + latency. The launches and the output files
(allreduce.json, allreduce.png in --out) are hvdtrain.bench.runner's; the table and the PNG, tables.py's
and plots.py's.
"""

from __future__ import annotations

import dataclasses
import shlex
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hvdtrain.bench import plans, plots, report, runner, tables
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError
from hvdtrain.launching.argv import wrapped_command
from hvdtrain.launching.options import LaunchOptions
from hvdtrain.launching.spec import LaunchSpec, make_spec

REFERENCE_BYTES = 64 * 1024**2  # the size the targets are stated at
TARGET_SIZES = (1024**2, REFERENCE_BYTES)  # ... and 1 MiB, about a small model's gradients
TARGET = 0.9  # Horovod (MPI, in place) busbw over mpi4py's at each of TARGET_SIZES that was measured
WORKER = "hvdtrain.bench.allreduce_worker"


@dataclasses.dataclass
class AllreducePlan:
    settings: plans.AllreduceSettings
    sizes: list[int]  # message sizes in bytes
    out: Path  # results directory: allreduce.json, allreduce.png, parts/, logs/
    jobs: list[runner.Job]  # one per controller, named after it, in launch order


def controller_specs(command: list[str], launch: LaunchOptions) -> list[LaunchSpec]:
    """One launch per controller, MPI first: the controller the launch options decide; both when they leave it open.
    Open: neither --gloo, --mpi nor --launcher outside Slurm (MPI through the default launcher, mpirun, and Gloo
    through horovodrun), or --launcher horovodrun alone (both through it)."""
    slurm = SlurmEnv.read()  # once for both launches
    decided = make_spec(command, launch, slurm=slurm)
    if decided.controller is None:
        return [dataclasses.replace(decided, controller=c) for c in ("mpi", "gloo")]
    chosen = launch.launcher or launch.gloo or launch.mpi
    if chosen or decided.launcher != "mpirun":
        return [decided]
    return [decided, make_spec(command, dataclasses.replace(launch, gloo=True), slurm=slurm)]


def message_sizes(settings: plans.AllreduceSettings, range_given: bool) -> list[int]:
    """--sizes (or --tiny's list) unless --min-bytes/--max-bytes ask for a range; else the range."""
    if settings.sizes and not range_given:
        return report.parse_sizes(settings.sizes)
    lo = report.parse_size(settings.min_bytes, "--min-bytes")
    hi = report.parse_size(settings.max_bytes, "--max-bytes")
    return report.size_range(lo, hi, settings.step_factor)


def make_plan(options: Mapping[str, Any], *, launch: LaunchOptions) -> AllreducePlan:
    """Validate every option (AllreduceSettings' fields; None: not given) and build one job per controller;
    raises UsageError before anything runs."""
    given = {k: v for k, v in options.items() if v is not None}
    range_given = "min_bytes" in given or "max_bytes" in given
    if "sizes" in given and range_given:
        raise UsageError("--sizes excludes --min-bytes/--max-bytes: give the sizes one way")
    settings = plans.resolve(plans.AllreduceSettings, given)
    sizes = message_sizes(settings, range_given)
    out = runner.out_dir(settings.out)
    logs = runner.logs_dir(out, launch.output_dir)
    decided = controller_specs(runner.worker_command(WORKER, out, "mpi"), dataclasses.replace(launch, output_dir=None))
    if decided[0].np < 2:
        raise UsageError(f"-np {decided[0].np}: an allreduce benchmark needs at least 2 ranks, e.g. -np 2")
    jobs = []
    for spec in decided:
        controller = spec.controller
        spec = dataclasses.replace(
            spec,
            command=runner.worker_command(WORKER, out, controller),
            output_dir=str(logs / controller),
        )
        paired = ([s for s in TARGET_SIZES if s in sizes] or [reference_size(sizes)]) if controller == "mpi" else []
        worker_plan = plans.AllreduceWorkerPlan(
            controller, sizes, settings.warmup, settings.iters, settings.repeats, paired, settings.pairs
        )
        jobs.append(runner.Job(controller, spec, worker_plan, about=f"{controller} controller on {spec.np} ranks"))
    return AllreducePlan(settings=settings, sizes=sizes, out=out, jobs=jobs)


def run(plan: AllreducePlan, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Launch every controller's job (or print the commands), then collect, report and plot."""
    bench = runner.Bench("allreduce", lambda parts: collect(parts, plan), tables.allreduce, plots.allreduce)
    return runner.run(bench, plan.out, plan.jobs, dry_run=dry_run, echo=echo)


# --------------------------------------------------------------------------------------------------
# Pure: from raw times to the report
# --------------------------------------------------------------------------------------------------


def add_bandwidths(row: dict, n: int) -> dict:
    """A raw row (impl, bytes, time_s) with algbw and busbw (GB/s); memcpy gets its copy bandwidth as algbw."""
    out = dict(row)
    out["time_us"] = row["time_s"] * 1e6
    out["algbw_GBps"] = report.algbw(row["bytes"], row["time_s"])
    out["busbw_GBps"] = None if row["impl"] == "memcpy" else report.busbw(out["algbw_GBps"], n)
    return out


def fit_ring_model(rows: Sequence[dict], n: int) -> Optional[dict]:
    """The ring model t = 2(n-1)/n x S/B + latency: the latency is the smallest size's time, B the median of
    the per-size estimates 2(n-1)/n x S / (t - latency) over the sizes of at least 1 MiB (else the larger
    half). Returns the fit and model/measured time at every size (1.0: the model is exact there)."""
    rows = sorted(rows, key=lambda r: r["bytes"])
    if len(rows) < 2 or n < 2:
        return None
    latency = rows[0]["time_s"]
    big = [r for r in rows[1:] if r["bytes"] >= 1024**2] or rows[len(rows) // 2 :]
    estimates = [report.bus_factor(n) * r["bytes"] / max(r["time_s"] - latency, 1e-12) / 1e9 for r in big]
    bandwidth = statistics.median(estimates)
    fit = {str(r["bytes"]): report.ring_time(r["bytes"], n, bandwidth, latency) / r["time_s"] for r in rows}
    return {"latency_us": latency * 1e6, "bandwidth_GBps": bandwidth, "model_over_measured": fit}


def paired_ratios(paired: Sequence[dict]) -> dict[str, dict]:
    """Per size, Horovod's busbw over mpi4py's in each pair of back-to-back blocks (mpi4py time / Horovod time):
    median, range and the number of pairs. A pair shares the machine's state of that moment, which on a shared
    machine swings by several times over seconds; the sweep's blocks of one implementation, then the other, do
    not."""
    out = {}
    for entry in paired:
        ratios = [m / h for m, h in zip(entry["mpi4py_block_times_s"], entry["horovod_block_times_s"]) if h > 0]
        if ratios:
            out[str(entry["bytes"])] = {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)],
                                        "pairs": len(ratios), "iters": entry["iters"]}  # fmt: skip
    return out


def reference_size(sizes: Sequence[int]) -> int:
    """64 MiB when measured, else the largest measured size not above it, else the smallest size."""
    below = [s for s in sizes if s <= REFERENCE_BYTES]
    return max(below) if below else min(sizes)


def collect(parts: Sequence[dict], plan: Optional[AllreducePlan] = None) -> dict:
    """Merge the runs' raw rows, add bandwidths, the model fit and the ratios at the reference size."""
    if not parts:
        raise ValueError("no results to collect")
    n = parts[0]["meta"]["np"]
    rows = []
    for part in parts:
        controller = part["meta"]["controller"]
        rows += [{**add_bandwidths(r, n), "controller": controller} for r in part["rows"]]
    sizes = sorted({r["bytes"] for r in rows})
    ref = reference_size(sizes)

    def at(impl, size, key="busbw_GBps"):
        return next((r[key] for r in rows if r["impl"] == impl and r["bytes"] == size), None)

    summary = {
        "reference_bytes": ref,
        "busbw_at_reference_GBps": {impl: at(impl, ref) for impl in plans.IMPLS if at(impl, ref) is not None},
        "horovod_mpi_over_mpi4py_busbw": report.ratio(at("horovod_mpi", ref), at("mpi4py", ref)),
        "horovod_gloo_over_torch_gloo_busbw": report.ratio(at("horovod_gloo", ref), at("torch_gloo", ref)),
        "memcpy_peak_GBps": max((r["algbw_GBps"] for r in rows if r["impl"] == "memcpy"), default=None),
        "target_horovod_mpi_over_mpi4py": TARGET,
    }
    at_sizes = {str(size): report.ratio(at("horovod_mpi", size), at("mpi4py", size)) for size in TARGET_SIZES}
    sweep = {k: v for k, v in at_sizes.items() if v is not None}
    summary["horovod_mpi_oop_over_mpi4py_busbw"] = report.ratio(at("horovod_mpi_oop", ref), at("mpi4py", ref))
    paired = summary["paired_at"] = paired_ratios([pair for part in parts for pair in part.get("paired", [])])
    # The verdict: the paired blocks where measured (same conditions for both), else the sweep.
    summary["sweep_horovod_mpi_over_mpi4py_busbw_at"] = sweep
    summary["horovod_mpi_over_mpi4py_busbw_at"] = {
        k: paired[k]["median"] if k in paired else v for k, v in sweep.items()
    }
    at_reference = paired.get(str(ref), {}).get("median", summary["horovod_mpi_over_mpi4py_busbw"])
    checked = list(summary["horovod_mpi_over_mpi4py_busbw_at"].values()) or [at_reference]
    summary["target_met"] = None if None in checked else all(v >= TARGET for v in checked)
    models = {impl: fit_ring_model([r for r in rows if r["impl"] == impl], n) for impl in plans.IMPLS}
    summary["ring_model"] = {k: v for k, v in models.items() if v is not None}
    meta = {"np": n, "sizes": sizes, "machine": report.machine_info(), "workers": [p["meta"] for p in parts]}
    if plan is not None:
        meta.update(
            warmup=plan.settings.warmup,
            iters=plan.settings.iters,
            repeats=plan.settings.repeats,
            pairs=plan.settings.pairs,
            tiny=plan.settings.tiny,
        )
        meta["commands"] = [shlex.join(wrapped_command(job.spec, "LOGDIR")) for job in plan.jobs]
        meta["launchers"] = [
            {
                "controller": job.name,
                "launcher": job.spec.launcher,
                "threads_per_rank": job.spec.threads_per_rank or "auto",
            }
            for job in plan.jobs
        ]
    return {"meta": meta, "rows": rows, "summary": summary}
