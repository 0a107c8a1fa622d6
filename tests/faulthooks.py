"""Trainer hooks the fault table (tests/e2e/test_faults.py) attaches with `hvdtrain train --hooks faulthooks:...`
(tests/ on PYTHONPATH), to time a fault or to be one. Nothing here is in the product.

Every hook sleeps $HVDTRAIN_TEST_STEP_SLEEP seconds before each step (elastichooks.SlowSteps: a test has time to act
mid-training) and, at its moment, writes its process id to $HVDTRAIN_TEST_MARK, the file the test waits for:
  MarkStep   rank 0, after step $HVDTRAIN_TEST_STEP: a test kills a rank in the middle of training (and waits
             $HVDTRAIN_TEST_MARK_PAUSE seconds there, for a signal to land at that step);
  SlowWrite  rank 0, inside its write of the checkpoint of step $HVDTRAIN_TEST_STEP: the whole state is in the
             temporary file, not yet renamed; the write then pauses (120 s) for the test to signal a rank;
  Stall      rank $HVDTRAIN_TEST_RANK stops calling collectives after step $HVDTRAIN_TEST_STEP (its main thread
             sleeps, as in a hung read; Horovod's background thread goes on): Horovod's stall shutdown ends it;
  UserError  rank $HVDTRAIN_TEST_RANK raises ValueError after step $HVDTRAIN_TEST_STEP, in user code (this file);
  Spin       rank $HVDTRAIN_TEST_RANK loops forever after step $HVDTRAIN_TEST_STEP (busy, holding the GIL);
  Lonely     rank $HVDTRAIN_TEST_RANK alone calls an allreduce after step $HVDTRAIN_TEST_STEP: a collective the
             other ranks never join.
SlowRank (no mark, no sleep on the other ranks) is a slow node: rank $HVDTRAIN_TEST_RANK alone takes
$HVDTRAIN_TEST_STEP_SLEEP seconds more at the start of every step (its own work: `hvdtrain report`'s straggler).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from elastichooks import SlowSteps


class _Fault(SlowSteps):
    def __init__(self):
        super().__init__()
        self.step = int(os.environ["HVDTRAIN_TEST_STEP"])
        self.rank = int(os.environ.get("HVDTRAIN_TEST_RANK", "0"))
        self.mark = Path(os.environ["HVDTRAIN_TEST_MARK"])

    def due(self, trainer) -> bool:
        """This rank, after the fault's step: writes the mark."""
        if trainer.rank != self.rank or trainer.state.step != self.step:
            return False
        self.mark.write_text(f"{os.getpid()}\n")
        return True


class MarkStep(_Fault):
    def on_step_end(self, trainer):
        if self.due(trainer):
            # a pause for the test's signal to land here, at this step (HVDTRAIN_TEST_MARK_PAUSE seconds; 0: go on)
            time.sleep(float(os.environ.get("HVDTRAIN_TEST_MARK_PAUSE", "0")))


class SlowWrite(_Fault):
    def __init__(self):
        super().__init__()
        import torch

        save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if isinstance(obj, dict) and obj.get("step") == self.step:
                f.flush()
                self.mark.write_text(f"{os.getpid()}\n")
                time.sleep(120)

        torch.save = slow_save  # what hvdtrain.train.checkpoint.save calls, in this rank's process only


class Stall(_Fault):
    def on_step_end(self, trainer):
        if self.due(trainer):
            time.sleep(3600)


class UserError(_Fault):
    def on_step_end(self, trainer):
        if self.due(trainer):
            raise ValueError(f"user code failed on rank {trainer.rank} after step {trainer.state.step}")


class Spin(_Fault):
    def on_step_end(self, trainer):
        if self.due(trainer):
            n = 0
            while True:
                n += 1


class Lonely(_Fault):
    def on_step_end(self, trainer):
        if self.due(trainer):
            import horovod.torch as hvd
            import torch

            hvd.allreduce(torch.ones(1), name="only.this.rank")


class SlowRank(SlowSteps):
    def __init__(self):
        super().__init__()
        self.rank = int(os.environ["HVDTRAIN_TEST_RANK"])

    def on_step_start(self, trainer):
        if trainer.rank == self.rank:
            super().on_step_start(trainer)
