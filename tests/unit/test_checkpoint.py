"""Checkpoints: atomic writes (a write killed midway leaves the previous checkpoint loadable), clear errors."""

import collections
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hvdtrain.errors import CheckpointError, DiskFullError
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


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), SystemExit(143), RuntimeError("pickling failed")],
    ids=["ctrl-c", "signal-handler-exit", "error"],
)  # fmt: skip
def test_failed_write_removes_its_temporary_file(tmp_path, monkeypatch, error):
    """Whatever interrupts the write midway (a signal handler that raises included): no temporary file is
    left, and the previous checkpoint is the newest, intact. (A full disk, for real: test_files.py.)"""
    checkpoint.save(state(1), tmp_path, 1)

    def broken_save(obj, f):
        f.write(b"partial")
        f.flush()
        assert checkpoint.interrupted_writes(tmp_path), "the temporary file should exist while it is written"
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(error)):
        checkpoint.save(state(2), tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.pt"]
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(tmp_path / "step-00000001.pt")["model"]["w"], torch.full((3,), 1.0))


def test_interrupted_writes_are_removed_and_said_in_one_line(tmp_path):
    checkpoint.save(state(1), tmp_path, 1)
    checkpoint.save(state(2), tmp_path, 2)
    left = [tmp_path / ".step-00000003.pt.k2j9x_a1.tmp", tmp_path / ".step-00000004.pt.zz.tmp"]
    for p in left:
        p.write_bytes(b"PK partial")
    (tmp_path / "notes.tmp").write_text("not ours")
    (tmp_path / ".step-00000005.pt").write_text("not a temporary file of save()")
    lines = []
    assert checkpoint.remove_interrupted_writes(tmp_path, lines.append) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".step-00000005.pt", "notes.tmp", "step-00000001.pt", "step-00000002.pt"
    ]  # fmt: skip
    assert len(lines) == 1 and "removed 2 unfinished checkpoint write(s)" in lines[0]
    assert ".step-00000003.pt.k2j9x_a1.tmp" in lines[0] and ".step-00000004.pt.zz.tmp" in lines[0]
    assert checkpoint.load(tmp_path / "step-00000002.pt")["model"]["w"][0] == 2.0
    # Nothing left: nothing said; no directory yet: nothing either.
    assert checkpoint.remove_interrupted_writes(tmp_path, lines.append) == [] and len(lines) == 1
    assert checkpoint.remove_interrupted_writes(tmp_path / "none", lines.append) == [] and len(lines) == 1


@pytest.mark.parametrize("handler", ["default", "raises"])
def test_sigterm_mid_write_real_process(tmp_path, handler):
    """A process writing a 16 MB checkpoint through save() gets SIGTERM midway (written, not yet fsynced nor
    renamed). With Python's default handler it dies at once (no `finally`) and leaves its temporary file, which
    the next start removes; with a handler that raises SystemExit, save() removes it itself. The previous
    checkpoint stays the newest, intact, either way."""
    ckpt_dir = RunDir(tmp_path).checkpoints
    checkpoint.save(state(1), ckpt_dir, 1)
    install = "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))" if handler == "raises" else ""
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time, torch
        from pathlib import Path
        from hvdtrain.train import checkpoint

        {install}

        def stalled_fsync(fd):  # the data is in the temporary file, not yet fsynced nor renamed
            print("writing", flush=True)
            time.sleep(60)

        os.fsync = stalled_fsync
        checkpoint.save({{"model": {{"w": torch.zeros(4_000_000)}}}}, Path({str(ckpt_dir)!r}), 2)  # 16 MB
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        writing = checkpoint.interrupted_writes(ckpt_dir)
        assert len(writing) == 1 and writing[0].stat().st_size > 16_000_000, "the write should be under way"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    lines = []
    if handler == "default":
        assert rc == -signal.SIGTERM
        left = checkpoint.interrupted_writes(ckpt_dir)
        assert len(left) == 1 and left[0].name.startswith(".step-00000002.pt.")
        assert checkpoint.remove_interrupted_writes(ckpt_dir, lines.append) == left and len(lines) == 1
    else:
        assert rc == 143
        assert checkpoint.remove_interrupted_writes(ckpt_dir, lines.append) == [] and lines == []
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-00000001.pt"]
    assert torch.equal(checkpoint.load(ckpt_dir / "step-00000001.pt")["model"]["w"], torch.full((3,), 1.0))


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


