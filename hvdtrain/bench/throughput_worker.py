"""Runs on every rank: ``python -m hvdtrain.bench.throughput_worker PLAN.json OUT.json``.

Measures training throughput the way Horovod's pytorch_synthetic_benchmark does: `warmup` untimed batches,
then `iters` timed iterations of `batches_per_iter` batches each; one iteration gives
batch_size x batches_per_iter / seconds samples/s on this rank. PLAN (a TrainWorkerPlan, hvdtrain.bench.plans)
lists measurements in order, each an arm (how the step is driven), a model shape and a gradient compression:

  ddp      torch DistributedDataParallel over a gloo process group (baseline; runs before Horovod starts,
           because Horovod's background thread wakes even when idle and would slow it)
  mpi4py   the minimal synchronous data-parallel loop on MPI itself: the gradients live in one flat buffer,
           one in-place Allreduce (sum) of it per step, divided by n, then the step: what the communication allows
           (the "ceiling" of any data-parallel loop on this MPI)
  nocomm   the same loop with a plain optimizer and no communication on every rank at once: N independent
           processes, the hardware ceiling at this np (ddp, mpi4py and nocomm run with Horovod shut down)
  horovod  a minimal hand-written Horovod loop: DistributedOptimizer, broadcast, forward/backward/step
  sharded  the same loop with hvdtrain.parallel.zero.ShardedOptimizer (ZeRO-1: gradients reduce-scattered,
           parameters all-gathered, 1/np of the momentum per rank) instead of the DistributedOptimizer
  pipeline the model cut into P = np stages, one per rank (hvdtrain.parallel.pipe: activations and gradients as
           mpi4py messages), M micro-batches per batch in the GPipe or 1F1B schedule, plain SGD per stage: one
           replica, so every rank steps the same --pipeline-batch samples (no collective: it runs without Horovod);
           also each stage's peak activation bytes (what autograd saved) and micro-batches in flight
  trainer  hvdtrain's Trainer.fit(), timed per step by a hook (StepStamps)
  trainer_unwatched  (diagnostic, not run by default) the Trainer with hvdtrain.progress's calls made no-ops: no
           phase published, no step timed (what the hang watchdog and the straggler times cost a rank, paired with
           trainer: run both in one launch); every Trainer arm also says the CPU its rank wrapper (which reports
           the record to the watchdog once a second) used per step
  trainer_lean  (diagnostic, not run by default) the Trainer without a preemption signal handler and with
           log_every past the last step: its window sums of [loss, samples, preemption votes] (one
           allreduce every log_every steps, overlapped with the next step; none on one rank), progress
           lines and metrics records happen once, at the end: what those cost

Every arm trains the same model (hvdtrain.train.models.build with the same seed) on the same synthetic
dataset, with the same batch, SGD (momentum 0.9, lr scaled by the number of ranks), the same sampler order
(DistributedSampler, seed 0) and the same way of taking a batch (indexing the dataset's tensors), so the
arms differ only in how the step is driven. The plan goes round by round (hvdtrain.bench.throughput's
measurement_order), DDP first: an MPI reference arm after a Horovod arm shuts Horovod down (hvd.shutdown),
the next Horovod arm initialises it again. Rank 0 writes every rank's per-iteration rates to OUT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hvdtrain import procs, progress
from hvdtrain.bench.plans import BASELINE_ARMS, MPI_ARMS, Measurement, ModelShape, Timing, TrainWorkerPlan
from hvdtrain.bench.report import tuning_env, write_json
from hvdtrain.env import rank_info
from hvdtrain.errors import rank_main
from hvdtrain.train import datasets, models
from hvdtrain.train.hooks import Hook


def rates_from_stamps(stamps: list[float], timing: Timing) -> list[float]:
    """Per-iteration samples/s from the times at which each step ended (stamps[0]: before the first step)."""
    w, bpi = timing.warmup, timing.batches_per_iter
    out = []
    for i in range(timing.iters):
        start, end = stamps[w + i * bpi], stamps[w + (i + 1) * bpi]
        out.append(timing.batch_size * bpi / (end - start))
    return out


def make_dataset(timing: Timing, size: int) -> datasets.Dataset:
    """Enough synthetic samples that no rank starts a second epoch inside one measurement."""
    return datasets.synthetic(timing.batch_size * timing.steps * size, seed=0)


def batches(dataset: datasets.Dataset, rank: int, size: int, batch_size: int):
    """This rank's batches in DistributedSampler order (seed 0, epoch 0), the Trainer's order."""
    from torch.utils.data.distributed import DistributedSampler

    order = list(DistributedSampler(dataset.train, num_replicas=size, rank=rank, shuffle=True, seed=0))
    x_all, y_all = dataset.train.tensors
    for i in range(0, len(order) - batch_size + 1, batch_size):
        index = torch.as_tensor(order[i : i + batch_size])
        yield x_all[index], y_all[index]


def build_model(shape: ModelShape, dataset: datasets.Dataset) -> nn.Module:
    torch.manual_seed(0)
    return models.build(shape.model, dataset.input_shape, dataset.num_classes, shape.hidden, shape.depth)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The plain training step both hand-written arms run (the Trainer runs its own)."""

    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()  # as a real loop would, to log it; it also waits for the step to finish

    return step


