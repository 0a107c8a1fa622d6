"""Parameter servers (parallel.ps) on real ranks and real MPI messages: with S = 0 the servers step on the mean of
the workers' gradients, which is single-process training on the concatenated batch (1 worker: plain single-process
SGD; N workers: synchronous data parallelism), to 1e-6, with the optimizer state gathered in torch's format; with
S > 0 and a slowed worker, the update log keeps the stale-synchronous bound. Run on 2 ranks (1 server, 1 worker)
and 3 (1 server and 2 workers, 2 servers and 1 worker)."""

import io
import time

import pytest
import torch
from torch import nn

from hvdtrain.parallel import ps

pytestmark = pytest.mark.ranks([2, 3])

STEPS = 12
PER_WORKER = 4
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def global_batches(workers, steps=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(PER_WORKER * workers, 7, generator=g, dtype=torch.float64),
         torch.randn(PER_WORKER * workers, 2, generator=g, dtype=torch.float64))
        for _ in range(steps)
    ]  # fmt: skip


def reference(name, data):
    """One process, plain optimizer, the whole global batch per step (mean loss)."""
    cls, kwargs = OPTIMIZERS[name]
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def run(comm, servers, staleness, name, data, delay=None, log=None):
    """Every rank: serve, or train on this worker's part of every batch. Returns (role, model, client or server
    counts, gathered state on rank 0)."""
    cls, kwargs = OPTIMIZERS[name]
    workers, server_ranks = ps.roles(comm.size, servers)
    model = make_model()
    params = list(model.parameters())
    layout = ps.Layout.of(params, servers)
    if comm.rank in server_ranks:
        server = ps.Server(comm, layout, server_ranks.index(comm.rank), workers, staleness,
                           lambda shard: cls(shard, **kwargs), torch.float64, log=log)  # fmt: skip
        return "server", None, server.serve(), None
    w = workers.index(comm.rank)
    client = ps.Client(comm, layout, server_ranks, params)
    if comm.rank == 0:
        client.init_servers(None)
    for x, y in data:
        part = slice(w * PER_WORKER, (w + 1) * PER_WORKER)
        for p in params:
            p.grad = None
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        if delay:
            time.sleep(delay(w))
        client.step()
    client.done()
    gathered = client.gather() if comm.rank == 0 else None
    client.bye()
    return "worker", model, {"messages": client.messages}, gathered


def layouts(size):
    return sorted({1, size - 1})


@pytest.fixture
def comm(hvd):
    from mpi4py import MPI

    return MPI.COMM_WORLD.Dup()  # not freed: Open MPI 4.1 can crash freeing it while Horovod's thread runs MPI


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_synchronous_servers_equal_single_process_training_on_the_whole_batch(comm, name):
    for servers in layouts(comm.size):
        workers = comm.size - servers
        data = global_batches(workers)
        role, model, counts, gathered = run(comm, servers, 0, name, data)
        expected, expected_opt = reference(name, data)
        if role == "server":
            assert counts["version"] == STEPS and counts["max_stale"] == 0
            continue
        for p, q in zip(model.parameters(), expected.parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), (servers, name)
        assert counts["messages"] == 2 * servers * STEPS
        if gathered is not None:
            flat, state, versions = gathered
            assert versions == [STEPS] * servers
            assert torch.allclose(flat, torch.cat([p.reshape(-1) for p in expected.parameters()]), atol=1e-6)
            want = expected_opt.state_dict()
            assert state["param_groups"][0]["params"] == want["param_groups"][0]["params"]
            assert sorted(state["state"]) == sorted(want["state"])
            for i, entry in want["state"].items():
                for k, v in entry.items():
                    got = state["state"][i][k]
                    assert torch.allclose(torch.as_tensor(got, dtype=torch.float64),
                                          torch.as_tensor(v, dtype=torch.float64), atol=1e-6), (i, k)  # fmt: skip


@pytest.mark.parametrize("staleness", [1, 3])
def test_bounded_staleness_with_a_slow_worker(comm, staleness):
    """Worker 1 is 20 ms slower per step: worker 0 runs ahead up to S clocks, no further; every gradient is applied
    at most (W - 1)(2S + 1) updates after the parameters it was computed on."""
    if comm.size < 3:
        pytest.skip("needs 2 workers: np 3")
    log = io.StringIO()
    data = global_batches(comm.size - 1, steps=20)
    role, _, counts, _ = run(comm, 1, staleness, "sgd", data, delay=lambda w: 0.02 * w, log=log)
    if role != "server":
        return
    rows = [tuple(map(int, line.split(","))) for line in log.getvalue().splitlines()]
    workers = comm.size - 1
    assert len(rows) == counts["version"] == 20 * workers
    stale = [applied - pulled for _, _, pulled, applied in rows]
    assert max(stale) <= (workers - 1) * (2 * staleness + 1)
    assert counts["max_lead"] == staleness  # the fast worker did run ahead, to the bound and not past it
    assert max(stale) >= 1
    # Each worker's clocks arrive in order, 1..20.
    for w in range(workers):
        assert [c for who, c, _, _ in rows if who == w] == list(range(1, 21))


def test_layout_cuts_the_flat_vector_into_contiguous_shards():
    params = [torch.zeros(3, 2), torch.zeros(5), torch.zeros(1)]
    layout = ps.Layout.of(params, 3)
    assert layout.total == 12 and layout.offsets == (0, 6, 11)
    assert layout.bounds == ((0, 4), (4, 8), (8, 12))
    flat = torch.arange(12.0)
    assert [tuple(p.shape) for p in layout.pieces(flat)] == [(3, 2), (5,), (1,)]
    with pytest.raises(ValueError, match="some would hold nothing"):
        ps.Layout.of([torch.zeros(2)], 3)


def test_optimizer_state_round_trips_through_the_shards():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    nn.functional.mse_loss(model(torch.randn(4, 7, dtype=torch.float64)), torch.zeros(4, 2).double()).backward()
    opt.step()
    layout = ps.Layout.of(list(model.parameters()), 2)
    back = ps.shards_to_optimizer(ps.optimizer_to_shards(opt.state_dict(), layout), layout)
    want = opt.state_dict()
    for i, entry in want["state"].items():
        for k, v in entry.items():
            assert torch.equal(back["state"][i][k], v), (i, k)
    assert ps.optimizer_to_shards(None, layout) == [None, None]
