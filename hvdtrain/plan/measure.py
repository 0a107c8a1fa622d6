"""What `hvdtrain plan` measures in its own process (torch imported inside `measure` only): the model's
parameter, gradient and optimizer-state bytes; for every way of cutting it into P pipeline stages, each stage's
forward+backward time and the activation bytes autograd keeps (a real forward+backward, timed with the threads a
rank gets) at every micro-batch size; the optimizer's step time; the dataset's bytes. Also what it reads here
instead of measuring: the memory a rank may use, and a `hvdtrain bench allreduce` result's bus bandwidth.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hvdtrain.config import TrainConfig
from hvdtrain.errors import UsageError
from hvdtrain.plan.model import Costs, Stage

MICRO_BATCHES = (1, 2, 4, 8)
STATE_PER_PARAM = {"sgd": 1, "adam": 2, "adamw": 2}  # optimizer state tensors per parameter (SGD: momentum)
REPS = 15  # timed forward+backward passes per measurement (the median is used)


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


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def forward_backward(module, inp, target=None):
    """Forward and backward: the loss on the last stage (target given), else the outputs' sum."""
    import torch

    out = module(inp)
    (torch.nn.functional.cross_entropy(out, target) if target is not None else out.sum()).backward()
    return out


def metered(module, inp, target=None):
    """forward_backward once, counting what autograd keeps (the pipeline's own meter): (the output, its bytes)."""
    from hvdtrain.parallel.pipe import ActivationMeter

    meter = ActivationMeter(module)
    with meter.forward(0):
        out = forward_backward(module, inp, target)
    return out.detach(), meter.peak_bytes


def measure(cfg: TrainConfig, ranks: int, threads: int) -> Costs:
    """Build the model and data as a rank would, and time and weigh it (see the module docstring)."""
    import torch

    from hvdtrain.train import datasets, models
    from hvdtrain.train.update import base_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    data = datasets.load(cfg.data, cfg.synthetic_samples, cfg.seed)
    model = models.build(cfg.model, data.input_shape, data.num_classes, cfg.hidden, cfg.depth)
    x_all, y_all = data.train.tensors
    data_bytes = sum(_bytes(ds.tensors) for ds in (data.train, data.test))
    nbytes = _bytes(model.parameters())
    b = cfg.batch_size
    x, y = x_all[:b], y_all[:b]

    activation_bytes = metered(model, x, y)[1]
    step_seconds = median_time(lambda: forward_backward(model, x, y))
    optimizer_seconds = median_time(base_optimizer(cfg, model.parameters(), 1e-9).step)

    layers = list(model)
    stages: dict[str, Stage] = {}
    for p in pipeline_depths(cfg, ranks):
        stages.update(measure_stages(layers, p, x, y, b))
    stateful = cfg.optimizer != "sgd" or cfg.momentum > 0
    return Costs(
        cfg.model, len(layers), nbytes, _bytes(model.buffers()),
        STATE_PER_PARAM[cfg.optimizer] * nbytes if stateful else 0,
        data_bytes, b, step_seconds, activation_bytes, optimizer_seconds, threads, stages,
    )  # fmt: skip


def pipeline_depths(cfg: TrainConfig, ranks: int) -> list[int]:
    """The stage counts P a pipeline of `ranks` ranks can have: its divisors from 2 up, no more than the model's
    layers with parameters (a stage without any: --strategy pipeline refuses it)."""
    return [p for p in range(2, ranks + 1) if ranks % p == 0 and p <= len(cfg.layers()[1])]


def measure_stages(layers: list, p: int, x, y, batch: int) -> dict[str, Stage]:
    """Each stage s of a pipeline of p (the layers balanced by parameter count, as --strategy pipeline cuts them)
    at every micro-batch count M of MICRO_BATCHES up to the batch: f"{p}:{s}:{M}" -> its Stage."""
    from torch import nn

    from hvdtrain.parallel.pipeline import balance_by_params

    sizes = balance_by_params(layers, p)
    bounds = [sum(sizes[:i]) for i in range(p + 1)]
    stages: dict[str, Stage] = {}
    for m in MICRO_BATCHES:
        if m > batch:
            continue
        micro = math.ceil(batch / m)
        inp = x[:micro]
        for s in range(p):
            part = nn.Sequential(*layers[bounds[s] : bounds[s + 1]])
            stage_in = inp.requires_grad_(s > 0)  # a stage after the first sends its input's gradient back
            target = y[:micro] if s == p - 1 else None
            out, held = metered(part, stage_in, target)
            seconds = median_time(lambda: forward_backward(part, stage_in, target))  # noqa: B023 (used at once)
            sent, weights = out.numel() * out.element_size(), _bytes(part.parameters())
            stages[f"{p}:{s}:{m}"] = Stage(bounds[s], bounds[s + 1], micro, seconds, held, sent, weights)
            inp = out
    return stages


def memory_per_rank(ranks_here: int, given_gib: Optional[float]) -> tuple[int, str]:
    """The memory a rank may use: --memory-per-rank, else this machine's available memory / its ranks."""
    if given_gib is not None:
        return int(given_gib * 1024**3), f"--memory-per-rank {given_gib:g} GiB"
    import psutil

    available = psutil.virtual_memory().available
    return available // ranks_here, f"{available / 1024**3:.1f} GiB available / {ranks_here} rank(s)"


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