def timed_loop(step: Callable[[torch.Tensor, torch.Tensor], None], data, timing: Timing) -> list[float]:
    """Run warm-up then the timed iterations of `step`; returns this rank's per-iteration samples/s."""
    stamps = [time.perf_counter()]
    for _ in range(timing.steps):
        x, y = next(data)
        step(x, y)
        stamps.append(time.perf_counter())
    return rates_from_stamps(stamps, timing)


# --------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------


def ddp_arm(plan: TrainWorkerPlan, shape: ModelShape, m: Measurement) -> tuple[list[float], dict]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, size = dist.get_rank(), dist.get_world_size()
    dataset = make_dataset(plan.timing, size)
    model = DistributedDataParallel(build_model(shape, dataset))
    opt = torch.optim.SGD(model.parameters(), lr=plan.lr * size, momentum=0.9)
    data = batches(dataset, rank, size, plan.timing.batch_size)
    return timed_loop(sgd_step(model, opt), data, plan.timing), {}


def mpi4py_arm(plan: TrainWorkerPlan, shape: ModelShape, m: Measurement) -> tuple[list[float], dict]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dataset = make_dataset(plan.timing, size)
    model = build_model(shape, dataset)  # the same seed on every rank: the weights a broadcast would give
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params))
    offset = 0
    for p in params:  # backward accumulates into these views of the flat buffer: no copies
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    opt = torch.optim.SGD(params, lr=plan.lr * size, momentum=0.9)
    buffer = flat.numpy()

    def step(x, y):
        flat.zero_()  # (zero_grad would drop the views)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        flat.div_(size)
        opt.step()
        loss.item()

    comm.Barrier()
    return timed_loop(step, batches(dataset, rank, size, plan.timing.batch_size), plan.timing), {}


def nocomm_arm(plan: TrainWorkerPlan, shape: ModelShape, m: Measurement) -> tuple[list[float], dict]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dataset = make_dataset(plan.timing, size)
    model = build_model(shape, dataset)
    opt = torch.optim.SGD(model.parameters(), lr=plan.lr * size, momentum=0.9)
    comm.Barrier()  # every rank at once, as in the other arms
    rates = timed_loop(sgd_step(model, opt), batches(dataset, rank, size, plan.timing.batch_size), plan.timing)
    comm.Barrier()
    return rates, {}


def horovod_arm(plan: TrainWorkerPlan, shape: ModelShape, m: Measurement) -> tuple[list[float], dict]:
    import horovod.torch as hvd

    from hvdtrain.parallel.zero import state_bytes

    rank, size = hvd.rank(), hvd.size()
    dataset = make_dataset(plan.timing, size)
    model = build_model(shape, dataset)
    opt = torch.optim.SGD(model.parameters(), lr=plan.lr * size, momentum=0.9)
    compression = hvd.Compression.fp16 if m.compression == "fp16" else hvd.Compression.none
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    data = batches(dataset, rank, size, plan.timing.batch_size)
    rates = timed_loop(sgd_step(model, opt), data, plan.timing)
    return rates, {"optimizer_state_bytes": state_bytes(opt)}


