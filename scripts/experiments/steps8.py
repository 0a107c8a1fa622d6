"""Per-phase times and samples/s of the mpi4py loop, one flat hvd.allreduce_ by hand, flat groups with 1, 2 and 4
groups, and no communication, interleaved in one launch (docs/performance-methods.md, "Knobs tried"). Needs
hvdtrain's Horovod patch (flat_groups). STEPS (400, the first 50 untimed) and ROUNDS (5) from the environment.

    OMPI_MCA_mpi_yield_when_idle=1 mpirun -np 2 --bind-to none python scripts/experiments/steps8.py
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's hvdtrain

# One launch, interleaved blocks: per-phase times (rank 0) and samples/s for
# mpi4py flat loop | hvd by-hand flat allreduce_ | DistributedOptimizer flat groups=1 | nocomm
import os, time, statistics as st, torch
from torch import nn
from mpi4py import MPI
from hvdtrain.train import datasets, models
torch.set_num_threads(1)
comm = MPI.COMM_WORLD; rank, size = comm.rank, comm.size
import horovod.torch as hvd
hvd.init(comm=comm); torch.set_num_threads(1)
B, STEPS, ROUNDS = 32, int(os.environ.get("STEPS", "400")), int(os.environ.get("ROUNDS", "5"))
ds = datasets.synthetic(B * 4000, seed=0); x_all, y_all = ds.train.tensors
g = torch.Generator().manual_seed(rank)
def mk():
    torch.manual_seed(0); return models.build("deep_mlp", ds.input_shape, ds.num_classes, 128, 16)
def flat_model():
    m = mk(); ps = list(m.parameters()); flat = torch.zeros(sum(p.numel() for p in ps)); o = 0
    for p in ps: p.grad = flat[o:o + p.numel()].view_as(p); o += p.numel()
    return m, flat, torch.optim.SGD(ps, lr=0.01, momentum=0.9)
m1, f1, o1 = flat_model(); b1 = f1.numpy()
m2, f2, o2 = flat_model()
m3 = mk(); o3 = hvd.DistributedOptimizer(torch.optim.SGD(m3.parameters(), lr=0.01, momentum=0.9), named_parameters=m3.named_parameters(), groups=1, flat_groups=True)
m5 = mk(); o5 = hvd.DistributedOptimizer(torch.optim.SGD(m5.parameters(), lr=0.01, momentum=0.9), named_parameters=m5.named_parameters(), groups=2, flat_groups=True)
m6 = mk(); o6 = hvd.DistributedOptimizer(torch.optim.SGD(m6.parameters(), lr=0.01, momentum=0.9), named_parameters=m6.named_parameters(), groups=4, flat_groups=True)
m4 = mk(); o4 = torch.optim.SGD(m4.parameters(), lr=0.01, momentum=0.9)
def arm_mpi(x, y, T):
    f1.zero_(); l = nn.functional.cross_entropy(m1(x), y); l.backward(); T.append(time.perf_counter())
    comm.Allreduce(MPI.IN_PLACE, b1, op=MPI.SUM); f1.div_(size); T.append(time.perf_counter()); o1.step(); l.item()
def arm_hand(x, y, T):
    f2.zero_(); l = nn.functional.cross_entropy(m2(x), y); l.backward(); T.append(time.perf_counter())
    hvd.allreduce_(f2, op=hvd.Average, name="flat"); T.append(time.perf_counter()); o2.step(); l.item()
def arm_flat(x, y, T):
    o3.zero_grad(); l = nn.functional.cross_entropy(m3(x), y); l.backward(); T.append(time.perf_counter())
    o3.synchronize(); T.append(time.perf_counter())
    with o3.skip_synchronize(): o3.step()
    l.item()
def mkflat(m3, o3):
    def arm_flat(x, y, T):
        o3.zero_grad(); l = nn.functional.cross_entropy(m3(x), y); l.backward(); T.append(time.perf_counter())
        o3.synchronize(); T.append(time.perf_counter())
        with o3.skip_synchronize(): o3.step()
        l.item()
    return arm_flat
def arm_nocomm(x, y, T):
    o4.zero_grad(); l = nn.functional.cross_entropy(m4(x), y); l.backward(); T.append(time.perf_counter())
    T.append(time.perf_counter()); o4.step(); l.item()
arms = {"mpi4py": arm_mpi, "hvd_by_hand": arm_hand, "flat_groups": arm_flat, "flat2": mkflat(m5, o5), "flat4": mkflat(m6, o6), "nocomm": arm_nocomm}
res = {}
for r in range(ROUNDS):
    for name, f in (list(arms.items()) if r % 2 == 0 else list(arms.items())[::-1]):
        ph = []; comm.Barrier(); t_start = None
        for i in range(STEPS):
            if i == 50: t_start = time.perf_counter()
            idx = torch.randint(0, len(x_all), (B,), generator=g); x, y = x_all[idx], y_all[idx]
            T = [time.perf_counter()]; f(x, y, T); T.append(time.perf_counter())
            if i >= 50: ph.append([T[k + 1] - T[k] for k in range(3)])
        rate = B * (STEPS - 50) / (time.perf_counter() - t_start)
        res.setdefault(name, []).append(([st.median(c) * 1e6 for c in zip(*ph)], [st.mean(c) * 1e6 for c in zip(*ph)], rate))
        comm.Barrier()
if rank == 0:
    ref = st.median(v[2] for v in res["mpi4py"]); noc = st.median(v[2] for v in res["nocomm"])
    for name, v in res.items():
        med = [st.median(x[0][k] for x in v) for k in range(3)]; mean = [st.median(x[1][k] for x in v) for k in range(3)]
        rates = [x[2] for x in v]
        print(f"{name:12s} fwd+bwd {med[0]:5.0f}/{mean[0]:5.0f}  reduce {med[1]:5.0f}/{mean[1]:5.0f}  step {med[2]:5.0f}/{mean[2]:5.0f} (median/mean us)  rate {st.median(rates):6.0f}  /mpi4py {st.median(rates)/ref:.2f}  /nocomm {st.median(rates)/noc:.2f}")
