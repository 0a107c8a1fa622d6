"""`hvdtrain plan`: which layout to train a model with on this machine, from measured costs (docs/plan.md).

Three steps, a module each:
1. measure (this process; torch imported there only): the model's bytes, each pipeline stage's time and
   activations at every micro-batch size, the optimizer's step (plan.measure);
2. probe (a real job of the ranks of one node, `python -m hvdtrain.plan.probe`): what a rank holds besides its
   model's state, the compute's contention, one step's allreduces, a 4-byte allreduce, a real pipeline's
   messages (plan.probe);
3. model every candidate layout (data; data with the sharded optimizer; local SGD with H; a pipeline of P stages
   x N/P replicas with M micro-batches, 1F1B or GPipe): memory per rank, bytes and collectives per step, the
   pipeline bubble, step time and samples/s; recommend the fastest synchronous layout that fits (plan.model, pure).
plan.render prints it; plan.validate (--validate) runs the layouts for real.

What the CLI calls is here: `run`, `bench_rows`, `validate`, `format_plan`, `format_validation`. `validate` is
the function (it hides the module of that name: import the module's other names from hvdtrain.plan.validate).
Nothing heavy is imported, and not plan.probe, which ranks run as __main__.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from hvdtrain.config import TrainConfig
from hvdtrain.plan import measure, model, render
from hvdtrain.plan.measure import bench_rows
from hvdtrain.plan.render import format_plan, format_validation
from hvdtrain.plan.validate import validate  # the function: `plan.validate` is what the CLI calls

__all__ = ["bench_rows", "dry_run", "format_plan", "format_validation", "run", "validate"]


def dry_run(cfg: TrainConfig, ranks: int, per_node: Optional[int], validate_steps: Optional[int], echo) -> None:
    """`hvdtrain plan --dry-run`: what `run` would measure and the probe's launch, shown; nothing run or written."""
    import tempfile
    from pathlib import Path

    from hvdtrain.launching.supervise import run_job
    from hvdtrain.plan import probe
    from hvdtrain.rundir import RunDir

    here = per_node or ranks
    threads = max(1, (os.cpu_count() or 1) // here)
    echo(f"# measure {cfg.model} in this process on {threads} thread(s), then a {here}-rank probe:")
    run_job(probe.spec(RunDir(Path(tempfile.gettempdir()) / "hvdtrain-plan-XXXXXXXX"), here), dry_run=True, echo=echo)
    if validate_steps:
        echo(f"# then the fastest fitting layout of each kind, {validate_steps} steps each (hvdtrain train)")


def run(cfg: TrainConfig, ranks: int, nodes: Optional[int], per_node: Optional[int], memory_gib: Optional[float],
        bench: Optional[Sequence[dict[str, Any]]], echo) -> dict[str, Any]:  # fmt: skip
    """Measure, probe, model, recommend (module docstring); returns the plan as a JSON-able dict."""
    from hvdtrain.plan import probe

    cores = os.cpu_count() or 1
    here = per_node or ranks
    threads = max(1, cores // here)
    echo(f"hvdtrain: plan: measuring {cfg.model} on {threads} thread(s), then a {here}-rank probe ...")
    costs = measure.measure(cfg, ranks, threads)
    pr = probe.run(cfg, here)
    if bench:
        pr.busbw_Bps = measure.bench_busbw(bench, costs.param_bytes)
    memory, said = measure.memory_per_rank(here, memory_gib)
    cands = sorted(model.candidates(costs, pr, ranks, cores * (nodes or 1), memory, cfg.batch_size),
                   key=lambda c: -c.samples_per_s)  # fmt: skip
    best = model.recommend(cands)
    return {
        "ranks": ranks, "nodes": nodes, "ntasks_per_node": per_node, "memory_per_rank_bytes": memory,
        "memory_said": said, "costs": dataclasses.asdict(costs), "probe": dataclasses.asdict(pr),
        "candidates": [dataclasses.asdict(c) for c in cands],
        "recommended": best and dataclasses.asdict(best),
        "why": render.explain(best, cands, costs) if best else [],
        "command": best and render.train_command(cfg, best, ranks, nodes, per_node),
    }  # fmt: skip
