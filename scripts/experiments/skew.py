"""The minimal mpi4py loop by phase (compute, wait for the other rank, allreduce, step) against the same loop
without communication (docs/performance.md, "Where the targets stand"). HVD=1 initialises Horovod first;
STEPS (300) and ROUNDS (4) from the environment.

    OMPI_MCA_mpi_yield_when_idle=1 mpirun -np 2 --bind-to none python scripts/experiments/skew.py
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's hvdtrain

# Where the mpi4py loop's "reduce" goes: per step, compute time (fwd+bwd), the wait for the other rank
# (a Barrier), the Allreduce itself, the optimizer step. Also nocomm (same loop, no Barrier/Allreduce).
# Blocks alternate: sync, nocomm, sync, ...
import os, sys, time, statistics as st
import numpy as np, torch
from torch import nn
from mpi4py import MPI
from hvdtrain.train import datasets, models
torch.set_num_threads(1)
if os.environ.get('HVD'):
    import horovod.torch as hvd; hvd.init(); torch.set_num_threads(1)
comm = MPI.COMM_WORLD; rank, size = comm.rank, comm.size
B, STEPS, ROUNDS = 32, int(os.environ.get("STEPS", "300")), int(os.environ.get("ROUNDS", "4"))
ds = datasets.synthetic(B * 2000, seed=0)
x_all, y_all = ds.train.tensors
torch.manual_seed(0)
model = models.build("deep_mlp", ds.input_shape, ds.num_classes, 128, 16)
params = [p for p in model.parameters()]
flat = torch.zeros(sum(p.numel() for p in params)); off = 0
for p in params:
    p.grad = flat[off:off + p.numel()].view_as(p); off += p.numel()
opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
buf = flat.numpy()
g = torch.Generator().manual_seed(rank)
def run(sync, barrier):
    rec = []
    comm.Barrier()
    T0 = time.perf_counter()
    for i in range(STEPS):
        idx = torch.randint(0, len(x_all), (B,), generator=g)
        x, y = x_all[idx], y_all[idx]
        t0 = time.perf_counter()
        flat.zero_()
        loss = nn.functional.cross_entropy(model(x), y); loss.backward()
        t1 = time.perf_counter()
        if sync and barrier: comm.Barrier()
        t2 = time.perf_counter()
        if sync: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        t3 = time.perf_counter()
        flat.div_(size); opt.step(); loss.item()
        t4 = time.perf_counter()
        rec.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
    total = time.perf_counter() - T0
    comm.Barrier()
    return rec, total
out = {}
for r in range(ROUNDS):
    for name, sync, bar in (("sync", True, False), ("sync+barrier", True, True), ("nocomm", False, False)):
        rec, total = run(sync, bar)
        rec = rec[20:]
        med = [st.median(c) * 1e6 for c in zip(*rec)]
        out.setdefault(name, []).append((med, B * STEPS / total))
allr = comm.gather(out, root=0)
if rank == 0:
    for name in ("sync", "sync+barrier", "nocomm"):
        for k in range(size):
            meds = allr[k][name]
            cols = [st.median(m[0][j] for m in meds) for j in range(5)]
            rates = [m[1] for m in meds]
            print(f"{name:13s} r{k}  compute {cols[0]:6.0f}  wait {cols[1]:5.0f}  allreduce {cols[2]:5.0f}  step {cols[3]:5.0f}  total {cols[4]:6.0f} us   samples/s {st.median(rates):6.0f} ({min(rates):.0f}-{max(rates):.0f})")
    s = [st.median([m[1] for m in allr[k]['sync']]) for k in range(size)]
    n = [st.median([m[1] for m in allr[k]['nocomm']]) for k in range(size)]
    print(f"sync/nocomm (mean over ranks): {sum(s)/sum(n):.2f}")
