"""The sharded optimizer (ZeRO stage 1) against Horovod's DistributedOptimizer: same base optimizer, same data,
same losses and parameters, on a model whose parameter count (77) no world size of 2, 3 or 4 divides, with
buckets small enough that there are several. Run on 2, 3 and 4 ranks."""

import os
import shutil
import tempfile

import pytest
import torch
from conftest import batches
from torch import nn

from hvdtrain.parallel import horovod
from hvdtrain.parallel.zero import ShardedOptimizer

pytestmark = pytest.mark.ranks([2, 3, 4])

STEPS = 20
SMALL_BUCKETS = 30 * 8 / 2**20  # about 30 float64 elements per bucket: 4 buckets


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2)).double()


OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}


def train(model, opt, data, passes=1):
    losses = []
    for x, y in data:
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(passes), y.chunk(passes)):
            loss = nn.functional.mse_loss(model(xs), ys) / passes
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(horovod.average_metrics({"loss": total}, 1, name="test.loss")["loss"])
    return losses


def reference(name, data, passes=1, compression="none"):
    cls, kwargs = OPTIMIZERS[name]
    model = make_model()
    opt = horovod.distributed_optimizer(
        cls(model.parameters(), **kwargs), model, compression=compression, backward_passes_per_step=passes
    )
    return model, opt, train(model, opt, data, passes)


def sharded(name, data, passes=1, compression="none", **extra):
    cls, kwargs = OPTIMIZERS[name]
    model = make_model()
    opt = ShardedOptimizer(
        cls, model, bucket_mb=SMALL_BUCKETS, backward_passes_per_step=passes, compression=compression,
        **kwargs, **extra,
    )  # fmt: skip
    return model, opt, train(model, opt, data, passes)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_states_equal(a, b):
    assert sorted(a["state"]) == sorted(b["state"])
    for i in a["state"]:
        assert sorted(a["state"][i]) == sorted(b["state"][i]), i
        for k, v in a["state"][i].items():
            torch.testing.assert_close(torch.as_tensor(v), torch.as_tensor(b["state"][i][k]), atol=1e-6, rtol=0)
    assert [{k: v for k, v in g.items() if k != "params"} for g in a["param_groups"]] == [
        {k: v for k, v in g.items() if k != "params"} for g in b["param_groups"]
    ]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sharded_equals_distributed_optimizer(hvd, name):
    data = batches(STEPS)
    ref_model, ref_opt, ref_losses = reference(name, data)
    model, opt, losses = sharded(name, data)
    assert len(opt.buckets) > 1 and sum(b.length for b in opt.buckets) == 77
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat(model), flat(ref_model), atol=1e-6, rtol=0)
    # The consolidated state is the unsharded optimizer's, in its format.
    assert_states_equal(opt.state_dict(), ref_opt.state_dict())


def test_state_is_a_slice_per_rank(hvd):
    _model, opt, _ = sharded("adam", batches(2))
    n = hvd.size()
    # Two moments per element of this rank's slices (77 elements padded per bucket to n x shard), one step
    # count per bucket.
    assert opt.state_bytes() == sum(2 * b.shard * 8 + 4 for b in opt.buckets)
    assert sum(b.shard for b in opt.buckets) * n < 77 + n * len(opt.buckets)


def test_gradient_accumulation_equals_distributed_optimizer(hvd):
    data = batches(5, per_rank=8)
    ref_model, _, ref_losses = reference("sgd-momentum", data, passes=2)
    model, _, losses = sharded("sgd-momentum", data, passes=2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat(model), flat(ref_model), atol=1e-6, rtol=0)


def test_fp16_compression_equals_distributed_optimizer(hvd):
    """The gradients travel in fp16 both ways; Horovod sums them in a different order for an allreduce than for
    a reduce-scatter once there are 3 ranks, so the two agree to fp16's precision, and both stay near fp32."""
    data = batches(5)
    ref_model, _, _ = reference("sgd-momentum", data, compression="fp16")
    model, _, _ = sharded("sgd-momentum", data, compression="fp16")
    exact_model, _, _ = reference("sgd-momentum", data)
    # Measured at np 3 and 4: 8e-5 from the fp16 allreduce, 1e-4 from fp32; equal at np 2.
    torch.testing.assert_close(flat(model), flat(ref_model), atol=1e-6 if hvd.size() == 2 else 5e-4, rtol=0)
    torch.testing.assert_close(flat(model), flat(exact_model), atol=5e-4, rtol=0)


