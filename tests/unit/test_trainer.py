"""Trainer.fit() in this process, on one rank (Horovod initialises as a single process): the step count,
the checkpoint schedule, evaluation, the hooks, a preemption request and the resume after it — and the
math: one rank's Trainer equals a hand-written torch loop over the same batches."""

import json
import os
import time

import pytest
import torch

from hvdtrain import preempt
from hvdtrain.config import TrainConfig
from hvdtrain.train import checkpoint, datasets, models
from hvdtrain.train.hooks import Hook
from hvdtrain.train.trainer import Trainer, params_sha256

SAMPLES, BATCH = 256, 16  # 16 steps per epoch on one rank


def config(tmp_path, name="run", **overrides):
    base = dict(model="mlp", hidden=16, data="synthetic", synthetic_samples=SAMPLES, batch_size=BATCH, epochs=3,
                lr=0.05, log_every=5, deterministic=True, preempt_signal="USR2", run_dir=str(tmp_path / name))  # fmt: skip
    return TrainConfig(**{**base, **overrides})


class Counter(Hook):
    def __init__(self, request_stop_at=None):
        self.calls: dict[str, list] = {}
        self.request_stop_at = request_stop_at

    def _note(self, name, value):
        self.calls.setdefault(name, []).append(value)

    def on_fit_start(self, trainer):
        self._note("fit_start", trainer.state.step)

    def on_step_start(self, trainer):
        self._note("step_start", trainer.state.step)

    def on_step_end(self, trainer):
        self._note("step_end", trainer.state.step)
        if trainer.state.step == self.request_stop_at:
            preempt.request()

    def on_epoch_end(self, trainer):
        self._note("epoch_end", trainer.state.step)

    def on_checkpoint(self, trainer, path):
        self._note("checkpoint", path.name)

    def on_fit_end(self, trainer, result):
        self._note("fit_end", result["steps"])


@pytest.fixture(scope="module", autouse=True)
def horovod_in_this_process():
    """Horovod initialises once in this pytest process (as a single rank, MPI singleton) and is shut down after
    this module, so its background thread does not poll through the rest of the tier."""
    for name in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        os.environ.setdefault(name, "1")
    yield
    import horovod.torch as hvd

    if hvd.is_initialized():
        hvd.shutdown()


@pytest.fixture(autouse=True)
def no_leftover_request():
    preempt.reset()
    yield
    preempt.reset()


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_max_steps_checkpoints_eval_and_hooks(tmp_path):
    cfg = config(tmp_path, max_steps=40, checkpoint_every=10, keep_checkpoints=10)
    hook = Counter()
    lines = []
    result = Trainer(cfg, hooks=[hook], echo=lines.append).fit()
    run_dir = tmp_path / "run"
    assert result["steps"] == 40 and result["epochs_done"] == 2 and not result["preempted"]
    assert json.loads((run_dir / "result.json").read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [
        f"step-{s:08d}.pt" for s in (10, 20, 30, 40)
    ]  # the end state is step 40, which the schedule had just written: no second copy
    assert hook.calls["checkpoint"] == [f"step-{s:08d}.pt" for s in (10, 20, 30, 40)]
    assert hook.calls["step_start"] == list(range(40)) and hook.calls["step_end"] == list(range(1, 41))
    assert hook.calls["fit_start"] == [0] and hook.calls["epoch_end"] == [16, 32] and hook.calls["fit_end"] == [40]
    got = rows(run_dir)
    assert got[0]["event"] == "start" and (got[0]["step"], got[0]["resumed_from"], got[0]["restart"]) == (0, None, 0)
    assert [r["step"] for r in got if "train_loss" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["step"] for r in got if "test_accuracy" in r] == [16, 32, 40]  # after epochs 1 and 2, and the end
    assert any(line.startswith("epoch 1/3 step 5/40 loss ") for line in lines)
    assert lines[-1].startswith(f"test accuracy: {result['test_accuracy']:.4f}")
    # The start-up's phases, said once after the first step (no launch phase: not launched by hvdtrain here).
    phases = ["imports", "hvd.init", "data", "model", "broadcast", "first step"]
    assert list(result["startup_s"]) == phases and all(v >= 0 for v in result["startup_s"].values())
    said = [line for line in lines if line.startswith("start-up: ")]
    assert len(said) == 1 and said[0].endswith(", first step " + f"{result['startup_s']['first step']:.2f} s)")
    assert TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == cfg


class BusyHook(Hook):
    """Works (spins) `seconds` at the start of every step: this rank's own compute, not a wait."""

    def __init__(self, seconds):
        self.seconds = seconds

    def on_step_start(self, trainer):
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass


def test_every_window_records_the_ranks_compute_and_wait_per_step(tmp_path):
    """Outside hvdtrain the Trainer times its steps with a publisher of its own; the window's row holds this rank's
    seconds per step, a hook's work in its compute."""
    Trainer(config(tmp_path, max_steps=20, log_every=5), hooks=[BusyHook(0.005)], echo=lambda _: None).fit()
    windows = [r for r in rows(tmp_path / "run") if "train_loss" in r]
    assert [r["step"] for r in windows] == [5, 10, 15, 20]
    for r in windows:
        (compute,), (wait,) = r["rank_compute_s"], r["rank_wait_s"]
        assert 0.005 <= compute < 0.5 and 0 <= wait < compute
        assert compute == round(compute, 6)


def test_one_rank_equals_a_plain_torch_loop(tmp_path):
    """Same model seed, same sampler order, SGD with momentum: the Trainer's weights are a plain loop's."""
    cfg = config(tmp_path, max_steps=20, eval_every_epoch=False)
    trainer = Trainer(cfg, echo=lambda _line: None)
    trainer.fit()

    data = datasets.synthetic(SAMPLES, seed=0)
    torch.manual_seed(0)
    model = models.build("mlp", data.input_shape, data.num_classes, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # DistributedSampler's order on one rank: a permutation seeded with seed + epoch (20 steps: 16 + 4).
    orders = [torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(epoch)) for epoch in (0, 1)]
    x_all, y_all = data.train.tensors
    for index in torch.cat(orders).split(BATCH)[:20]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x_all[index]), y_all[index]).backward()
        opt.step()
    for (name, mine), theirs in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=name)


