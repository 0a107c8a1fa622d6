r"""Per-phase step times, every arm in one launch: per round, the mpi4py loop before Horovod, then for each config
(';'-separated NAME=VALUE,... environments) hvd.init, the mpi4py loop, Horovod's groups, a flat buffer reduced by
hand and flat groups, in blocks of BLOCK steps; hvd.shutdown. Prints medians (rank 0).
Docs: docs/horovod-patch.md ("Flat groups"). Needs hvdtrain's Horovod patch (flat_groups). Run from the repository:
    OMPI_MCA_mpi_yield_when_idle=1 mpirun -np 2 --bind-to none \
        python scripts/experiments/steps7.py "HOROVOD_IDLE_CYCLE_TIME=0;HOROVOD_IDLE_CYCLE_TIME=20"
ROUNDS (6) and BLOCK (80) from the environment.
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
rank, size = comm.Get_rank(), comm.Get_size()
configs = [dict(kv.split("=") for kv in c.split(",") if kv) for c in sys.argv[1].split(";")]
rounds, block = int(os.environ.get("ROUNDS", "6")), int(os.environ.get("BLOCK", "80"))
def build():
    torch.manual_seed(0)
    return models.build("deep_mlp", (1, 8, 8), 10, 128, 16)
g = torch.Generator().manual_seed(rank)
X = torch.randn(block, 32, 1, 8, 8, generator=g); Y = torch.randint(0, 10, (block, 32), generator=g)
def flat_model():
    m = build(); params = list(m.parameters()); flat = torch.zeros(sum(p.numel() for p in params)); off = 0
    for p in params:  # the gradients are views of one buffer
        p.grad = flat[off:off + p.numel()].view_as(p); off += p.numel()
    return m, torch.optim.SGD(params, lr=0.01, momentum=0.9), flat
def mpi4py_arm():
    m, opt, flat = flat_model()
    def reduce():
        comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM); flat.div_(size)
    return m, opt, reduce, flat.zero_
def by_hand_arm():
    m, opt, flat = flat_model()
    return m, opt, lambda: hvd.allreduce_(flat, op=hvd.Average, name="flat"), flat.zero_
def groups_arm(flat):
    m = build()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                                   named_parameters=list(m.named_parameters()), groups=1, flat_groups=flat)
    hvd.broadcast_parameters(m.state_dict(), 0)
    return m, opt, None, None
PH, RES = {}, {}
def run(setup, key=None):
    model, opt, after, zero = setup
    comm.Barrier()
    pc = time.perf_counter; t0 = pc(); ph = [0.0] * 4
    for i in range(block):
        a = pc(); (zero or opt.zero_grad)(); loss = nn.functional.cross_entropy(model(X[i]), Y[i])
        b = pc(); loss.backward()
        c = pc()
        if after: after()
        d = pc(); opt.step()
        e = pc(); loss.item()
        ph[0] += b - a; ph[1] += c - b; ph[2] += d - c; ph[3] += e - d
    if key:
        PH.setdefault(key, []).append([x / block * 1e6 for x in ph])
        RES.setdefault(key, []).append(32 * block / (pc() - t0))
reference = mpi4py_arm(); run(reference)
for r in range(rounds):
    run(reference, "mpi4py before hvd.init")
    for i in (range(len(configs)) if r % 2 == 0 else reversed(range(len(configs)))):
        saved = {k: os.environ.get(k) for k in configs[i]}
        os.environ.update(configs[i]); hvd.init(comm=comm); torch.set_num_threads(1)
        arms = {"mpi4py": mpi4py_arm(), "horovod groups": groups_arm(False), "flat by hand": by_hand_arm(),
                "flat groups": groups_arm(True)}
        for a in arms.values(): run(a)
        for a, st in arms.items(): run(st, f"{a} | {sys.argv[1].split(';')[i] or 'default'}")
        hvd.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
base = RES["mpi4py before hvd.init"]
if rank == 0:
    for k, v in PH.items():
        print(f"{k:45s} fwd/bwd/reduce/step us", [round(statistics.median(x[j] for x in v)) for j in range(4)],
              f"samples/s vs the reference {statistics.median(x / y for x, y in zip(RES[k], base)):.3f}", flush=True)
