"""`hvdtrain train` through click's CliRunner: validation before launch, --config precedence, dry run."""

import json
import re
import zipfile

import pytest
import torch
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain import mpi
from hvdtrain.cli import cli
from hvdtrain.config import TrainConfig
from hvdtrain.env import SlurmEnv
from hvdtrain.parallel.hybrid import devices_for_rank
from hvdtrain.train import checkpoint


@pytest.fixture
def run(no_processes, clean_env, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def invoke(*args, env=None):
        return CliRunner().invoke(cli, ["train", *args], env=env)

    return invoke


def dry_config(output):
    """The config.json that a dry run would write (printed as '#   ' lines)."""
    lines = [line[4:] for line in output.splitlines() if line.startswith("#   ")]
    return json.loads("\n".join(lines))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--strategy", "ring"], "--strategy: 'ring' is not one of data, model, hybrid, pipeline"),
        (["--strategy", "pipeline"], "--stages: --strategy pipeline needs --stages P"),
        (["--stages", "2"], "--stages: applies to --strategy pipeline, not data"),
        (["--schedule", "1f1b"], "--schedule: applies to --strategy pipeline, not data"),
        (["--strategy", "pipeline", "--stages", "2", "--schedule", "zigzag"], "--schedule: 'zigzag' is not one of"),
        (["-np", "3", "--strategy", "pipeline", "--stages", "2"], "--stages 2 does not divide 3 ranks: each replica"),
        (["-np", "1", "--strategy", "pipeline", "--stages", "2"], "use -np 2"),
        (
            ["-np", "4", "--strategy", "pipeline", "--stages", "4", "--model", "mlp"],
            "--stages 4 is more than the 3 layers with parameters of --model mlp (6 layers in all)",
        ),
        (
            ["-np", "2", "--strategy", "pipeline", "--stages", "2", "--balance", "1,5", "--model", "mlp"],
            "--balance 1,5: stage 0 (layers 0-0) holds no parameters",
        ),
        (
            ["-np", "2", "--strategy", "pipeline", "--stages", "2", "--balance", "3,4", "--model", "mlp"],
            "--balance 3,4 adds up to 7 layers",
        ),
        (["-np", "2", "--strategy", "pipeline", "--stages", "2", "--balance", "6"], "must give 2 stage sizes"),
        (
            ["-np", "3", "--strategy", "pipeline", "--stages", "2", "--update", "async"],
            "--strategy: pipeline does not combine with --update async",
        ),
        (
            ["-np", "2", "--strategy", "pipeline", "--stages", "2", "--update", "local-sgd"],
            "--update: does not combine with --strategy pipeline",
        ),
        (
            ["-np", "2", "--strategy", "pipeline", "--stages", "2", "--reduce-op", "adasum"],
            "Adasum has no process sets",
        ),
        (["-np", "2", "--strategy", "pipeline", "--stages", "2", "--gloo"], "--strategy pipeline needs MPI"),
        (
            ["-np", "2", "--strategy", "pipeline", "--stages", "2", "--elastic", "--min-np", "2"],
            "--strategy pipeline cannot be elastic",
        ),
        (["--model", "resnet"], "--model: 'resnet' is not one of"),
        (["--epochs", "0"], "--epochs: 0 is too small"),
        (["--batch-size", "0"], "--batch-size: 0 is too small"),
        (["--lr", "-1"], "--lr: -1.0 must be positive"),
        (["--micro-batches", "64"], "cannot split a batch of 32"),
        (["--devices-per-rank", "2"], "need --strategy model, hybrid or pipeline"),
        (
            ["--strategy", "hybrid", "--devices-per-rank", "2", "--balance", "3"],
            "--balance: [3] must give 2 stage sizes",
        ),
        (["--balance", "a,b"], "comma-separated list"),
        (["--data", "nope.npz"], "--data: no such file 'nope.npz'"),
        (["--data", "mnist"], "is not digits, synthetic or a .npz file"),
        (["--resume-from", "missing.pt"], "no such checkpoint 'missing.pt'"),
        (["--preempt-signal", "KILL"], "--preempt-signal: 'KILL' is not USR1"),
        (["--compression", "int8"], "--compression: 'int8' is not one of none, fp16"),
        (["--shard-optimizer", "--reduce-op", "adasum"], "--shard-optimizer: needs --reduce-op average"),
        (["-np", "2", "--strategy", "model", "--devices-per-rank", "2"], "use -np 1, or --strategy hybrid"),
        (["--epochs", "many"], "'many' is not a valid integer"),
        (["-np", "0"], "at least 1"),
        (["--hooks", "myhooks.Stall"], "--hooks: 'myhooks.Stall' is not module:Name"),
        (["--timeline-steps", "5"], "--timeline-steps: '5' is not a window of steps A:B with 1 <= A <= B"),
        (["--timeline-steps", "8:5"], "--timeline-steps: '8:5' is not a window of steps A:B"),
        (["--timeline-steps", "0:5"], "--timeline-steps: '0:5' is not a window"),
        (["--timeline-steps", "a:b"], "--timeline-steps: 'a:b' is not a window"),
        (["--timeline", "--elastic", "--min-np", "2"], "--timeline cannot follow an elastic job"),
        (["--autotune", "--deterministic"], "--autotune: changes the fusion threshold while training"),
        # (--hooks that do not load: test_bad_input.py, through the real CLI: they are loaded in a child process)
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_started(run, args, needle, tmp_path):
    result = run(*args, "--run-dir", "r")
    assert_usage_error(result, needle)
    assert not (tmp_path / "r").exists()  # nothing written


def test_hybrid_layout_is_checked_against_visible_gpus(run):
    result = run("-np", "2", "--strategy", "hybrid", "--devices-per-rank", "2", "--run-dir", "r",
                 env={"CUDA_VISIBLE_DEVICES": "0,1,2"})  # fmt: skip
    assert_usage_error(result, "needs 2 ranks per node x 2 devices per rank = 4 GPUs, but only 3 are visible")


def test_hybrid_on_cpu_passes_preflight_with_cpu_stages(run):
    """No GPU visible: the layout check passes (each rank gets k CPU stages) and 2 ranks are launched."""
    result = run("-np", "2", "--strategy", "hybrid", "--devices-per-rank", "2", "--run-dir", "r", "--dry-run",
                 env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"^mpirun -np 2 -H localhost:2 .*-m hvdtrain\.worker \S+/r/config\.json$", result.output, re.M)
    assert devices_for_rank(1, 2, 2, cuda_count=0) == ["cpu", "cpu"]
    assert devices_for_rank(1, 2, 2, cuda_count=4) == ["cuda:2", "cuda:3"]


def save_checkpoint(tmp_path, step, **cfg):
    fp = checkpoint.fingerprint(TrainConfig(**cfg))
    return checkpoint.save({"model": {"w": torch.zeros(1)}, "fingerprint": fp}, tmp_path / "r" / "checkpoints", step)


def test_existing_checkpoints_need_resume(run, tmp_path):
    save_checkpoint(tmp_path, 20)
    assert_usage_error(run("--run-dir", "r"), "already has checkpoints (newest step-00000020.pt): pass --resume")
    assert run("-np", "1", "--run-dir", "r", "--resume", "--dry-run").exit_code == 0


def test_resume_checks_the_checkpoint_before_launching(run, tmp_path):
    save_checkpoint(tmp_path, 10, model="mlp")
    assert_usage_error(run("-np", "1", "--run-dir", "r", "--resume"), "model: checkpoint has 'mlp', this job has 'cnn'")
    assert_usage_error(
        run("-np", "1", "--run-dir", "r", "--resume", "--model", "mlp", "--optimizer", "adam"),
        "optimizer: checkpoint has 'sgd', this job has 'adam'",
    )
    newest = save_checkpoint(tmp_path, 20, model="mlp")
    with zipfile.ZipFile(newest, "w") as z:  # whole, but not torch's (one cut short is passed over: below)
        z.writestr("data.pkl", b"garbage")
    result = run("-np", "1", "--run-dir", "r", "--resume", "--model", "mlp")
    assert_usage_error(result, "is corrupt or not a checkpoint")
    assert "step-00000010.pt is intact: resume from it with --resume-from" in result.output
    ok = run(
        "-np", "1", "--run-dir", "r", "--model", "mlp", "--resume-from", "r/checkpoints/step-00000010.pt", "--dry-run"
    )
    assert ok.exit_code == 0, ok.output


def test_a_checkpoint_resumes_on_any_world_size_strategy_and_batch(run, tmp_path):
    """Only the model, the data (its seed) and the optimizer must match: another world size, batch, strategy or
    update rule, static or elastic, resumes it (the ranks say what changed)."""
    save_checkpoint(tmp_path, 10)
    (tmp_path / "hosts").write_text("localhost:2\n")
    for args in (
        ["-np", "2"], ["-np", "3", "--batch-size", "64"], ["-np", "4", "--strategy", "pipeline", "--stages", "2"],
        ["-np", "2", "--shard-optimizer"], ["-np", "2", "--update", "local-sgd"], ["-np", "3", "--update", "async"],
        ["-np", "1", "--strategy", "hybrid", "--devices-per-rank", "2"],
        ["-np", "2", "--elastic", "--hosts-file", "hosts"],
    ):  # fmt: skip
        result = run(*args, "--run-dir", "r", "--resume", "--dry-run", env={"CUDA_VISIBLE_DEVICES": ""})
        assert result.exit_code == 0, (args, result.output)
    save_checkpoint(tmp_path, 20, seed=1)
    assert_usage_error(run("-np", "2", "--run-dir", "r", "--resume"), "seed: checkpoint has 1, this job has 0")


def test_resume_without_checkpoints(run):
    assert_usage_error(run("--run-dir", "r", "--resume"), "--resume: no checkpoint in r/checkpoints")


def test_resume_passes_over_what_a_killed_job_left_and_says_so(run, tmp_path):
    """A killed job's checkpoints/: the temporary file of a write that never finished, and a newest checkpoint cut
    short (not by save, which is atomic: a copy, another writer). --resume takes the newest complete one and says
    on stderr, one line each, what it skipped; with none complete left it is one line, exit 2."""
    save_checkpoint(tmp_path, 10)
    newest = save_checkpoint(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:200])
    ckpt_dir = tmp_path / "r" / "checkpoints"
    (ckpt_dir / ".step-00000030.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04")
    result = run("-np", "1", "--run-dir", "r", "--resume", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "hvdtrain: warning: r/checkpoints: skipped .step-00000030.pt.k1ll3d.tmp (unfinished checkpoint write of a "
        "killed job; removed when the job starts)",
        "hvdtrain: warning: r/checkpoints: skipped step-00000020.pt, cut short (a write that did not finish); "
        "resuming from step-00000010.pt",
    ]  # fmt: skip
    cfg = TrainConfig(run_dir="r", resume=True)
    assert checkpoint.resume_path(cfg, SlurmEnv.read({})).name == "step-00000010.pt"  # what rank 0 loads
    (ckpt_dir / "step-00000010.pt").write_bytes(b"")
    assert_usage_error(run("-np", "1", "--run-dir", "r", "--resume"), "--resume: no complete checkpoint in r/checkp")


