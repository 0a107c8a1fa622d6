"""Step 5: your own model and data with hvdtrain's Trainer (checkpoints, resume, metrics, preemption).

Any nn.Module works for data parallelism (an nn.Sequential also for --strategy model/hybrid); data is a
Dataset of two TensorDatasets. Here: a 3-class problem made with scikit-learn, and a small MLP.

    hvdtrain run -np 2 -- python examples/05_own_model_and_data.py --run-dir runs/own
"""

import argparse

import torch
from sklearn.datasets import make_classification
from torch import nn
from torch.utils.data import TensorDataset

from hvdtrain.config import TrainConfig
from hvdtrain.train.datasets import Dataset
from hvdtrain.train.trainer import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--run-dir", default="runs/own-model")
parser.add_argument("--epochs", type=int, default=10)
args = parser.parse_args()

# Your data: the same arrays on every rank (the Trainer shards them); a fixed split.
x, y = make_classification(n_samples=3000, n_features=20, n_informative=10, n_classes=3, random_state=0)
x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
data = Dataset(TensorDataset(x[:2400], y[:2400]), TensorDataset(x[2400:], y[2400:]), input_shape=(20,), num_classes=3)

# Your model.
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))

cfg = TrainConfig(run_dir=args.run_dir, epochs=args.epochs, batch_size=32, lr=0.02, model="mlp", data="own")
result = Trainer(cfg, model=model, dataset=data).fit()  # prints test accuracy on rank 0
