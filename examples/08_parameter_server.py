"""Step 8: asynchronous SGD with a parameter server: step 2 with the lines marked `# +ps` in place of the
DistributedOptimizer. The last rank serves the parameters (and their momentum); the others are workers that push
gradients and receive fresh parameters, at most --max-staleness steps ahead of the slowest worker. Needs MPI
(mpi4py messages). (`hvdtrain train --update async` does the same for the built-in job.)

hvdtrain run -np 3 --mpi -- python examples/08_parameter_server.py --epochs 10
"""

import argparse
import sys

import torch
from torch import nn

from hvdtrain.env import rank_info  # +ps
from hvdtrain.parallel import horovod, ps  # +ps
from hvdtrain.train import datasets, models

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--max-staleness", type=int, default=2)  # +ps: S
args = parser.parse_args()

workers, servers = ps.roles(rank_info().size, 1)  # +ps: the last rank serves
hvd = horovod.init(group=workers)  # +ps: Horovod's collectives run among the workers only
from mpi4py import MPI  # noqa: E402  # +ps: after hvd.init, which starts MPI

comm = MPI.COMM_WORLD.Dup()  # +ps: every rank, the channel for the server's messages
me = hvd.rank()  # the rank in the job (a worker's is also its place among the workers)
torch.manual_seed(0)
data = datasets.digits()
model = models.cnn(data.input_shape, data.num_classes)
layout = ps.Layout.of(list(model.parameters()), len(servers))  # +ps: the flat parameters, one shard per server
if me in servers:  # +ps: serve until every worker says bye, then leave
    server = ps.Server(comm, layout, servers.index(me), workers, args.max_staleness,
                       lambda shard: torch.optim.SGD(shard, lr=args.lr, momentum=args.momentum), torch.float32)  # fmt: skip
    server.serve()
    hvd.barrier(process_set=hvd.global_process_set)  # +ps: leave together (one rank's exit ends Horovod for all)
    sys.exit(0)
client = ps.Client(comm, layout, servers, list(model.parameters()))  # +ps
horovod.broadcast_state(model)  # every worker starts from rank 0's weights
if horovod.rank() == 0:
    client.init_servers(None)  # +ps: ... and so does the server
sampler = horovod.sampler(data.train, seed=0)  # this worker's shard
loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, sampler=sampler)

for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    for x, y in loader:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        client.step()  # +ps: push the gradient, wait for the server's fresh parameters

client.done()  # +ps: this worker's last step is in
horovod.PendingSum([0.0], name="all_done").result()  # +ps: ... and every other worker's
client.pull()  # +ps: the final parameters
model.eval()
x, y = data.test.tensors
mine = torch.arange(horovod.rank(), len(y), horovod.size())
with torch.no_grad():
    correct = (model(x[mine]).argmax(1) == y[mine]).sum().item()
accuracy = horovod.average_metrics({"accuracy": correct}, len(mine))["accuracy"]
if horovod.rank() == 0:
    print(f"test accuracy: {accuracy:.4f} on {horovod.size()} workers and {len(servers)} server "
          f"({client.messages} messages)")  # fmt: skip
client.bye()  # +ps
hvd.barrier(process_set=hvd.global_process_set)  # +ps: leave together with the server