def test_the_fingerprint_is_the_model_the_data_and_the_optimizer():
    from hvdtrain.config import TrainConfig

    base = checkpoint.fingerprint(TrainConfig())
    assert set(base) == {"model", "hidden", "depth", "data", "synthetic_samples", "optimizer", "seed"}
    others = [TrainConfig(batch_size=64), TrainConfig(strategy="pipeline", stages=2), TrainConfig(shard_optimizer=True),
              TrainConfig(update="local-sgd"), TrainConfig(strategy="hybrid", devices_per_rank=2)]  # fmt: skip
    assert all(checkpoint.fingerprint(cfg) == base for cfg in others)
    assert checkpoint.fingerprint(TrainConfig(optimizer="adam")) != base


def test_a_resume_takes_the_new_worlds_learning_rate_in_every_optimizer_state():
    saved = {
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.2, "params": [0]}, {"lr": 0.2, "params": [1]}]},
        "local": [{"optimizer": {"state": {}, "param_groups": [{"lr": 0.2, "params": [0, 1]}]}}] * 2,
    }
    assert checkpoint.set_learning_rate(saved, 0.1) == 0.2
    groups = saved["optimizer"]["param_groups"] + [
        g for own in saved["local"] for g in own["optimizer"]["param_groups"]
    ]
    assert [g["lr"] for g in groups] == [0.1] * 4
    assert checkpoint.set_learning_rate({"model": {}}, 0.1) is None


def layout(**changes):
    base = {"ranks": 4, "processes": 4, "strategy": "data", "update": "sync", "stages": 1, "batch_size": 16,
            "backward_passes_per_step": 1, "lr": 0.2}  # fmt: skip
    return {**base, **changes}


def test_what_changed_on_a_resume_is_one_line():
    saved = {"step": 120, "layout": layout()}
    assert checkpoint.layout_change(saved, layout(), 0.2) is None
    assert (
        checkpoint.layout_change(saved, layout(ranks=2, processes=2, lr=0.1), 0.2)
        == "step 120 of a 4-rank job resumed on 2 ranks; lr 0.2 -> 0.1"
    )
    assert checkpoint.layout_change(saved, layout(ranks=1, processes=1, batch_size=64), 0.2) == (
        "step 120 of a 4-rank job resumed on 1 rank; batch 16 -> 64 per rank"
    )
    piped = layout(ranks=1, processes=2, strategy="pipeline", stages=2, update="sync")
    assert checkpoint.layout_change(saved, piped, 0.2) == (
        "step 120 of a 4-rank job resumed on 2 ranks; strategy data -> pipeline; stages 1 -> 2"
    )
    assert checkpoint.layout_change(saved, layout(update="sharded", backward_passes_per_step=2), 0.2) == (
        "step 120 of a 4-rank job resumed on 4 ranks; update sync -> sharded; backward passes per step 1 -> 2"
    )


def test_a_checkpoint_from_before_the_layout_record_says_what_its_config_says():
    old = {"step": 30, "fingerprint": {"world_size": 3}, "config": {"strategy": "data", "update": "sync",
           "shard_optimizer": True, "batch_size": 32, "backward_passes_per_step": 1}}  # fmt: skip
    assert checkpoint.layout_change(old, layout(ranks=2, processes=2, batch_size=32), 0.1) == (
        "step 30 of a 3-rank job resumed on 2 ranks; update sharded -> sync; lr 0.1 -> 0.2"
    )
    elastic = {"step": 7, "config": {}}  # no world size recorded
    assert checkpoint.layout_change(elastic, layout(ranks=2, processes=2), 0.2) == "step 7 resumed on 2 ranks"


def test_a_background_write_saves_the_state_of_its_step_and_hands_on_its_error(tmp_path, monkeypatch):
    writes = checkpoint.Writes(background=True)
    live = collections.OrderedDict(w=torch.zeros(3))
    path = writes.save({"model": live, "step": 1}, tmp_path, 1, keep=5)
    live["w"].add_(1)  # training goes on and changes the live tensor in place
    writes.wait()
    saved = checkpoint.load(path)
    assert torch.equal(saved["model"]["w"], torch.zeros(3)) and type(saved["model"]) is collections.OrderedDict
    assert writes.take_done() == [(1, path)] and writes.take_done() == []

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_atomic", full)
    writes.save({"model": live, "step": 2}, tmp_path, 2, keep=5)  # returns at once: the error comes with wait()
    with pytest.raises(OSError):
        writes.wait()
    writes.wait()  # said once
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001.pt"]


