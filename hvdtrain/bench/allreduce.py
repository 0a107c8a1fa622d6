"""`hvdtrain bench allreduce`: allreduce time, algorithm and bus bandwidth against message size.

One launch per Horovod controller, each running hvdtrain.bench.allreduce_worker on N ranks:
  mpi  (horovodrun --mpi, or mpirun/srun): memcpy, mpi4py Allreduce, Horovod allreduce (MPI controller)
  gloo (horovodrun --gloo):                torch.distributed gloo all_reduce, Horovod allreduce (Gloo)
Workers write raw times; this side computes algbw = S / t and busbw = algbw x 2(n-1)/n (nccl-tests),
fits the ring cost model t = 2(n-1)/n x S / B + latency, prints a table and writes allreduce.json and
allreduce.png into --out.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hvdtrain import launch as L
from hvdtrain.bench import report as R
from hvdtrain.errors import UsageError

IMPLS = ("horovod_mpi", "mpi4py", "horovod_gloo", "torch_gloo")
SHORT = {"horovod_mpi": "hvd-mpi", "mpi4py": "mpi4py", "horovod_gloo": "hvd-gloo", "torch_gloo": "torch-gloo"}
REFERENCE_BYTES = 64 * 1024**2  # the size the targets are stated at
TINY = {"sizes": [4, 1024, 64 * 1024], "warmup": 1, "iters": 3}


@dataclasses.dataclass
class AllreducePlan:
    sizes: list[int]  # message sizes in bytes (float32 tensors of size/4 elements)
    warmup: int  # untimed calls per size
    iters: int  # timed calls per size up to 16 MiB (fewer above, see report.iterations_for)
    out: Path  # results directory: allreduce.json, allreduce.png, parts/, logs/
    runs: list[tuple[str, L.LaunchSpec]]  # (controller, launch spec) in launch order
    tiny: bool = False


def controllers_for(launcher: Optional[str], gloo: bool, mpi: bool) -> list[str]:
    """Both controllers with horovodrun (the default); --gloo or --mpi picks one; mpirun/srun mean MPI."""
    if gloo:
        return ["gloo"]
    if mpi or launcher in ("mpirun", "srun"):
        return ["mpi"]
    return ["mpi", "gloo"]


def worker_command(plan_path: Path, part_path: Path) -> list[str]:
    return [sys.executable, "-m", "hvdtrain.bench.allreduce_worker", str(plan_path), str(part_path)]


def make_plan(
    out: str,
    *,
    sizes: Optional[str] = None,
    min_bytes: Optional[str] = None,
    max_bytes: Optional[str] = None,
    step_factor: int = 2,
    warmup: Optional[int] = None,
    iters: Optional[int] = None,
    tiny: bool = False,
    launch: dict[str, Any],
) -> AllreducePlan:
    """Validate every option and build the launch specs; raises UsageError before anything runs."""
    if sizes and (min_bytes or max_bytes):
        raise UsageError("--sizes excludes --min-bytes/--max-bytes: give the sizes one way")
    if sizes:
        size_list = R.parse_sizes(sizes)
    elif tiny and not (min_bytes or max_bytes):
        size_list = list(TINY["sizes"])
    else:
        lo = R.parse_size(min_bytes or "4", "--min-bytes")
        hi = R.parse_size(max_bytes or "256MiB", "--max-bytes")
        size_list = R.size_range(lo, hi, step_factor)
    warmup = (TINY["warmup"] if tiny else 5) if warmup is None else warmup
    iters = (TINY["iters"] if tiny else 20) if iters is None else iters
    if warmup < 0:
        raise UsageError(f"--warmup {warmup}: must be 0 or more")
    if iters < 1:
        raise UsageError(f"--iters {iters}: must be at least 1")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; give a directory")
    launch = dict(launch)
    gloo, mpi, logs = launch.pop("gloo", False), launch.pop("mpi", False), launch.pop("output_dir", None)
    if gloo and mpi:
        raise UsageError("--gloo and --mpi exclude each other: pick one controller (the default runs both)")
    runs = []
    for controller in controllers_for(launch.get("launcher"), gloo, mpi):
        log_dir = Path(logs or out_dir / "logs") / controller
        command = worker_command(
            out_dir / "parts" / f"plan-{controller}.json", out_dir / "parts" / f"{controller}.json"
        )
        spec = L.make_spec(
            command,
            gloo=controller == "gloo",
            mpi=controller == "mpi" and launch.get("launcher") in (None, "horovodrun"),
            output_dir=str(log_dir),
            **launch,
        )
        if spec.np < 2:
            raise UsageError(f"-np {spec.np}: an allreduce benchmark needs at least 2 ranks, e.g. -np 2")
        runs.append((controller, spec))
    return AllreducePlan(sizes=size_list, warmup=warmup, iters=iters, out=out_dir, runs=runs, tiny=tiny)


def run(plan: AllreducePlan, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Launch every controller's run (or print the commands), then collect, report and plot."""
    if dry_run:
        for controller, spec in plan.runs:
            echo(f"# {controller} controller")
            L.run_job(spec, dry_run=True, echo=echo)
        return {}
    parts = plan.out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for controller, spec in plan.runs:
        store = parts / f".torch-store-{controller}-{os.getpid()}-{time.time_ns()}"
        worker_plan = {"controller": controller, "sizes": plan.sizes, "warmup": plan.warmup, "iters": plan.iters}
        R.write_json(parts / f"plan-{controller}.json", {**worker_plan, "store": str(store.resolve())})
        (parts / f"{controller}.json").unlink(missing_ok=True)
        echo(f"hvdtrain bench allreduce: {controller} controller on {spec.np} ranks ...")
        try:
            L.run_job(spec, echo=lambda _line: None)
        finally:
            store.unlink(missing_ok=True)  # torch's FileStore file
    result = collect([R.read_json(parts / f"{c}.json") for c, _ in plan.runs], plan)
    R.write_json(plan.out / "allreduce.json", result)
    plot(result, plan.out / "allreduce.png")
    echo(table(result))
    echo(f"wrote {plan.out / 'allreduce.json'} and {plan.out / 'allreduce.png'}")
    return result


