"""Update rules: how one step's local gradients become new parameters on every rank.

The Trainer runs forward and backward passes and then calls `rule.step(state)`; everything distributed about
the update lives behind this seam, so a new rule (a sharded optimizer, periodic model averaging, parameter
servers) is one new class here rather than another branch in the loop:

    sync       Horovod's DistributedOptimizer: gradients ring-allreduced (average or Adasum) during backward,
               then every rank takes the same optimizer step.
    sharded    the same update with the optimizer state partitioned (ZeRO stage 1, parallel/zero.py): gradients
               reduce-scattered during backward, each rank steps its slice, the slices all-gathered.
    local-sgd  own optimizer steps, the parameters averaged every H steps (parallel/local_sgd.py).
    async      parameter servers (parallel/ps.py): workers push gradients and pull parameters; the servers step.

A rank pipeline's stages step with train.placement.PipelineUpdate, beside the placement that chooses it.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from hvdtrain import progress
from hvdtrain.config import TrainConfig
from hvdtrain.parallel import horovod
from hvdtrain.train.state import TrainState


def optimizer_spec(cfg: TrainConfig, lr: float) -> tuple[type, dict[str, Any]]:
    """The torch optimizer class named by cfg.optimizer and its settings."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {"lr": lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls, {"lr": lr, "weight_decay": cfg.weight_decay}


def base_optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    """The local optimizer named by cfg.optimizer, before any distributed wrapping."""
    cls, kwargs = optimizer_spec(cfg, lr)
    return cls(params, **kwargs)


