"""parallel.zero_files: a sharded optimizer's state as the ranks' own files, merged, and resharded to any world
(the layout arithmetic of parallel.zero, no Horovod world needed)."""

import pytest
import torch
from torch import nn

from hvdtrain.parallel import zero_files
from hvdtrain.parallel.zero import layout


def adam_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 7, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
    return list(model.parameters()), opt.state_dict()


def whole_bucket(state, b, key):
    flat = torch.zeros(b.padded, dtype=torch.float64)
    for p, i, off in zip(b.params, b.indices, b.offsets):
        flat[off : off + p.numel()] = state["state"][i][key].reshape(-1)
    return flat


def write_ranks(state, params, world, bucket_elements, folder):
    """The files `world` sharded ranks would write (each rank's slices of every bucket, as ShardedOptimizer holds)."""
    paths = []
    for rank in range(world):
        buckets = layout([params], world, rank, bucket_elements)
        states = []
        for b in buckets:
            lo = rank * b.shard
            own = {k: whole_bucket(state, b, k)[lo : lo + b.shard].clone() for k in ("exp_avg", "exp_avg_sq")}
            states.append({**own, "step": state["state"][b.indices[0]]["step"].clone()})
        path = folder / f"optimizer.{rank}.pt"
        torch.save(zero_files.payload(buckets, states), path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_ranks_files_merge_into_the_whole_state(tmp_path, world):
    params, state = adam_state()
    paths = write_ranks(state, params, world, 30, tmp_path)
    merged = zero_files.consolidate(zero_files.Pieces.of_files(paths), [list(p.shape) for p in params],
                                    state["param_groups"])  # fmt: skip
    assert sorted(merged["state"]) == sorted(state["state"])
    for i, entry in state["state"].items():
        for k, v in entry.items():
            assert torch.equal(merged["state"][i][k], v), (i, k)


@pytest.mark.parametrize("written,reading", [(3, 2), (2, 3), (4, 1), (1, 4), (3, 3)])
def test_a_reader_of_any_world_copies_out_exactly_its_slices(tmp_path, written, reading):
    params, state = adam_state()
    pieces = zero_files.Pieces.of_files(write_ranks(state, params, written, 30, tmp_path))
    for rank in range(reading):
        for b in layout([params], reading, rank, 40):  # other buckets too
            for key in ("exp_avg", "exp_avg_sq"):
                got = torch.zeros(b.shard, dtype=torch.float64)
                for piece in b.pieces:
                    pieces.copy(
                        piece.index, piece.start, piece.end, key, got[piece.at : piece.at + piece.end - piece.start]
                    )
                lo = rank * b.shard
                assert torch.equal(got, whole_bucket(state, b, key)[lo : lo + b.shard]), (rank, key)
            assert pieces.scalar(b.indices, "step") == state["state"][b.indices[0]]["step"]


def test_a_whole_state_is_one_piece_per_parameter():
    params, state = adam_state()
    pieces = zero_files.Pieces.of_state(state["state"])
    merged = zero_files.consolidate(pieces, [list(p.shape) for p in params], state["param_groups"])
    assert all(torch.equal(merged["state"][i]["exp_avg"], e["exp_avg"]) for i, e in state["state"].items())
