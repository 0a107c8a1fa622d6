"""Per-phase step time of the sharded optimizer against DistributedOptimizer, in one process: zero_grad,
forward + backward, step (big_mlp-like deep_mlp: hidden 2048, depth 3; batch 32; medians of 25 steps, ms)
(docs/performance.md, "Sharded optimizer").

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 python scripts/experiments/step_phases.py
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's hvdtrain

import time, torch, horovod.torch as hvd, statistics
from torch import nn
from hvdtrain.parallel.zero import ShardedOptimizer
from hvdtrain.train import models
hvd.init(); torch.set_num_threads(1)
def build(kind):
    torch.manual_seed(0)
    m = models.build("deep_mlp", (1,8,8), 10, 2048, 3)
    if kind == "h":
        opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), named_parameters=m.named_parameters())
    else:
        opt = ShardedOptimizer(torch.optim.SGD, m, lr=0.01, momentum=0.9)
    return m, opt
x = torch.randn(32,1,8,8); y = torch.randint(0,10,(32,))
res = {"h": {"z":[], "fb":[], "s":[]}, "s": {"z":[], "fb":[], "s":[]}}
built = {k: build(k) for k in "hs"}
for r in range(30):
    for k in "hs":
        m, opt = built[k]
        t0=time.perf_counter(); opt.zero_grad(); t1=time.perf_counter()
        nn.functional.cross_entropy(m(x),y).backward(); t2=time.perf_counter()
        opt.step(); t3=time.perf_counter()
        if r >= 5:
            res[k]["z"].append(t1-t0); res[k]["fb"].append(t2-t1); res[k]["s"].append(t3-t2)
for k in "hs":
    print(k, {p: f"{statistics.median(v)*1000:.1f}" for p, v in res[k].items()})
