"""Asynchronous SGD with parameter servers, on mpi4py point-to-point messages (stale-synchronous parallel).

Of the job's N ranks the last P serve parameters and the first W = N - P are workers (rank 0, a worker, writes
the run's files). The model's parameters, flattened in model.parameters() order into one vector of L elements,
are cut into P contiguous shards; server p holds shard p and the optimizer state of that shard (a torch
optimizer over one flat tensor: the same arithmetic as over the whole model, element by element).

    worker step   backward -> the flattened gradient's shard p sent to server p (all P at once, as buffers, no
                  pickling) -> each server's reply, the shard's parameters after the update -> into the model:
                  2P messages and 2L elements per step
    server        for each gradient, in arrival order:
                    S > 0   one optimizer step on it: w <- w - lr * g_i (and the optimizer's own state)
                    S = 0   waits for the gradient of every worker of this clock, then one step on their mean:
                            synchronous data parallelism
                  then replies to every worker allowed to go on: a worker that has pushed c gradients may start
                  its next step while c - min_j c_j <= S, the minimum over the workers still training
                  (stale-synchronous parallel, Ho et al. 2013); the others wait for the slowest to catch up

A server counts its updates (its version). Every gradient it applies is logged as (worker, worker's clock,
version the worker's parameters came from, version the gradient was applied to): the difference is the
gradient's staleness, at most (W - 1)(2S + 1) updates (the test checks the log against the clock bound).

Control messages (pickled; not in the hot path): INIT from rank 0 before anything else (the initial or
resumed shard and its optimizer state), PULL (a worker asks for the current shard), SAVE (rank 0 asks for the
shard, its optimizer state and version: a checkpoint), DONE (a worker has taken its last step: it no longer
holds back the others), BYE (a worker is finished with the servers; a server returns when every worker said it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, TextIO

import numpy as np
import torch

from hvdtrain import progress

GRAD, PARAMS, PULL, SAVE, STATE, DONE, BYE, INIT = range(11, 19)


def roles(size: int, servers: int) -> tuple[list[int], list[int]]:
    """(workers, servers): the first size - servers ranks train, the last `servers` serve."""
    return list(range(size - servers)), list(range(size - servers, size))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each parameter lies in the flat vector, and each server's shard of it."""

    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    total: int
    bounds: tuple[tuple[int, int], ...]  # (start, end) of each server's shard

    @classmethod
    def of(cls, params: list[torch.Tensor], servers: int) -> Layout:
        shapes = tuple(tuple(p.shape) for p in params)
        sizes = [p.numel() for p in params]
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        total = sum(sizes)
        if servers > total:
            raise ValueError(f"{servers} parameter servers for {total} parameters: some would hold nothing")
        cut = [total * p // servers for p in range(servers + 1)]
        return cls(shapes, offsets, total, tuple(zip(cut[:-1], cut[1:])))

    def flatten(self, tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        for t, off in zip(tensors, self.offsets):
            out[off : off + t.numel()].copy_(t.reshape(-1))
        return out

    def pieces(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """`flat` cut back into the parameters' shapes (views)."""
        return [flat[off : off + int(np.prod(s, dtype=np.int64))].view(s) for off, s in zip(self.offsets, self.shapes)]


def _mpi():
    from mpi4py import MPI  # after hvd.init: Horovod initialises MPI (thread level multiple)

    return MPI


def _buffer(t: torch.Tensor):
    return t.numpy()


# ------------------------------------------------------------------------------------------------ servers
def optimizer_to_shards(state: Optional[dict[str, Any]], layout: Layout) -> list[Optional[dict[str, Any]]]:
    """A torch-format optimizer state_dict of the whole model (one entry per parameter) -> each server's
    state_dict for its flat shard. Entries shaped like their parameter (momentum, Adam's moments) are cut by the
    shards; the others (Adam's step count) are the same for every parameter and copied. None, or a state with no
    entries yet (a fresh start), gives None for every server."""
    if state is None or not state.get("state"):
        return [None] * len(layout.bounds)
    group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    per_param = [state["state"][i] for i in range(len(layout.shapes))]
    flats, scalars = {}, {}
    for k, first in per_param[0].items():
        if torch.is_tensor(first) and tuple(first.shape) == layout.shapes[0] and first.dim() > 0:
            flats[k] = torch.cat([entry[k].reshape(-1) for entry in per_param])
        else:
            scalars[k] = first
    out = []
    for start, end in layout.bounds:
        entry = {k: v[start:end].clone() for k, v in flats.items()}
        entry.update({k: _copy(v) for k, v in scalars.items()})
        out.append({"state": {0: entry}, "param_groups": [{**group, "params": [0]}]})
    return out


def shards_to_optimizer(states: list[dict[str, Any]], layout: Layout) -> dict[str, Any]:
    """Every server's shard state_dict -> one torch-format state_dict of the whole model (what a checkpoint holds;
    the same format as an ordinary optimizer's, so sync and async checkpoints load into each other). A per-tensor
    entry (a step count) is taken from the server holding the parameter's first element."""
    group = {k: v for k, v in states[0]["param_groups"][0].items() if k != "params"}
    entries = [s["state"].get(0, {}) for s in states]
    result: dict[int, dict[str, Any]] = {}
    if all(entries):
        full = {
            k: torch.cat([e[k] for e in entries])
            for k, v in entries[0].items()
            if torch.is_tensor(v) and v.dim() == 1 and len(v) == layout.bounds[0][1] - layout.bounds[0][0]
        }
        pieces = {k: layout.pieces(v) for k, v in full.items()}
        for i, offset in enumerate(layout.offsets):
            owner = entries[next(p for p, (s, e) in enumerate(layout.bounds) if s <= offset < e)]
            result[i] = {k: pieces[k][i].clone() if k in full else _copy(owner[k]) for k in entries[0]}
    return {"state": result, "param_groups": [{**group, "params": list(range(len(layout.shapes)))}]}


def _copy(v):
    return v.clone() if torch.is_tensor(v) else v


class Server:
    """One parameter server: its shard, an optimizer over it, the workers' clocks; serve() until every worker is
    finished. `make_optimizer(params)` builds the torch optimizer (the job's, with its learning rate)."""

    def __init__(self, comm, layout: Layout, index: int, workers: list[int], staleness: int,
                 make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer], dtype: torch.dtype,
                 log: Optional[TextIO] = None):  # fmt: skip
        self.comm, self.layout, self.index, self.workers, self.staleness = comm, layout, index, workers, staleness
        start, end = layout.bounds[index]
        self.param = torch.zeros(end - start, dtype=dtype)
        self.param.grad = torch.zeros_like(self.param)
        self.optimizer = make_optimizer([self.param])
        self._incoming = torch.zeros_like(self.param)
        self._sum = torch.zeros_like(self.param)
        self.version = 0  # updates applied
        self.clock = {w: 0 for w in workers}  # gradients received from each worker
        self.pulled = {w: 0 for w in workers}  # the version each worker's parameters came from
        self.training = set(workers)  # workers that have not said DONE
        self.waiting: list[int] = []  # workers whose gradient was taken and who wait for their parameters
        self.batch: list[int] = []  # S = 0: workers whose gradient is in _sum
        self.log = log
        self.messages = 0
        self.max_lead = 0  # the most clocks a worker was ahead of the slowest when it was let go on (<= S)
        self.max_stale = 0  # the most updates applied between a worker's pull and its gradient's update

    # -- the loop
    def serve(self) -> dict[str, Any]:
        MPI = _mpi()
        self._init(self.comm.recv(source=0, tag=INIT))
        status = MPI.Status()
        finished: set[int] = set()
        while len(finished) < len(self.workers):
            self.comm.Probe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
            src, tag = status.Get_source(), status.Get_tag()
            self.messages += 1
            progress.step(self.messages, phase="serve")  # a server's progress: the messages it has served
            if tag == GRAD:
                self.comm.Recv(_buffer(self._incoming), source=src, tag=GRAD)
                self._on_gradient(src)
            elif tag == PULL:
                self.comm.recv(source=src, tag=PULL)
                self._send_params(src)
            elif tag == SAVE:
                self.comm.recv(source=src, tag=SAVE)
                self.comm.send(self._state(), dest=src, tag=STATE)
            elif tag == DONE:
                self.comm.recv(source=src, tag=DONE)
                self.training.discard(src)
                self._release()
            elif tag == BYE:  # implies DONE
                self.comm.recv(source=src, tag=BYE)
                finished.add(src)
                self.training.discard(src)
                self._release()
            else:
                raise RuntimeError(f"parameter server {self.index}: unexpected message tag {tag} from rank {src}")
        return {"server": self.index, "version": self.version, "messages": self.messages,
                "max_lead": self.max_lead, "max_stale": self.max_stale}  # fmt: skip

    def _init(self, message: dict[str, Any]) -> None:
        with torch.no_grad():
            self.param.copy_(message["param"])
        if message.get("optimizer") is not None:
            self.optimizer.load_state_dict(message["optimizer"])
        self.version = int(message.get("version", 0))
        self.pulled = {w: self.version for w in self.workers}

    # -- updates
    def _on_gradient(self, worker: int) -> None:
        self.clock[worker] += 1
        if self.staleness == 0:
            self._sum += self._incoming
            self.batch.append(worker)
        else:
            self._apply(self._incoming, [worker])
        self.waiting.append(worker)
        self._release()

    def _apply(self, grad: torch.Tensor, workers: list[int]) -> None:
        applied_to = self.version
        self.param.grad.copy_(grad)
        self.optimizer.step()
        self.version += 1
        for w in workers:
            self.max_stale = max(self.max_stale, applied_to - self.pulled[w])
            if self.log is not None:
                self.log.write(f"{w},{self.clock[w]},{self.pulled[w]},{applied_to}\n")

    def _slowest(self) -> int:
        return min((self.clock[w] for w in self.training), default=max(self.clock.values()))

    def _release(self) -> None:
        """S = 0: once every training worker's gradient of this clock is in, one step on their mean, and every
        one of them goes on. S > 0: every waiting worker within S clocks of the slowest goes on."""
        if self.staleness == 0:
            if self.batch and set(self.batch) >= self.training:
                self._apply(self._sum / len(self.batch), self.batch)
                self._sum.zero_()
                self.batch = []
            else:
                return
        slowest = self._slowest()
        ready = [w for w in self.waiting if self.clock[w] - slowest <= self.staleness]
        for w in ready:
            self.waiting.remove(w)
            self.max_lead = max(self.max_lead, self.clock[w] - slowest)
            self._send_params(w)

    def _send_params(self, worker: int) -> None:
        self.pulled[worker] = self.version
        self.comm.Send(_buffer(self.param.detach()), dest=worker, tag=PARAMS)

    def _state(self) -> dict[str, Any]:
        return {"param": self.param.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "version": self.version}  # fmt: skip


# ------------------------------------------------------------------------------------------------ workers
class Client:
    """A worker's side: push the gradient, receive the fresh parameters, in one exchange per step."""

    def __init__(self, comm, layout: Layout, servers: list[int], params: list[torch.Tensor]):
        self.comm, self.layout, self.servers, self.params = comm, layout, servers, params
        dtype = params[0].dtype
        self._grad = torch.zeros(layout.total, dtype=dtype)
        self._flat = torch.zeros(layout.total, dtype=dtype)
        self.messages = 0

    def _shard(self, t: torch.Tensor, p: int) -> np.ndarray:
        start, end = self.layout.bounds[p]
        return _buffer(t[start:end])

    def init_servers(self, optimizer_state: Optional[dict[str, Any]], versions: Optional[list[int]] = None) -> None:
        """Rank 0, before any worker's first step: every server's shard of the current parameters and of
        `optimizer_state` (torch format, the whole model's; None for a fresh start), and the update count each
        server starts from (a checkpoint's; zeros for a fresh start)."""
        flat = self.layout.flatten([p.detach() for p in self.params], self._flat)
        states = optimizer_to_shards(optimizer_state, self.layout)
        versions = versions if versions is not None and len(versions) == len(self.servers) else [0] * len(states)
        for p, server in enumerate(self.servers):
            start, end = self.layout.bounds[p]
            message = {"param": flat[start:end].clone(), "optimizer": states[p], "version": versions[p]}
            self.comm.send(message, dest=server, tag=INIT)

    def step(self) -> None:
        """Push this step's gradients, wait for every server's fresh shard, take it into the parameters."""
        MPI = _mpi()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.layout.flatten([g.detach() for g in grads], self._grad)
        requests = []
        for p, server in enumerate(self.servers):
            requests.append(self.comm.Irecv(self._shard(self._flat, p), source=server, tag=PARAMS))
            requests.append(self.comm.Isend(self._shard(self._grad, p), dest=server, tag=GRAD))
        MPI.Request.Waitall(requests)
        self.messages += 2 * len(self.servers)
        self._take()

    def pull(self) -> None:
        """The servers' current parameters into the model."""
        MPI = _mpi()
        requests = []
        for p, server in enumerate(self.servers):
            requests.append(self.comm.Irecv(self._shard(self._flat, p), source=server, tag=PARAMS))
            self.comm.send(None, dest=server, tag=PULL)
        MPI.Request.Waitall(requests)
        self._take()

    def _take(self) -> None:
        with torch.no_grad():
            for p, piece in zip(self.params, self.layout.pieces(self._flat)):
                p.copy_(piece)

    def gather(self) -> tuple[torch.Tensor, dict[str, Any], list[int]]:
        """Rank 0: (flat parameters, torch-format optimizer state, each server's version) from every server."""
        for server in self.servers:
            self.comm.send(None, dest=server, tag=SAVE)
        states = [self.comm.recv(source=server, tag=STATE) for server in self.servers]
        flat = torch.cat([s["param"] for s in states])
        optimizer = shards_to_optimizer([s["optimizer"] for s in states], self.layout)
        return flat, optimizer, [s["version"] for s in states]

    def done(self) -> None:
        """This worker has taken its last step."""
        for server in self.servers:
            self.comm.send(None, dest=server, tag=DONE)

    def bye(self) -> None:
        """This worker needs the servers no more."""
        for server in self.servers:
            self.comm.send(None, dest=server, tag=BYE)
