"""64 MiB allreduce: mpi4py on numpy's memory, mpi4py on torch's, Horovod in place, alternating blocks of 5 calls,
8 rounds; medians (ms) (docs/performance-methods.md, "How bench allreduce measures").

    OMPI_MCA_mpi_yield_when_idle=1 mpirun -np 2 --bind-to none python scripts/experiments/big.py
    (add -x THP_MEM_ALLOC_ENABLE=1 to give torch's tensors huge pages)
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

import time, statistics as st, numpy as np, torch
from mpi4py import MPI
import horovod.torch as hvd
torch.set_num_threads(1)
comm = MPI.COMM_WORLD
hvd.init(comm=comm)
S = 64 << 20
nb = np.zeros(S // 4, dtype=np.float32)
tb = torch.zeros(S // 4); tbn = tb.numpy()
tb2 = torch.zeros(S // 4)
ops = {"mpi-numpy": lambda: comm.Allreduce(MPI.IN_PLACE, nb, op=MPI.SUM),
       "mpi-torchbuf": lambda: comm.Allreduce(MPI.IN_PLACE, tbn, op=MPI.SUM),
       "hvd": lambda: hvd.allreduce_(tb2, op=hvd.Sum, name="big")}
for f in ops.values():
    for _ in range(3): f()
res = {k: [] for k in ops}
for r in range(8):
    for k in (list(ops) if r % 2 == 0 else list(ops)[::-1]):
        comm.Barrier(); t0 = time.perf_counter()
        for _ in range(5): ops[k]()
        res[k].append(comm.allreduce((time.perf_counter() - t0) / 5 * 1e3, op=MPI.MAX))
if comm.rank == 0:
    for k, v in res.items(): print(f"{k:14s} median {st.median(v):6.1f} ms  range {min(v):.1f}-{max(v):.1f}")
