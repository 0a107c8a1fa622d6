"""Elastic data parallelism with Horovod: workers come and go, training goes on.

`horovodrun --min-np/--max-np --host-discovery-script` (what `hvdtrain train --elastic` runs) starts one worker
per discovered slot with HOROVOD_ELASTIC=1; `hvd.init()` then joins the driver's rendezvous. When a worker
fails, the others' next collective raises HorovodInternalError; when the discovery finds a new (or lost) host,
the driver tells rank 0, and the next `commit()` raises HostsUpdatedInterrupt on every rank (Horovod agrees on
it with a broadcast). `run` catches both, rolls the state back to the last commit (for a failure), re-forms
the world (shutdown + init: the driver hands out new ranks), calls the reset callbacks, broadcasts rank 0's
state to every worker (new ones included) and calls the training function again.

What this module adds to Horovod's own elastic API (hvd.elastic.TorchState/ElasticSampler) is `Commits`, a State
whose save/restore/sync are the caller's (the Trainer commits its TrainState, its update rule's state and the
position in the epoch, and broadcasts the optimizer state as one object: Horovod's broadcast_optimizer_state takes
a dummy step that moves the weights when weight decay is on).

The samples of an epoch not yet processed are dealt over the current world by parallel.shards.shard_of_rest, the
rule of every job, static or elastic (so an elastic run without events is the static run).
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import horovod.torch as hvd
from horovod.common.elastic import State

T = TypeVar("T")


def enabled() -> bool:
    """True in a worker started by horovodrun's elastic driver."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


class Commits(State):
    """Horovod's elastic State over callbacks: `save()` keeps a copy of what `snapshot()` returns (in memory, on
    every rank), `restore()` hands the last copy to `load(copy)`, `sync()` calls `broadcast()` (rank 0's state
    to every worker) and then saves, so a new worker's first rollback point is the state it was given.
    `commit()` (Horovod's) saves and then raises HostsUpdatedInterrupt on every rank when hosts changed."""

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        load: Callable[[dict[str, Any]], None],
        broadcast: Callable[[], None],
    ):
        self._snapshot, self._load, self._broadcast = snapshot, load, broadcast
        self._saved: dict[str, Any] = {}
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.save()

    def save(self) -> None:
        self._saved = self._snapshot()

    def restore(self) -> None:
        self._load(self._saved)

    def sync(self) -> None:
        self._broadcast()
        self.save()


def run(state: Commits, func: Callable[[], T]) -> T:
    """Call `func` until it returns, through every reset (Horovod's hvd.elastic.run loop): after a failed
    collective the state rolls back to its last commit; after a host change it keeps its (just committed)
    state; then Horovod re-forms the world, the reset callbacks run, and rank 0's state is broadcast."""
    return hvd.elastic.run(lambda _state: func())(state)