def test_config_file_precedence_cli_over_file_over_defaults(run, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nbatch-size: 16\nlr: 0.2\nnp: 1\n")
    result = run("--config", "c.yaml", "--lr", "0.3", "--run-dir", "r", "--dry-run")
    assert result.exit_code == 0, result.output
    cfg = dry_config(result.output)
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["momentum"]) == (3, 16, 0.3, 0.9)
    assert re.search(r"^mpirun -np 1 -H localhost:1 ", result.output, re.M)


def test_config_file_unknown_keys_list_the_valid_ones(run, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    result = run("--config", "c.yaml")
    assert_usage_error(result, "unknown keys ['learning_rate']")
    assert "valid keys are:" in result.output and "batch_size" in result.output


@pytest.mark.parametrize("text,needle", [("epochs: [1\n", "not valid YAML"), ("- 1\n", "must be a mapping")])
def test_config_file_malformed(run, tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    assert_usage_error(run("--config", "c.yaml"), needle)


def test_missing_config_file(run):
    assert_usage_error(run("--config", "nope.yaml"), "no such file 'nope.yaml'")


def test_a_sharded_optimizer_is_not_elastic(run, tmp_path):
    (tmp_path / "hosts").write_text("localhost:2\n")
    result = run("--shard-optimizer", "--elastic", "--hosts-file", "hosts", "--run-dir", "r")
    assert_usage_error(result, "--shard-optimizer cannot be elastic: a lost worker would take its slice")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 0.001), ("adamw", 0.001)])
