"""Interleaved arms in one launch: ROUNDS x [BLOCK steps of each arm]; per-round ratios to mpi4py.
Docs: docs/horovod-patch.md ("One grouped allreduce per step"). Arms: mpi4py, nocomm, hvd (per gradient), hvd_gN
(N groups). Run from the repository root:
    OMPI_MCA_mpi_yield_when_idle=1 mpirun -np 2 --bind-to none python scripts/experiments/steps2.py mpi4py,nocomm,hvd,hvd_g1
ROUNDS (8) and BLOCK (60) from the environment; PYTHONPATH=<stock wheel's files> for a stock Horovod.
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's hvdtrain

import os, sys, time, json, statistics
import torch
from torch import nn
torch.set_num_threads(1)
from hvdtrain.train import models
from mpi4py import MPI
import horovod.torch as hvd
comm = MPI.COMM_WORLD
hvd.init(comm=comm); torch.set_num_threads(1)
rank = hvd.rank()
arms = sys.argv[1].split(",")
rounds, block = int(os.environ.get("ROUNDS", "8")), int(os.environ.get("BLOCK", "60"))
def build():
    torch.manual_seed(0)
    return models.build("deep_mlp", (1, 8, 8), 10, 128, 16)
g = torch.Generator().manual_seed(rank)
X = torch.randn(block, 32, 1, 8, 8, generator=g); Y = torch.randint(0, 10, (block, 32), generator=g)
setups = {}
for arm in arms:
    m = build()
    if arm == "nocomm":
        setups[arm] = (m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), None, None)
    elif arm == "mpi4py":
        params = list(m.parameters()); flat = torch.zeros(sum(p.numel() for p in params)); off = 0
        for p in params:
            p.grad = flat[off:off + p.numel()].view_as(p); off += p.numel()
        def reduce(flat=flat):
            comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM); flat.div_(comm.Get_size())
        setups[arm] = (m, torch.optim.SGD(params, lr=0.01, momentum=0.9), reduce, flat.zero_)
    else:
        kw = {}
        if arm.startswith("hvd_g"): kw["groups"] = int(arm[5:])
        opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                                       named_parameters=[(f"{arm}.{n}", p) for n, p in m.named_parameters()], **kw)
        hvd.broadcast_parameters(m.state_dict(), 0)
        setups[arm] = (m, opt, None, None)
def run(arm):
    model, opt, after, zero = setups[arm]
    comm.Barrier()
    t0 = time.perf_counter()
    for i in range(block):
        (zero or opt.zero_grad)()
        loss = nn.functional.cross_entropy(model(X[i]), Y[i])
        loss.backward()
        if after: after()
        opt.step()
        loss.item()
    return 32 * block / (time.perf_counter() - t0)
for arm in arms: run(arm)  # warm
res = {a: [] for a in arms}
for r in range(rounds):
    order = arms if r % 2 == 0 else arms[::-1]
    for arm in order: res[arm].append(run(arm))
ratios = {a: statistics.median(x / y for x, y in zip(res[a], res["mpi4py"])) for a in arms if a != "mpi4py"}
if rank == 0:
    print(json.dumps({"median_sps": {a: round(statistics.median(v)) for a, v in res.items()},
                      "median_ratio_to_mpi4py": {a: round(v, 3) for a, v in ratios.items()}}), flush=True)
