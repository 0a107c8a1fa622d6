"""`hvdtrain plan`'s text: the plan and the validation as tables, a candidate's short name, why the recommended
layout won, and the exact command that trains with it."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from hvdtrain.config import TrainConfig
from hvdtrain.files import size_text
from hvdtrain.plan.model import Candidate, Costs
from hvdtrain.render import fixed_row

PLAN_COLUMNS = (("layout", 26), ("mem/rank", 10), ("comm/step", 11), ("bubble", 8), ("step ms", 9), ("samples/s", 11))
VALIDATION_COLUMNS = (("validated", 26), ("step ms", 9), ("measured", 10), ("ratio", 7), ("mem/rank", 10),
                      ("peak RSS", 10), ("ratio", 7))  # fmt: skip


def label(cand: dict[str, Any]) -> str:
    """A candidate's short name: data, sharded, local-sgd H=4, pipeline P=2 M=4 1f1b."""
    args = dict(zip(cand["args"][::2], cand["args"][1::2]))
    if cand["layout"] == "local-sgd":
        return f"local-sgd H={args['--average-every']}"
    if cand["layout"] == "pipeline":
        return f"pipeline P={args['--stages']} M={args['--micro-batches']} {args['--schedule']}"
    return cand["layout"]


def format_plan(plan: dict[str, Any]) -> str:
    """The plan (`hvdtrain.plan.run`'s dict) as `hvdtrain plan` prints it: what was measured and probed, every
    layout's row, the recommendation with its reasons and command."""
    c, pr = plan["costs"], plan["probe"]
    widths = [w for _, w in PLAN_COLUMNS]
    lines = [
        f"model {c['model']}: {c['layers']} layers, parameters {size_text(c['param_bytes'])}, optimizer state "
        f"{size_text(c['state_bytes'])}, activations {size_text(c['activation_bytes'])} per batch of {c['batch']}; "
        f"forward+backward {c['step_seconds'] * 1e3:.2f} ms per batch on {c['threads']} thread(s)",
        f"probe ({pr['ranks']} ranks): a rank holds {size_text(pr['base_rss_bytes'])} before training; one step's "
        f"gradient allreduce {pr['comm_seconds'] * 1e3:.2f} ms ({pr['busbw_Bps'] / 1e9:.2f} GB/s bus), a 4-byte "
        f"allreduce {pr['latency_seconds'] * 1e6:.0f} us, a message to the next rank {pr['p2p_seconds'] * 1e6:.0f} us",
        f"memory per rank: {plan['memory_said']}",
        "",
        fixed_row([name for name, _ in PLAN_COLUMNS], widths),
    ]
    for cand in plan["candidates"]:
        flags = ("" if cand["fits"] else " (does not fit)") + ("" if cand["exact"] else " *")
        cells = [label(cand), size_text(cand["memory_bytes"]), size_text(cand["comm_bytes"]), f"{cand['bubble']:.2f}",
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
            why.append(f"  the whole model and its state fit each rank ({size_text(best.memory_bytes)}), so every rank "
                       "computes a full batch with one allreduce per step")  # fmt: skip
    elif best.layout == "sharded":
        why.append(f"  the optimizer's step is {costs.optimizer_seconds * 1e3:.2f} ms of the step: sharding it "
                   "saves more than its second collective costs")  # fmt: skip
    else:
        why.append(f"  {best.layout} is {best.samples_per_s / data.samples_per_s:.2f}x data parallel here")
    if not data.fits:
        why.append(f"  data parallel needs {size_text(data.memory_bytes)} per rank, more than there is")
    return why


def format_validation(rows: Sequence[dict[str, Any]]) -> str:
    """`--validate`'s rows: each layout's predicted step time and memory beside the measured ones."""
    widths = [w for _, w in VALIDATION_COLUMNS]
    lines = [fixed_row([name for name, _ in VALIDATION_COLUMNS], widths)]
    for r in rows:
        cells = [r["layout"], f"{r['predicted_step_seconds'] * 1e3:.2f}", f"{r['measured_step_seconds'] * 1e3:.2f}",
                 f"{r['step_ratio']:.2f}", size_text(r["predicted_memory_bytes"]), size_text(r["measured_peak_rss_bytes"]),
                 f"{r['memory_ratio']:.2f}"]  # fmt: skip
        lines.append(fixed_row(cells, widths))
    return "\n".join(lines)


def train_command(cfg: TrainConfig, best: Candidate, ranks: int, nodes: Optional[int], per_node: Optional[int]) -> str:
    """The command that trains with `best`: `hvdtrain train` on this machine, or `hvdtrain submit` for --nodes."""
    train = " ".join(["hvdtrain train", *(["-np", str(ranks)] if not nodes else []), *model_flags(cfg), *best.args])
    if nodes:
        return f"hvdtrain submit --nodes {nodes} --ntasks-per-node {per_node} -- {train}"
    return train


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
