"""`hvdtrain checkpoint ls|inspect|verify|consolidate` on real checkpoint files (written by checkpoint.save)."""

import json
import os
import struct
import zipfile

import pytest
import torch
from click.testing import CliRunner

from hvdtrain.cli import cli
from hvdtrain.train import checkpoint

LAYOUT = {"ranks": 2, "processes": 4, "strategy": "pipeline", "update": "sync", "stages": 2, "batch_size": 32,
          "backward_passes_per_step": 1, "lr": 0.02}  # fmt: skip


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model(torch.randn(8, 5)).sum().backward()
    optimizer.step()
    return model, optimizer


def write(folder, step, model, optimizer, **extra):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": 1,
             "step_in_epoch": 3, "samples_in_epoch": 192, "rng": [checkpoint.rng_state()] * 4,
             "fingerprint": {"model": "mlp", "optimizer": "adam"}, "layout": LAYOUT, **extra}  # fmt: skip
    return checkpoint.save(state, folder, step, keep=10)


@pytest.fixture
def run_dir(tmp_path):
    model, optimizer = model_and_optimizer()
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (10, 20, 30):
        write(folder, step, model, optimizer)
    return tmp_path / "run"


def call(*args):
    return CliRunner().invoke(cli, ["checkpoint", *map(str, args)])


def test_ls_lists_each_checkpoint_and_what_resume_takes(run_dir):
    newest = run_dir / "checkpoints" / "step-00000030.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # cut short: --resume passes over it
    (run_dir / "checkpoints" / ".step-00000040.pt.7-ab.tmp").write_bytes(b"partial")
    result = call("ls", run_dir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["step", "epoch", "samples", "ranks"]
    assert lines[2].split()[:9] == ["10", "2", "192", "4", "pipeline", "sync", "32", "0.02", "39"]
    assert "complete (--resume takes it)" in lines[3] and lines[3].startswith("20 ")
    assert "cut short" in lines[4] and "step-00000030.pt" in lines[4]
    assert "unfinished write" in lines[5] and ".step-00000040.pt.7-ab.tmp" in lines[5]
    rows = [json.loads(line) for line in call("ls", run_dir / "checkpoints", "--json").output.splitlines()]
    assert [r["status"] for r in rows] == ["complete", "complete", "cut short", "unfinished write"]
    assert rows[1]["resume"] and rows[0]["params"] == 39


def test_inspect_says_position_layout_fingerprint_and_sizes(run_dir):
    result = call("inspect", run_dir)
    assert result.exit_code == 0, result.output
    assert "step-00000030.pt" in result.output
    assert "position   step 30, epoch 2, 192 of its samples done" in result.output
    assert "written by ranks 2, processes 4, strategy pipeline" in result.output
    assert "must match model mlp, optimizer adam" in result.output
    assert "model      39 parameters in 4 tensors (156 B)" in result.output
    assert "optimizer  exp_avg, exp_avg_sq, step" in result.output and "lr 0.02, betas (0.9, 0.999)" in result.output
    info = json.loads(call("inspect", run_dir / "checkpoints" / "step-00000010.pt", "--json").output)
    assert info["step"] == 10 and info["rng_states"] == 4 and info["layout"] == LAYOUT


def test_verify_finds_a_changed_byte_and_a_cut(run_dir):
    assert call("verify", run_dir).exit_code == 0
    target = run_dir / "checkpoints" / "step-00000020.pt"
    data = bytearray(target.read_bytes())
    with zipfile.ZipFile(target) as z:  # a byte of the largest tensor's data, past its local header
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= 0xFF
    target.write_bytes(bytes(data))
    cut = run_dir / "checkpoints" / "step-00000010.pt"
    cut.write_bytes(cut.read_bytes()[:-50])
    result = call("verify", run_dir, "--all")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith("BAD  ") and "cut short" in lines[0]
    assert lines[1].startswith("BAD  ") and "checksum mismatch" in lines[1]
    assert lines[2].startswith("ok  ") and lines[2].endswith("step-00000030.pt")


def test_verify_names_non_finite_weights(tmp_path):
    model, optimizer = model_and_optimizer()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    write(tmp_path, 5, model, optimizer)
    result = call("verify", tmp_path / "step-00000005.pt")
    assert result.exit_code == 1 and "non-finite values in 0.weight" in result.output


def test_consolidate_writes_a_plain_torch_file(run_dir, tmp_path):
    model, optimizer = model_and_optimizer()
    out = tmp_path / "plain" / "model.pt"
    result = call("consolidate", run_dir, "-o", out)
    assert result.exit_code == 0, result.output
    fresh = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    fresh.load_state_dict(torch.load(out, weights_only=True))  # no hvdtrain object inside
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert call("consolidate", run_dir, "-o", out).exit_code == 2  # exists
    both = call("consolidate", run_dir, "-o", out, "--with-optimizer", "--force")
    assert both.exit_code == 0, both.output
    plain = torch.load(out, weights_only=True)
    assert set(plain) == {"model", "optimizer"} and plain["optimizer"]["param_groups"][0]["lr"] == 0.02
    assert not [p for p in out.parent.iterdir() if p.name != "model.pt"]  # nothing else left beside it


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p: None, "no such file or directory"),
        (lambda p: p.mkdir(), "holds no checkpoint"),
        (lambda p: (p / "checkpoints").mkdir(parents=True) or (p / "checkpoints" / "step-00000001.pt").write_bytes(b"x"),
         "no complete checkpoint"),
    ],
)  # fmt: skip
def test_a_bad_target_is_one_line_and_status_2(tmp_path, make, words):
    target = tmp_path / "t"
    make(target)
    for command in ("inspect", "verify"):
        result = call(command, target)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and words in result.output


