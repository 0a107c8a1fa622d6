"""Step 7: step 2 with local SGD (periodic model averaging): the lines marked `# +local` replace step 2's
DistributedOptimizer. Every rank steps on its own gradients; every --average-every steps the parameters are
averaged (one grouped allreduce), after --warmup synchronous steps. (`hvdtrain train --update local-sgd` does the
same for the built-in job.)

hvdtrain run -np 2 -- python examples/07_local_sgd.py --epochs 5
"""

import argparse

import torch
from torch import nn

from hvdtrain.parallel import horovod
from hvdtrain.parallel.local_sgd import LocalSGD  # +local
from hvdtrain.train import datasets, models

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--average-every", type=int, default=4)  # +local: H
parser.add_argument("--warmup", type=int, default=20)  # +local: synchronous steps first (post-local SGD)
args = parser.parse_args()

hvd = horovod.init()
torch.manual_seed(0)
data = datasets.digits()
model = models.cnn(data.input_shape, data.num_classes)
lr = horovod.scaled_lr(args.lr, scale=True)
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # +local: a plain, local optimizer
averager = LocalSGD(model, average_every=args.average_every, warmup=args.warmup)  # +local
horovod.broadcast_state(model)  # every rank starts from rank 0's weights
sampler = horovod.sampler(data.train, seed=0)
loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, sampler=sampler)

for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        averager.step(optimizer)  # +local: the step; gradients averaged in warm-up, parameters every H steps

if not averager.in_sync:  # +local: the ranks' models differ since the last average: end on their mean
    averager.average()
model.eval()
x, y = data.test.tensors
mine = torch.arange(hvd.rank(), len(y), hvd.size())
with torch.no_grad():
    correct = (model(x[mine]).argmax(1) == y[mine]).sum().item()
accuracy = horovod.average_metrics({"accuracy": correct}, len(mine))["accuracy"]
if hvd.rank() == 0:
    print(f"test accuracy: {accuracy:.4f} on {hvd.size()} ranks ({averager.collectives} allreduces "
          f"in {averager.steps} steps)")  # fmt: skip
