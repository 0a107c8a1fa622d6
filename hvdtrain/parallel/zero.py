"""Optimizer-state partitioning (ZeRO stage 1) on Horovod's collectives.

    opt = ShardedOptimizer(torch.optim.Adam, model, lr=1e-3)        # instead of hvd.DistributedOptimizer(...)
    hvdtrain train --shard-optimizer --optimizer adam ...

The model's trainable parameters are laid out, in the optimizer's order, into flat buckets (at most
`bucket_mb` each; a bucket never mixes parameter groups, devices or dtypes), each padded with zeros to a
multiple of the world size n; every parameter and its gradient become views into the bucket's flat parameter
and gradient buffers. Rank r owns the r-th of the n equal slices of every bucket: one flat tensor per bucket
(a view of its slice of the parameter buffer), which is all the wrapped optimizer ever sees, so its state
(Adam's two moments, SGD's momentum) is 1/n of the unsharded one. A step:

    backward    gradients accumulate straight into the flat gradient buffers; as each bucket's are complete
                (after the last of backward_passes_per_step passes), the buffer is reduce-scattered with
                Average (hvd.reducescatter_async): rank r receives the mean gradient of its slice, while
                backward goes on with the other buckets
    step()      every rank steps its optimizer on its slices (in place: they are the parameters' memory), then
                the slices are all-gathered (hvd.allgather_async) into every rank's parameter buffers

That is the same traffic as a ring allreduce (reduce-scatter + all-gather = 2(n-1)/n x S bytes per rank),
and the same arithmetic as hvd.DistributedOptimizer for any optimizer that treats each element on its own.
Padding keeps every slice the same length (Horovod's reducescatter would otherwise give ranks 0..k-1 one extra
element each); padded elements have zero gradients and are never copied back.

`state_dict()` is collective and returns the consolidated state in torch's ordinary (unsharded) format, so a
checkpoint written by n sharded ranks loads into m sharded ranks, into an unsharded optimizer, and back;
`load_state_dict` takes such a dict on every rank and keeps only this rank's slices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Iterable, Optional, Union

import horovod.torch as hvd
import torch
from torch import nn

from hvdtrain.errors import ConfigError
from hvdtrain.parallel import zero_files

# torch optimizers whose update of an element reads only that element's parameter, gradient and state (plus
# scalars such as the step count), so stepping a slice equals slicing the full step.
ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")
# Those that are not, and why.
REFUSED = {
    "LBFGS": "it keeps a history of whole flattened gradients and searches along one direction over all "
    "parameters (a closure re-evaluating the full loss), so it cannot step a slice on its own",
    "SparseAdam": "it takes sparse gradients, which cannot be flattened into buckets",
    "Adafactor": "it factors each matrix's second moment into row and column statistics, which a flat slice "
    "does not have",
    "Muon": "it orthogonalises each matrix's whole update (Newton-Schulz), which a flat slice does not have",
}
SCALAR_STATE = zero_files.SCALAR_STATE  # state entries that are one number per parameter tensor, not per element


def check_optimizer(optimizer_class: type, elementwise: bool = False) -> None:
    """Raise ConfigError unless stepping a slice of the parameters with `optimizer_class` equals slicing the
    full step. Classes hvdtrain does not know (LAMB, LARS... compute norms over a whole tensor) are refused
    unless the caller vouches for them with elementwise=True."""
    name = getattr(optimizer_class, "__name__", str(optimizer_class))
    if name in REFUSED and getattr(torch.optim, name, None) is optimizer_class:
        raise ConfigError(f"the sharded optimizer cannot run {name}: {REFUSED[name]}")
    if getattr(torch.optim, name, None) is optimizer_class and name in ELEMENTWISE:
        return
    if not elementwise:
        raise ConfigError(
            f"the sharded optimizer runs only optimizers that update each element on its own ({', '.join(ELEMENTWISE)}); "
            f"{name} is not one hvdtrain knows: pass elementwise=True if its update of an element reads only that "
            "element (no per-tensor norms or factored statistics)"
        )


@dataclasses.dataclass
class Piece:
    """Part of one parameter inside a rank's slice of a bucket: elements [start, end) of the flattened
    parameter are elements [at, at + end - start) of the slice."""

    index: int  # the parameter's position in the optimizer's order (its key in a state dict)
    slot: int  # its position in the bucket
    start: int
    end: int
    at: int


@dataclasses.dataclass
class Bucket:
    """Parameters flattened back to back (param i at offsets[i]), padded to `padded` = n x shard elements."""

    group: int  # the parameter group
    params: list[nn.Parameter]
    indices: list[int]  # each parameter's position in the optimizer's order
    offsets: list[int]
    length: int  # elements of the parameters, unpadded
    padded: int
    shard: int  # elements per rank
    pieces: list[Piece] = dataclasses.field(default_factory=list)  # of this rank's slice


def layout(groups: list[list[torch.Tensor]], size: int, rank: int, bucket_elements: int) -> list[Bucket]:
    """The buckets of `groups` (lists of parameters; only those that require gradients are laid out) for rank
    `rank` of `size`: pure arithmetic, the same on every rank."""
    buckets: list[Bucket] = []
    index = 0
    for g, params in enumerate(groups):
        open_buckets: dict[tuple, Bucket] = {}
        for p in params:
            i, index = index, index + 1
            if not p.requires_grad:
                continue
            key = (p.device, p.dtype)
            b = open_buckets.get(key)
            if b is None or (b.length and b.length + p.numel() > bucket_elements):
                b = open_buckets[key] = Bucket(g, [], [], [], 0, 0, 0)
                buckets.append(b)
            b.params.append(p)
            b.indices.append(i)
            b.offsets.append(b.length)
            b.length += p.numel()
    for b in buckets:
        b.shard = max(1, math.ceil(b.length / size))
        b.padded = b.shard * size
        lo, hi = rank * b.shard, (rank + 1) * b.shard
        for slot, (p, i, off) in enumerate(zip(b.params, b.indices, b.offsets)):
            start, end = max(lo, off), min(hi, off + p.numel())
            if start < end:
                b.pieces.append(Piece(i, slot, start - off, end - off, start - lo))
    return buckets


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors `optimizer` holds (momenta, moments, step counts)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


class ShardedOptimizer(torch.optim.Optimizer):
    """`optimizer_class(params, **kwargs)` with its state partitioned over the ranks of `process_set`.

    params: an nn.Module (its parameters), parameters, or parameter groups, as for any torch optimizer.
    compression: "none" or "fp16" (the gradients' reduce-scatter travels in fp16, as hvd.Compression.fp16).
    backward_passes_per_step: local backward passes (accumulated) before each step, as for DistributedOptimizer.
    elementwise: vouch that an optimizer class hvdtrain does not know updates each element on its own.
    Gradients are averaged over the ranks (no Adasum: it combines whole gradient vectors pairwise).
    `param_groups` are the usual ones (over the model's parameters), so learning-rate schedulers work; their
    settings are handed to the wrapped optimizer before every step.
    """

    _created = 0

    def __init__(
        self,
        optimizer_class: type,
        params: Union[nn.Module, Iterable],
        *,
        compression: str = "none",
        backward_passes_per_step: int = 1,
        bucket_mb: float = 25.0,
        process_set=None,
        elementwise: bool = False,
        **kwargs,
    ):
        check_optimizer(optimizer_class, elementwise)
        comp = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}.get(compression)
        if comp is None:
            raise ConfigError(f"--compression: '{compression}' is not one of none, fp16")
        if backward_passes_per_step < 1:
            raise ConfigError(f"backward_passes_per_step {backward_passes_per_step}: must be at least 1")
        if isinstance(params, nn.Module):
            params = params.parameters()
        # The class itself normalises the groups and fills in its defaults (it allocates no state yet).
        probe = optimizer_class(params, **kwargs)
        self._ready = False
        super().__init__(probe.param_groups, probe.defaults)
        self._ready = True
        # Collective names: optimizers are created in the same order on every rank, so the count agrees.
        ShardedOptimizer._created += 1
        self._name = f"hvdtrain.zero{ShardedOptimizer._created}"
        self._compression = comp
        self._passes_per_step = backward_passes_per_step
        self._process_set = process_set or hvd.global_process_set
        self.world_size, self.shard_rank = self._process_set.size(), self._process_set.rank()
        itemsize = max((p.element_size() for g in self.param_groups for p in g["params"]), default=4)
        self.buckets = layout(
            [g["params"] for g in self.param_groups],
            self.world_size,
            self.shard_rank,
            max(1, int(bucket_mb * 2**20) // itemsize),
        )
        self._flatten_buckets()
        # One group of the wrapped optimizer per group here that has trainable parameters: group -> its buckets
        # (in bucket order, which is the wrapped optimizer's parameter order).
        self._members: dict[int, list[int]] = {}
        for n, b in enumerate(self.buckets):
            self._members.setdefault(b.group, []).append(n)
        if not self._members:
            raise ConfigError("the sharded optimizer got no parameter that requires a gradient")
        self.optimizer = optimizer_class(
            [{**self._settings(g), "params": [self._shards[n] for n in ns]} for g, ns in self._members.items()],
            **kwargs,
        )
        self._bucket_of = {}
        for n, b in enumerate(self.buckets):
            for p in b.params:
                self._bucket_of[p] = n
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._reset_passes()

    def _flatten_buckets(self) -> None:
        """Every parameter and its gradient become views into their bucket's flat (padded) buffers: backward
        accumulates straight into what is reduce-scattered, this rank's slice of the parameter buffer is the
        tensor the wrapped optimizer steps in place, and the all-gather lands in one copy."""
        self._flat_params: list[torch.Tensor] = []
        self._flat_grads: list[torch.Tensor] = []
        self._shards: list[nn.Parameter] = []
        self._addresses: list[list[tuple[int, int]]] = []  # per bucket: each parameter's and gradient's data_ptr
        with torch.no_grad():
            for b in self.buckets:
                like = b.params[0]
                flat = torch.zeros(b.padded, dtype=like.dtype, device=like.device)
                grads = torch.zeros(b.padded, dtype=like.dtype, device=like.device)
                for p, off in zip(b.params, b.offsets):
                    flat[off : off + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = flat[off : off + p.numel()].view_as(p)
                    if p.grad is not None:
                        grads[off : off + p.numel()].copy_(p.grad.reshape(-1))
                    p.grad = grads[off : off + p.numel()].view_as(p)
                self._addresses.append([(p.data_ptr(), p.grad.data_ptr()) for p in b.params])
                lo = self.shard_rank * b.shard
                self._flat_params.append(flat)
                self._flat_grads.append(grads)
                self._shards.append(nn.Parameter(flat[lo : lo + b.shard], requires_grad=False))

    # ------------------------------------------------------------------------------------------ step
    def _settings(self, group: int) -> dict[str, Any]:
        return {k: v for k, v in self.param_groups[group].items() if k != "params"}

    def _reset_passes(self) -> None:
        self._passes = {p: 0 for b in self.buckets for p in b.params}
        self._complete = [0] * len(self.buckets)
        self._handles: list[Optional[tuple]] = [None] * len(self.buckets)

    def _on_grad(self, p: torch.Tensor) -> None:
        """A parameter's gradient was accumulated: after its last pass, reduce-scatter its bucket if complete."""
        self._passes[p] += 1
        if self._passes[p] > self._passes_per_step:
            raise RuntimeError(
                f"gradients were computed more than backward_passes_per_step={self._passes_per_step} times before "
                "step(): raise backward_passes_per_step, or call step() after that many backward passes"
            )
        if self._passes[p] == self._passes_per_step:
            n = self._bucket_of[p]
            self._complete[n] += 1
            if self._complete[n] == len(self.buckets[n].params):
                self._launch(n)

    def _launch(self, n: int) -> None:
        b, grads = self.buckets[n], self._flat_grads[n]
        for p, off, (_, address) in zip(b.params, b.offsets, self._addresses[n]):
            if p.grad is not None and p.grad.data_ptr() == address:
                continue  # accumulated in place, as laid out
            view = grads[off : off + p.numel()]
            if p.grad is None:  # as DistributedOptimizer: a parameter without a gradient counts as zeros
                view.zero_()
            else:  # set from outside (model.zero_grad(), a user): take it in
                view.copy_(p.grad.reshape(-1))
            p.grad = view.view_as(p)
        if self.world_size == 1:  # the slice is the whole bucket: nothing to reduce
            self._handles[n] = (None, None, grads)
            return
        sent, ctx = self._compression.compress(grads)
        handle = hvd.reducescatter_async(
            sent, name=f"{self._name}.grad.{n}", op=hvd.Average, process_set=self._process_set
        )
        self._handles[n] = (handle, ctx, sent)

    def _check_views(self) -> None:
        for b, addresses in zip(self.buckets, self._addresses):
            for p, (address, _) in zip(b.params, addresses):
                if p.data_ptr() != address:
                    raise RuntimeError(
                        "a parameter was replaced after the sharded optimizer was created (model.to(), "
                        "load_state_dict(assign=True)...): create the optimizer after the model is in place"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_views()
        for n in range(len(self.buckets)):
            if self._handles[n] is None:  # parameters that got no gradient in this step's passes
                self._launch(n)
        for n, shard in enumerate(self._shards):
            handle, ctx, sent = self._handles[n]
            if handle is None:
                shard.grad = sent
            else:
                shard.grad = self._compression.decompress(hvd.synchronize(handle), ctx).to(shard.dtype)
        for g, group in zip(self._members, self.optimizer.param_groups):
            group.update(self._settings(g))
        self.optimizer.step()  # in place: this rank's slice of every parameter
        gathers = (
            []
            if self.world_size == 1
            else [
                hvd.allgather_async(shard.detach(), name=f"{self._name}.param.{n}", process_set=self._process_set)
                for n, shard in enumerate(self._shards)
            ]
        )
        for flat, handle in zip(self._flat_params, gathers):
            flat.copy_(hvd.synchronize(handle))
        for shard in self._shards:
            shard.grad = None
        self._reset_passes()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients stay views into the buckets (zeroed in place, whatever set_to_none says); a parameter of no
        bucket (frozen) follows set_to_none."""
        if any(h is not None for h in self._handles):
            raise RuntimeError(
                "zero_grad() was called after backward() but before step(): the reduce-scatter of those gradients "
                "is under way; call step() first"
            )
        self._reset_passes()
        for grads in self._flat_grads:
            grads.zero_()
        bucketed = set(self._bucket_of)
        for group in self.param_groups:
            for p in group["params"]:
                if p not in bucketed and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._ready:
            raise ConfigError("the sharded optimizer's parameters are laid out once: pass every group at creation")
        super().add_param_group(param_group)

    # -------------------------------------------------------------------------------------- state
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (its slices' state only)."""
        return state_bytes(self.optimizer)

    def state_dict(self, root_rank: Optional[int] = None) -> Optional[dict[str, Any]]:
        """Collective: the consolidated state in torch's unsharded format (indices in the optimizer's order).
        With root_rank, only that rank keeps it (the others return None and hold one bucket at a time)."""
        keep = root_rank is None or hvd.rank() == root_rank
        every_keys = [sorted(self.optimizer.state.get(shard, {})) for shard in self._shards]
        # Agreed first: a rank whose state differs (loaded on one rank only) would leave the others waiting.
        digest = int.from_bytes(hashlib.sha256(repr(every_keys).encode()).digest()[:7], "big")
        digests = hvd.allgather(torch.tensor([digest]), name=f"{self._name}.keys", process_set=self._process_set)
        if (digests != digest).any():
            raise RuntimeError(
                "the ranks' sharded optimizer states differ (e.g. load_state_dict was called on some ranks only): "
                "call load_state_dict on every rank with the same dict"
            )
        state: dict[int, dict[str, Any]] = {}
        for n, (b, shard, keys) in enumerate(zip(self.buckets, self._shards, every_keys)):
            local = self.optimizer.state.get(shard, {})
            flat_keys = [k for k in keys if torch.is_tensor(local[k]) and local[k].dim() == 1]
            fulls = {}
            if flat_keys:
                handles = [
                    hvd.allgather_async(
                        local[k].detach(), name=f"{self._name}.state.{n}.{k}", process_set=self._process_set
                    )
                    for k in flat_keys
                ]
                fulls = {k: hvd.synchronize(h) for k, h in zip(flat_keys, handles)}
            if not keep or not keys:
                continue
            for p, i, off in zip(b.params, b.indices, b.offsets):
                entry = {}
                for k in keys:
                    if k in fulls:
                        entry[k] = fulls[k][off : off + p.numel()].view_as(p).clone()
                    else:
                        v = local[k]
                        entry[k] = v.clone() if torch.is_tensor(v) else v
                state[i] = entry
        if not keep:
            return None
        groups, index = [], 0
        for group in self.param_groups:
            groups.append({**self._settings(len(groups)), "params": list(range(index, index + len(group["params"])))})
            index += len(group["params"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take a consolidated (unsharded-format) state: the groups' settings, and this rank's slices of every
        parameter's state. Needs no collective, and any world size may have written it; call it on every rank
        with the same dict (each keeps a different part of it)."""
        saved_groups = state_dict["param_groups"]
        self._check_groups(saved_groups)
        order = [i for s in saved_groups for i in s["params"]]  # saved keys, in this optimizer's order
        saved_state = {pos: state_dict["state"][key] for pos, key in enumerate(order) if key in state_dict["state"]}
        self._load(saved_groups, zero_files.Pieces.of_state(saved_state))

    def shard_file(self) -> dict[str, Any]:
        """This rank's own state as its file of a sharded checkpoint (parallel.zero_files): the live tensors of
        its slices, nothing gathered, nothing copied. Not collective."""
        return zero_files.payload(self.buckets, [self.optimizer.state.get(shard, {}) for shard in self._shards])

    def file_settings(self) -> dict[str, Any]:
        """What a sharded checkpoint keeps beside the ranks' files: the groups' settings (torch's param_groups)
        and every parameter's shape, in the optimizer's order (what consolidating the files needs)."""
        groups, index = [], 0
        for group in self.param_groups:
            groups.append({**self._settings(len(groups)), "params": list(range(index, index + len(group["params"])))})
            index += len(group["params"])
        return {"param_groups": groups, "shapes": [list(p.shape) for g in self.param_groups for p in g["params"]]}

    def load_files(self, param_groups: list[dict[str, Any]], paths: list) -> None:
        """Take this rank's slices from the files of a sharded checkpoint written by any number of ranks (each
        rank reads only the elements of its own slices: the files are mapped), and the groups' settings. Not
        collective; every rank calls it with the same files."""
        self._check_groups(param_groups)
        self._load(param_groups, zero_files.Pieces.of_files(paths))

    def _check_groups(self, saved_groups: list[dict[str, Any]]) -> None:
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "the optimizer state does not fit this model: "
                f"{[len(s['params']) for s in saved_groups]} parameters per group saved, "
                f"{[len(g['params']) for g in self.param_groups]} here"
            )

    def _load(self, saved_groups: list[dict[str, Any]], pieces: zero_files.Pieces) -> None:
        """The groups' settings, and this rank's slices of every parameter's state copied out of `pieces`."""
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        base_state = {}
        for n, (b, shard) in enumerate(zip(self.buckets, self._shards)):
            keys = pieces.keys(b.indices)
            if not keys:
                continue
            entry: dict[str, Any] = {}
            for k in keys:
                like = pieces.flat_like(b.indices, k)
                if like is None or (k in SCALAR_STATE and like.numel() == 1):
                    # A copy: optimizers count steps in place, and the state may be another optimizer's own.
                    entry[k] = pieces.scalar(b.indices, k)
                    continue
                flat = torch.zeros(b.shard, dtype=like.dtype, device=shard.device)
                for piece in b.pieces:
                    pieces.copy(
                        piece.index, piece.start, piece.end, k, flat[piece.at : piece.at + piece.end - piece.start]
                    )
                entry[k] = flat
            base_state[n] = entry
        base_groups = [{**self._settings(g), "params": ns} for g, ns in self._members.items()]
        # The wrapped optimizer's own load casts each entry as it expects (e.g. Adam keeps `step` a CPU float).
        self.optimizer.load_state_dict({"state": base_state, "param_groups": base_groups})
