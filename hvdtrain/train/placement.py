"""Placements: where a replica's parts live and what each rank does, chosen once per job (`choose`).

    data               the whole model on this rank's device; rank r of N reads shard r of N
    device pipeline    --strategy model/hybrid: one replica over this rank's k devices (parallel.pipeline.Pipeline),
                       the data as above
    rank pipeline      --strategy pipeline: a replica over P consecutive ranks, one stage each (parallel.pipe.Stage);
                       every stage of replica r reads shard r of N/P; its gradients are averaged over the stage's
                       replicas (a Horovod process set per stage: PipelineUpdate)
    parameter servers  --update async: the last P ranks serve parameter shards (parallel.ps) instead of training; the
                       workers are the data placement over Horovod's process set of the workers

The Trainer asks its placement instead of looking at the strategy: the process sets of hvd.init (process_sets),
which shard of the data this rank reads (replica), the model or stage it trains (place), the update rule that fits
(update_rule), a step's forward and backward passes (passes), the test split's sums (test_sums), the layout's words
(describe) and part of result.json (result), and whether this rank trains at all (trains; else serve).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from hvdtrain import progress
from hvdtrain.config import TrainConfig
from hvdtrain.parallel import horovod
from hvdtrain.train.state import TrainState
from hvdtrain.train.update import AsyncUpdate, SyncUpdate, UpdateRule, base_optimizer, update_rule


def choose(cfg: TrainConfig, ranks: int) -> Placement:
    """The placement of a job of `ranks` ranks (raises ConfigError when the ranks do not fit its layout)."""
    if cfg.strategy == "pipeline":
        return RankPipeline(cfg, ranks)
    if cfg.update == "async":
        return ParameterServers(cfg, ranks)
    if cfg.strategy in ("model", "hybrid"):
        return DevicePipeline(cfg)
    return Placement(cfg)


class Placement:
    """The data placement (--strategy data), and the interface: subclasses override what differs."""

    trains = True  # False on the ranks that serve the others instead (async's parameter servers)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.in_device = self.out_device = torch.device("cpu")  # where a batch's inputs and labels go (place)

    def process_sets(self) -> dict[str, Any]:
        """parallel.horovod.init's `group` and `parts` (the process sets every rank names alike); none here."""
        return {}

    def replica(self) -> tuple[int, int]:
        """This rank's data-parallel place, (index, count): it reads shard `index` of `count` of the data, and the
        steps, the learning rate and a checkpoint's world size follow `count`. Asked again after an elastic reset."""
        return horovod.rank(), horovod.size()

    def place(self, model: nn.Module, data) -> nn.Module:
        """This rank's part of `model` on its device(s): here all of it, on this rank's device."""
        self.in_device = self.out_device = horovod.device()
        return model.to(self.in_device)

    def update_rule(self, builtin_model: bool) -> UpdateRule:
        """The update rule this placement steps with (--update, --shard-optimizer: train.update.update_rule)."""
        global_rank, world_size = horovod.world()
        return update_rule(self.cfg, world_size=world_size, rank=global_rank, builtin_model=builtin_model)

    def passes(self, state: TrainState, group: list[torch.Tensor], x_all, y_all, loss_fn) -> tuple[float, int]:
        """The backward passes of one step over the batches of indices `group`: (loss sum, samples)."""
        loss_sum, samples = 0.0, 0
        for index in group:
            x, y = x_all[index], y_all[index]
            if self.in_device.type != "cpu" or self.out_device.type != "cpu":
                x, y = x.to(self.in_device, non_blocking=True), y.to(self.out_device, non_blocking=True)
            progress.set_phase("forward")
            loss = loss_fn(state.model(x), y)
            progress.set_phase("backward")
            # Accumulated gradients are summed: divide so the step sees the mean over the passes.
            (loss / len(group)).backward()
            loss_sum += loss.item() * len(index)
            samples += len(index)
        return loss_sum, samples

    def test_sums(self, model: nn.Module, x_all, y_all, mine: torch.Tensor, loss_fn) -> tuple[dict[str, float], int]:
        """This rank's sums of the test loss and of the correct answers over the test samples `mine`, and how many
        samples they count (no gradients: the caller runs under torch.no_grad)."""
        loss_sum, correct = 0.0, 0.0
        for chunk in mine.split(256):
            x, y = x_all[chunk].to(self.in_device), y_all[chunk].to(self.out_device)
            out = model(x)
            loss_sum += loss_fn(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
        return {"test_loss": loss_sum, "test_accuracy": correct}, len(mine)

    def describe(self, size: int) -> str:
        """The job's ranks in the words of the start line (`size`: the data-parallel width)."""
        return f"{size} rank(s)"

    def result(self) -> dict[str, Any]:
        """The layout's entries of result.json (every rank calls it; collective where they are gathered)."""
        return {}

    def serve(self, run_dir) -> dict[str, Any]:
        """What a rank that does not train does instead, until the others are done; its result."""
        raise NotImplementedError(f"{type(self).__name__} ranks all train")


class DevicePipeline(Placement):
    """--strategy model and hybrid: one replica split over this rank's k devices (cuda:local_rank*k+i, or k CPU
    stages), GPipe micro-batches within the rank (parallel.pipeline); across ranks it is the data placement."""

    def place(self, model: nn.Module, data) -> nn.Module:
        from hvdtrain.parallel.hybrid import devices_for_rank
        from hvdtrain.parallel.pipeline import Pipeline

        cfg = self.cfg
        devices = devices_for_rank(horovod.local_rank(), horovod.local_size(), cfg.devices_per_rank)
        pipeline = Pipeline(model, devices, balance=cfg.balance, micro_batches=cfg.micro_batches)
        self.in_device, self.out_device = pipeline.input_device, pipeline.output_device
        return pipeline


class ParameterServers(Placement):
    """--update async: the first N - P ranks are workers, the data placement over Horovod's process set of the
    workers (every collective of the loop runs over it: parallel.horovod); the last P ranks serve a parameter shard
    each (train.update.AsyncUpdate's servers) and never enter the loop."""

    def __init__(self, cfg: TrainConfig, ranks: int):
        from hvdtrain.parallel.ps import roles

        super().__init__(cfg)
        cfg.data_ranks(ranks)  # raises when the servers leave no worker
        self.workers, self.servers = roles(ranks, cfg.ps_ranks)
        self.rule: Optional[AsyncUpdate] = None

    @property
    def trains(self) -> bool:
        return horovod.world()[0] not in self.servers

    def process_sets(self) -> dict[str, Any]:
        return {"group": self.workers}

    def update_rule(self, builtin_model: bool) -> UpdateRule:
        global_rank, world_size = horovod.world()
        self.rule = AsyncUpdate(self.cfg, world_size, global_rank)
        return self.rule

    def describe(self, size: int) -> str:
        return f"{size} worker(s) and {len(self.servers)} parameter server(s), max staleness {self.cfg.max_staleness}"

    def serve(self, run_dir) -> dict[str, Any]:
        """Serve the workers until each is finished (no loop, no files but its log of updates)."""
        index = self.rule.server.index
        print(f"hvdtrain: async: this rank serves parameter shard {index} of {len(self.servers)}", flush=True)
        result = self.rule.serve(run_dir.ps_log(index))
        print(f"hvdtrain: async: server {index} applied {result['version']} updates", flush=True)
        return {"parameter_server": index, **result}


class RankPipeline(Placement):
    """--strategy pipeline: N ranks as N/P replicas of P stages (parallel.grid.Grid); this rank holds one stage
    (parallel.pipe.Stage). Its data-parallel place is its replica's: every stage of replica r reads shard r, and the
    steps, the learning rate and a checkpoint's world size follow the replicas. The first stage takes the inputs, the
    last the labels; the last alone has the loss and the outputs (the other stages add zeros to the sums)."""

    def __init__(self, cfg: TrainConfig, ranks: int):
        from hvdtrain.parallel.grid import Grid

        super().__init__(cfg)
        cfg.data_ranks(ranks)  # raises when the stages do not divide the ranks
        self.grid = Grid(ranks, cfg.stages)
        self.stage = None  # this rank's parallel.pipe.Stage (place)
        self.rule: Optional[PipelineUpdate] = None

    def process_sets(self) -> dict[str, Any]:
        return {"parts": self.grid.stage_sets()}

    def replica(self) -> tuple[int, int]:
        return self.grid.replica_of(horovod.rank()), self.grid.replicas

    def place(self, model: nn.Module, data) -> nn.Module:
        """This rank's stage of the model (the neighbours agree on the shapes between them)."""
        from mpi4py import MPI  # after hvd.init, which initialised MPI for threads

        from hvdtrain.parallel.pipe import Stage

        cfg, x = self.cfg, data.train.tensors[0]
        self.in_device = self.out_device = horovod.device()
        # A communicator of the pipeline's own; left to MPI_Finalize (freeing one while Horovod runs crashed MPI).
        self.stage = st = Stage.build(
            model, self.grid, MPI.COMM_WORLD.Dup(), x.shape[1:], x.dtype, cfg.balance, cfg.schedule,
            cfg.micro_batches, self.in_device,
        )  # fmt: skip
        first, layers = st.bounds[st.index][:2]
        print(
            f"hvdtrain: pipeline: this rank is {self.grid.role(st.rank)} (layers {first}-{first + layers - 1}; "
            f"{self.grid.stages} stages, {self.grid.replicas} replica(s))",
            flush=True,
        )
        return st.module

    def update_rule(self, builtin_model: bool) -> UpdateRule:
        self.rule = PipelineUpdate(self.cfg, self.stage)
        return self.rule

    def passes(self, state: TrainState, group: list[torch.Tensor], x_all, y_all, loss_fn) -> tuple[float, int]:
        """Each batch through the stages in the schedule's order (the first stage feeds the inputs, the last takes
        the labels and the loss). (loss sum, samples) on the last stage, zeros on the others."""
        st, loss_sum, samples = self.stage, 0.0, 0
        self.rule.expect_backwards(state, sum(st.micro_count(len(index)) for index in group))
        for index in group:
            x = x_all[index].to(self.in_device) if st.first else None
            y = y_all[index].to(self.out_device) if st.last else None
            loss, n = st.train_pass(len(index), x, y, loss_fn, 1 / len(group))
            loss_sum, samples = loss_sum + loss, samples + n
        return loss_sum, samples

    def test_sums(self, model: nn.Module, x_all, y_all, mine: torch.Tensor, loss_fn) -> tuple[dict[str, float], int]:
        """The replica's test samples through its stages; the last stage alone has outputs, and counts them."""
        st, loss_sum, correct = self.stage, 0.0, 0.0
        for chunk in mine.split(256):
            x, y = x_all[chunk].to(self.in_device), y_all[chunk].to(self.out_device)
            out = st.forward_only(len(chunk), x if st.first else None)
            if out is None:
                continue  # a stage before the last
            loss_sum += loss_fn(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
        st.flush()
        return {"test_loss": loss_sum, "test_accuracy": correct}, len(mine) if st.last else 0

    def describe(self, size: int) -> str:
        cfg = self.cfg
        return (f"{self.grid.ranks} rank(s) as {size} replica(s) of {self.grid.stages} pipeline stages "
                f"({cfg.schedule}, {cfg.micro_batches} micro-batch(es) per batch)")  # fmt: skip

    def result(self) -> dict[str, Any]:
        """The layout, and the most activation memory each stage held (of replica 0; collective)."""
        peaks = horovod.allgather_object(
            (self.stage.meter.peak_bytes, self.stage.meter.peak_micro), name="hvdtrain.pipeline_peaks"
        )
        return {
            "ranks": self.grid.ranks,
            "stages": self.grid.stages,
            "schedule": self.cfg.schedule,
            "micro_batches": self.cfg.micro_batches,
            "activation_peak_bytes": [b for b, _ in peaks[: self.grid.stages]],
            "micro_batches_in_flight_peak": [m for _, m in peaks[: self.grid.stages]],
        }


class PipelineUpdate(SyncUpdate):
    """The rank pipeline's update rule: each rank steps its stage's parameters, their gradients averaged over the
    replicas holding that stage (Horovod's DistributedOptimizer on the stage's process set; nothing to average
    with one replica). The same arithmetic as SyncUpdate on the unsplit model, stage by stage. Checkpoints gather
    replica 0's stages into one data-parallel checkpoint on global rank 0, and a resume cuts it back."""

    name = "sync"

    def __init__(self, cfg: TrainConfig, stage):
        super().__init__(cfg)
        self.stage = stage
        self.replicas = stage.grid.replicas

    def learning_rate(self) -> float:
        cfg = self.cfg  # scaled with the replicas, the data-parallel width (horovod.size() counts every stage)
        return cfg.lr * self.replicas * cfg.backward_passes_per_step if cfg.scale_lr else cfg.lr

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg
        optimizer = base_optimizer(cfg, model.parameters(), lr)
        if self.replicas == 1:
            return optimizer
        return horovod.distributed_optimizer(
            optimizer, model, cfg.compression, cfg.backward_passes_per_step, cfg.reduce_op,
            process_set=horovod.part(), named_parameters=self.stage.named_parameters(),
        )  # fmt: skip

    def expect_backwards(self, state: TrainState, count: int) -> None:
        """Before a step: its micro-batches' backwards, each of which adds to every gradient (the distributed
        optimizer allreduces a gradient after that many, where it would count backward passes)."""
        if self.replicas > 1:
            state.optimizer.set_backward_passes_per_step(count)

    def _from_replica_0(self, state: TrainState, optimizer: bool) -> None:
        if self.replicas > 1:
            root = self.stage.grid.rank_of(0, self.stage.index)
            horovod.broadcast_state(state.model, state.optimizer if optimizer else None, root, horovod.part())

    def broadcast(self, state: TrainState) -> None:
        self._from_replica_0(state, optimizer=False)

    def restore(self, state: TrainState, saved: Optional[dict[str, Any]]) -> None:
        from hvdtrain.parallel import pipe

        parts = None
        if saved is not None:
            parts = [
                (pipe.stage_model_state(saved["model"], layer, layers),
                 pipe.stage_optimizer_state(saved["optimizer"], param, params))
                for layer, layers, param, params in self.stage.bounds
            ]  # fmt: skip
        mine = self.stage.scatter(parts)
        if mine is not None:
            state.model.load_state_dict(mine[0])
            state.optimizer.load_state_dict(mine[1])
        self._from_replica_0(state, optimizer=True)

    def _gather(self, state: TrainState, optimizer: bool) -> Optional[tuple[dict[str, Any], Optional[dict[str, Any]]]]:
        from hvdtrain.parallel import pipe

        parts = self.stage.gather((state.model.state_dict(), state.optimizer.state_dict() if optimizer else None))
        if parts is None:
            return None
        bounds = self.stage.bounds
        model = pipe.whole_model_state([(b[0], m) for b, (m, _) in zip(bounds, parts)])
        if not optimizer:
            return model, None
        return model, pipe.whole_optimizer_state([(b[2], o) for b, (_, o) in zip(bounds, parts)])

    def checkpoint_entries(self, state: TrainState, root_rank: int) -> Optional[dict[str, Any]]:
        gathered = self._gather(state, optimizer=True)
        if gathered is None:
            return None
        return {"model": gathered[0], "optimizer": gathered[1], "update": self.state_dict()}

    def model_state(self, state: TrainState) -> Optional[dict[str, Any]]:
        gathered = self._gather(state, optimizer=False)
        return None if gathered is None else gathered[0]
