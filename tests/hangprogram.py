"""A user's own Horovod program that reports its steps (hvdtrain.progress.step), for tests/e2e/test_hangs.py:
rank $HVDTRAIN_TEST_RANK's data loader sleeps in its dataset's __getitem__ from batch $HVDTRAIN_TEST_STEP on,
after writing its pid to $HVDTRAIN_TEST_MARK; the other ranks wait for it in their next allreduce."""

import os
import time
from pathlib import Path

import horovod.torch as hvd
import torch

import hvdtrain.progress as progress

hvd.init()
SLOW_RANK, SLOW_BATCH = int(os.environ["HVDTRAIN_TEST_RANK"]), int(os.environ["HVDTRAIN_TEST_STEP"])
BATCH = 4


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 100_000

    def __getitem__(self, i):
        if hvd.rank() == SLOW_RANK and i == SLOW_BATCH * BATCH:
            Path(os.environ["HVDTRAIN_TEST_MARK"]).write_text(f"{os.getpid()}\n")
            time.sleep(3600)
        return torch.tensor([float(i)])


for step, x in enumerate(torch.utils.data.DataLoader(Numbers(), batch_size=BATCH)):
    progress.step(step)
    hvd.allreduce(x.sum(), name="batch.sum")
    time.sleep(0.01)