def test_the_default_lr_follows_the_optimizer(run, optimizer, lr):
    assert dry_config(run("--optimizer", optimizer, "--dry-run").output)["lr"] == lr
    assert dry_config(run("--optimizer", optimizer, "--lr", "0.3", "--dry-run").output)["lr"] == 0.3


def test_dry_run_shows_the_worker_command_and_writes_nothing(run, tmp_path):
    result = run("-np", "2", "--run-dir", "my run", "--dry-run")
    assert result.exit_code == 0, result.output
    assert (
        "-m hvdtrain.worker" in result.output and "'" + str(tmp_path / "my run" / "config.json") + "'" in result.output
    )
    assert "--log-dir '" + str(tmp_path / "my run" / "logs") + "'" in result.output
    assert not (tmp_path / "my run").exists()


def test_default_run_dir_inside_slurm_is_the_job_id(run):
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}
    result = run("--dry-run", env=env)
    assert result.exit_code == 0, result.output
    assert dry_config(result.output)["run_dir"] == "runs/train-70_3"
    assert "srun --ntasks=2 --mpi=pmix" in result.output


def test_unreachable_host_is_found_before_config_json_is_written(fake_ssh, clean_env, monkeypatch, tmp_path):
    from hvdtrain.launching import supervise

    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(supervise, "run_job", lambda spec, **kw: started.append(spec) or 0)
    result = CliRunner().invoke(cli, ["train", "-H", "locked2.invalid:2", "--run-dir", "r"])
    assert_usage_error(
        result, "cannot reach host locked2.invalid over ssh: root@locked: Permission denied (publickey)."
    )
    assert started == [] and not (tmp_path / "r").exists()
    ok = CliRunner().invoke(cli, ["train", "-H", "node2.invalid:2", "--run-dir", "r"])
    assert ok.exit_code == 0 and len(started) == 1 and (tmp_path / "r" / "config.json").exists(), ok.output


