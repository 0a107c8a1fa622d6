"""Step 4: hybrid. Step 2 (data parallel across ranks) + step 3 (each rank's replica split over its own k
devices). Lines added to step 2 are marked `# +hybrid`. Rank r owns devices r*k ... r*k+k-1 of its node.

    hvdtrain run -np 2 -- python examples/04_hybrid.py --epochs 5 --devices-per-rank 2
"""

import argparse

import torch
from torch import nn

from hvdtrain.parallel import horovod
from hvdtrain.parallel.hybrid import devices_for_rank  # +hybrid
from hvdtrain.parallel.pipeline import Pipeline  # +hybrid
from hvdtrain.train import datasets, models

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--devices-per-rank", type=int, default=2)  # +hybrid
parser.add_argument("--micro-batches", type=int, default=4)  # +hybrid
args = parser.parse_args()

hvd = horovod.init()
torch.manual_seed(0)
data = datasets.digits()
# +hybrid: checks that ranks-per-node x k devices exist (CPU stages when there are no GPUs)
devices = devices_for_rank(hvd.local_rank(), hvd.local_size(), args.devices_per_rank)
model = Pipeline(models.cnn(data.input_shape, data.num_classes), devices, micro_batches=args.micro_batches)  # +hybrid
optimizer = torch.optim.SGD(model.parameters(), lr=horovod.scaled_lr(args.lr, scale=True), momentum=0.9)
optimizer = horovod.distributed_optimizer(optimizer, model)  # gradients of every stage are allreduced
horovod.broadcast_state(model)
sampler = horovod.sampler(data.train, seed=0)
loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, sampler=sampler)

for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        out = model(x.to(model.input_device))  # +hybrid
        nn.functional.cross_entropy(out, y.to(model.output_device)).backward()  # +hybrid
        optimizer.step()

model.eval()
x, y = data.test.tensors
mine = torch.arange(hvd.rank(), len(y), hvd.size())
with torch.no_grad():
    correct = (model(x[mine].to(model.input_device)).argmax(1).cpu() == y[mine]).sum().item()
accuracy = horovod.average_metrics({"accuracy": correct}, len(mine))["accuracy"]
if hvd.rank() == 0:
    print(f"test accuracy: {accuracy:.4f} on {hvd.size()} ranks x {len(devices)} devices ({devices[0]}...)")
