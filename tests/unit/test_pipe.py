"""The pipeline across ranks, its pure parts (parallel.pipe, parallel.grid): the layout, the micro-batch sizes,
the schedules (every op once, dependencies in order, the memory bound, no deadlock, the bubble), and the renaming
of stage states into a data-parallel checkpoint and back. The messages between real ranks are the mpi tier's."""

import pytest
import torch
from torch import nn

from hvdtrain.config import MODELS, TrainConfig
from hvdtrain.errors import ConfigError
from hvdtrain.parallel import pipe
from hvdtrain.parallel.grid import Grid
from hvdtrain.parallel.pipeline import bubble_fraction, split_stages
from hvdtrain.train import checkpoint, models


def test_grid_puts_consecutive_ranks_in_a_replica_and_each_stage_in_a_set():
    g = Grid(6, 3)
    assert g.replicas == 2
    assert [(g.replica_of(r), g.stage_of(r)) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert g.stage_sets() == [[0, 3], [1, 4], [2, 5]]
    assert all(g.rank_of(g.replica_of(r), g.stage_of(r)) == r for r in range(6))
    assert g.role(4) == "stage 1 of replica 1"
    with pytest.raises(ConfigError, match="must be a multiple of --stages"):
        Grid(5, 2)


@pytest.mark.parametrize("batch,m", [(32, 4), (10, 4), (9, 4), (3, 8), (1, 1), (7, 7)])
def test_micro_sizes_are_tensor_splits(batch, m):
    sizes = pipe.micro_sizes(batch, m)
    assert sizes == [len(c) for c in torch.arange(batch).tensor_split(min(m, batch))]
    assert sum(sizes) == batch and min(sizes) >= 1


@pytest.mark.parametrize("kind", pipe.SCHEDULES)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("micro", [1, 2, 3, 4, 8])
def test_schedules_run_each_op_once_in_order_and_bound_memory(kind, stages, micro):
    for s in range(stages):
        ops = pipe.schedule(kind, stages, s, micro)
        assert sorted(ops) == sorted(
            [(pipe.FORWARD, i) for i in range(micro)] + [(pipe.BACKWARD, i) for i in range(micro)]
        )
        assert all(ops.index((pipe.FORWARD, i)) < ops.index((pipe.BACKWARD, i)) for i in range(micro))
        peak = pipe.peak_in_flight(ops)
        if kind == "gpipe":
            assert peak == micro
        else:  # 1F1B: the P - s micro-batches in flight of PipeDream-Flush, at most P
            assert peak == min(stages - s, micro) <= stages
    start = pipe.timing(kind, stages, micro)  # raises on a deadlock
    assert len(start) == 2 * stages * micro


@pytest.mark.parametrize("stages,micro", [(2, 1), (2, 4), (3, 8), (4, 4)])
def test_both_schedules_take_the_bubble_of_the_formula(stages, micro):
    # Unit forwards, backwards of cost 2: an ideal step takes 3m units per stage; the pipeline fills and drains in
    # (P - 1) x 3 more, so the idle share is (P - 1) / (m + P - 1).
    for kind in pipe.SCHEDULES:
        start = pipe.timing(kind, stages, micro)
        end = max(t + (1 if op == pipe.FORWARD else 2) for (_, op, _), t in start.items())
        assert end == 3 * (micro + stages - 1)
        assert 1 - 3 * micro / end == pytest.approx(bubble_fraction(stages, micro))


def test_the_table_draws_every_op():
    text = pipe.table("1f1b", 2, 3)
    assert text.splitlines()[0].startswith("stage 0 | F0  F1")
    assert all(f"B{i}" in line for line in text.splitlines() for i in range(3))


def model():
    torch.manual_seed(0)
    return models.deep_mlp((1, 8, 8), 10, hidden=6, depth=3)  # 10 layers


@pytest.mark.parametrize("parts,balance", [(2, None), (3, [2, 5, 3]), (4, None)])
def test_stage_states_rename_to_the_unsplit_model_and_back(parts, balance):
    whole = model()
    opt = torch.optim.Adam(whole.parameters(), lr=0.1, weight_decay=0.01)
    whole(torch.randn(5, 1, 8, 8)).sum().backward()
    opt.step()
    stages = split_stages(whole, parts, balance)
    bounds, layers, params = [], 0, 0
    for st in stages:
        n = len(list(st.parameters()))
        bounds.append((layers, len(st), params, n))
        layers, params = layers + len(st), params + n
    model_parts = [(b[0], st.state_dict()) for b, st in zip(bounds, stages)]
    assert pipe.whole_model_state(model_parts).keys() == whole.state_dict().keys()
    for k, v in pipe.whole_model_state(model_parts).items():
        assert v is whole.state_dict()[k] or torch.equal(v, whole.state_dict()[k])
    full = opt.state_dict()
    opt_parts = [(b[2], pipe.stage_optimizer_state(full, b[2], b[3])) for b in bounds]
    merged = pipe.whole_optimizer_state(opt_parts)
    assert merged["param_groups"] == full["param_groups"]
    assert merged["state"].keys() == full["state"].keys()
    for i, entry in full["state"].items():
        for key, value in entry.items():
            assert torch.equal(merged["state"][i][key], value)
    for b, st in zip(bounds, stages):  # a stage's own part loads into a stage optimizer
        own = pipe.stage_model_state(whole.state_dict(), b[0], b[1])
        st.load_state_dict(own)
        stage_opt = torch.optim.Adam(st.parameters(), lr=0.1, weight_decay=0.01)
        stage_opt.load_state_dict(pipe.stage_optimizer_state(full, b[2], b[3]))


def test_data_pipeline_and_hybrid_checkpoints_share_a_fingerprint():
    data = TrainConfig(micro_batches=4)
    piped = TrainConfig(strategy="pipeline", stages=2, micro_batches=8, balance=[3, 7], schedule="gpipe")
    hybrid = TrainConfig(strategy="hybrid", devices_per_rank=2)
    assert checkpoint.fingerprint(data) == checkpoint.fingerprint(piped) == checkpoint.fingerprint(hybrid)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("depth", [1, 8])
def test_layer_counts_known_before_launch_match_the_models(name, depth):
    built = models.build(name, (1, 8, 8), 10, 16, depth)
    count, weighted = TrainConfig(model=name, depth=depth).layers()
    assert count == len(built)
    assert weighted == [i for i, layer in enumerate(built) if list(layer.parameters())]


def test_a_data_job_of_the_replicas():
    cfg = TrainConfig(strategy="pipeline", stages=3).with_defaults()
    assert cfg.schedule == "1f1b"
    assert cfg.data_ranks(6) == 2
    with pytest.raises(ConfigError, match="use -np 6"):
        cfg.data_ranks(7)


def test_a_stage_without_parameters_is_refused():
    class Comm:
        rank, size = 0, 2

    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.ReLU())
    with pytest.raises(ConfigError, match=r"stage 1 \(layers 1-2\) holds no parameters"):
        pipe.Stage.build(seq, Grid(2, 2), Comm(), (2,), torch.float32, balance=[1, 2])


def test_a_stage_is_built_from_a_sequential_only():
    class Comm:
        rank, size = 0, 1

    with pytest.raises(ConfigError, match="splits an nn.Sequential"):
        pipe.Stage.build(nn.Linear(2, 2), Grid(1, 1), Comm(), (2,), torch.float32)