def test_lr_changes_reach_the_sharded_steps(hvd):
    data = batches(6)
    cls, kwargs = OPTIMIZERS["sgd-momentum"]
    ref_model = make_model()
    ref = horovod.distributed_optimizer(cls(ref_model.parameters(), **kwargs), ref_model)
    model = make_model()
    opt = ShardedOptimizer(cls, model, bucket_mb=SMALL_BUCKETS, **kwargs)
    for o in (ref, opt):
        scheduler = torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        for x, y in data:
            o.zero_grad()
            nn.functional.mse_loss((ref_model if o is ref else model)(x), y).backward()
            o.step()
            scheduler.step()
    torch.testing.assert_close(flat(model), flat(ref_model), atol=1e-6, rtol=0)


@pytest.fixture
def shared_dir(hvd):
    """One directory every rank agrees on (rank 0 makes it; the ranks share this machine's file system)."""
    path = horovod.broadcast_object(tempfile.mkdtemp(prefix="hvdtrain-zero-") if hvd.rank() == 0 else None)
    yield path
    hvd.barrier()
    if hvd.rank() == 0:
        shutil.rmtree(path)


def test_round_trips_through_the_unsharded_format(hvd, shared_dir):
    path = os.path.join(shared_dir, "state.pt")
    data = batches(STEPS + 5)
    first, rest = data[:STEPS], data[STEPS:]
    # sharded(n) -> file -> unsharded: a plain torch optimizer loads it and holds the reference's state.
    model, opt, _ = sharded("adamw", first)
    saved = opt.state_dict(root_rank=0)
    if hvd.rank() == 0:
        torch.save(saved, path)
    else:
        assert saved is None
    hvd.barrier()
    ref_model, ref_opt, _ = reference("adamw", first)
    plain = torch.optim.AdamW(make_model().parameters(), **OPTIMIZERS["adamw"][1])
    plain.load_state_dict(torch.load(path))
    assert_states_equal(plain.state_dict(), ref_opt.state_dict())
    # unsharded -> sharded(n): a fresh sharded optimizer loads the reference's state and both go on equal.
    again_model = make_model()
    again_model.load_state_dict(ref_model.state_dict())
    again = ShardedOptimizer(torch.optim.AdamW, again_model, bucket_mb=1.0, **OPTIMIZERS["adamw"][1])
    again.load_state_dict(ref_opt.state_dict())
    assert_states_equal(again.state_dict(), ref_opt.state_dict())
    ref_losses, losses = train(ref_model, ref_opt, rest), train(again_model, again, rest)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat(again_model), flat(ref_model), atol=1e-6, rtol=0)


def test_sharded_n_to_sharded_one(hvd, shared_dir):
    """A state written by n ranks loads into one rank sharding alone (a process set of itself) and steps on
    exactly like the n-rank run would on that rank's data... which one rank alone sees as its whole batch: so
    compare with an unsharded single-rank optimizer loaded from the same file."""
    path = os.path.join(shared_dir, "state-n.pt")
    model, opt, _ = sharded("adam", batches(STEPS))
    saved = opt.state_dict(root_rank=0)
    if hvd.rank() == 0:
        torch.save({"model": model.state_dict(), "optimizer": saved}, path)
    hvd.barrier()
    sets = [hvd.add_process_set([r]) for r in range(hvd.size())]  # collective: every rank adds every set
    alone = sets[hvd.rank()]
    try:
        file = torch.load(path)
        data = batches(5, seed=7)
        one_model = make_model()
        one_model.load_state_dict(file["model"])
        one = ShardedOptimizer(torch.optim.Adam, one_model, process_set=alone, **OPTIMIZERS["adam"][1])
        assert one.world_size == 1 and len(one.buckets) == 1 and one.buckets[0].shard == 77
        one.load_state_dict(file["optimizer"])
        assert_states_equal(one.state_dict(), file["optimizer"])
        plain_model = make_model()
        plain_model.load_state_dict(file["model"])
        plain = torch.optim.Adam(plain_model.parameters(), **OPTIMIZERS["adam"][1])
        plain.load_state_dict(file["optimizer"])
        for (x, y), o, m in [(xy, o, m) for xy in data for o, m in ((one, one_model), (plain, plain_model))]:
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
        torch.testing.assert_close(flat(one_model), flat(plain_model), atol=1e-6, rtol=0)
    finally:
        hvd.barrier()
        for s in sets:
            hvd.remove_process_set(s)


