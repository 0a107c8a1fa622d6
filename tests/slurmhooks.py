"""Trainer hooks the Slurm tier attaches with `hvdtrain train --hooks slurmhooks:...` (tests/ on PYTHONPATH).

SlowFirstRun sleeps $HVDTRAIN_TEST_STEP_SLEEP seconds before each step of a job's first run only (SLURM_RESTART_COUNT
unset or 0): the first run outlives its time limit's warning, and the requeued run finishes at full speed.
"""

from __future__ import annotations

import os

from elastichooks import SlowSteps


class SlowFirstRun(SlowSteps):
    def __init__(self):
        super().__init__()
        if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            self.seconds = 0.0
