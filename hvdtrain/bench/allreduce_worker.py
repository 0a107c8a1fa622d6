"""Runs on every rank: ``python -m hvdtrain.bench.allreduce_worker PLAN.json OUT.json``.

PLAN (an AllreduceWorkerPlan, hvdtrain.bench.plans) gives the controller of this run ("mpi" or "gloo"), the
message sizes, warm-up, iterations and repeats. Each
implementation is timed on float32 tensors of every size: after a correctness check (ones summed over n
ranks give n) and `warmup` untimed calls, `repeats` blocks of `iterations_for(size)` back-to-back allreduces
are timed, each after a barrier; a block's time is the slowest rank's mean per call, and a size's time the
median block's (every block's time is kept: a hiccup of the machine spoils one block, not the size).

The MPI run times memcpy, then mpi4py's Allreduce, and only then initialises Horovod (on the same
MPI_COMM_WORLD); the Gloo run times torch.distributed's gloo all_reduce and only then initialises Horovod.
The baselines run before Horovod starts because Horovod's background thread wakes even when idle (stock
Horovod's MPI controller spins a core), which would slow them on a small machine. The MPI run then times
mpi4py and Horovod (in place) once more at `paired_sizes`, in `pairs` pairs of back-to-back blocks: a shared machine
swings by several times over seconds, and a pair meets it in one state. Rank 0 writes OUT with raw times;
bandwidths are computed by the launching side (hvdtrain.bench.allreduce).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hvdtrain.bench.plans import AllreduceWorkerPlan
from hvdtrain.bench.report import ELEMENT_BYTES, iterations_for, tuning_env, write_json
from hvdtrain.env import rank_info
from hvdtrain.errors import rank_main


def _time_calls(op, barrier, n: int) -> float:
    barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        op()
    return (time.perf_counter() - t0) / n


def _sweep(impl: str, plan: AllreduceWorkerPlan, make, check, barrier, slowest) -> list[dict]:
    """Time `make(size)`'s op over every size; `check` verifies one result; `slowest` takes the max over ranks."""
    rows = []
    for size in plan.sizes:
        op, buf = make(size)
        check(op, buf)
        for _ in range(plan.warmup):
            op()
        n = iterations_for(size, plan.iters)
        blocks = [slowest(_time_calls(op, barrier, n)) for _ in range(plan.repeats)]
        row = {"impl": impl, "bytes": size, "elements": size // ELEMENT_BYTES, "iters": n}
        rows.append({**row, "time_s": statistics.median(blocks), "block_times_s": blocks})
    return rows


def _check_sum(get, fill, n: int, impl: str):
    def check(op, buf):
        fill(buf, 1.0)
        op()
        got = get(buf)
        if got != n:
            raise RuntimeError(f"{impl}: allreduce of ones over {n} ranks gave {got}, expected {n}")
        fill(buf, 0.0)  # time on zeros: sums stay finite however many iterations run

    return check


def memcpy_rows(plan: AllreduceWorkerPlan, barrier, slowest) -> list[dict]:
    """Local copy bandwidth (dst.copy_(src), one thread) on every rank at once: this machine's limit."""

    def make(size):
        src, dst = torch.ones(size // ELEMENT_BYTES), torch.empty(size // ELEMENT_BYTES)
        return (lambda: dst.copy_(src)), dst

    return _sweep("memcpy", plan, make, lambda op, buf: None, barrier, slowest)


def mpi_run(plan: AllreduceWorkerPlan) -> tuple[list[dict], dict]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n = comm.Get_size()

    def slowest(t):
        return comm.allreduce(t, op=MPI.MAX)

    rows = memcpy_rows(plan, comm.Barrier, slowest)

    def make_mpi(size):
        # Memory from torch's allocator, as training's gradients and Horovod's buffers here: numpy's own
        # allocator asks for transparent huge pages for large arrays, which made its 64 MiB allreduce ~12 %
        # faster on this machine than the same call on torch's memory (docs/performance-methods.md).
        buf = torch.zeros(size // ELEMENT_BYTES).numpy()
        return (lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)), buf

    fill_np = lambda b, v: b.fill(v)  # noqa: E731
    check = _check_sum(lambda b: float(b[0]), fill_np, n, "mpi4py")
    rows += _sweep("mpi4py", plan, make_mpi, check, comm.Barrier, slowest)
    rows += horovod_rows(plan, "horovod_mpi", comm=comm)
    info = {"mpi_vendor": ".".join(map(str, MPI.get_vendor()[1])), "mpi_library": MPI.get_vendor()[0]}
    return rows, {**info, "paired": paired_blocks(plan, comm, make_mpi, slowest)}


def paired_blocks(plan: AllreduceWorkerPlan, comm, make_mpi, slowest) -> list[dict]:
    """At each of plan.paired_sizes, with Horovod up: `pairs` pairs of blocks, mpi4py's Allreduce and Horovod's
    in-place allreduce back to back (the order alternating), so that each pair meets the machine in one state."""
    import horovod.torch as hvd

    out = []
    for size in plan.paired_sizes:
        ops = {"mpi4py": make_mpi(size)[0], "horovod": horovod_in_place(hvd, size, f"bench.paired.{size}")[0]}
        n = iterations_for(size, plan.iters)
        for op in ops.values():
            for _ in range(plan.warmup):
                op()
        times: dict[str, list[float]] = {"mpi4py": [], "horovod": []}
        for k in range(plan.pairs):
            for impl in ("mpi4py", "horovod") if k % 2 == 0 else ("horovod", "mpi4py"):
                times[impl].append(slowest(_time_calls(ops[impl], comm.Barrier, n)))
        out.append({"bytes": size, "iters": n, **{f"{impl}_block_times_s": t for impl, t in times.items()}})
    return out


def torch_gloo_rows(plan: AllreduceWorkerPlan) -> list[dict]:
    import torch.distributed as dist

    info = rank_info()
    store = Path(plan.store)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=info.rank, world_size=info.size)
    try:

        def slowest(t):
            x = torch.tensor([t], dtype=torch.float64)
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
            return x.item()

        def make(size):
            buf = torch.zeros(size // ELEMENT_BYTES)
            return (lambda: dist.all_reduce(buf)), buf

        check = _check_sum(lambda b: b[0].item(), lambda b, v: b.fill_(v), info.size, "torch_gloo")
        return _sweep("torch_gloo", plan, make, check, dist.barrier, slowest)
    finally:
        dist.destroy_process_group()


def horovod_in_place(hvd, size: int, name: str):
    """The path training takes (DistributedOptimizer's allreduce_async_ on the gradient itself): (op, buffer)."""
    buf = torch.zeros(size // ELEMENT_BYTES)
    return (lambda: hvd.allreduce_(buf, op=hvd.Sum, name=name)), buf


def horovod_rows(plan: AllreduceWorkerPlan, impl: str, comm=None) -> list[dict]:
    import horovod.torch as hvd

    hvd.init(comm=comm) if comm is not None else hvd.init()

    def slowest(t):
        return hvd.allreduce(torch.tensor([t], dtype=torch.float64), op=hvd.Max, name="bench.slowest").item()

    def in_place(size):
        return horovod_in_place(hvd, size, f"bench.allreduce.{size}")

    def out_of_place(size):  # a new output tensor per call; the result checked is the call's, not buf
        buf = torch.zeros(size // ELEMENT_BYTES)
        name = f"bench.allreduce_oop.{size}"
        out = [buf]

        def op():
            out[0] = hvd.allreduce(buf, op=hvd.Sum, name=name)

        return op, out

    check = _check_sum(lambda b: b[0].item(), lambda b, v: b.fill_(v), hvd.size(), impl)
    rows = _sweep(impl, plan, in_place, check, hvd.barrier, slowest)

    def fill(out, value):
        out[0].fill_(value)  # out[0] is buf until the first call: the check fills the input, then reads the output

    check_oop = _check_sum(lambda out: out[0][0].item(), fill, hvd.size(), f"{impl}_oop")
    return rows + _sweep(f"{impl}_oop", plan, out_of_place, check_oop, hvd.barrier, slowest)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hvdtrain.bench.allreduce_worker PLAN.json OUT.json", file=sys.stderr)
        return 2
    plan, out = AllreduceWorkerPlan.from_json(Path(argv[0]).read_text()), Path(argv[1])
    torch.set_num_threads(1)  # a copy or a sum on one thread per rank: the ranks already fill the cores
    info = rank_info()
    if plan.controller == "mpi":
        rows, extra = mpi_run(plan)
    else:
        rows, extra = torch_gloo_rows(plan), {}
        rows += horovod_rows(plan, "horovod_gloo")
    import horovod

    if info.rank == 0:
        meta = {"np": info.size, "controller": plan.controller, "torch": torch.__version__}
        paired = extra.pop("paired", [])
        meta.update(horovod=horovod.__version__, env=tuning_env(os.environ), **extra)
        write_json(out, {"meta": meta, "rows": rows, "paired": paired})
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(main, sys.argv[1:]))
