"""The trivial Horovod job `hvdtrain bench launch` times: hvd.init, one allreduce, exit (the work of any job's start)."""

import horovod.torch as hvd
import torch

hvd.init()
total = hvd.allreduce(torch.ones(1), op=hvd.Sum, name="trivial").item()
assert total == hvd.size(), (total, hvd.size())