def test_consolidate_refuses_an_output_it_cannot_write_before_reading(run_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = call("consolidate", run_dir, "-o", tmp_path / "afile" / "model.pt")
    assert result.exit_code == 2 and "is a file, not a directory" in result.output
    assert sorted(os.listdir(tmp_path)) == ["afile", "run"]


def test_a_sharded_checkpoint_lists_verifies_and_consolidates(tmp_path):
    """A directory of two ranks' optimizer files (parallel.zero_files) beside rank 0's meta.pt: one checkpoint to
    every command; consolidate merges the files into torch's whole state."""
    from hvdtrain.parallel import zero_files
    from hvdtrain.parallel.zero import layout

    model, optimizer = model_and_optimizer()
    params, whole = list(model.parameters()), optimizer.state_dict()
    folder = tmp_path / "run" / "checkpoints"
    shapes = [list(p.shape) for p in params]
    meta = {"model": model.state_dict(), "step": 50, "epoch": 1, "step_in_epoch": 3, "samples_in_epoch": 192,
            "rng": [], "fingerprint": {"model": "mlp"}, "layout": {**LAYOUT, "update": "sharded"},
            "optimizer": {"param_groups": whole["param_groups"], "shapes": shapes, "sharded": 2}}  # fmt: skip
    for rank in (1, 0):
        states = []
        for b in layout([params], 2, rank, 20):
            flat = {k: torch.zeros(b.padded) for k in ("exp_avg", "exp_avg_sq")}
            for p, i, off in zip(b.params, b.indices, b.offsets):
                for k in flat:
                    flat[k][off : off + p.numel()] = whole["state"][i][k].reshape(-1)
            lo = rank * b.shard
            states.append(
                {**{k: v[lo : lo + b.shard].clone() for k, v in flat.items()}, "step": whole["state"][0]["step"]}
            )
        shard = zero_files.payload(layout([params], 2, rank, 20), states)
        checkpoint.save_sharded(meta if rank == 0 else None, shard, folder, 50, (rank, 2), lambda p: [None, None])
    rows = [json.loads(line) for line in call("ls", tmp_path / "run", "--json").output.splitlines()]
    assert [(r["file"].rsplit("/", 1)[1], r["status"], r["update"]) for r in rows] == [
        ("step-00000050", "complete", "sharded")
    ]
    assert "in the files of its 2 ranks" in call("inspect", tmp_path / "run").output
    assert call("verify", folder / "step-00000050").exit_code == 0
    out = tmp_path / "plain.pt"
    assert call("consolidate", tmp_path / "run", "-o", out, "--with-optimizer").exit_code == 0
    plain = torch.load(out, weights_only=True)["optimizer"]
    assert all(
        torch.equal(plain["state"][i][k], whole["state"][i][k]) for i in whole["state"] for k in ("exp_avg", "step")
    )
    shard_file = folder / "step-00000050" / "optimizer.1.pt"
    data = bytearray(shard_file.read_bytes())
    with zipfile.ZipFile(shard_file) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 1] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    result = call("verify", tmp_path / "run")
    assert result.exit_code == 1 and "checksum mismatch in optimizer.1.pt" in result.output
