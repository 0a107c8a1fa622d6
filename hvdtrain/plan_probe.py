"""Runs on every rank of `hvdtrain plan`'s probe: ``python -m hvdtrain.plan_probe CONFIG.json OUT.json``.

What a rank of the training job holds before it trains (its peak RSS after the worker's imports, Horovod's
start, the dataset and the model; rank 0 also imports TensorBoard's writer, as the Trainer's rank 0 does) and
what one data-parallel step's communication takes: an allreduce of every gradient as the DistributedOptimizer
issues them (one asynchronous allreduce per parameter, fused by Horovod), and a 4-byte allreduce (the latency).
Medians of REPS; rank 0 writes OUT (hvdtrain.plan.Probe's fields).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPS, WARMUP = 30, 5


def ping_pong(rank: int, size: int) -> None:
    """Rank 0 and rank 1 exchange a small message there and back with mpi4py (a pipeline's activations travel
    this way); the other ranks wait."""
    from mpi4py import MPI

    comm, buf = MPI.COMM_WORLD, bytearray(64)
    if size < 2 or rank > 1:
        return
    if rank == 0:
        comm.Send(buf, dest=1, tag=7)
        comm.Recv(buf, source=1, tag=7)
    else:
        comm.Recv(buf, source=0, tag=7)
        comm.Send(buf, dest=0, tag=7)


def main(argv: list[str]) -> None:
    import torch

    from hvdtrain.config import TrainConfig
    from hvdtrain.files import write_json
    from hvdtrain.parallel import horovod
    from hvdtrain.plan import ring_bytes
    from hvdtrain.train import datasets, models, trainer  # noqa: F401  (the worker's imports, for its memory)

    cfg = TrainConfig.from_dict(json.loads(Path(argv[0]).read_text()))
    hvd = horovod.init()
    if hvd.rank() == 0:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (the Trainer's rank 0 records with it)
    data = datasets.load(cfg.data, cfg.synthetic_samples, cfg.seed)
    model = models.build(cfg.model, data.input_shape, data.num_classes, cfg.hidden, cfg.depth)
    grads = [torch.randn_like(p) for p in model.parameters()]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def timed(fn) -> float:
        for _ in range(WARMUP):
            fn()
        times = []
        for _ in range(REPS):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def step() -> None:
        handles = [hvd.allreduce_async_(g, name=f"plan.grad.{i}", op=hvd.Average) for i, g in enumerate(grads)]
        for h in handles:
            hvd.synchronize(h)

    tiny = torch.zeros(1)
    comm = timed(step)
    latency = timed(lambda: hvd.allreduce_(tiny, name="plan.latency", op=hvd.Sum))
    p2p = timed(lambda: ping_pong(hvd.rank(), hvd.size())) / 2
    size = sum(g.numel() * g.element_size() for g in grads)
    peaks = horovod.allgather_object(rss, name="plan.rss")
    if hvd.rank() == 0:
        write_json(argv[1], {
            "ranks": hvd.size(), "base_rss_bytes": max(peaks), "comm_seconds": comm, "latency_seconds": latency,
            "busbw_Bps": ring_bytes(size, hvd.size()) / comm if hvd.size() > 1 else 0.0, "p2p_seconds": p2p,
        })  # fmt: skip
    horovod.barrier_all()


if __name__ == "__main__":
    main(sys.argv[1:])
