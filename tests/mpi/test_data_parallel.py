"""Data parallelism against single-process arithmetic: the distributed result must equal what one process
computes on the concatenated batch, from the same initialisation."""

import copy

import pytest
import torch
from torch import nn

from hvdtrain.parallel import horovod
from hvdtrain.parallel.pipeline import Pipeline
from hvdtrain.train import models

pytestmark = pytest.mark.ranks(2)


def make_model(seed=0):
    torch.manual_seed(seed)
    return models.mlp((1, 8, 8), 10, hidden=16).double()


def global_batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def reference_steps(model, batches, lr, momentum, steps):
    """One process, the full batch of every rank concatenated, plain torch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for x, y in batches[:steps]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _distributed_run(hvd, model, per_rank, steps, lr, momentum, compression="none", passes=1, groups=0):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    opt = horovod.distributed_optimizer(
        opt, model, compression=compression, backward_passes_per_step=passes, groups=groups
    )
    horovod.broadcast_state(model, opt)
    for x, y in per_rank[:steps]:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(passes), y.chunk(passes)):
            (nn.functional.cross_entropy(model(xs), ys) / passes).backward()
        opt.step()
    return model


@pytest.mark.parametrize("momentum,groups", [(0.0, 0), (0.9, 0), (0.9, 1), (0.9, 3), (0.9, 100)])
def test_data_parallel_equals_single_process_on_concatenated_batch(hvd, momentum, groups):
    """Each gradient reduced on its own (groups 0), in one grouped allreduce (1, the Trainer's default on CPU), in
    3 groups, and with more groups than parameters (one per parameter)."""
    b, steps = 8, 3
    n = hvd.size()
    data = [global_batch(b * n, seed=s) for s in range(steps)]
    mine = [(x[hvd.rank() * b : (hvd.rank() + 1) * b], y[hvd.rank() * b : (hvd.rank() + 1) * b]) for x, y in data]
    # Rank 0's weights are broadcast: start the other ranks from different ones to prove it.
    dist = _distributed_run(hvd, make_model(seed=hvd.rank()), mine, steps, 0.1, momentum, groups=groups)
    ref = reference_steps(make_model(seed=0), data, 0.1, momentum, steps)
    assert torch.allclose(params(dist), params(ref), atol=1e-6, rtol=0)


@pytest.mark.parametrize("groups", [0, 1])
def test_gradient_accumulation_equals_the_larger_batch(hvd, groups):
    b, passes = 8, 2
    n = hvd.size()
    x, y = global_batch(b * n)
    r = hvd.rank()
    dist = _distributed_run(
        hvd, make_model(), [(x[r * b : (r + 1) * b], y[r * b : (r + 1) * b])], 1, 0.1, 0.0, passes=passes,
        groups=groups,
    )  # fmt: skip
    ref = reference_steps(make_model(), [(x, y)], 0.1, 0.0, 1)
    assert torch.allclose(params(dist), params(ref), atol=1e-6, rtol=0)


def test_fp16_compression_stays_close(hvd):
    b = 8
    n = hvd.size()
    x, y = global_batch(b * n)
    r = hvd.rank()
    torch.manual_seed(0)
    model = models.mlp((1, 8, 8), 10, hidden=16)  # float32: fp16 compression casts gradients to half and back
    ref = copy.deepcopy(model).double()
    dist = _distributed_run(hvd, model, [(x[r * b : (r + 1) * b].float(), y[r * b : (r + 1) * b])], 1, 0.1, 0.0, "fp16")
    reference_steps(ref, [(x, y)], 0.1, 0.0, 1)
    assert torch.allclose(params(dist).double(), params(ref), atol=1e-3, rtol=0)
    assert not torch.equal(params(dist).double(), params(make_model()))  # it did move


def test_average_metrics_are_exact(hvd):
    # Rank r holds r + 1 samples with losses 1..r+1: the global mean is over all samples, not of rank means.
    r = hvd.rank()
    values = [float(v) for v in range(1, r + 2)]
    m = horovod.average_metrics({"loss": sum(values), "correct": float(r + 1)}, len(values), name="t_avg")
    every = [float(v) for k in range(hvd.size()) for v in range(1, k + 2)]
    assert m["loss"] == pytest.approx(sum(every) / len(every), abs=1e-12)
    assert m["correct"] == pytest.approx(sum(k + 1 for k in range(hvd.size())) / len(every), abs=1e-12)


def test_any_rank_agrees(hvd):
    assert horovod.any_rank(hvd.rank() == hvd.size() - 1, name="t_any1") is True
    assert horovod.any_rank(False, name="t_any2") is False


def test_uneven_batch_counts_finish_without_hanging(hvd):
    """Rank r has r + 2 batches. Ranks that run out wait in hvd.join(); Horovod's Average then still divides
    by the world size (joined ranks add zeros), which the reference replays; then all ranks take the
    parameters of the last rank to join."""
    b, n, r = 4, hvd.size(), hvd.rank()
    counts = [k + 2 for k in range(n)]
    batches = [global_batch(b * n, seed=100 + s) for s in range(max(counts))]
    model = make_model()
    opt = horovod.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    horovod.broadcast_state(model, opt)
    for x, y in batches[: counts[r]]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[r * b : (r + 1) * b]), y[r * b : (r + 1) * b]).backward()
        opt.step()
    last = horovod.join_and_resync(model, opt)
    assert last == n - 1

    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for s, (x, y) in enumerate(batches):
        active = [k for k in range(n) if counts[k] > s]
        ref_opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(ref(x[k * b : (k + 1) * b]), y[k * b : (k + 1) * b]) for k in active) / n
        loss.backward()
        ref_opt.step()
    assert torch.allclose(params(model), params(ref), atol=1e-6, rtol=0)
    everyone = horovod.allgather_object(params(model), name="t_uneven_params")
    assert all(torch.equal(everyone[0], p) for p in everyone)


def test_hybrid_two_cpu_stages_per_rank_equals_data_parallel(hvd):
    """Each rank holds one replica split over 2 (CPU) devices with 4 micro-batches; ranks are data parallel."""
    b, steps = 8, 3
    n, r = hvd.size(), hvd.rank()
    data = [global_batch(b * n, seed=200 + s) for s in range(steps)]
    mine = [(x[r * b : (r + 1) * b], y[r * b : (r + 1) * b]) for x, y in data]
    dp = _distributed_run(hvd, make_model(), mine, steps, 0.1, 0.9)
    hybrid = _distributed_run(hvd, Pipeline(make_model(), ["cpu", "cpu"], micro_batches=4), mine, steps, 0.1, 0.9)
    assert torch.allclose(params(hybrid), params(dp), atol=1e-6, rtol=0)
    ref = reference_steps(make_model(), data, 0.1, 0.9, steps)
    assert torch.allclose(params(hybrid), params(ref), atol=1e-6, rtol=0)
