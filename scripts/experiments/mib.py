"""4 B and 1 MiB allreduce: mpi4py before hvd.init(), then Horovod in place and mpi4py after it in alternating
blocks; medians and ranges, and the 1 MiB busbw ratios (docs/performance-methods.md, "How bench allreduce measures").

    OMPI_MCA_mpi_yield_when_idle=1 mpirun -np 2 --bind-to none python scripts/experiments/mib.py
    hvdtrain run -np 2 python scripts/experiments/mib.py        # ITERS (200) calls per block
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

# 1 MiB and 4 B allreduce: mpi4py before hvd.init, Horovod in place, mpi4py after init; alternating blocks.
import os, sys, time, statistics as st
import numpy as np, torch
from mpi4py import MPI
torch.set_num_threads(1)
comm = MPI.COMM_WORLD
N = int(os.environ.get("ITERS", "200"))
sizes = [4, 1 << 20]
def timeit(op, n=N):
    for _ in range(10): op()
    comm.Barrier(); t0 = time.perf_counter()
    for _ in range(n): op()
    return comm.allreduce((time.perf_counter() - t0) / n * 1e6, op=MPI.MAX)
res = {}
bufs = {s: np.zeros(max(1, s // 4), dtype=np.float32) for s in sizes}
for s in sizes:
    res[("mpi4py-pre", s)] = [timeit(lambda: comm.Allreduce(MPI.IN_PLACE, bufs[s], op=MPI.SUM)) for _ in range(3)]
import horovod.torch as hvd
hvd.init(comm=comm)
tb = {s: torch.zeros(max(1, s // 4)) for s in sizes}
for r in range(5):
    for s in sizes:
        res.setdefault(("hvd", s), []).append(timeit(lambda: hvd.allreduce_(tb[s], op=hvd.Sum, name=f"x{s}")))
        res.setdefault(("mpi4py-post", s), []).append(timeit(lambda: comm.Allreduce(MPI.IN_PLACE, bufs[s], op=MPI.SUM)))
if comm.rank == 0:
    for k, v in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{k[0]:12s} {k[1]:8d}  median {st.median(v):8.1f} us  range {min(v):.1f}-{max(v):.1f}")
    m = st.median(res[("mpi4py-pre", 1 << 20)]); h = st.median(res[("hvd", 1 << 20)])
    print(f"1 MiB busbw ratio hvd/mpi4py-pre: {m / h:.2f}  hvd/mpi4py-post: {st.median(res[('mpi4py-post', 1<<20)]) / h:.2f}")