def test_preemption_request_stops_at_the_agreed_step_and_resumes_exactly(tmp_path):
    """A request after step 7 travels in the window closed at step 10 (log_every 5), which is read after
    step 11: training stops there, checkpoints it, and a resume continues to the same weights."""
    hook = Counter(request_stop_at=7)
    result = Trainer(config(tmp_path, max_steps=30), hooks=[hook], echo=lambda _line: None).fit()
    assert result["preempted"] and result["requeued"] is None and result["steps"] == 11
    assert hook.calls["checkpoint"] == ["step-00000011.pt"] and hook.calls["fit_end"] == [11]
    assert "test_accuracy" not in result

    preempt.reset()
    again = Counter()
    resumed = Trainer(config(tmp_path, max_steps=30, resume=True), hooks=[again], echo=lambda _line: None).fit()
    assert again.calls["fit_start"] == [11] and again.calls["step_end"][0] == 12
    straight = Trainer(config(tmp_path, name="straight", max_steps=30), echo=lambda _line: None).fit()
    assert resumed["steps"] == straight["steps"] == 30
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert resumed["test_loss"] == straight["test_loss"]
    events = [(r["event"], r["step"]) for r in rows(tmp_path / "run") if "event" in r and r["event"] != "checkpoint"]
    assert events == [("start", 0), ("preempted", 11), ("start", 11)]  # what `hvdtrain report` counts


def test_resume_removes_what_an_interrupted_checkpoint_write_left(tmp_path):
    """A write killed outright (SIGTERM with Python's default handler) leaves its temporary file; the resumed
    job's rank 0 removes it at its start, says so in one line, and keeps the real checkpoints."""
    Trainer(config(tmp_path, max_steps=10, checkpoint_every=5), echo=lambda _line: None).fit()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    left = ckpt_dir / ".step-00000015.pt.x7k_q2ab.tmp"
    left.write_bytes(b"PK\x03\x04 partial")
    lines = []
    Trainer(config(tmp_path, max_steps=12, checkpoint_every=5, resume=True), echo=lines.append).fit()
    assert not left.exists()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [f"step-{s:08d}.pt" for s in (5, 10, 12)]
    said = [line for line in lines if left.name in line]
    assert len(said) == 1 and said[0].startswith("removed 1 unfinished checkpoint write(s)")


def test_params_sha256_sees_every_bit():
    model = torch.nn.Linear(3, 2)
    before = params_sha256(model)
    with torch.no_grad():
        model.bias[0] = torch.nextafter(model.bias[0], torch.tensor(10.0))
    assert params_sha256(model) != before