def test_state_of_a_large_model_is_one_nth_per_rank(hvd):
    """10.4 M float32 parameters, Adam: the unsharded state is two copies of them (83.6 MB on every rank); each
    sharded rank holds 1/n of it, plus its padding (< n elements per bucket) and one step count per bucket."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 1001))
    total = sum(p.numel() for p in model.parameters())
    assert total > 10_000_000
    opt = ShardedOptimizer(torch.optim.Adam, model, lr=1e-3)
    nn.functional.cross_entropy(model(torch.randn(4, 2048)), torch.randint(0, 1001, (4,))).backward()
    opt.step()
    unsharded = 2 * total * 4 + 4 * len(list(model.parameters()))
    n = hvd.size()
    assert unsharded / n <= opt.state_bytes() < unsharded / n * 1.001
    # Every rank holds the same share.
    shares = horovod.allgather_object(opt.state_bytes(), name="test.shares")
    assert max(shares) == min(shares)


def test_unused_parameters_and_model_zero_grad_as_with_distributed_optimizer(hvd):
    """A layer that gets no gradient counts as zeros (weight decay still moves it, as under DistributedOptimizer),
    and gradients dropped by model.zero_grad() (set to None) are taken in again."""

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.spare = make_model(), nn.Linear(3, 3).double()

        def forward(self, x):
            return self.body(x)

    data = batches(6)
    cls, kwargs = OPTIMIZERS["sgd-momentum"]
    models, losses = [], []
    for wrap in ("reference", "sharded"):
        torch.manual_seed(0)
        model = WithSpare()
        if wrap == "reference":
            opt = horovod.distributed_optimizer(cls(model.parameters(), **kwargs), model)
        else:
            opt = ShardedOptimizer(cls, model, bucket_mb=SMALL_BUCKETS, **kwargs)
        run = []
        for x, y in data:
            model.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            run.append(loss.item())
        models.append(model)
        losses.append(run)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat(models[1]), flat(models[0]), atol=1e-6, rtol=0)


def test_a_parameter_replaced_after_creation_is_reported(hvd):
    model = make_model()
    opt = ShardedOptimizer(torch.optim.SGD, model, lr=0.1)
    model.float()  # new parameter tensors: the optimizer's views no longer hold them
    with pytest.raises(RuntimeError, match="create the optimizer after the model is in place"):
        opt.step()


def test_each_rank_writes_its_own_state_and_any_world_reads_its_slices(hvd, shared_dir):
    """A sharded checkpoint's files (parallel.zero_files): each rank's holds its own state only (1/n of it, nothing
    gathered); merged they are the consolidated state; a sharded optimizer of n - 1 ranks, and of one, takes its
    slices from them and holds exactly the consolidated state."""
    from hvdtrain.parallel import zero_files

    model, opt, _ = sharded("adam", batches(STEPS))
    own = opt.shard_file()
    path = os.path.join(shared_dir, f"optimizer.{hvd.rank()}.pt")
    torch.save(own, path)
    files = [os.path.join(shared_dir, f"optimizer.{r}.pt") for r in range(hvd.size())]
    written = sum(v.numel() * v.element_size() for b in own["buckets"] for v in b["state"].values() if v.dim() == 1)
    assert written == sum(  # its slices' moments, nothing else
        v.numel() * v.element_size() for s in opt.optimizer.state.values() for v in s.values() if v.dim() == 1
    )
    whole = opt.state_dict()  # gathered on every rank: the reference
    moments = sum(v.numel() * v.element_size() for e in whole["state"].values() for k, v in e.items() if k != "step")
    padding = 2 * 8 * hvd.size() * len(opt.buckets)  # two float64 moments, under n padded elements per bucket
    assert written * hvd.size() <= moments + padding  # 1/n of the whole
    hvd.barrier()
    settings = opt.file_settings()
    merged = zero_files.consolidate(zero_files.Pieces.of_files(files), settings["shapes"], settings["param_groups"])
    assert_states_equal(merged, whole)
    sets = [hvd.add_process_set([r]) for r in range(hvd.size())]  # collective: every rank adds every set
    fewer = hvd.add_process_set(list(range(hvd.size() - 1))) if hvd.size() > 2 else None  # (of 2: that is [0])
    mine = [sets[hvd.rank()]] + ([fewer] if fewer is not None and fewer.included() else [])
    try:
        for group in mine:
            again_model = make_model()
            again_model.load_state_dict(model.state_dict())
            again = ShardedOptimizer(torch.optim.Adam, again_model, bucket_mb=SMALL_BUCKETS, process_set=group,
                                     **OPTIMIZERS["adam"][1])  # fmt: skip
            again.load_files(settings["param_groups"], files)
            assert_states_equal(again.state_dict(), whole)
    finally:
        hvd.barrier()
        for s in [*sets, *([fewer] if fewer is not None else [])]:
            hvd.remove_process_set(s)
