"""An idle rank's CPU: 3 s after hvd.init(), each rank's CPU time over wall time (docs/horovod-patch.md, "Idle
cycles"; docs/performance-methods.md). Run it on 2 ranks under either controller:

    for c in gloo mpi; do hvdtrain run -np 2 --$c -- python scripts/experiments/idle.py; done
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

import time

import horovod.torch as hvd

hvd.init()
t0, c0 = time.time(), time.process_time()
time.sleep(3)
print(f"rank {hvd.rank()}: idle CPU {(time.process_time() - c0) / (time.time() - t0):.0%} of a core", flush=True)
