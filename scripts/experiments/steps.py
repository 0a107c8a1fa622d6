r"""Step-time experiment: per-rank samples/s of deep_mlp (hidden 128, depth 16, batch 32) for
nocomm (no communication), mpi4py (one flat in-place Allreduce of all gradients), horovod (DistributedOptimizer).
Usage: mpirun -np 2 python steps.py ARMS  (ARMS: comma list of nocomm,mpi4py,horovod,horovod_g1)
Docs: docs/performance-methods.md ("Knobs tried"). Run from the repository root, one launch per variant:
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np 2 [--mca ...] [-x HOROVOD_...] \
        python scripts/experiments/steps.py mpi4py,horovod,horovod_g1
scripts/experiments/drive.py alternates the variants over launches. STEPS (300) steps, the first 30 untimed.
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's hvdtrain

import os, sys, time, statistics, json
import torch
from torch import nn
torch.set_num_threads(1)
from hvdtrain.train import models, datasets

arms = sys.argv[1].split(",")
steps, warm = int(os.environ.get("STEPS", "300")), 30
rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "0")))
size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("HOROVOD_SIZE", "1")))

def build():
    torch.manual_seed(0)
    return models.build("deep_mlp", (1, 8, 8), 10, 128, 16)

g = torch.Generator().manual_seed(rank)
X = torch.randn(steps, 32, 1, 8, 8, generator=g); Y = torch.randint(0, 10, (steps, 32), generator=g)

def loop(model, opt, after_backward=None, zero=None):
    ts = []
    for i in range(steps):
        if i == warm: t0 = time.perf_counter()
        (zero or opt.zero_grad)()
        loss = nn.functional.cross_entropy(model(X[i]), Y[i])
        loss.backward()
        if after_backward: after_backward()
        opt.step()
        loss.item()
    return 32 * (steps - warm) / (time.perf_counter() - t0)

out = {}
comm = None
for arm in arms:
    if arm == "nocomm":
        m = build(); out[arm] = loop(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    elif arm == "mpi4py":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        m = build(); params = list(m.parameters())
        flat = torch.zeros(sum(p.numel() for p in params))
        # gradients live in the flat buffer: one in-place Allreduce, no copies
        off = 0
        for p in params:
            p.grad = flat[off:off + p.numel()].view_as(p); off += p.numel()
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        def reduce():
            comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM); flat.div_(comm.Get_size())
        comm.Barrier()
        out[arm] = loop(m, opt, reduce, zero=flat.zero_)  # zero_grad() would drop the views
    elif arm.startswith("horovod"):
        import horovod.torch as hvd
        if not hvd.is_initialized():
            hvd.init(comm=comm) if comm is not None else hvd.init()
            torch.set_num_threads(1)
        m = build()
        kw = {"groups": 1} if arm == "horovod_g1" else {}
        opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), named_parameters=m.named_parameters(), **kw)
        hvd.broadcast_parameters(m.state_dict(), 0)
        out[arm] = loop(m, opt)
print(json.dumps({"rank": rank, **{k: round(v) for k, v in out.items()}}), flush=True)
