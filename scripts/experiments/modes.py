"""The slow spells of the VM: 1 MiB mpi4py allreduce blocks of 200 calls back to back for 10 s, each block's time
(us, slowest rank) and the steal time in /proc/stat meanwhile, printed as time/steal% (docs/performance-methods.md,
"Slow spells").

    OMPI_MCA_mpi_yield_when_idle=1 mpirun -np 2 --bind-to none python scripts/experiments/modes.py
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

import time, numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
b = np.zeros(1 << 18, dtype=np.float32)
def steal():
    f = open('/proc/stat').readline().split(); return int(f[8]), sum(int(x) for x in f[1:9])
ts = []
T0 = time.perf_counter()
while time.perf_counter() - T0 < 10:
    s0, a0 = steal()
    comm.Barrier(); t0 = time.perf_counter()
    for _ in range(200): comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)
    t = comm.allreduce((time.perf_counter() - t0) / 200 * 1e6, op=MPI.MAX)
    s1, a1 = steal()
    ts.append((t, 100 * (s1 - s0) / max(1, a1 - a0)))
if comm.rank == 0:
    print(" ".join(f"{t:.0f}/{s:.0f}%" for t, s in ts))
