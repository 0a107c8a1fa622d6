"""`hvdtrain plan`: which layout to train a model with on this machine, from measured costs (docs/plan.md).

Three steps:
1. measure (this process; torch imported here only): the model's parameter, gradient and optimizer-state bytes;
   for every way of cutting it into P pipeline stages, each stage's forward+backward time and the activation
   bytes autograd keeps (a real forward+backward, timed with the threads a rank gets) at every micro-batch size;
   the optimizer's step time; the dataset's bytes;
2. probe (a real job of the ranks of one node, `python -m hvdtrain.plan_probe`): what a rank holds besides its
   model's state (peak RSS), how much slower the compute is with every rank computing at once, one data-parallel
   step's allreduces as the DistributedOptimizer issues them, a 4-byte allreduce, and a real pipeline of its ranks
   (what a message between stages costs);
3. model every candidate layout (data; data with the sharded optimizer; local SGD with H; a pipeline of P stages
   x N/P replicas with M micro-batches, 1F1B or GPipe): memory per rank, bytes and collectives per step, the
   pipeline bubble (P-1)/(M+P-1), step time and samples/s; recommend the fastest synchronous layout that fits.

The formulas are docs/plan.md's (W: parameter bytes = gradient bytes, O: optimizer state, A(b): activations of
b samples, c(b): forward+backward, s: contention, n: ranks averaging, B: batch per rank):
  data      mem = base + 2W + O + A(B);   t = c(B) s + opt + comm(W, n)
  sharded   mem = base + 2W + O/n + A(B); t = c(B) s + opt/n + comm(W, n) + lat   (reduce-scatter + all-gather)
  local-sgd mem as data;  t = c(B) s + opt + comm(W, n)/H                         (approximate)
  pipeline  mem_s = base + W_s (2 + O/W) + k A_s(B/M), k = min(P - s, M) (1F1B) or M (GPipe);
            t = (sum_s c_s(B/M) + (M - 1) max_s c_s(B/M)) s + 2(P-1) M p2p + opt W_max/W + comm(W_max, N/P)
  comm(S, n) = the probe's measured step for data (its n), else 2(n-1)/n x S / busbw + lat
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hvdtrain.config import TrainConfig
from hvdtrain.errors import UsageError
from hvdtrain.render import fixed_row

MICRO_BATCHES = (1, 2, 4, 8)
AVERAGE_EVERY = (4, 16)
STATE_PER_PARAM = {"sgd": 1, "adam": 2, "adamw": 2}  # optimizer state tensors per parameter (SGD: momentum)
REPS = 15  # timed forward+backward passes per measurement (the median is used)
PLAN_COLUMNS = (("layout", 26), ("mem/rank", 10), ("comm/step", 11), ("bubble", 8), ("step ms", 9), ("samples/s", 11))
VALIDATION_COLUMNS = (("validated", 26), ("step ms", 9), ("measured", 10), ("ratio", 7), ("mem/rank", 10),
                      ("peak RSS", 10), ("ratio", 7))  # fmt: skip


@dataclasses.dataclass
class Stage:
    """One candidate stage (layers [start, end) of the model) at one micro-batch size."""

    start: int
    end: int
    micro: int  # samples per micro-batch
    seconds: float  # forward + backward of one micro-batch
    activation_bytes: int  # what autograd keeps for backward of one micro-batch
    output_bytes: int  # the activation sent to the next stage, one micro-batch
    param_bytes: int


@dataclasses.dataclass
class Costs:
    """What `measure` found (seconds, bytes)."""

    model: str
    layers: int
    param_bytes: int
    buffer_bytes: int
    state_bytes: int  # optimizer state
    data_bytes: int  # the dataset's tensors (every rank loads them)
    batch: int
    step_seconds: float  # forward + backward of one batch B on one rank
    activation_bytes: int  # autograd's saved tensors for one batch B
    optimizer_seconds: float  # one optimizer step over every parameter
    threads: int  # per rank, as measured
    stages: dict[str, Stage]  # f"{P}:{s}:{M}" -> stage s of P at M micro-batches


@dataclasses.dataclass
class Probe:
    """What a real N-rank job measured: a rank's peak RSS before training, one data-parallel step's allreduces."""

    ranks: int
    base_rss_bytes: int
    comm_seconds: float  # one step's gradient allreduces (per-tensor, fused by Horovod), median
    latency_seconds: float  # one 4-byte allreduce, median
    busbw_Bps: float  # bus bandwidth the step's allreduce reached
    p2p_seconds: float  # one small mpi4py message from a rank to the next (half a round trip)
    compute_seconds: float  # forward + backward of one batch with every rank computing at once (the slowest)
    pipeline_seconds: float = 0.0  # one batch through a real pipeline of every rank as a stage (M = 1); 0: none


@dataclasses.dataclass
class Candidate:
    layout: str  # data | sharded | local-sgd | pipeline
    args: list[str]  # the train flags
    memory_bytes: int  # the most any rank holds
    comm_bytes: int  # per step, per rank (on the wire, ring)
    collectives: float  # per step (a pipeline: also its point-to-point messages)
    bubble: float
    step_seconds: float
    samples_per_s: float
    exact: bool  # the same optimisation as one process on the whole batch (False: local SGD)
    fits: bool = True
    note: str = ""


def ring_bytes(size: int, n: int) -> float:
    """Bytes each rank sends in a ring allreduce of `size` bytes over n ranks."""
    return 2 * (n - 1) / n * size if n > 1 else 0.0


def bubble(stages: int, micro: int) -> float:
    return (stages - 1) / (micro + stages - 1)


# --------------------------------------------------------------------------------------------------
# 1. Measure (this process)
# --------------------------------------------------------------------------------------------------


def median_time(fn, reps: int = REPS, warmup: int = 1) -> float:
    """The median of `reps` timed calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(cfg: TrainConfig, ranks: int, threads: int) -> Costs:
    """Build the model and data as a rank would, and time and weigh it (see the module docstring)."""
    import torch
    from torch import nn

    from hvdtrain.parallel.pipe import ActivationMeter
    from hvdtrain.parallel.pipeline import balance_by_params
    from hvdtrain.train import datasets, models
    from hvdtrain.train.update import base_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    data = datasets.load(cfg.data, cfg.synthetic_samples, cfg.seed)
    model = models.build(cfg.model, data.input_shape, data.num_classes, cfg.hidden, cfg.depth)
    x_all, y_all = data.train.tensors
    data_bytes = sum(t.numel() * t.element_size() for ds in (data.train, data.test) for t in ds.tensors)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    b = cfg.batch_size
    x, y = x_all[:b], y_all[:b]

    def run(module: nn.Module, inp, target=None):
        """Forward and backward: the loss on the last stage (target given), else the outputs' sum."""
        out = module(inp)
        (nn.functional.cross_entropy(out, target) if target is not None else out.sum()).backward()
        return out

    def metered(module: nn.Module, inp, target=None):
        """run once, counting what autograd keeps (the pipeline's own meter): (the output, its bytes)."""
        meter = ActivationMeter(module)
        with meter.forward(0):
            out = run(module, inp, target)
        return out.detach(), meter.peak_bytes

    activation_bytes = metered(model, x, y)[1]
    step_seconds = median_time(lambda: run(model, x, y))
    optimizer_seconds = median_time(base_optimizer(cfg, model.parameters(), 1e-9).step)

    layers = list(model)
    stages: dict[str, Stage] = {}
    for p in sorted({d for d in range(2, ranks + 1) if ranks % d == 0}):
        if p > len(cfg.layers()[1]):
            continue  # a stage without parameters: --strategy pipeline refuses it
        sizes = balance_by_params(layers, p)
        bounds = [sum(sizes[:i]) for i in range(p + 1)]
        for m in MICRO_BATCHES:
            if m > b:
                continue
            micro = math.ceil(b / m)
            inp = x[:micro]
            for s in range(p):
                part = nn.Sequential(*layers[bounds[s] : bounds[s + 1]])
                stage_in = inp.requires_grad_(s > 0)  # a stage after the first sends its input's gradient back
                target = y[:micro] if s == p - 1 else None
                out, held = metered(part, stage_in, target)
                seconds = median_time(lambda: run(part, stage_in, target))  # noqa: B023 (used at once)
                stages[f"{p}:{s}:{m}"] = Stage(
                    bounds[s], bounds[s + 1], micro, seconds, held, out.numel() * out.element_size(),
                    sum(q.numel() * q.element_size() for q in part.parameters()),
                )  # fmt: skip
                inp = out
    stateful = cfg.optimizer != "sgd" or cfg.momentum > 0
    return Costs(
        cfg.model, len(layers), nbytes, buffers, STATE_PER_PARAM[cfg.optimizer] * nbytes if stateful else 0,
        data_bytes, b, step_seconds, activation_bytes, optimizer_seconds, threads, stages,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# 2. Probe (a real job)
# --------------------------------------------------------------------------------------------------


def probe(cfg: TrainConfig, ranks: int) -> Probe:
    """Run `python -m hvdtrain.plan_probe` on `ranks` ranks of this machine (its logs in a temporary directory,
    removed) and read what it measured."""
    from hvdtrain import launch

    with tempfile.TemporaryDirectory(prefix="hvdtrain-plan-") as tmp:
        config, out = Path(tmp) / "config.json", Path(tmp) / "probe.json"
        config.write_text(cfg.to_json())
        command = [sys.executable, "-m", "hvdtrain.plan_probe", str(config), str(out)]
        spec = launch.make_spec(command, np=ranks, output_dir=str(Path(tmp) / "logs"), check_cmd=False)
        launch.run_job(spec, echo=lambda _line: None)
        got = json.loads(out.read_text())
    return Probe(**got)


# --------------------------------------------------------------------------------------------------
# 3. Model (pure)
# --------------------------------------------------------------------------------------------------


def comm_seconds(size: float, n: int, pr: Probe) -> float:
    """An allreduce of `size` bytes over n ranks: the ring's bytes at the bus bandwidth, plus one collective's
    fixed cost (the probe's 4-byte allreduce)."""
    if n <= 1 or size <= 0:
        return 0.0
    return ring_bytes(size, n) / pr.busbw_Bps + pr.latency_seconds


def p2p_seconds(costs: Costs, pr: Probe, slow: float) -> float:
    """What one of a pipeline's messages costs: from the probe's real pipeline of its ranks (M = 1: its step less
    its stages' compute, over its 2(P-1) messages) when it ran one, else the probe's ping-pong."""
    p = pr.ranks
    stages = [costs.stages.get(f"{p}:{s}:1") for s in range(p)]
    if pr.pipeline_seconds <= 0 or None in stages:
        return pr.p2p_seconds
    busy = sum(st.seconds for st in stages) * slow
    return max(0.0, (pr.pipeline_seconds - busy) / (2 * (p - 1)))


def candidates(costs: Costs, pr: Probe, ranks: int, cores: int, memory_bytes: int, batch: int) -> list[Candidate]:
    """Every layout of `ranks` ranks on a machine of `cores` cores and `memory_bytes` per rank, modelled."""
    # Compute slows down when the ranks compute at once (the probe saw it: memory bandwidth, Horovod's polling
    # thread), and ranks beyond the cores share them; every compute time is scaled by the larger factor.
    slow = max(1.0, ranks / cores, pr.compute_seconds / costs.step_seconds if costs.step_seconds else 1.0)
    compute = costs.step_seconds * slow
    # The probe's ranks held the whole model's parameters, gradients, optimizer state and one batch's activations
    # (and the dataset): a rank's own share of those is added per layout to what it holds besides them.
    base = max(0, pr.base_rss_bytes - (2 * costs.param_bytes + costs.state_bytes + costs.activation_bytes))
    w, o = costs.param_bytes, costs.state_bytes
    out = []
    data_comm = pr.comm_seconds if pr.ranks == ranks else comm_seconds(w, ranks, pr)
    step = compute + costs.optimizer_seconds + (data_comm if ranks > 1 else 0.0)
    mem = base + 2 * w + o + costs.activation_bytes
    out.append(Candidate("data", [], mem, int(ring_bytes(w, ranks)), 1 if ranks > 1 else 0, 0.0, step,
                         ranks * batch / step, True))  # fmt: skip
    if ranks > 1:
        # Two collectives (reduce-scatter, all-gather) where data has one: one more latency.
        step = compute + costs.optimizer_seconds / ranks + data_comm + pr.latency_seconds
        out.append(Candidate("sharded", ["--shard-optimizer"], base + 2 * w + o // ranks + costs.activation_bytes,
                             int(ring_bytes(w, ranks)), 2, 0.0, step, ranks * batch / step, True))  # fmt: skip
        for h in AVERAGE_EVERY:
            step = compute + costs.optimizer_seconds + comm_seconds(w + costs.buffer_bytes, ranks, pr) / h
            out.append(Candidate("local-sgd", ["--update", "local-sgd", "--average-every", str(h)], mem,
                                 int(ring_bytes(w, ranks) / h), 1 / h, 0.0, step, ranks * batch / step, False,
                                 note="approximate: changes the optimisation (docs/updates.md)"))  # fmt: skip
    message = p2p_seconds(costs, pr, slow)
    for p, m in sorted({(int(p), int(m)) for p, _, m in (key.split(":") for key in costs.stages)}):
        stages = [costs.stages[f"{p}:{s}:{m}"] for s in range(p)]
        replicas = ranks // p
        p2p = 2 * (p - 1) * m * message
        # The first micro-batch passes every stage, each further one adds the slowest stage's time.
        busy = (sum(st.seconds for st in stages) + (m - 1) * max(st.seconds for st in stages)) * slow
        grads = max(st.param_bytes for st in stages)
        sync = comm_seconds(grads, replicas, pr)
        opt = costs.optimizer_seconds * grads / max(w, 1)
        step = busy + p2p + opt + sync
        for schedule in ("1f1b", "gpipe"):
            held = [min(p - s, m) if schedule == "1f1b" else m for s in range(p)]
            mem = max(base + st.param_bytes * (2 + o / max(w, 1)) + k * st.activation_bytes
                      for st, k in zip(stages, held))  # fmt: skip
            args = ["--strategy", "pipeline", "--stages", str(p), "--micro-batches", str(m), "--schedule", schedule]
            out.append(Candidate("pipeline", args, int(mem), int(ring_bytes(grads, replicas)),
                                 (1 if replicas > 1 else 0) + 2 * (p - 1) * m / p, bubble(p, m), step,
                                 replicas * batch / step, True))  # fmt: skip
    for c in out:
        c.fits = c.memory_bytes <= memory_bytes
    return out


def recommend(cands: Sequence[Candidate]) -> Optional[Candidate]:
    """The fastest synchronous layout that fits; ties go to the simplest (data before sharded before pipeline)."""
    order = {"data": 0, "sharded": 1, "pipeline": 2}
    fitting = [c for c in cands if c.fits and c.exact]
    return max(fitting, key=lambda c: (c.samples_per_s, -order.get(c.layout, 9))) if fitting else None


def memory_per_rank(ranks_here: int, given_gib: Optional[float]) -> tuple[int, str]:
    """The memory a rank may use: --memory-per-rank, else this machine's available memory / its ranks."""
    if given_gib is not None:
        return int(given_gib * 1024**3), f"--memory-per-rank {given_gib:g} GiB"
    import psutil

    available = psutil.virtual_memory().available
    return available // ranks_here, f"{available / 1024**3:.1f} GiB available / {ranks_here} rank(s)"


def _gib(b: float) -> str:
    if b < 1024**2:
        return f"{b / 1024:.0f} KiB"
    return f"{b / 1024**2:.0f} MiB" if b < 1024**3 else f"{b / 1024**3:.2f} GiB"


def label(cand: dict[str, Any]) -> str:
    """A candidate's short name: data, sharded, local-sgd H=4, pipeline P=2 M=4 1f1b."""
    args = dict(zip(cand["args"][::2], cand["args"][1::2]))
    if cand["layout"] == "local-sgd":
        return f"local-sgd H={args['--average-every']}"
    if cand["layout"] == "pipeline":
        return f"pipeline P={args['--stages']} M={args['--micro-batches']} {args['--schedule']}"
    return cand["layout"]


def format_plan(plan: dict[str, Any]) -> str:
    c, pr = plan["costs"], plan["probe"]
    lines = [
        f"model {c['model']}: {c['layers']} layers, parameters {_gib(c['param_bytes'])}, optimizer state "
        f"{_gib(c['state_bytes'])}, activations {_gib(c['activation_bytes'])} per batch of {c['batch']}; "
        f"forward+backward {c['step_seconds'] * 1e3:.2f} ms per batch on {c['threads']} thread(s)",
        f"probe ({pr['ranks']} ranks): a rank holds {_gib(pr['base_rss_bytes'])} before training; one step's "
        f"gradient allreduce {pr['comm_seconds'] * 1e3:.2f} ms ({pr['busbw_Bps'] / 1e9:.2f} GB/s bus), a 4-byte "
        f"allreduce {pr['latency_seconds'] * 1e6:.0f} us, a message to the next rank {pr['p2p_seconds'] * 1e6:.0f} us",
        f"memory per rank: {plan['memory_said']}",
        "",
        fixed_row(*zip(*PLAN_COLUMNS)),
    ]
    widths = [w for _, w in PLAN_COLUMNS]
    for cand in plan["candidates"]:
        flags = ("" if cand["fits"] else " (does not fit)") + ("" if cand["exact"] else " *")
        cells = [label(cand), _gib(cand["memory_bytes"]), _gib(cand["comm_bytes"]), f"{cand['bubble']:.2f}",
                 f"{cand['step_seconds'] * 1e3:.2f}", f"{cand['samples_per_s']:,.0f}"]  # fmt: skip
        lines.append(fixed_row(cells, widths) + flags)
    if any(not cand["exact"] for cand in plan["candidates"]):
        lines.append("* local SGD: approximate (averages every H steps), never recommended by speed alone")
    best = plan["recommended"]
    if best is None:
        lines.append("no synchronous layout fits the memory per rank: use more ranks, a smaller --batch-size or model")
    else:
        lines += ["", f"recommended: {best['layout']} ({best['samples_per_s']:,.0f} samples/s predicted)", *plan["why"],
                  f"  {plan['command']}"]  # fmt: skip
    return "\n".join(lines)


def explain(best: Candidate, cands: Sequence[Candidate], costs: Costs) -> list[str]:
    """A few lines on why `best` won."""
    data = next(c for c in cands if c.layout == "data")
    why = []
    if best.layout == "data":
        pipes = [c for c in cands if c.layout == "pipeline"]
        if pipes:
            top = max(pipes, key=lambda c: c.samples_per_s)
            why.append(f"  a pipeline pays its bubble and messages: at best {top.samples_per_s:,.0f} samples/s "
                       f"({label(vars(top))}), {top.samples_per_s / data.samples_per_s:.2f}x data")  # fmt: skip
        if data.collectives == 0:  # one rank
            why.append("  one rank: nothing to split or to average")
        else:
            why.append(f"  the whole model and its state fit each rank ({_gib(best.memory_bytes)}), so every rank "
                       "computes a full batch with one allreduce per step")  # fmt: skip
    elif best.layout == "sharded":
        why.append(f"  the optimizer's step is {costs.optimizer_seconds * 1e3:.2f} ms of the step: sharding it "
                   "saves more than its second collective costs")  # fmt: skip
    else:
        why.append(f"  {best.layout} is {best.samples_per_s / data.samples_per_s:.2f}x data parallel here")
    if not data.fits:
        why.append(f"  data parallel needs {_gib(data.memory_bytes)} per rank, more than there is")
    return why


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def bench_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a `hvdtrain bench allreduce` JSON for Horovod's in-place MPI allreduce (the path training
    uses); read before anything starts: a file that is not one is bad input."""
    if not Path(path).is_file():
        raise UsageError(f"--bench-json: no such file '{path}'")
    try:
        rows = json.loads(Path(path).read_text())["rows"]
        mine = [r for r in rows if r["impl"] == "horovod_mpi" and r["bytes"] > 0 and r["busbw_GBps"] >= 0]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--bench-json {path}: not a `hvdtrain bench allreduce` result (allreduce.json)") from None
    if not mine:
        raise UsageError(f"--bench-json {path}: holds no Horovod allreduce rows; run hvdtrain bench allreduce")
    return mine


def bench_busbw(rows: Sequence[dict[str, Any]], size: int) -> float:
    """The busbw (bytes/s) of the row (bench_rows) whose size is nearest `size`."""
    best = min(rows, key=lambda r: abs(math.log(r["bytes"]) - math.log(max(size, 1))))
    return best["busbw_GBps"] * 1e9


def train_command(cfg: TrainConfig, best: Candidate, ranks: int, nodes: Optional[int], per_node: Optional[int]) -> str:
    train = " ".join(["hvdtrain train", *(["-np", str(ranks)] if not nodes else []), *model_flags(cfg), *best.args])
    if nodes:
        return f"hvdtrain submit --nodes {nodes} --ntasks-per-node {per_node} -- {train}"
    return train


def run(cfg: TrainConfig, ranks: int, nodes: Optional[int], per_node: Optional[int], memory_gib: Optional[float],
        bench: Optional[Sequence[dict[str, Any]]], echo) -> dict[str, Any]:  # fmt: skip
    """Measure, probe, model, recommend (module docstring); returns the plan as a JSON-able dict."""
    cores = os.cpu_count() or 1
    here = per_node or ranks
    threads = max(1, cores // here)
    echo(f"hvdtrain: plan: measuring {cfg.model} on {threads} thread(s), then a {here}-rank probe ...")
    costs = measure(cfg, ranks, threads)
    pr = probe(cfg, here)
    if bench:
        pr.busbw_Bps = bench_busbw(bench, costs.param_bytes)
    memory, said = memory_per_rank(here, memory_gib)
    cands = sorted(candidates(costs, pr, ranks, cores * (nodes or 1), memory, cfg.batch_size),
                   key=lambda c: -c.samples_per_s)  # fmt: skip
    best = recommend(cands)
    return {
        "ranks": ranks, "nodes": nodes, "ntasks_per_node": per_node, "memory_per_rank_bytes": memory,
        "memory_said": said, "costs": dataclasses.asdict(costs), "probe": dataclasses.asdict(pr),
        "candidates": [dataclasses.asdict(c) for c in cands],
        "recommended": best and dataclasses.asdict(best),
        "why": explain(best, cands, costs) if best else [],
        "command": best and train_command(cfg, best, ranks, nodes, per_node),
    }  # fmt: skip


def model_flags(cfg: TrainConfig) -> list[str]:
    """The train flags that give `cfg`'s model, data and optimizer (those not at their defaults)."""
    defaults = TrainConfig()
    flags = []
    for name in ("model", "hidden", "depth", "data", "synthetic_samples", "batch_size", "optimizer", "momentum",
                 "seed"):  # fmt: skip
        value = getattr(cfg, name)
        if value != getattr(defaults, name):
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def to_validate(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates `--validate` runs: the fastest fitting one of each layout (the recommendation among them)."""
    seen, out = set(), []
    for cand in plan["candidates"]:  # fastest first
        if cand["fits"] and cand["layout"] not in seen:
            seen.add(cand["layout"])
            out.append(cand)
    return out


def validate(plan: dict[str, Any], cfg: TrainConfig, steps: int, echo) -> list[dict[str, Any]]:
    """Run each of `to_validate(plan)` for real on this machine (`hvdtrain train ... --max-steps steps`, in a
    temporary run directory) and set its predicted step time and memory beside the measured ones: the training
    seconds per step and the largest peak RSS of any rank."""
    from hvdtrain.errors import LaunchError

    rows = []
    for cand in to_validate(plan):
        with tempfile.TemporaryDirectory(prefix="hvdtrain-plan-") as tmp:
            run_dir = Path(tmp) / "run"
            command = [sys.executable, "-m", "hvdtrain", "train", "-np", str(plan["ranks"]), *model_flags(cfg),
                       *cand["args"], "--max-steps", str(steps), "--no-eval-every-epoch", "--run-dir", str(run_dir)]  # fmt: skip
            echo(f"hvdtrain: plan: validating {label(cand)} ({steps} steps) ...")
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                raise LaunchError(f"validating {label(cand)}: the job failed (exit {proc.returncode}):\n{tail}")
            result = json.loads((run_dir / "result.json").read_text())
        measured = result["seconds_training"] / result["steps"]
        rss = max(result["peak_rss_bytes"])
        rows.append({
            "layout": label(cand), "args": cand["args"], "predicted_step_seconds": cand["step_seconds"],
            "measured_step_seconds": measured, "step_ratio": measured / cand["step_seconds"],
            "predicted_memory_bytes": cand["memory_bytes"], "measured_peak_rss_bytes": rss,
            "memory_ratio": rss / cand["memory_bytes"],
        })  # fmt: skip
    return rows


def format_validation(rows: Sequence[dict[str, Any]]) -> str:
    widths = [w for _, w in VALIDATION_COLUMNS]
    lines = [fixed_row(*zip(*VALIDATION_COLUMNS))]
    for r in rows:
        cells = [r["layout"], f"{r['predicted_step_seconds'] * 1e3:.2f}", f"{r['measured_step_seconds'] * 1e3:.2f}",
                 f"{r['step_ratio']:.2f}", _gib(r["predicted_memory_bytes"]), _gib(r["measured_peak_rss_bytes"]),
                 f"{r['memory_ratio']:.2f}"]  # fmt: skip
        lines.append(fixed_row(cells, widths))
    return "\n".join(lines)
