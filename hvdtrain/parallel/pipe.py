"""Model parallelism across ranks: the stages of one model replica on different processes (possibly on different
hosts), activations sent forward and their gradients backward between neighbouring ranks as mpi4py
point-to-point messages (Horovod has no send/receive), in GPipe or 1F1B micro-batch order.

Layout (`parallel.grid.Grid`): N ranks, P stages per replica, N/P replicas; the ranks holding stage s of every
replica form a Horovod process set, over which that stage's gradients are averaged (pipeline x data
parallelism); with one replica there is nothing to average.

A batch of B samples is cut into m = min(M, B) micro-batches (torch.tensor_split: sizes differ by at most one).
Every stage of a replica reads the same indices (the replica's shard), so every stage knows B and the
micro-batch sizes; the trailing shapes and dtypes of the tensors crossing each boundary are agreed once, when
the stages are built (one pickled message per boundary), and the hot path sends raw bytes only.

Schedules (`schedule`), as op lists per stage, F i = forward of micro-batch i, B i = its backward:
    gpipe   F0 F1 ... F(m-1), then B(m-1) ... B0: every stage holds all m micro-batches' activations
    1f1b    stage s first runs w = min(P-s-1, m) forwards, then alternates one forward and one backward, then the
            last w backwards (PipeDream-Flush, Narayanan et al. 2021): at most P-s micro-batches in flight
Both are synchronous: the gradients are those of the whole batch, and the step is the unsplit model's. The
bubble is (P-1)/(m+P-1) of each step for both; 1F1B bounds the memory. `timing` simulates either schedule with
unit-time ops (the time x stage tables of docs/architecture.md, the bench's model).

Messages: tag 2i carries micro-batch i's activation forward, 2i+1 its gradient backward (MPI keeps the order of
messages with the same source and tag, so the passes of one step and the steps after it reuse them); EVAL tags
evaluation's forward-only chunks; GATHER/SCATTER move a checkpoint's parts (pickled: not in the hot path). Sends
are non-blocking (each holds its buffer until a step's end), receives blocking.

Checkpoints have the data-parallel format: global rank 0 gathers replica 0's stages, renamed to the unsplit
model's names (layer j of stage s is layer offset_s + j) and the optimizer state renumbered in the unsplit
model's parameter order (`whole_model_state`, `whole_optimizer_state`); a resume cuts them back
(`stage_model_state`, `stage_optimizer_state`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from hvdtrain.errors import ConfigError
from hvdtrain.parallel.grid import Grid
from hvdtrain.parallel.pipeline import split_stages

SCHEDULES = ("1f1b", "gpipe")
FORWARD, BACKWARD = "F", "B"
EVAL, GATHER, SCATTER, SHAPES = 1 << 20, (1 << 20) + 1, (1 << 20) + 2, (1 << 20) + 3


def micro_sizes(batch: int, micro_batches: int) -> list[int]:
    """The sizes of min(M, B) micro-batches of a batch of B samples (torch.tensor_split's)."""
    m = min(micro_batches, batch)
    return [batch // m + (1 if i < batch % m else 0) for i in range(m)]


def schedule(kind: str, stages: int, stage: int, micro: int) -> list[tuple[str, int]]:
    """Stage `stage`'s ops for one batch of `micro` micro-batches: ("F", i) and ("B", i) in the order it runs them."""
    if kind == "gpipe":
        return [(FORWARD, i) for i in range(micro)] + [(BACKWARD, i) for i in reversed(range(micro))]
    if kind != "1f1b":
        raise ConfigError(f"--schedule: '{kind}' is not one of {', '.join(SCHEDULES)}")
    warmup = min(stages - stage - 1, micro)
    ops = [(FORWARD, i) for i in range(warmup)]
    for k in range(micro - warmup):
        ops += [(FORWARD, warmup + k), (BACKWARD, k)]
    return ops + [(BACKWARD, i) for i in range(micro - warmup, micro)]


def peak_in_flight(ops: Sequence[tuple[str, int]]) -> int:
    """The most micro-batches whose forward is done and backward not, over a stage's ops."""
    live = peak = 0
    for op, _ in ops:
        live += 1 if op == FORWARD else -1
        peak = max(peak, live)
    return peak


def _cost(op: str, backward_cost: float = 2.0) -> float:
    """An op's time in the simulated schedule: a forward 1 unit, a backward `backward_cost`."""
    return 1.0 if op == FORWARD else backward_cost


def _input_of(stage: int, op: str, i: int, stages: int) -> Optional[tuple[int, str, int]]:
    """The op whose result (stage, op, i) waits for: the previous stage's forward, the next stage's backward."""
    if op == FORWARD and stage > 0:
        return stage - 1, FORWARD, i
    if op == BACKWARD and stage < stages - 1:
        return stage + 1, BACKWARD, i
    return None


def timing(kind: str, stages: int, micro: int, backward_cost: float = 2.0) -> dict[tuple[int, str, int], float]:
    """When each op starts, with forwards taking 1 time unit and backwards `backward_cost`, each stage running its
    ops in schedule order as soon as their inputs exist (F i after the previous stage's F i; B i after the next
    stage's B i); messages take no time. {(stage, op, i): start}."""
    ops = [schedule(kind, stages, s, micro) for s in range(stages)]
    start: dict[tuple[int, str, int], float] = {}
    done: dict[tuple[int, str, int], float] = {}
    clock, pos = [0.0] * stages, [0] * stages
    while any(pos[s] < len(ops[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(ops[s]):
                continue
            op, i = ops[s][pos[s]]
            need = _input_of(s, op, i, stages)
            if need is not None and need not in done:
                continue
            t = max(clock[s], done[need] if need else 0.0)
            start[(s, op, i)] = t
            clock[s] = done[(s, op, i)] = t + _cost(op, backward_cost)
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {kind} deadlocks with {stages} stages and {micro} micro-batches")
    return start


def table(kind: str, stages: int, micro: int) -> str:
    """The schedule drawn as a time x stage table (forward 1 unit, backward 2), as docs/architecture.md shows it."""
    start = timing(kind, stages, micro)
    end = max(t + _cost(op) for (_, op, _), t in start.items())
    rows = []
    for s in range(stages):
        cells = ["."] * int(end)
        for (stage, op, i), t in start.items():
            if stage == s:
                for u in range(int(t), int(t + _cost(op))):
                    cells[u] = f"{op}{i}"
        rows.append(f"stage {s} | " + " ".join(f"{c:<3}" for c in cells).rstrip())
    return "\n".join(rows)


def _as_bytes(t: torch.Tensor):
    """A contiguous tensor's memory as a numpy uint8 array (an MPI buffer of any dtype, no copy)."""
    return t.view(-1).view(torch.uint8).numpy()


class ActivationMeter:
    """What autograd keeps for backward, per micro-batch in flight (saved tensors other than parameters, counted
    when saved and released when that micro-batch's backward is done): the live bytes and micro-batches, and their
    peaks."""

    def __init__(self, module: nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._bytes: dict[int, int] = {}
        self._seen: dict[int, set[int]] = {}
        self.peak_bytes = self.peak_micro = 0

    @contextlib.contextmanager
    def forward(self, i: int) -> Iterator[None]:
        self._bytes[i], self._seen[i] = 0, set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._params and ptr not in self._seen[i]:
                self._seen[i].add(ptr)
                self._bytes[i] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak_bytes = max(self.peak_bytes, sum(self._bytes.values()))
        self.peak_micro = max(self.peak_micro, len(self._bytes))

    def release(self, i: int) -> None:
        self._bytes.pop(i, None)
        self._seen.pop(i, None)


class Stage:
    """This rank's stage of a pipelined replica: its layers, its neighbours, the shapes crossing its boundaries,
    and the schedule it runs a batch in.

    stage = Stage.build(model, grid, comm, input_shape, input_dtype, balance, schedule="1f1b", micro_batches=4)
    stage.train_pass(batch, x, y, loss_fn, scale)  # forward + backward of one batch; gradients accumulate
    stage.forward_only(batch, x)                   # evaluation: the last stage returns the outputs
    """

    def __init__(
        self,
        module: nn.Module,
        grid: Grid,
        comm,
        bounds: list[tuple[int, int, int, int]],
        device: torch.device,
        in_shape: tuple[int, ...],
        dtype: torch.dtype,
        out_shape: tuple[int, ...],
        out_dtype: torch.dtype,
        kind: str,
        micro_batches: int,
    ):
        self.module, self.grid, self.comm = module, grid, comm
        self.rank = comm.rank
        self.index, self.replica = grid.stage_of(self.rank), grid.replica_of(self.rank)
        self.first, self.last = self.index == 0, self.index == grid.stages - 1
        self.prev = None if self.first else self.rank - 1
        self.next = None if self.last else self.rank + 1
        self.bounds = bounds  # every stage's (layer offset, layers, parameter offset, parameters)
        self.layer_offset = bounds[self.index][0]
        self.device = device  # where the module and the tensors it takes live
        self.in_shape, self.dtype, self.out_shape, self.out_dtype = in_shape, dtype, out_shape, out_dtype
        self.kind, self.micro_batches = kind, micro_batches
        self.meter = ActivationMeter(module)
        self._sends: list = []

    @classmethod
    def build(
        cls,
        model: nn.Sequential,
        grid: Grid,
        comm,
        input_shape: Sequence[int],
        input_dtype: torch.dtype,
        balance: Optional[Sequence[int]] = None,
        schedule: str = "1f1b",
        micro_batches: int = 1,
        device: Any = "cpu",
    ) -> Stage:
        """Cut `model` (the same on every rank) into grid.stages stages and keep this rank's (on `device`); the
        neighbours agree on the shapes between them (collective along each replica's pipeline)."""
        if schedule not in SCHEDULES:
            raise ConfigError(f"--schedule: '{schedule}' is not one of {', '.join(SCHEDULES)}")
        if not isinstance(model, nn.Sequential):
            raise ConfigError(f"--strategy pipeline splits an nn.Sequential, not a {type(model).__name__}")
        if grid.ranks != comm.size:
            raise ConfigError(f"a grid of {grid.ranks} ranks for a job of {comm.size}")
        parts = split_stages(model, grid.stages, balance)
        bounds, layers, params = [], 0, 0
        for part in parts:
            count = len(list(part.parameters()))
            bounds.append((layers, len(part), params, count))
            layers, params = layers + len(part), params + count
        empty = [i for i, b in enumerate(bounds) if b[3] == 0]
        if empty:
            first, count = bounds[empty[0]][:2]
            raise ConfigError(
                f"pipeline stage {empty[0]} (layers {first}-{first + count - 1}) holds no parameters: give --balance "
                "so that every stage has a layer with parameters"
            )
        s = grid.stage_of(comm.rank)
        module = parts[s].to(device)
        if s == 0:
            in_shape, dtype = tuple(input_shape), input_dtype
        else:
            in_shape, dtype = comm.recv(source=comm.rank - 1, tag=SHAPES)
        out = _probe(module, in_shape, dtype, device)
        out_shape, out_dtype = tuple(out.shape[1:]), out.dtype
        if s < grid.stages - 1:
            comm.send((out_shape, out_dtype), dest=comm.rank + 1, tag=SHAPES)
        return cls(module, grid, comm, bounds, torch.device(device), in_shape, dtype, out_shape, out_dtype, schedule,
                   micro_batches)  # fmt: skip

    # ---------------------------------------------------------------------------------------------- messages
    def _send(self, t: torch.Tensor, dest: int, tag: int) -> None:
        buf = t.detach().to("cpu").contiguous()  # (MPI here sends host memory: a GPU stage's tensor is copied)
        self._sends.append((self.comm.Isend(_as_bytes(buf), dest=dest, tag=tag), buf))

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, source: int, tag: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        self.comm.Recv(_as_bytes(out), source=source, tag=tag)
        return out.to(self.device)

    def flush(self) -> None:
        """Wait for this rank's sends (their buffers are freed then)."""
        for request, _ in self._sends:
            request.Wait()
        self._sends.clear()

    # ---------------------------------------------------------------------------------------------- passes
    def micro_count(self, batch: int) -> int:
        return len(micro_sizes(batch, self.micro_batches))

    def train_pass(
        self,
        batch: int,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        loss_fn: Optional[Callable] = None,
        scale: float = 1.0,
    ) -> tuple[float, int]:
        """Forward and backward of one batch of `batch` samples (x on the first stage, y and loss_fn on the last):
        the parameters' gradients accumulate those of `scale` x the batch's mean loss, as one process running the
        unsplit model on the whole batch would get them. Returns (the loss summed over the batch's samples,
        samples) on the last stage, (0.0, 0) on the others."""
        sizes = micro_sizes(batch, self.micro_batches)
        xs = x.tensor_split(len(sizes)) if self.first else None
        ys = y.tensor_split(len(sizes)) if self.last else None
        held: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        loss_sum = 0.0
        for op, i in schedule(self.kind, self.grid.stages, self.index, len(sizes)):
            if op == FORWARD:
                if self.first:
                    inp = xs[i]
                else:
                    inp = self._recv((sizes[i], *self.in_shape), self.dtype, self.prev, 2 * i).requires_grad_()
                with self.meter.forward(i):
                    out = self.module(inp)
                    if self.last:
                        loss = loss_fn(out, ys[i])
                        loss_sum += loss.item() * sizes[i]
                        out = loss * (sizes[i] / batch * scale)  # this micro-batch's share of the batch's mean
                if not self.last:
                    self._send(out, self.next, 2 * i)
                held[i] = (None if self.first else inp, out)
            else:
                inp, out = held.pop(i)
                if self.last:
                    out.backward()
                else:
                    grad = self._recv(tuple(out.shape), self.out_dtype, self.next, 2 * i + 1)
                    torch.autograd.backward(out, grad)
                if not self.first:
                    self._send(inp.grad, self.prev, 2 * i + 1)
                self.meter.release(i)
        self.flush()
        return (loss_sum, batch) if self.last else (0.0, 0)

    @torch.no_grad()
    def forward_only(self, batch: int, x: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """One chunk of `batch` samples forward (evaluation): the last stage returns the outputs, the others None.
        Sends stay pending until flush()."""
        inp = x if self.first else self._recv((batch, *self.in_shape), self.dtype, self.prev, EVAL)
        out = self.module(inp)
        if self.last:
            return out
        self._send(out, self.next, EVAL)
        return None

    # ------------------------------------------------------------------------------------------- checkpoints
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This stage's parameters under the unsplit model's names (what its allreduces are called)."""
        return [(_shift(name, self.layer_offset), p) for name, p in self.module.named_parameters()]

    def gather(self, part: Any) -> Optional[list[Any]]:
        """Replica 0's stages hand `part` to global rank 0, which returns them in stage order (None elsewhere;
        the other replicas hold the same and send nothing)."""
        if self.replica != 0:
            return None
        if self.rank != 0:
            self.comm.send(part, dest=0, tag=GATHER)
            return None
        return [part] + [self.comm.recv(source=s, tag=GATHER) for s in range(1, self.grid.stages)]

    def scatter(self, parts: Optional[list[Any]]) -> Any:
        """Global rank 0 gives replica 0's stage s parts[s]; returns this rank's part (None outside replica 0)."""
        if self.replica != 0:
            return None
        if self.rank != 0:
            return self.comm.recv(source=0, tag=SCATTER)
        for s in range(1, self.grid.stages):
            self.comm.send(parts[s], dest=s, tag=SCATTER)
        return parts[0]


def _probe(module: nn.Module, in_shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> torch.Tensor:
    """The module's output for one zero sample (eval mode, no gradients, the RNG untouched): its shape and dtype."""
    modes = [m.training for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            return module(torch.zeros((1, *in_shape), dtype=dtype, device=device))
    finally:
        for m, mode in zip(module.modules(), modes):
            m.training = mode


def _shift(name: str, offset: int) -> str:
    """`j.rest` -> `(j + offset).rest`: a stage's name for a state entry -> the unsplit Sequential's."""
    head, _, rest = name.partition(".")
    return f"{int(head) + offset}.{rest}" if rest else str(int(head) + offset)


def whole_model_state(parts: Sequence[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The unsplit model's state_dict from (layer offset, stage state_dict) pairs in stage order."""
    out: dict[str, torch.Tensor] = {}
    for offset, state in parts:
        out.update({_shift(k, offset): v for k, v in state.items()})
    return out


def stage_model_state(whole: dict[str, torch.Tensor], offset: int, layers: int) -> dict[str, torch.Tensor]:
    """A stage's state_dict (layers offset ... offset+layers-1 of the unsplit model, renamed from 0)."""
    out = {}
    for k, v in whole.items():
        head = int(k.partition(".")[0])
        if offset <= head < offset + layers:
            out[_shift(k, -offset)] = v
    return out


def whole_optimizer_state(parts: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The unsplit model's optimizer state_dict (torch's format, one parameter group) from (parameter offset,
    stage optimizer state_dict) pairs in stage order: the stages' parameters numbered on from each other."""
    state: dict[int, Any] = {}
    params: list[int] = []
    group: dict[str, Any] = {}
    for offset, sd in parts:
        if len(sd["param_groups"]) != 1:
            raise ValueError("a pipeline stage's optimizer has one parameter group")
        state.update({int(k) + offset: v for k, v in sd["state"].items()})
        g = sd["param_groups"][0]
        params += [p + offset for p in g["params"]]
        group = {**g, "params": params}
    return {"state": state, "param_groups": [group]}


def stage_optimizer_state(whole: dict[str, Any], offset: int, count: int) -> dict[str, Any]:
    """A stage's optimizer state_dict: parameters offset ... offset+count-1 of the unsplit model's, from 0."""
    if len(whole["param_groups"]) != 1:
        raise ValueError("a pipeline stage's optimizer state comes from one parameter group")
    g = whole["param_groups"][0]
    state = {int(k) - offset: v for k, v in whole["state"].items() if offset <= int(k) < offset + count}
    return {"state": state, "param_groups": [{**g, "params": list(range(count))}]}
