"""Step 2: data parallel with Horovod. Step 1 plus the lines marked `# +hvd`.

hvdtrain run -np 2 -- python examples/02_data_parallel.py --epochs 5
"""

import argparse

import torch
from torch import nn

from hvdtrain.parallel import horovod  # +hvd
from hvdtrain.train import datasets, models

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
args = parser.parse_args()

hvd = horovod.init()  # +hvd: one process per rank; threads from OMP_NUM_THREADS set by the launcher
torch.manual_seed(0)
data = datasets.digits()
model = models.cnn(data.input_shape, data.num_classes)
lr = horovod.scaled_lr(args.lr, scale=True)  # +hvd: the global batch is size x larger, so is the lr
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
optimizer = horovod.distributed_optimizer(optimizer, model)  # +hvd: ring-allreduce of the gradients
horovod.broadcast_state(model)  # +hvd: every rank starts from rank 0's weights
sampler = horovod.sampler(data.train, seed=0)  # +hvd: this rank's shard
loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, sampler=sampler)

for epoch in range(args.epochs):
    sampler.set_epoch(epoch)  # +hvd: a new shuffle each epoch, the same on every rank
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

model.eval()
x, y = data.test.tensors
mine = torch.arange(hvd.rank(), len(y), hvd.size())  # +hvd: each rank evaluates its part of the test set
with torch.no_grad():
    correct = (model(x[mine]).argmax(1) == y[mine]).sum().item()
accuracy = horovod.average_metrics({"accuracy": correct}, len(mine))["accuracy"]  # +hvd: exact global mean
if hvd.rank() == 0:  # +hvd: rank 0 reports
    print(f"test accuracy: {accuracy:.4f} on {hvd.size()} ranks")
