"""The pipeline across ranks (parallel.pipe) on real ranks and real MPI messages: one batch through 2 or 3 stages
(np 2, np 3: one replica) in both schedules and M in {1, 2, 4, 8} gives the unsplit model's outputs, loss and
every parameter's gradient on one process (1e-6); 10 optimizer steps give its parameters and optimizer state, and
a checkpoint gathered from the stages is the unsplit model's. At np 4, 2 stages x 2 replicas (each stage's
gradients averaged by Horovod's DistributedOptimizer on that stage's process set) equal data parallelism on 2
ranks, that is one process on the concatenated batch; and 4 stages. 1F1B keeps at most P micro-batches'
activations per stage (measured by what autograd saves), GPipe all M."""

import pytest
import torch
from torch import nn

from hvdtrain.parallel import horovod, pipe
from hvdtrain.parallel.grid import Grid

pytestmark = pytest.mark.ranks([2, 3, 4])

BATCH = 22  # micro-batches of unequal sizes (22 / 4: 6, 6, 5, 5): each weighs its share of the batch's mean
SHAPE = (3, 4)


@pytest.fixture(scope="module")
def comm(hvd):
    from mpi4py import MPI

    return MPI.COMM_WORLD.Dup()  # left to MPI_Finalize, as the Trainer's (not freed while Horovod runs)


def layouts(size):
    """The stage counts this world size can run: every replica a pipeline of at least 2 stages."""
    return [p for p in (2, 3, 4) if p <= size and size % p == 0]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 8), nn.Tanh(),
        nn.Linear(8, 5), nn.Linear(5, 3),
    ).double()  # fmt: skip