# --------------------------------------------------------------------------------------------------
# Pure: from raw times to the report
# --------------------------------------------------------------------------------------------------


def add_bandwidths(row: dict, n: int) -> dict:
    """A raw row (impl, bytes, time_s) with algbw and busbw (GB/s); memcpy gets its copy bandwidth as algbw."""
    out = dict(row)
    out["time_us"] = row["time_s"] * 1e6
    out["algbw_GBps"] = R.algbw(row["bytes"], row["time_s"])
    out["busbw_GBps"] = None if row["impl"] == "memcpy" else R.busbw(out["algbw_GBps"], n)
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
    estimates = [R.bus_factor(n) * r["bytes"] / max(r["time_s"] - latency, 1e-12) / 1e9 for r in big]
    bandwidth = statistics.median(estimates)
    fit = {str(r["bytes"]): R.ring_time(r["bytes"], n, bandwidth, latency) / r["time_s"] for r in rows}
    return {"latency_us": latency * 1e6, "bandwidth_GBps": bandwidth, "model_over_measured": fit}


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
        "busbw_at_reference_GBps": {impl: at(impl, ref) for impl in IMPLS if at(impl, ref) is not None},
        "horovod_mpi_over_mpi4py_busbw": R.ratio(at("horovod_mpi", ref), at("mpi4py", ref)),
        "horovod_gloo_over_torch_gloo_busbw": R.ratio(at("horovod_gloo", ref), at("torch_gloo", ref)),
        "memcpy_peak_GBps": max((r["algbw_GBps"] for r in rows if r["impl"] == "memcpy"), default=None),
        "target_horovod_mpi_over_mpi4py": 0.9,
    }
    ok = summary["horovod_mpi_over_mpi4py_busbw"]
    summary["target_met"] = None if ok is None else ok >= 0.9
    models = {impl: fit_ring_model([r for r in rows if r["impl"] == impl], n) for impl in IMPLS}
    summary["ring_model"] = {k: v for k, v in models.items() if v is not None}
    meta = {"np": n, "sizes": sizes, "machine": R.machine_info(), "workers": [p["meta"] for p in parts]}
    if plan is not None:
        meta.update(warmup=plan.warmup, iters=plan.iters, tiny=plan.tiny)
        meta["commands"] = [shlex.join(L.wrapped_command(s, "LOGDIR")) for _, s in plan.runs]
        meta["launchers"] = [
            {"controller": c, "launcher": s.launcher, "threads_per_rank": s.threads_per_rank} for c, s in plan.runs
        ]
    return {"meta": meta, "rows": rows, "summary": summary}


def table(result: dict) -> str:
    """Time per call (us) and busbw (GB/s) per implementation, one line per size; memcpy's copy GB/s."""
    rows = result["rows"]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    has_memcpy = any(r["impl"] == "memcpy" for r in rows)
    headers = ["size"]
    for impl in impls:
        headers += [f"{SHORT[impl]} us", f"{SHORT[impl]} bus"]
    if has_memcpy:
        headers.append("memcpy GB/s")
    by = {(r["impl"], r["bytes"]): r for r in rows}
    lines = []
    for size in result["meta"]["sizes"]:
        line: list[Any] = [R.format_bytes(size)]
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
    out = [R.render_table(headers, lines, title)]
    ref = R.format_bytes(s["reference_bytes"])
    for key, label in (
        ("horovod_mpi_over_mpi4py_busbw", "Horovod (MPI) / mpi4py busbw"),
        ("horovod_gloo_over_torch_gloo_busbw", "Horovod (Gloo) / torch.distributed gloo busbw"),
    ):
        if s.get(key) is not None:
            out.append(f"{label} at {ref}: {s[key]:.3f}")
    if s.get("target_met") is not None:
        out.append(f"target Horovod (MPI) busbw >= 0.9 x mpi4py at {ref}: {'met' if s['target_met'] else 'NOT met'}")
    return "\n".join(out)


def plot(result: dict, path: Path) -> Path:
    """busbw against size for every implementation, memcpy as this machine's limit; time against size."""
    rows = result["rows"]

    def draw(axes):
        bw, t = axes
        for impl in (*IMPLS, "memcpy"):
            mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["bytes"])
            if not mine:
                continue
            xs = [r["bytes"] for r in mine]
            key = "algbw_GBps" if impl == "memcpy" else "busbw_GBps"
            style = {"linestyle": "--", "color": "black"} if impl == "memcpy" else {"marker": "o", "markersize": 3}
            bw.plot(xs, [max(r[key], 1e-9) for r in mine], label=SHORT.get(impl, impl), **style)
            if impl != "memcpy":
                t.plot(xs, [r["time_us"] for r in mine], label=SHORT[impl], marker="o", markersize=3)
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

    return R.save_plot(path, draw, ncols=2, width=6.5)