class UpdateRule:
    """The interface; subclasses override what differs."""

    name = "base"
    serves = False  # True on the ranks that do not train but serve the others (async's parameter servers)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def learning_rate(self) -> float:
        """The learning rate the optimizer runs with (after any scaling with the world size)."""
        return self.cfg.lr

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer the loop calls zero_grad/step on, and whose state_dict a checkpoint holds."""
        return base_optimizer(self.cfg, model.parameters(), lr)

    def step(self, state: TrainState) -> None:
        """Turn the gradients of the passes just run into new parameters."""
        state.optimizer.step()

    def restore(self, state: TrainState, saved: Optional[dict[str, Any]]) -> None:
        """Every rank: the model and optimizer of a checkpoint that rank 0 read (`saved`; None on the others)."""
        if saved is not None:
            state.load_weights(saved)
        horovod.broadcast_state(state.model, state.optimizer)

    def optimizer_state(self, optimizer: torch.optim.Optimizer, root_rank: int) -> Optional[dict[str, Any]]:
        """Called on every rank when a checkpoint is written: the optimizer state root_rank will save (None
        elsewhere is allowed). Collective for rules whose state is spread over the ranks."""
        return optimizer.state_dict()

    def checkpoint_entries(self, state: TrainState, root_rank: int) -> Optional[dict[str, Any]]:
        """Called on every rank when a checkpoint is written: its "model", "optimizer" and "update" entries (and
        any the rule adds) as root_rank will save them (None elsewhere is allowed). Collective where the rule's
        state is spread over the ranks."""
        return {
            "model": state.model.state_dict(),
            "optimizer": self.optimizer_state(state.optimizer, root_rank),
            "update": self.state_dict(),
        }

    def shard_file(self, state: TrainState) -> Optional[dict[str, Any]]:
        """Called on every rank when a checkpoint is written: this rank's own part of the optimizer state, which
        it writes itself, in parallel with the others (a sharded checkpoint); None: rank 0 writes it all."""
        return None

    def eval_model(self, state: TrainState) -> nn.Module:
        """The model to evaluate (every rank calls it; collective where the ranks' models differ)."""
        return state.model

    def broadcast(self, state: TrainState) -> None:
        """Every rank, at a fresh start (no checkpoint): the starting parameters made equal where they must be."""
        horovod.broadcast_state(state.model, None)

    def model_state(self, state: TrainState) -> Optional[dict[str, Any]]:
        """The whole model's state_dict as root (global rank 0) sees it: what result.json's fingerprint hashes.
        Collective where the model is spread over the ranks (None elsewhere is allowed)."""
        return state.model.state_dict()

    def start(self, state: TrainState) -> None:
        """After every rank holds the starting state (fresh or resumed), before the first step."""

    def finish(self, state: TrainState) -> None:
        """After the last training step, before the final evaluation and checkpoint (every rank)."""

    def close(self) -> None:
        """At the very end of fit(), after the hooks' on_fit_end (every rank)."""

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state for a checkpoint (e.g. a schedule position); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SyncUpdate(UpdateRule):
    """Synchronous data parallelism: w <- w - lr * mean_i grad_i, the allreduce overlapped with backward."""

    name = "sync"

    def learning_rate(self) -> float:
        # Linear lr scaling with the effective batch; Adasum adapts by itself and needs none.
        cfg = self.cfg
        return horovod.scaled_lr(cfg.lr, cfg.scale_lr and cfg.reduce_op == "average", cfg.backward_passes_per_step)

    def __init__(self, cfg: TrainConfig, builtin_model: bool = True):
        super().__init__(cfg)
        self.builtin_model = builtin_model

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg
        return horovod.distributed_optimizer(
            super().make_optimizer(model, lr), model, cfg.compression, cfg.backward_passes_per_step, cfg.reduce_op,
            groups=self.grad_groups(model),
        )  # fmt: skip

    def step(self, state: TrainState) -> None:
        """Horovod's optimizer step in its two parts, so that a rank's progress tells waiting from working: the
        gradients' allreduce waited for (the phase the trainer set: allreduce), then the local step (optimizer)."""
        optimizer = state.optimizer
        if not (hasattr(optimizer, "synchronize") and hasattr(optimizer, "skip_synchronize")):
            optimizer.step()
            return
        optimizer.synchronize()
        progress.set_phase("optimizer")
        with optimizer.skip_synchronize():
            optimizer.step()

    def grad_groups(self, model: nn.Module) -> int:
        """--grad-groups, or its default: one grouped allreduce per step for a built-in model on CPU ranks (their
        cores all compute, so reducing while the backward runs overlaps nothing, and every gradient reduced on its
        own costs Horovod's per-tensor work: docs/performance.md), averaged. Otherwise Horovod's own default, each
        gradient as soon as it is ready: a user's model may leave a parameter without a gradient on some rank, where
        a group would wait for it, and on GPUs reducing during the backward overlaps. Never in an elastic job: Horovod's
        groups agree on their order when the optimizer is made, which a worker that joins later would redo alone."""
        from hvdtrain.parallel import elastic

        cfg = self.cfg
        if cfg.grad_groups is not None:
            return cfg.grad_groups
        cpu = all(p.device.type == "cpu" for p in model.parameters())
        return 1 if self.builtin_model and cpu and cfg.reduce_op == "average" and not elastic.enabled() else 0


class ShardedUpdate(SyncUpdate):
    """The synchronous update with the optimizer state partitioned over the ranks (ZeRO stage 1): the same
    arithmetic as SyncUpdate, 1/N of its optimizer state per rank."""

    name = "sharded"

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        from hvdtrain.parallel.zero import ShardedOptimizer

        cfg = self.cfg
        cls, kwargs = optimizer_spec(cfg, lr)
        return ShardedOptimizer(
            cls, model, compression=cfg.compression, backward_passes_per_step=cfg.backward_passes_per_step, **kwargs
        )

    def restore(self, state: TrainState, saved: Optional[dict[str, Any]]) -> None:
        # A sharded checkpoint (written by any number of ranks): every rank reads its own slices from the ranks'
        # files, nobody the whole. Else every rank takes its slices of the whole state rank 0 read.
        if saved is not None:
            state.model.load_state_dict(saved["model"])
        horovod.broadcast_state(state.model, None)
        optimizer = saved and saved["optimizer"]
        files = horovod.broadcast_object(
            optimizer and "files" in optimizer and (optimizer["param_groups"], optimizer["files"]),
            name="hvdtrain.optimizer_files",
        )
        if files:
            state.optimizer.load_files(*files)
            return
        whole = horovod.broadcast_object(optimizer, name="hvdtrain.optimizer_state")
        state.optimizer.load_state_dict(whole)

    def checkpoint_entries(self, state: TrainState, root_rank: int) -> Optional[dict[str, Any]]:
        # Nothing gathered: each rank writes its own state (shard_file); rank 0 keeps the settings and shapes.
        if horovod.rank() != root_rank:
            return None
        settings = state.optimizer.file_settings()
        return {"model": state.model.state_dict(), "optimizer": {**settings, "sharded": horovod.size()},
                "update": self.state_dict()}  # fmt: skip

    def shard_file(self, state: TrainState) -> Optional[dict[str, Any]]:
        return state.optimizer.shard_file()


class LocalSGDUpdate(SyncUpdate):
    """Local SGD: each rank steps its own (plain, not distributed) optimizer; the parameters are averaged every
    H steps (parallel.local_sgd.LocalSGD). The learning rate is the synchronous rule's (scaled the same way): with
    H = 1 and plain SGD the two rules are the same update.

    Between averaging steps the ranks' models differ. Evaluation then uses the average (a copy: training goes on
    from each rank's own model); a checkpoint holds the average as "model" (what a sync job or inference loads)
    plus every rank's own model and optimizer state under "local", which a resume on the same number of ranks
    restores exactly. The last step of a run averages, so the final model is the same on every rank."""

    name = "local-sgd"
    _own_states = False  # restore() gave each rank its own saved state (not a broadcast one)

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        from hvdtrain.parallel.local_sgd import LocalSGD

        self.averager = LocalSGD(model, self.cfg.average_every, self.cfg.local_sgd_warmup)
        return base_optimizer(self.cfg, model.parameters(), lr)

    def step(self, state: TrainState) -> None:
        self.averager.step(state.optimizer)

    def checkpoint_entries(self, state: TrainState, root_rank: int) -> Optional[dict[str, Any]]:
        if self.averager.in_sync or horovod.size() == 1:
            return super().checkpoint_entries(state, root_rank)
        average = self.averager.averaged_state()
        own_optimizer = state.optimizer.state_dict()
        local = horovod.allgather_object((state.model.state_dict(), own_optimizer), name="hvdtrain.local_sgd.states")
        return {
            "model": average,
            "optimizer": own_optimizer,
            "update": self.state_dict(),
            "local": [{"model": m, "optimizer": o} for m, o in local],
        }

    def restore(self, state: TrainState, saved: Optional[dict[str, Any]]) -> None:
        # Every rank learns whether the checkpoint holds one state per rank of this world.
        local = horovod.broadcast_object(
            saved and len(saved.get("local") or []) == horovod.size() and saved["local"],
            name="hvdtrain.local_sgd.local",
        )
        self._own_states = bool(local)
        if not local:
            super().restore(state, saved)  # the average (and root's optimizer state) on every rank
            return
        state.load_weights(local[horovod.rank()])

    def eval_model(self, state: TrainState) -> nn.Module:
        if self.averager.in_sync or horovod.size() == 1:
            return state.model
        model = copy.deepcopy(state.model)
        model.load_state_dict(self.averager.averaged_state())
        return model

    def finish(self, state: TrainState) -> None:
        if not self.averager.in_sync:
            self.averager.average()

    def state_dict(self) -> dict[str, Any]:
        return {"local_sgd": self.averager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # After a broadcast (a resume from the average, an elastic reset) the ranks are equal; after a resume of
        # each rank's own state, as the schedule says.
        own, self._own_states = self._own_states, False
        if "local_sgd" in state:
            self.averager.load_state_dict(state["local_sgd"], in_sync=not own)


class AsyncUpdate(UpdateRule):
    """Asynchronous SGD on parameter servers (parallel.ps): the first N - P ranks are workers and run the
    Trainer's loop over Horovod's process set of the workers (their sampler shards, metric sums and checkpoints
    are the workers'); the last P ranks serve (`serves`), and the Trainer hands them to serve() instead.

    Learning rate: with S = 0 the servers step on the mean of the W workers' gradients, so the rate is the
    synchronous one (scaled by W); with S > 0 each gradient is a step of its own, W of them per round, so the
    rate is the one-rank rate (scaled only by backward passes): the same distance per round of W gradients."""

    name = "async"

    def __init__(self, cfg: TrainConfig, world_size: int, rank: int):
        super().__init__(cfg)
        from hvdtrain.parallel import ps

        self.staleness = cfg.max_staleness
        self.workers, self.servers = ps.roles(world_size, cfg.ps_ranks)
        self.serves = rank in self.servers
        self.global_rank = rank
        self._saved: Optional[dict[str, Any]] = None  # rank 0: the checkpoint it resumed from

    def learning_rate(self) -> float:
        # Computed from the roles, not horovod.size(): a server is outside the workers' group.
        cfg = self.cfg
        gradients = len(self.workers) if self.staleness == 0 else 1  # averaged into one step
        return cfg.lr * gradients * cfg.backward_passes_per_step if cfg.scale_lr else cfg.lr

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        from mpi4py import MPI

        from hvdtrain.parallel import ps

        self.comm = MPI.COMM_WORLD.Dup()  # every rank, servers too: the job's channel for the servers' messages
        params = list(model.parameters())
        self.layout = ps.Layout.of(params, len(self.servers))
        if self.serves:
            self.server = ps.Server(
                self.comm, self.layout, self.servers.index(self.global_rank), self.workers, self.staleness,
                lambda shard: base_optimizer(self.cfg, shard, lr), params[0].dtype, log=None,
            )  # fmt: skip
            return self.server.optimizer
        self.client = ps.Client(self.comm, self.layout, self.servers, params)
        # The workers' own optimizer only holds the settings and clears the gradients: the servers step.
        return base_optimizer(self.cfg, params, lr)

    def serve(self, log_path) -> dict[str, Any]:
        """A server's whole part in the job (until every worker is finished, then the job's last barrier);
        returns its counts."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            log.write("worker,clock,version_pulled,version_applied\n")
            self.server.log = log
            result = self.server.serve()
        horovod.barrier_all()
        return result

    def step(self, state: TrainState) -> None:
        self.client.step()

    def restore(self, state: TrainState, saved: Optional[dict[str, Any]]) -> None:
        # Rank 0 keeps the checkpoint's optimizer state for the servers (start); the workers take its model.
        if saved is not None:
            state.model.load_state_dict(saved["model"])
            self._saved = saved
        horovod.broadcast_state(state.model, None)

    def start(self, state: TrainState) -> None:
        # Rank 0 gives every server its shard first (a server takes nothing else before): the starting parameters
        # and, on a resume, the checkpoint's optimizer state and version.
        if horovod.rank() == 0:
            saved = self._saved or {}
            self.client.init_servers(saved.get("optimizer"), saved.get("update", {}).get("ps_versions"))
        self._saved = None

    def checkpoint_entries(self, state: TrainState, root_rank: int) -> Optional[dict[str, Any]]:
        if horovod.rank() != root_rank:
            return None
        flat, optimizer_state, versions = self.client.gather()
        model = {k: v.clone() for k, v in state.model.state_dict().items()}
        names = [name for name, _ in state.model.named_parameters()]
        for name, piece in zip(names, self.layout.pieces(flat)):
            model[name] = piece.clone()
        return {"model": model, "optimizer": optimizer_state, "update": {**self.state_dict(), "ps_versions": versions}}

    def eval_model(self, state: TrainState) -> nn.Module:
        self.client.pull()  # the servers' parameters now (with S > 0 they move on while the workers evaluate)
        return state.model

    def finish(self, state: TrainState) -> None:
        # Every worker's last gradient is applied once it has its reply; after the others are done too, every
        # worker pulls the same final parameters.
        self.client.done()
        horovod.PendingSum([0.0], name="hvdtrain.ps.finished").result()
        self.client.pull()

    def close(self) -> None:
        # The communicator is left to MPI_Finalize: freeing it while Horovod's background thread runs MPI calls
        # crashed Open MPI 4.1 (ompi_attr_delete_all) now and then. Then every rank, servers too, meets once more:
        # a rank that exits shuts Horovod (and MPI) down on all the others.
        self.client.bye()
        horovod.barrier_all()

    def state_dict(self) -> dict[str, Any]:
        return {"async": {"servers": len(self.servers), "max_staleness": self.staleness}}


def update_rule(cfg: TrainConfig, world_size: int = 1, rank: int = 0, builtin_model: bool = True) -> UpdateRule:
    """The rule for this configuration (an async job's also needs the job's world size and this rank; the
    synchronous rule, whether the model is one of train.models). A rank pipeline steps with its own rule
    (train.placement.PipelineUpdate), which its placement chooses."""
    if cfg.update == "local-sgd":
        return LocalSGDUpdate(cfg)
    if cfg.update == "async":
        return AsyncUpdate(cfg, world_size, rank)
    return ShardedUpdate(cfg) if cfg.shard_optimizer else SyncUpdate(cfg, builtin_model)
