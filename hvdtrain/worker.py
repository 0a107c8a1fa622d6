"""Entry point run on every rank for the built-in training job: ``python -m hvdtrain.worker CONFIG.json``.

`hvdtrain train` validates the configuration, writes it to the run directory and launches this module on
N ranks. Errors a user can fix end the rank with one line and their exit status (2), like the CLI's.
"""

from __future__ import annotations

import json
import sys

from hvdtrain.errors import HvdtrainError, rank_main


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
    except HvdtrainError:
        raise  # one line (and a user's traceback) through rank_main
    except Exception as e:
        if not _peer_gone(e):
            raise  # a bug: its traceback is the report
        # Horovod shut down under this rank (another rank died, left, or stalled past --stall-timeout): the launcher
        # names the rank that failed first; a traceback here would only bury that.
        print(f"hvdtrain: error: {HOROVOD_SHUT_DOWN}", file=sys.stderr, flush=True)
        return PEER_GONE
    return 0


PEER_GONE = 3  # this rank's exit status when Horovod shut down because of another rank
HOROVOD_SHUT_DOWN = "Horovod has been shut down: another rank failed or left the job (the launch report names it)"


def _peer_gone(error: BaseException) -> bool:
    """Whether `error` is Horovod's shutdown (HorovodInternalError, raised on every rank when the collective layer
    stops: a rank died or a stall shut Horovod down), not an error of this rank's own."""
    try:
        from horovod.common.exceptions import HorovodInternalError
    except ImportError:
        return False
    return isinstance(error, HorovodInternalError)


if __name__ == "__main__":
    sys.exit(rank_main(main, sys.argv[1:]))
