"""Entry point run on every rank for the built-in training job: ``python -m hvdtrain.worker CONFIG.json``.

`hvdtrain train` validates the configuration, writes it to the run directory and launches this module on
N ranks. Errors a user can fix end the rank with one line and their exit status (2), like the CLI's.
"""

from __future__ import annotations

import json
import sys

from hvdtrain.errors import HvdtrainError


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m hvdtrain.worker CONFIG.json", file=sys.stderr)
        return 2
    from hvdtrain import preempt
    from hvdtrain.config import TrainConfig

    try:
        with open(argv[0]) as f:
            cfg = TrainConfig.from_dict(json.load(f))
        preempt.install(cfg.preempt_signal)  # before the slow imports: a warning during start-up is not fatal
        from hvdtrain.train.hooks import load_hooks
        from hvdtrain.train.trainer import Trainer

        Trainer(cfg, hooks=load_hooks(cfg.hook_refs())).fit()
    except HvdtrainError as e:
        print(f"hvdtrain: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
