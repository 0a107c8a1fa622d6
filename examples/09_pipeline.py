"""Step 9: a pipeline across ranks. Step 3's split of one model into stages, but every stage is a process of
its own (a rank, possibly on another host), so on CPUs the stages really compute at the same time:
activations go forward and their gradients backward as mpi4py messages (hvdtrain.parallel.pipe), in the 1F1B
or GPipe order of micro-batches. No Horovod here: one replica has nothing to average (`hvdtrain train
--strategy pipeline` adds replicas, each stage's gradients averaged over Horovod process sets).

    hvdtrain run -np 2 --mpi -- python examples/09_pipeline.py --epochs 5 --micro-batches 4
"""

import argparse

import torch
from mpi4py import MPI
from torch import nn

from hvdtrain.parallel.grid import Grid
from hvdtrain.parallel.pipe import Stage
from hvdtrain.train import datasets, models

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--micro-batches", type=int, default=4)
parser.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b")
args = parser.parse_args()

comm = MPI.COMM_WORLD
torch.manual_seed(0)  # the same whole model on every rank: each keeps its own stage of it
data = datasets.digits()
x_all, y_all = data.train.tensors
stage = Stage.build(
    models.cnn(data.input_shape, data.num_classes), Grid(comm.size, stages=comm.size), comm, x_all.shape[1:],
    x_all.dtype, schedule=args.schedule, micro_batches=args.micro_batches,
)  # fmt: skip
optimizer = torch.optim.SGD(stage.module.parameters(), lr=args.lr, momentum=0.9)

for epoch in range(args.epochs):
    # Every stage takes the same batches: the first feeds their inputs, the last their labels.
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(epoch))
    stage.module.train()
    for batch in order.split(args.batch_size):
        optimizer.zero_grad()
        x = x_all[batch] if stage.first else None
        y = y_all[batch] if stage.last else None
        stage.train_pass(len(batch), x, y, nn.functional.cross_entropy)  # forward and backward, micro-batched
        optimizer.step()  # each stage steps its own layers

stage.module.eval()
x, y = data.test.tensors
out = stage.forward_only(len(y), x if stage.first else None)  # the last stage gets the outputs
stage.flush()
if stage.last:
    accuracy = (out.argmax(1) == y).float().mean().item()
    print(f"test accuracy: {accuracy:.4f} on {comm.size} pipeline stages ({args.schedule}, {args.micro_batches} "
          "micro-batches)")  # fmt: skip
