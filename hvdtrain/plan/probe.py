"""`hvdtrain plan`'s probe: a real job of the ranks of one node. `run` launches it (through the same launcher as
`train`) and reads what it measured; every rank runs ``python -m hvdtrain.plan.probe CONFIG.json OUT.json``.

What a rank of the training job holds besides its model's state and activations (its peak RSS after the
worker's imports, Horovod's start, the dataset, the model, the allreduces that allocate Horovod's fusion buffer
and one step of the training's optimizer through the DistributedOptimizer; rank 0 also imports TensorBoard's
writer, as the Trainer's rank 0 does); one batch's forward+backward with every rank computing at once (the
contention the planning process alone does not see); one data-parallel step's communication as the
DistributedOptimizer issues it (one asynchronous allreduce per parameter, fused by Horovod); one batch through a
real pipeline of every rank as a stage (its messages); a 4-byte allreduce (the latency); a small mpi4py message
to the next rank. Medians of REPS (the compute: the slowest rank's); rank 0 writes OUT (plan.model.Probe's
fields).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path

from hvdtrain.config import TrainConfig
from hvdtrain.errors import rank_main
from hvdtrain.plan.measure import median_time
from hvdtrain.plan.model import Probe, ring_bytes
from hvdtrain.rundir import RunDir

MODULE = "hvdtrain.plan.probe"  # what every rank runs (python -m)
REPS, WARMUP = 30, 5


def run(cfg: TrainConfig, ranks: int) -> Probe:
    """Run `python -m hvdtrain.plan.probe` on `ranks` ranks of this machine (in a temporary run directory: its
    config, the ranks' logs and the probe's result; removed) and read what it measured."""
    from hvdtrain.launching.supervise import run_job

    with tempfile.TemporaryDirectory(prefix="hvdtrain-plan-") as tmp:
        run_dir = RunDir(tmp)
        run_dir.config.write_text(cfg.to_json())
        run_job(spec(run_dir, ranks), echo=lambda _line: None)
        got = json.loads(run_dir.result.read_text())
    return Probe(**got)


def spec(run_dir: RunDir, ranks: int):
    """The probe's launch: `python -m hvdtrain.plan.probe CONFIG RESULT` on `ranks` ranks, logs in the run's."""
    from hvdtrain.launching.options import LaunchOptions
    from hvdtrain.launching.spec import make_spec

    command = [sys.executable, "-m", MODULE, str(run_dir.config), str(run_dir.result)]
    return make_spec(command, LaunchOptions(np=ranks, output_dir=str(run_dir.logs.path)), check_cmd=False)


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


def pipeline_step(model, data, batch: int, weighted: int, timed) -> float:
    """One batch through a real pipeline of every rank as a stage (hvdtrain.parallel.pipe.Stage, one micro-batch,
    1F1B), Horovod running as in training: its messages meet what a pipeline's meet. 0.0 when the model has fewer
    layers with parameters (`weighted`) than there are ranks, or there is one rank."""
    import torch
    from mpi4py import MPI

    from hvdtrain.parallel.grid import Grid
    from hvdtrain.parallel.pipe import Stage

    size = MPI.COMM_WORLD.size
    if size < 2 or weighted < size:
        return 0.0
    comm = MPI.COMM_WORLD.Dup()  # left to MPI_Finalize: freeing it while Horovod runs is not safe
    x_all, y_all = data.train.tensors
    x, y = x_all[:batch], y_all[:batch]
    stage = Stage.build(model, Grid(size, size), comm, x.shape[1:], x.dtype, schedule="1f1b", micro_batches=1)

    def step() -> None:
        stage.module.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy
        stage.train_pass(batch, x if stage.first else None, y if stage.last else None, loss)

    comm.Barrier()
    return timed(step)


def main(argv: list[str]) -> None:
    import torch

    from hvdtrain.files import write_json
    from hvdtrain.parallel import horovod
    from hvdtrain.train import datasets, models, trainer  # noqa: F401  (the worker's imports, for its memory)
    from hvdtrain.train.update import base_optimizer

    cfg = TrainConfig.from_dict(json.loads(Path(argv[0]).read_text()))
    hvd = horovod.init()
    if hvd.rank() == 0:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (the Trainer's rank 0 records with it)
    data = datasets.load(cfg.data, cfg.synthetic_samples, cfg.seed)
    model = models.build(cfg.model, data.input_shape, data.num_classes, cfg.hidden, cfg.depth)
    grads = [torch.randn_like(p) for p in model.parameters()]
    x, y = data.train.tensors[0][: cfg.batch_size], data.train.tensors[1][: cfg.batch_size]

    def timed(fn) -> float:
        return median_time(fn, REPS, WARMUP)

    def step() -> None:
        handles = [hvd.allreduce_async_(g, name=f"plan.grad.{i}", op=hvd.Average) for i, g in enumerate(grads)]
        for h in handles:
            hvd.synchronize(h)

    def compute() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()

    tiny = torch.zeros(1)
    seconds = timed(compute)  # every rank at once, Horovod's thread running: the compute's contention
    comm = timed(step)
    latency = timed(lambda: hvd.allreduce_(tiny, name="plan.latency", op=hvd.Sum))
    # With Horovod running, a message waits for MPI's progress behind the background thread's collectives (each
    # cycle, even when idle): on these machines about a cycle, not the wire's microseconds. The median is what a
    # pipeline's messages meet.
    p2p = timed(lambda: ping_pong(hvd.rank(), hvd.size())) / 2
    pipeline = pipeline_step(model, data, cfg.batch_size, len(cfg.layers()[1]), timed)
    size = sum(g.numel() * g.element_size() for g in grads)
    # One real step of the training's optimizer through the DistributedOptimizer: the first optimizer a process
    # makes imports much of torch (tens of MiB), and the step allocates its state.
    optimizer = horovod.distributed_optimizer(base_optimizer(cfg, model.parameters(), cfg.lr), model)
    optimizer.zero_grad()
    compute()
    optimizer.step()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after the fusion buffer and autograd's use
    peaks = horovod.allgather_object(rss, name="plan.rss")
    seconds = max(horovod.allgather_object(seconds, name="plan.compute"))
    if hvd.rank() == 0:
        write_json(argv[1], {
            "ranks": hvd.size(), "base_rss_bytes": max(peaks), "comm_seconds": comm, "latency_seconds": latency,
            "busbw_Bps": ring_bytes(size, hvd.size()) / comm if hvd.size() > 1 else 0.0, "p2p_seconds": p2p,
            "compute_seconds": seconds, "pipeline_seconds": pipeline,
        })  # fmt: skip
    horovod.barrier_all()


if __name__ == "__main__":
    sys.exit(rank_main(main, sys.argv[1:]))