def sharded_arm(plan: TrainWorkerPlan, shape: ModelShape, m: Measurement) -> tuple[list[float], dict]:
    import horovod.torch as hvd

    from hvdtrain.parallel.zero import ShardedOptimizer

    rank, size = hvd.rank(), hvd.size()
    dataset = make_dataset(plan.timing, size)
    model = build_model(shape, dataset)
    opt = ShardedOptimizer(torch.optim.SGD, model, lr=plan.lr * size, momentum=0.9, compression=m.compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    data = batches(dataset, rank, size, plan.timing.batch_size)
    rates = timed_loop(sgd_step(model, opt), data, plan.timing)
    return rates, {"optimizer_state_bytes": opt.state_bytes()}


_pipe_comm = None  # the pipeline arm's communicator (one Dup for every measurement; left to MPI_Finalize)


def pipeline_arm(plan: TrainWorkerPlan, shape: ModelShape, m: Measurement) -> tuple[list[float], dict]:
    global _pipe_comm
    from mpi4py import MPI

    from hvdtrain.parallel.grid import Grid
    from hvdtrain.parallel.pipe import Stage

    if _pipe_comm is None:
        _pipe_comm = MPI.COMM_WORLD.Dup()
    comm = _pipe_comm
    timing = dataclasses.replace(plan.timing, batch_size=plan.pipeline_batch)
    dataset = make_dataset(timing, 1)  # one replica: every stage reads the same batches
    x = dataset.train.tensors[0]
    stage = Stage.build(
        build_model(shape, dataset), Grid(comm.size, comm.size), comm, x.shape[1:], x.dtype,
        schedule=m.schedule, micro_batches=m.micro,
    )  # fmt: skip
    opt = torch.optim.SGD(stage.module.parameters(), lr=plan.lr, momentum=0.9)

    def step(x, y):
        opt.zero_grad()
        stage.train_pass(len(x), x if stage.first else None, y if stage.last else None, nn.functional.cross_entropy)
        opt.step()

    comm.Barrier()
    rates = timed_loop(step, batches(dataset, 0, 1, timing.batch_size), timing)
    peaks = comm.allgather((stage.meter.peak_bytes, stage.meter.peak_micro))
    return rates, {
        "stages": comm.size, "schedule": m.schedule, "micro": m.micro,
        "activation_peak_bytes": [b for b, _ in peaks], "micro_in_flight_peak": [n for _, n in peaks],
    }  # fmt: skip


class StepStamps(Hook):
    """The start of the first step, then the end of every step: whatever the Trainer does between two steps
    (progress lines, metrics records, starting and reading the window allreduce) falls inside the timed
    intervals."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_start(self, trainer) -> None:
        if not self.stamps:
            self.stamps.append(time.perf_counter())

    def on_step_end(self, trainer) -> None:
        self.stamps.append(time.perf_counter())


def trainer_arm(plan: TrainWorkerPlan, shape: ModelShape, m: Measurement) -> tuple[list[float], dict]:
    """The Trainer as users run it (its defaults: a progress line, a metrics record and the overlapped window
    allreduce every log_every steps, TensorBoard, the preemption signal handler), minus evaluation between
    epochs; a fresh run directory per measurement. Timed per step by a StepStamps hook, so warm-up is
    excluded exactly as for the other arms; the set-up before the first step and the final evaluation and
    checkpoint are not timed."""
    import horovod.torch as hvd

    from hvdtrain.config import TrainConfig
    from hvdtrain.train.trainer import Trainer

    size, steps = hvd.size(), plan.timing.steps
    dataset = make_dataset(plan.timing, size)
    run_dir = Path(plan.run_root) / f"np{size}-{m.arm}-{m.model}-{m.compression}-{m.round}"
    lean = {}
    if m.arm == "trainer_lean":
        # Diagnostic arm: no preemption signal handler, and log_every past the last step, so the window sums
        # (an allreduce on 2+ ranks), the progress line and the metrics record happen once, after the last step.
        lean = {"preempt_signal": "", "log_every": steps + 1}
    cfg = TrainConfig(
        model=shape.model, hidden=shape.hidden, depth=shape.depth, data="synthetic",
        synthetic_samples=len(dataset.train), epochs=1, max_steps=steps, batch_size=plan.timing.batch_size,
        lr=plan.lr, scale_lr=True, optimizer="sgd", momentum=0.9, compression=m.compression, seed=0,
        run_dir=str(run_dir), eval_every_epoch=False, **lean,
    )  # fmt: skip
    timer = StepStamps()
    wrapper_before = _cpu_seconds(os.getppid())
    with progress.using(_Silent()) if m.arm == "trainer_unwatched" else contextlib.nullcontext():
        result = Trainer(cfg, dataset=dataset, echo=lambda _line: None, hooks=[timer]).fit()
    wrapper_cpu = _cpu_seconds(os.getppid()) - wrapper_before
    hvd.barrier()
    if hvd.rank() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    if len(timer.stamps) != steps + 1:
        raise RuntimeError(f"the Trainer ran {len(timer.stamps) - 1} timed steps; the plan needs {steps}")
    extra = {"fit_samples_per_s": result.get("samples_per_s"), "fit_steps": result.get("steps"),
             "wrapper_cpu_s_per_step": wrapper_cpu / max(1, result.get("steps") or 1)}  # fmt: skip
    if m.arm == "trainer_unwatched":
        extra["progress_us_per_step"] = progress_cost_us(cfg.backward_passes_per_step)
    return rates_from_stamps(timer.stamps, plan.timing), {**extra, "method": "per-step stamps"}


class _Silent:
    """hvdtrain.progress's Publisher with every call a no-op (the trainer_unwatched arm)."""

    current = ""

    def step(self, n=None, phase="step") -> None:
        pass

    def phase(self, name) -> None:
        pass

    def spent(self) -> tuple[float, float]:
        return 0.0, 0.0


def progress_cost_us(passes: int, steps: int = 20000) -> float:
    """What the Trainer's hvdtrain.progress calls of one step cost this rank, in microseconds: the same calls, in
    the same order, into a record of its own, timed over `steps` steps (what trainer_unwatched leaves out)."""
    timer = progress.Publisher(bytearray(progress.SIZE))
    with progress.using(timer):
        began = time.perf_counter()
        for i in range(steps):
            progress.step(i, phase="hook")
            timer.spent()
            progress.set_phase("forward")
            for _ in range(passes):
                progress.set_phase("forward")
                progress.set_phase("backward")
            progress.set_phase("allreduce")
            progress.set_phase("optimizer")
            progress.set_phase("hook")
            timer.spent()
        return (time.perf_counter() - began) / steps * 1e6


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc, 10 ms steps); 0 where /proc cannot say."""
    fields = procs.stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


ARM_RUNNERS = {
    "ddp": ddp_arm, "horovod": horovod_arm, "trainer": trainer_arm, "trainer_lean": trainer_arm, "sharded": sharded_arm,
    "mpi4py": mpi4py_arm, "nocomm": nocomm_arm, "pipeline": pipeline_arm, "trainer_unwatched": trainer_arm,
}  # fmt: skip


# --------------------------------------------------------------------------------------------------


class _Collectives:
    """Which collective layer is up in this worker as the measurements go: Horovod (its arms and the Trainer's),
    torch.distributed's gloo group (DDP), or neither (the mpi4py and no-communication references, on the MPI that
    mpi4py started)."""

    def __init__(self, store: str, rank: int, size: int, threads: int):
        self.store, self.rank, self.size, self.threads = store, rank, size, threads
        self.hvd_started = False
        self.ddp_group = False

    def enter(self, arm: str) -> None:
        """Bring up what `arm` runs on, and take down what it must not run beside."""
        if arm in BASELINE_ARMS and self.hvd_started:
            if arm not in MPI_ARMS or "mpi4py.MPI" not in sys.modules:
                raise RuntimeError(f"the plan puts a {arm} measurement after Horovod started on its own MPI")
            import horovod.torch as hvd

            # The references run without Horovod's background thread; the next Horovod arm starts it again (on
            # the MPI that mpi4py started, which Horovod's shutdown leaves running).
            hvd.shutdown()
            self.hvd_started = False
        if arm == "ddp":
            if not self.ddp_group:
                import torch.distributed as dist

                store = f"file://{self.store}"
                dist.init_process_group("gloo", init_method=store, rank=self.rank, world_size=self.size)
                self.ddp_group = True
            return
        if self.ddp_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.ddp_group = False
        if not self.hvd_started and arm not in BASELINE_ARMS:
            import horovod.torch as hvd

            # On the MPI that mpi4py started, when a reference arm did (Horovod then leaves it running).
            hvd.init(comm=sys.modules["mpi4py.MPI"].COMM_WORLD) if "mpi4py.MPI" in sys.modules else hvd.init()
            torch.set_num_threads(self.threads)
            self.hvd_started = True

    def gather(self, results: list) -> list:
        """Every rank's results, on every rank, through whichever group is up."""
        if self.hvd_started:
            import horovod.torch as hvd

            return hvd.allgather_object(results)
        if self.ddp_group:
            import torch.distributed as dist

            everyone = [None] * self.size
            dist.all_gather_object(everyone, results)
            dist.destroy_process_group()
            return everyone
        return sys.modules["mpi4py.MPI"].COMM_WORLD.allgather(results)  # the reference arms alone: MPI


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hvdtrain.bench.throughput_worker PLAN.json OUT.json", file=sys.stderr)
        return 2
    plan, out = TrainWorkerPlan.from_json(Path(argv[0]).read_text()), Path(argv[1])
    threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    torch.set_num_threads(threads)
    info = rank_info()
    collectives = _Collectives(plan.store, info.rank, info.size, threads)
    results = []
    for m in plan.measurements:
        collectives.enter(m.arm)
        rates, extra = ARM_RUNNERS[m.arm](plan, plan.models[m.model], m)
        results.append({**dataclasses.asdict(m), "rates": rates, **extra})
    everyone = collectives.gather(results)
    if info.rank == 0:
        import horovod

        merged = []
        for i, m in enumerate(everyone[0]):
            row = {k: v for k, v in m.items() if k != "rates"}
            row["rank_rates"] = [per_rank[i]["rates"] for per_rank in everyone]
            merged.append(row)
        meta = {"np": info.size, "threads_per_rank": threads, "controller": plan.controller}
        meta.update(fusion_threshold=os.environ.get("HOROVOD_FUSION_THRESHOLD"), torch=torch.__version__)
        meta.update(horovod=horovod.__version__, env=tuning_env(os.environ))
        write_json(out, {"meta": meta, "measurements": merged})
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(main, sys.argv[1:]))