def test_hooks_load_from_the_working_directory(tmp_path, monkeypatch):
    """--hooks module:Name, as the ranks load them: a Hook subclass is instantiated, a factory is called, a Hook is
    taken as it is; anything else is refused in one line saying why, the user's own errors with their traceback
    (their frames only)."""
    from hvdtrain.errors import ConfigError, UserCodeError
    from hvdtrain.train.hooks import Hook, load_hooks

    (tmp_path / "userhooks.py").write_text(
        "from hvdtrain.train.hooks import Hook\n"
        "class Count(Hook):\n    steps = 0\n    def on_step_end(self, trainer):\n        self.steps += 1\n"
        "def make():\n    return Count()\n"
        "made = Count()\n"
        "not_a_hook = 3\n"
        "class Needs(Hook):\n    def __init__(self, every):\n        self.every = every\n"
        "class Broken(Hook):\n    def __init__(self):\n        raise ValueError('no\\nsuch device')\n"
    )
    (tmp_path / "hookpkg").mkdir()
    (tmp_path / "hookpkg" / "__init__.py").write_text("")
    (tmp_path / "needsdep.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    hooks = load_hooks(TrainConfig(hooks="userhooks:Count, userhooks:make, userhooks:made").hook_refs())
    assert [type(h).__name__ for h in hooks] == ["Count"] * 3 and all(isinstance(h, Hook) for h in hooks)
    refused = {
        "userhooks:not_a_hook": "not_a_hook is an int, not a Hook subclass or a function returning a Hook; name one",
        "userhooks:Nope": f"{tmp_path}/userhooks.py has no 'Nope'; its hooks: Count, Needs, Broken",
        "userhooks:Needs": "Needs() needs arguments (missing a required argument: 'every'); give its parameters",
        "hookpkg.missing:X": f"no module 'hookpkg.missing' in {tmp_path} or on PYTHONPATH; put hookpkg/missing.py",
    }
    for ref, said in refused.items():
        with pytest.raises(ConfigError) as e:
            load_hooks([ref])
        assert str(e.value).startswith(f"--hooks {ref}: {said}") and not isinstance(e.value, UserCodeError)
    with pytest.raises(UserCodeError) as e:
        load_hooks(["userhooks:Broken"])
    assert str(e.value) == (
        f"--hooks userhooks:Broken: Broken() raised ValueError: no such device ({tmp_path}/userhooks.py:15); fix "
        "your code there (its traceback is above)"
    )
    assert e.value.user_traceback.splitlines() == [
        "Traceback (most recent call last):",
        f'  File "{tmp_path}/userhooks.py", line 15, in __init__',
        "    raise ValueError('no\\nsuch device')",
        "ValueError: no",
        "such device",
    ]
    with pytest.raises(UserCodeError, match="importing needsdep raised ModuleNotFoundError: No module named 'not_in"):
        load_hooks(["needsdep:X"])


def test_hooks_are_checked_in_a_child_that_neither_hangs_the_launch_nor_stays(tmp_path, monkeypatch):
    """check_in_child: the verdict of load_hooks in a child process of this Python, in this directory. One that
    hangs is killed at the timeout (with what it started), one that ends the process says so; the launching side
    never imports the user's module."""
    import sys
    import time

    import psutil

    from hvdtrain.errors import ConfigError
    from hvdtrain.train.hooks import check_in_child

    monkeypatch.chdir(tmp_path)
    (tmp_path / "slowhooks.py").write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'hvdtrain-test-grandchild'])\n"
        "time.sleep(60)\n"
    )
    (tmp_path / "exithooks.py").write_text("import os\nprint('bye', flush=True)\nos._exit(7)\n")
    (tmp_path / "goodhooks.py").write_text("from hvdtrain.train.hooks import Hook\nclass Good(Hook):\n    pass\n")
    check_in_child(["goodhooks:Good"])
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^--hooks slowhooks:X: loading them took longer than 1\.5 s; make"):
        check_in_child(["slowhooks:X"], timeout=1.5)
    assert time.monotonic() - started < 30
    time.sleep(0.2)
    left = [p for p in psutil.process_iter(["cmdline"]) if "hvdtrain-test-grandchild" in (p.info["cmdline"] or [])]
    assert left == [], "the child's own processes should be gone with it"
    with pytest.raises(ConfigError, match=r"^--hooks exithooks:X: loading them ended the process with exit status 7"):
        check_in_child(["exithooks:X"])
    assert not {"goodhooks", "slowhooks", "exithooks"} & set(sys.modules)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exithooks.py", "goodhooks.py", "slowhooks.py"]


