"""Step 3: model parallel. Step 1 with the model split over two devices and a micro-batch pipeline (the
lines marked `# +mp`). With two GPUs the stages go to cuda:0 and cuda:1; here on CPUs both stages are "cpu",
which still exercises the split and the pipeline.

    python examples/03_model_parallel.py --epochs 5 --micro-batches 4
"""

import argparse

import torch
from torch import nn

from hvdtrain.parallel.pipeline import Pipeline  # +mp
from hvdtrain.train import datasets, models

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--micro-batches", type=int, default=4)  # +mp
args = parser.parse_args()

torch.manual_seed(0)
data = datasets.digits()
devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cpu", "cpu"]  # +mp
model = Pipeline(models.cnn(data.input_shape, data.num_classes), devices, micro_batches=args.micro_batches)  # +mp
print(f"stages on {devices}, layers per stage {model.balance}")  # +mp: balanced by parameter count
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=True)

for _epoch in range(args.epochs):
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        out = model(x.to(model.input_device))  # +mp: inputs to the first stage
        nn.functional.cross_entropy(out, y.to(model.output_device)).backward()  # +mp: labels to the last
        optimizer.step()

model.eval()
x, y = data.test.tensors
with torch.no_grad():
    accuracy = (model(x.to(model.input_device)).argmax(1).cpu() == y).float().mean().item()
print(f"test accuracy: {accuracy:.4f}")