def test_one_background_write_in_flight_at_most(tmp_path, monkeypatch):
    import threading

    release, started = threading.Event(), []
    original = checkpoint.write_atomic

    def held(path, write, **kwargs):
        started.append(path.name)
        release.wait(10)
        return original(path, write, **kwargs)

    monkeypatch.setattr(checkpoint, "write_atomic", held)
    writes = checkpoint.Writes(background=True)
    writes.save({"step": 1}, tmp_path, 1, keep=5)
    second = threading.Thread(target=writes.save, args=({"step": 2}, tmp_path, 2, 5))
    second.start()
    second.join(0.5)
    assert second.is_alive() and started == ["step-00000001.pt"]  # the second save waits for the first write
    assert writes.take_done() == []  # taken while a write is in flight: it is reported later, not lost
    release.set()
    second.join(10)
    writes.wait()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001.pt", "step-00000002.pt"]
    assert [step for step, _ in writes.take_done()] == [1, 2]


def save_two_ranks(folder, step, problems=(None, None), keep=3):
    """A sharded checkpoint as two ranks write it (rank 1's write first, then rank 0's; `agree` answers with both
    ranks' problems)."""
    shard = {"format": 1, "buckets": []}
    meta = {"model": {"w": torch.ones(2)}, "optimizer": {"param_groups": [], "shapes": [], "sharded": 2},
            "step": step, "epoch": 0, "step_in_epoch": step, "rng": []}  # fmt: skip
    for rank in (1, 0):
        agree = lambda problem, rank=rank: [problem if r == rank else p for r, p in enumerate(problems)]  # noqa: E731
        path = checkpoint.save_sharded(meta if rank == 0 else None, shard, folder, step, (rank, 2), agree, keep)
    return path


def test_a_sharded_checkpoint_is_a_directory_complete_once_renamed(tmp_path):
    for step in (10, 20, 30, 40):
        path = save_two_ranks(tmp_path, step)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-00000020",
        "step-00000030",
        "step-00000040",
    ]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "meta.pt", "optimizer.0.pt", "optimizer.1.pt"]
    assert checkpoint.complete(path) and not checkpoint.interrupted_writes(tmp_path)
    saved = checkpoint.load(path)
    assert saved["optimizer"]["files"] == [str(path / "optimizer.0.pt"), str(path / "optimizer.1.pt")]
    (path / "optimizer.1.pt").write_bytes(b"cut")  # not the size the manifest says
    assert not checkpoint.complete(path)
    with pytest.raises(CheckpointError, match="not complete"):
        checkpoint.load(path)


def test_a_failed_shard_write_fails_every_rank_and_leaves_the_previous_checkpoint(tmp_path):
    save_two_ranks(tmp_path, 10)
    with pytest.raises(DiskFullError, match="step-00000020: the file system is full"):
        save_two_ranks(tmp_path, 20, problems=(None, ("full", "cannot write step-00000020: the file system is full")))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000010"]
    assert not checkpoint.interrupted_writes(tmp_path)  # rank 0 removed the temporary directory


def test_a_killed_sharded_write_is_passed_over_and_removed(tmp_path):
    save_two_ranks(tmp_path, 10)
    left = tmp_path / ".step-00000020.shards.tmp"
    left.mkdir()
    (left / "optimizer.1.pt").write_bytes(b"x")
    assert checkpoint.interrupted_writes(tmp_path) == [left]
    said = []
    checkpoint.remove_interrupted_writes(tmp_path, said.append)
    assert not left.exists() and ".step-00000020.shards.tmp" in said[0]


def test_resume_from_takes_a_sharded_checkpoints_directory(tmp_path):
    from hvdtrain.config import TrainConfig
    from hvdtrain.errors import ConfigError

    path = save_two_ranks(tmp_path, 10)
    assert TrainConfig(resume_from=str(path)).validate().resume_from == str(path)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        TrainConfig(resume_from=str(tmp_path)).validate()  # a directory, but not a checkpoint's