def global_batch(grid, step):
    g = torch.Generator().manual_seed(100 + step)
    n = BATCH * grid.replicas
    return torch.randn(n, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def replica_batch(grid, rank, step):
    x, y = global_batch(grid, step)
    r = grid.replica_of(rank)
    return x[r * BATCH : (r + 1) * BATCH], y[r * BATCH : (r + 1) * BATCH]


def run_pass(stage, x, y, scale=1.0):
    return stage.train_pass(
        len(x), x if stage.first else None, y if stage.last else None, nn.functional.cross_entropy, scale
    )


@pytest.mark.parametrize("kind", pipe.SCHEDULES)
@pytest.mark.parametrize("micro", [1, 2, 4, 8])
def test_one_batch_gives_the_unsplit_models_outputs_loss_and_gradients(comm, kind, micro):
    for stages in layouts(comm.size):
        grid = Grid(comm.size, stages)
        stage = pipe.Stage.build(make_model(), grid, comm, SHAPE, torch.float64, schedule=kind, micro_batches=micro)
        x, y = replica_batch(grid, comm.rank, 0)
        loss_sum, n = run_pass(stage, x, y)
        ref = make_model()
        out = ref(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        if stage.last:
            assert n == BATCH and loss_sum / n == pytest.approx(loss.item(), abs=1e-6)
        else:
            assert (loss_sum, n) == (0.0, 0)
        grads = dict(ref.named_parameters())
        names = [name for name, _ in stage.named_parameters()]
        assert names and set(names) <= set(grads)
        for name, p in stage.named_parameters():
            assert torch.allclose(p.grad, grads[name].grad, atol=1e-6, rtol=0), (stages, name)
        evaluated = stage.forward_only(BATCH, x if stage.first else None)
        stage.flush()
        if stage.last:
            assert torch.allclose(evaluated, out.detach(), atol=1e-6, rtol=0)
        comm.Barrier()


def train(comm, hvd, grid, kind, micro, steps=10):
    """`steps` SGD steps (momentum, weight decay) of every replica's pipeline on its share of the global batches;
    each stage's gradients averaged over its replicas by the DistributedOptimizer on the stage's process set."""
    stage = pipe.Stage.build(make_model(), grid, comm, SHAPE, torch.float64, schedule=kind, micro_batches=micro)
    opt = torch.optim.SGD(stage.module.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sets = []
    if grid.replicas > 1:
        sets = [hvd.add_process_set(ranks) for ranks in grid.stage_sets()]
        opt = horovod.distributed_optimizer(
            opt, stage.module, process_set=sets[stage.index], named_parameters=stage.named_parameters()
        )
    try:
        for step in range(steps):
            x, y = replica_batch(grid, comm.rank, step)
            opt.zero_grad()
            if sets:  # every micro-batch's backward adds to the gradients: allreduce after the last
                opt.set_backward_passes_per_step(stage.micro_count(len(x)))
            run_pass(stage, x, y)
            opt.step()
    finally:
        for s in sets:
            hvd.remove_process_set(s)
    return stage, opt


def reference(grid, steps=10):
    """One process, the unsplit model, the whole global batch per step (mean loss): data parallelism's result."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(steps):
        x, y = global_batch(grid, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", pipe.SCHEDULES)
@pytest.mark.parametrize("micro", [1, 4])
def test_ten_steps_and_the_gathered_checkpoint_equal_data_parallelism(comm, hvd, kind, micro):
    for stages in layouts(comm.size):
        grid = Grid(comm.size, stages)
        stage, opt = train(comm, hvd, grid, kind, micro)
        ref, ref_opt = reference(grid)
        params = dict(ref.named_parameters())
        for name, p in stage.named_parameters():
            assert torch.allclose(p, params[name], atol=1e-6, rtol=0), (stages, name)
        parts = stage.gather((stage.module.state_dict(), opt.state_dict()))
        if comm.rank == 0:
            model = pipe.whole_model_state([(b[0], m) for b, (m, _) in zip(stage.bounds, parts)])
            assert model.keys() == ref.state_dict().keys()
            for k, v in ref.state_dict().items():
                assert torch.allclose(model[k], v, atol=1e-6, rtol=0)
            state = pipe.whole_optimizer_state([(b[2], o) for b, (_, o) in zip(stage.bounds, parts)])
            expected = ref_opt.state_dict()
            assert state["param_groups"] == expected["param_groups"]
            for i, entry in expected["state"].items():
                assert torch.allclose(state["state"][i]["momentum_buffer"], entry["momentum_buffer"], atol=1e-6)
            parts = [
                (pipe.stage_model_state(ref.state_dict(), b[0], b[1]),
                 pipe.stage_optimizer_state(expected, b[2], b[3]))
                for b in stage.bounds
            ]  # fmt: skip
        else:
            assert parts is None
        mine = stage.scatter(parts)  # a resume: replica 0's stages get their parts of the unsplit state
        if grid.replica_of(comm.rank) == 0:
            for k, v in mine[0].items():
                assert torch.allclose(v, stage.module.state_dict()[k], atol=1e-6, rtol=0)
        else:
            assert mine is None
        comm.Barrier()


def test_1f1b_holds_at_most_p_micro_batches_of_activations_and_gpipe_all(comm):
    micro = 8
    for stages in layouts(comm.size):
        grid = Grid(comm.size, stages)
        peaks = {}
        for kind in pipe.SCHEDULES:
            stage = pipe.Stage.build(make_model(), grid, comm, SHAPE, torch.float64, schedule=kind, micro_batches=micro)
            x, y = replica_batch(grid, comm.rank, 0)
            run_pass(stage, x, y)
            peaks[kind] = (stage.meter.peak_micro, stage.meter.peak_bytes)
        s = grid.stage_of(comm.rank)
        assert peaks["gpipe"][0] == micro
        assert peaks["1f1b"][0] == min(stages - s, micro) <= stages
        assert 0 < peaks["1f1b"][1] < peaks["gpipe"][1]
        # the bytes scale with the micro-batches held (of 3 or 2 samples each here)
        assert peaks["1f1b"][1] <= peaks["gpipe"][1] * peaks["1f1b"][0] / micro * 1.5
        comm.Barrier()
