"""Step 6: step 2 with the optimizer state sharded over the ranks (ZeRO stage 1): the lines marked `# +zero`
replace step 2's optimizer lines. Each rank keeps 1/N of Adam's two moments; the arithmetic is
DistributedOptimizer's. (`hvdtrain train --shard-optimizer` does the same for the built-in job.)

hvdtrain run -np 2 -- python examples/06_sharded_optimizer.py --epochs 5
"""

import argparse

import torch
from torch import nn

from hvdtrain.parallel import horovod
from hvdtrain.parallel.zero import ShardedOptimizer  # +zero
from hvdtrain.train import datasets, models

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.001)
args = parser.parse_args()

hvd = horovod.init()
torch.manual_seed(0)
data = datasets.digits()
model = models.cnn(data.input_shape, data.num_classes)
lr = horovod.scaled_lr(args.lr, scale=True)
# +zero: gradients reduce-scattered (this rank gets the mean of its slice), the slice stepped, slices all-gathered.
optimizer = ShardedOptimizer(torch.optim.Adam, model, lr=lr)  # +zero: instead of Adam + distributed_optimizer
horovod.broadcast_state(model)  # every rank starts from rank 0's weights
sampler = horovod.sampler(data.train, seed=0)
loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, sampler=sampler)

for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

state = optimizer.state_dict(root_rank=0)  # +zero: collective; rank 0 gets the whole state, in torch's format
model.eval()
x, y = data.test.tensors
mine = torch.arange(hvd.rank(), len(y), hvd.size())
with torch.no_grad():
    correct = (model(x[mine]).argmax(1) == y[mine]).sum().item()
accuracy = horovod.average_metrics({"accuracy": correct}, len(mine))["accuracy"]
if hvd.rank() == 0:
    mine_mb = optimizer.state_bytes() / 1e6  # +zero: this rank's share of the optimizer state
    whole_mb = 2 * 4 * sum(p.numel() for p in model.parameters()) / 1e6  # Adam: two float32 moments per parameter
    print(f"optimizer state on rank 0: {mine_mb:.3f} MB of {whole_mb:.3f} MB")
    print(f"test accuracy: {accuracy:.4f} on {hvd.size()} ranks (whole state saved: {len(state['state'])} tensors)")