def test_a_horovod_built_for_another_mpi_is_refused_before_anything_is_written(fake_mpich, run, monkeypatch, tmp_path):
    """MPICH's mpiexec first on PATH, Horovod built against Open MPI (read from its library: a fake here): the ranks
    would each run alone or fail in MPI_Init; refused in one line. mpi4py counts where the job sends messages."""
    built = {"horovod": mpi.Linked("/venv/horovod/torch/mpi_lib_v2.so", "openmpi", "libmpi.so.40")}
    monkeypatch.setattr(mpi, "built_with", lambda package: built.get(package))
    result = run("-np", "2", "--run-dir", str(tmp_path / "r"))
    assert_usage_error(
        result,
        f"Horovod was built against Open MPI (libmpi.so.40) but mpirun on PATH is MPICH (Hydra) 4.0.2 "
        f"({fake_mpich.parent / 'mpirun'} -> {fake_mpich}); load the MPI module Horovod was built with (Open MPI)",
    )
    assert not (tmp_path / "r").exists()
    built = {
        "horovod": mpi.Linked("h.so", "mpich", "libmpich.so.12"),
        "mpi4py": mpi.Linked("m.so", "openmpi", "libmpi.so.40"),
    }
    assert run("-np", "2", "--dry-run").exit_code == 0  # a data job sends no mpi4py message
    assert_usage_error(run("-np", "3", "--update", "async", "--dry-run"), "mpi4py was built against Open MPI")
    assert run("-np", "2", "--gloo", "--dry-run").exit_code == 0  # Gloo under horovodrun: no MPI to match
