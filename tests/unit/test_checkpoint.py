"""Checkpoints: atomic writes (a write killed midway leaves the previous checkpoint loadable), clear errors."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hvdtrain.errors import CheckpointError
from hvdtrain.rundir import RunDir
from hvdtrain.train import checkpoint


def state(v):
    return {"model": {"w": torch.full((3,), float(v))}, "fingerprint": {"model": "mlp", "world_size": 2}}


def test_save_load_roundtrip_and_pruning(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(state(step), tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000030.pt", "step-00000040.pt"]
    loaded = checkpoint.load(tmp_path / "step-00000040.pt", {"model": "mlp", "world_size": 2})
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 40.0))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_killed_midway_leaves_previous_checkpoint_loadable(tmp_path):
    checkpoint.save(state(1), tmp_path, 1)
    # A child starts writing step 2 and is SIGKILLed while pickling it (the pickle stalls on purpose).
    child = textwrap.dedent(
        f"""
        import time, torch
        from pathlib import Path
        from hvdtrain.train import checkpoint

        class Stall:
            def __reduce__(self):
                print("writing", flush=True)
                time.sleep(60)
                return (int, (0,))

        checkpoint.save({{"model": {{"w": torch.zeros(1_000_000)}}, "stall": Stall()}}, Path({str(tmp_path)!r}), 2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the temporary file should exist"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001.pt"]
    assert torch.equal(checkpoint.load(tmp_path / "step-00000001.pt")["model"]["w"], torch.full((3,), 1.0))


def test_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    checkpoint.save(state(1), tmp_path, 1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save(state(2), tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.pt"]


def test_corrupt_checkpoint_names_the_intact_previous_one(tmp_path):
    checkpoint.save(state(1), tmp_path, 1)
    checkpoint.save(state(2), tmp_path, 2)
    newest = tmp_path / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, e.g. a disk that filled up
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(newest)
    assert "corrupt" in str(e.value) and "step-00000001.pt" in str(e.value) and "--resume-from" in str(e.value)
    assert checkpoint.load(tmp_path / "step-00000001.pt")["model"]["w"][0] == 1.0


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "step-00000001.pt"
    torch.save({"something": "else"}, p)
    with pytest.raises(CheckpointError, match="not an hvdtrain checkpoint"):
        checkpoint.load(p)


def test_mismatched_checkpoint_says_what_differs(tmp_path):
    checkpoint.save(state(1), tmp_path, 1)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path / "step-00000001.pt", {"model": "mlp", "world_size": 4})
    assert "world_size: checkpoint has 2, this job has 4" in str(e.value)
    assert "new --run-dir" in str(e.value)


def test_rng_state_roundtrip():
    s = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(s)
    assert torch.equal(torch.rand(3), a)


def test_listing_ignores_temporary_and_foreign_files(tmp_path):
    checkpoint.save(state(5), tmp_path, 5)
    (tmp_path / ".step-00000006.pt.abc.tmp").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000005.pt"]
    assert RunDir(tmp_path).checkpoint(7) == tmp_path / "checkpoints" / "step-00000007.pt"


def test_fingerprint_leaves_the_world_size_out_for_elastic_jobs():
    from hvdtrain.config import TrainConfig

    cfg = TrainConfig()
    assert checkpoint.fingerprint(cfg, 4)["world_size"] == 4
    elastic = checkpoint.fingerprint(cfg, None)
    assert "world_size" not in elastic
    assert elastic == {k: v for k, v in checkpoint.fingerprint(cfg, 4).items() if k != "world_size"}
