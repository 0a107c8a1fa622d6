"""Step 1: plain PyTorch, one process. The CNN on scikit-learn's digits (no download).

python examples/01_single_process.py --epochs 5
"""

import argparse

import torch
from torch import nn

from hvdtrain.train import datasets, models

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
args = parser.parse_args()

torch.manual_seed(0)
data = datasets.digits()
model = models.cnn(data.input_shape, data.num_classes)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=True)

for _epoch in range(args.epochs):
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

model.eval()
x, y = data.test.tensors
with torch.no_grad():
    accuracy = (model(x).argmax(1) == y).float().mean().item()
print(f"test accuracy: {accuracy:.4f}")