def test_a_sharded_optimizer_on_one_rank_trains_and_saves_like_the_plain_one(tmp_path):
    """One rank holds every slice: the same steps as the unsharded Adam, bit for bit, and a checkpoint (the
    directory of the rank's file) whose optimizer state, consolidated, is the unsharded run's."""
    results, saved = {}, {}
    for shard in (False, True):
        cfg = config(tmp_path / str(shard), max_steps=12, optimizer="adam", lr=0.01, shard_optimizer=shard)
        results[shard] = Trainer(cfg, echo=lambda _line: None).fit()
        newest = checkpoint.list_checkpoints(tmp_path / str(shard) / "run" / "checkpoints")[-1]
        assert newest.is_dir() == shard
        saved[shard] = checkpoint.consolidate_optimizer(checkpoint.load(newest))["optimizer"]
    assert results[True]["params_sha256"] == results[False]["params_sha256"]
    assert saved[True]["param_groups"] == saved[False]["param_groups"]
    assert saved[True]["state"].keys() == saved[False]["state"].keys()
    for i, state in saved[False]["state"].items():
        for k, v in state.items():
            assert torch.equal(saved[True]["state"][i][k], v), (i, k)


def test_the_preemption_handler_is_the_callers_after_fit(tmp_path):
    """Used as a library, fit() installs the handler and restores the caller's; in the worker process, which
    installed it before its imports, it stays to the end, so a warning signal during the final evaluation,
    checkpoint or shutdown is not a death by USR2 (Slurm may send it at any time)."""
    import signal

    before = signal.getsignal(signal.SIGUSR2)
    Trainer(config(tmp_path, max_steps=3), echo=lambda _: None).fit()
    assert signal.getsignal(signal.SIGUSR2) is before
    assert preempt.install("USR2")  # as hvdtrain.worker does
    try:
        Trainer(config(tmp_path, "worker", max_steps=3), echo=lambda _: None).fit()
        assert signal.getsignal(signal.SIGUSR2) is preempt._handler
        os.kill(os.getpid(), signal.SIGUSR2)  # after fit: recorded, and this process lives on
        assert preempt.requested()
    finally:
        preempt.uninstall()
        preempt.reset()
    assert signal.getsignal(signal.SIGUSR2) is before


def test_a_world_smaller_than_the_srun_step_ends_in_one_line(tmp_path, monkeypatch):
    """An srun task of a 2-task step whose MPI came up as a world of 1 (MPICH under --mpi=pmix: N singletons, each
    training alone): the Trainer stops after hvd.init with the plugin in use and the one to try, before any step."""
    from hvdtrain.errors import UsageError

    for name, value in {"SLURM_STEP_NUM_TASKS": "2", "SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    hook = Counter()
    with pytest.raises(UsageError) as e:
        Trainer(config(tmp_path, max_steps=3), echo=lambda _: None, hooks=[hook]).fit()
    assert str(e.value).startswith("srun started 2 tasks with --mpi=pmix and each MPI rank has a world of 1")
    assert "try --mpi=pmi2" in str(e.value) and "step_start" not in hook.calls


def test_grad_groups_default_one_group_for_built_in_models_on_cpu_else_horovods_own():
    from hvdtrain.train.update import SyncUpdate, update_rule

    model = models.mlp((1, 8, 8), 10, hidden=16)
    cfg = TrainConfig(model="mlp").with_defaults()
    assert update_rule(cfg).grad_groups(model) == 1  # built-in model, CPU, average
    assert update_rule(cfg, builtin_model=False).grad_groups(model) == 0  # a user's model may skip a gradient
    assert SyncUpdate(TrainConfig(reduce_op="adasum").with_defaults()).grad_groups(model) == 0
    for n in (0, 3):
        explicit = TrainConfig(grad_groups=n).with_defaults()
        assert update_rule(explicit, builtin_model=False).grad_groups(model) == n


def test_grad_groups_default_is_per_gradient_in_an_elastic_job(monkeypatch):
    from hvdtrain.train.update import update_rule

    monkeypatch.setenv("HOROVOD_ELASTIC", "1")  # a worker of horovodrun's elastic driver
    model = models.mlp((1, 8, 8), 10, hidden=16)
    assert update_rule(TrainConfig(model="mlp").with_defaults()).grad_groups(model) == 0
