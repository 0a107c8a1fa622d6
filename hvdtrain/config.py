"""Training configuration: one dataclass, a docstring comment per field, validation that names the flag.

A YAML ``--config`` file fills click's ``default_map``, so precedence is click's: CLI > file > defaults.
Keys may be written with dashes or underscores; unknown keys fail with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import ConfigError
from hvdtrain.files import write_text_atomic
from hvdtrain.rundir import META_FILE, RunDir

STRATEGIES = ("data", "model", "hybrid", "pipeline")
SCHEDULES = ("1f1b", "gpipe")  # --strategy pipeline's micro-batch schedules (parallel.pipe)
MODELS = ("mlp", "cnn", "deep_mlp")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_LR = {"sgd": 0.05, "adam": 0.001, "adamw": 0.001}  # for one rank, on the reference models
DIGITS_SAMPLES = 1797  # scikit-learn's digits; 20% held out for testing (train.datasets.digits)
COMPRESSIONS = ("none", "fp16")
REDUCE_OPS = ("average", "adasum")
UPDATES = ("sync", "local-sgd", "async")
DEFAULT_AVERAGE_EVERY = 4  # local SGD's period H when --average-every is not given
DEFAULT_MAX_STALENESS = 4  # async: how many steps the fastest worker may be ahead of the slowest
PREEMPT_SIGNALS = ("USR1", "USR2", "TERM", "INT")
ASYNC_NOT_ELASTIC = (
    "--update async cannot be elastic: a lost server would take its shard of the parameters with it; drop --elastic"
)
SHARDED_NOT_ELASTIC = (
    "--shard-optimizer cannot be elastic: a lost worker would take its slice of the optimizer state with it; "
    "drop --elastic or --shard-optimizer"
)
PIPELINE_NOT_ELASTIC = (
    "--strategy pipeline cannot be elastic: a lost rank would take its stage of every replica's model with it; "
    "drop --elastic"
)
TIMELINE_NOT_ELASTIC = (
    "--timeline cannot follow an elastic job: Horovod starts its timeline file afresh at every reset; drop "
    "--elastic, or --timeline and --timeline-steps"
)
GROUPS_NOT_ELASTIC = (
    "--grad-groups cannot be elastic: Horovod's groups agree on their order once, when the optimizer is made, and "
    "a worker that joins later would ask the others again; drop --elastic or --grad-groups"
)
MODEL_NOT_ELASTIC = (
    "--strategy model runs one replica on one rank, so it cannot be elastic: drop --elastic, or use --strategy data "
    "or hybrid"
)
# A hook reference: a dotted module path, a colon, a dotted attribute path.
HOOK_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _bad(flag: str, msg: str):
    raise ConfigError(f"--{flag}: {msg}")


def _f(default, help: str, choices: Optional[tuple[str, ...]] = None):
    """A field with its --help text and, for a choice, its valid values (the CLI builds one option per field
    from these)."""
    return dataclasses.field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


@dataclasses.dataclass
class TrainConfig:
    """Everything the built-in job and the Trainer take; one CLI option per field (`--batch-size` ...)."""

    strategy: str = _f(
        "data", "how one replica spreads over devices, replicas over ranks (docs/architecture.md)", STRATEGIES
    )
    devices_per_rank: int = _f(1, "model/hybrid: devices holding one replica (cuda:local_rank*k+i, or k CPU stages)")
    stages: Optional[int] = _f(
        None,
        "pipeline: ranks per replica, P; ranks r*P ... r*P+P-1 hold the P consecutive stages of replica r, and -np "
        "must be a multiple of P",
    )
    schedule: Optional[str] = _f(
        None,
        "pipeline: 1f1b (one forward, one backward: at most P micro-batches' activations per stage; the default) "
        "or gpipe (all forwards, then all backwards)",
        SCHEDULES,
    )
    balance: Optional[list[int]] = _f(None, "model/hybrid/pipeline: layers per stage; None balances by parameter count")
    micro_batches: int = _f(1, "model/hybrid/pipeline: micro-batches per batch (pipeline bubble (p-1)/(m+p-1))")
    model: str = _f("cnn", "reference model: cnn for 8x8 images, deep_mlp (many layers) for benchmarks", MODELS)
    hidden: int = _f(64, "width of the hidden layers of mlp and deep_mlp")
    depth: int = _f(8, "number of hidden layers of deep_mlp")
    data: str = _f("digits", "digits | synthetic | PATH.npz (arrays x, y; optional x_test, y_test)")
    synthetic_samples: int = _f(2048, "data=synthetic: number of training samples")
    epochs: int = _f(15, "passes over the training set")
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (overrides epochs when reached)")
    batch_size: int = _f(32, "samples per rank per step (per backward pass with accumulation)")
    lr: Optional[float] = _f(None, "base learning rate (for one rank); default 0.05 for sgd, 0.001 for adam and adamw")
    scale_lr: bool = _f(True, "multiply lr by the number of ranks (x backward_passes_per_step), Goyal et al.")
    optimizer: str = _f("sgd", "the optimizer every rank steps", OPTIMIZERS)
    momentum: float = _f(0.9, "sgd only")
    weight_decay: float = _f(0.0, "L2 penalty of the optimizer")
    backward_passes_per_step: int = _f(1, "gradient accumulation: local backward passes per allreduce + step")
    compression: str = _f("none", "fp16: compress gradients for the allreduce", COMPRESSIONS)
    reduce_op: str = _f("average", "how gradients are combined across ranks", REDUCE_OPS)
    grad_groups: Optional[int] = _f(
        None,
        "sync: Horovod reduces the gradients in this many groups of consecutive parameters per step, each once its "
        "last gradient is ready (DistributedOptimizer's groups); 0: each gradient on its own as soon as it is ready "
        "(Horovod's default). Default: 1 for the built-in models on CPU ranks (measured faster: docs/performance.md), "
        "else 0 (and always 0 for an elastic job). A group needs every one of its gradients on every rank",
    )
    shard_optimizer: bool = _f(
        False,
        "ZeRO stage 1: each rank keeps and updates 1/N of the optimizer state (gradients reduce-scattered, "
        "parameters all-gathered); checkpoints hold the whole state, loadable with or without it",
    )
    update: str = _f(
        "sync",
        "how gradients become parameters: sync (allreduce every step), local-sgd (own steps, parameters averaged "
        "every --average-every steps), async (parameter servers, bounded staleness); docs/updates.md",
        UPDATES,
    )
    average_every: Optional[int] = _f(
        None, f"local-sgd: local steps between parameter averages, H (default {DEFAULT_AVERAGE_EVERY})"
    )
    local_sgd_warmup: Optional[int] = _f(
        None, "local-sgd: synchronous steps (gradients averaged) before local steps begin, W (default 0)"
    )
    ps_ranks: Optional[int] = _f(
        None,
        "async: ranks that serve parameters (the last ones; each holds a shard and its optimizer state), P (default 1)",
    )
    max_staleness: Optional[int] = _f(
        None,
        "async: steps the fastest worker may be ahead of the slowest, S (0: synchronous, the server steps on "
        f"the mean of every worker's gradient; default {DEFAULT_MAX_STALENESS})",
    )
    seed: int = _f(0, "model initialisation and data order; rank r also seeds its own RNGs with seed + r")
    deterministic: bool = _f(False, "torch deterministic algorithms, HOROVOD_FUSION_THRESHOLD=0, fixed seeds")
    run_dir: Optional[str] = _f(None, "where config.json, metrics.jsonl, TensorBoard events, checkpoints go")
    checkpoint_every: int = _f(0, "steps between checkpoints (0: only at the end and on preemption)")
    keep_checkpoints: int = _f(3, "newest checkpoints kept")
    async_checkpoint: bool = _f(
        False,
        "write checkpoints in the background while training goes on (the step pays a copy to host memory; at most "
        "one write in flight; the end, a preemption and Ctrl-C wait for it)",
    )
    commit_every: int = _f(
        10,
        "elastic jobs: steps between commits (an in-memory copy of the state every rank rolls back to when a "
        "worker fails; also when new hosts are taken in); epochs end with one too",
    )
    resume: bool = _f(False, "resume from the newest checkpoint in run_dir")
    resume_from: Optional[str] = _f(None, "resume from this checkpoint file")
    log_every: int = _f(
        10, "steps between progress lines and metric records; also how often the ranks agree on a preemption request"
    )
    eval_every_epoch: bool = _f(True, "evaluate on the test split after each epoch (else only at the end)")
    preempt_signal: str = _f("USR2", "signal that asks for checkpoint-and-stop (Slurm's --signal); '' to disable")
    requeue: bool = _f(True, "inside Slurm: after a preemption checkpoint, requeue the job (scontrol requeue)")
    max_requeues: int = _f(3, "do not requeue once SLURM_RESTART_COUNT reaches this")
    hooks: Optional[str] = _f(
        None,
        "Trainer hooks to add, comma-separated module:Name (a Hook subclass, or a function returning a Hook), "
        "imported on every rank, e.g. myhooks:LogGradNorm",
    )
    timeline: bool = _f(
        False,
        "record Horovod's timeline of the whole run into RUN_DIR/timeline.json (rank 0 writes it; large for long runs: "
        "see --timeline-steps); `hvdtrain timeline RUN_DIR` summarizes it",
    )
    autotune: bool = _f(
        False,
        "Horovod's autotuner: while training it tries fusion thresholds, cycle times and the response cache, scored "
        "by allreduce throughput, and keeps the best; its log in RUN_DIR/autotune.csv (`hvdtrain report` shows "
        "the choice)",
    )
    timeline_steps: Optional[str] = _f(
        None, "A:B: record Horovod's timeline of steps A to B only (both included; step 1 is the first) into "
        "RUN_DIR/timeline.json",
    )  # fmt: skip

    def validate(self, check_data: bool = True) -> TrainConfig:
        """Raise ConfigError naming the flag of the first bad value, or of the first row of COMBINATIONS among its
        own options that refuses it. check_data=False when the caller provides its own dataset (then `data` is
        only a label)."""
        self._check_values()
        if self.strategy == "pipeline" and self.stages is None:
            _bad("stages", "--strategy pipeline needs --stages P, the ranks one replica spreads over (e.g. 2)")
        check_combinations(self)  # each value is valid on its own: now what combines with what
        parts = self.stages if self.strategy == "pipeline" else self.devices_per_rank
        if self.balance is not None and (len(self.balance) != parts or any(b < 1 for b in self.balance)):
            what = "--stages" if self.strategy == "pipeline" else "--devices-per-rank"
            _bad("balance", f"{self.balance} must give {parts} stage sizes ({what}) of at least 1 layer")
        if check_data and self.data not in ("digits", "synthetic"):
            if not self.data.endswith(".npz"):
                _bad("data", f"'{self.data}' is not digits, synthetic or a .npz file")
            if not Path(self.data).is_file():
                _bad("data", f"no such file '{self.data}'")
        # A checkpoint file, or a sharded checkpoint's directory (its rank 0 part: rundir.META_FILE).
        if self.resume_from is not None and not (
            Path(self.resume_from).is_file() or (Path(self.resume_from) / META_FILE).is_file()
        ):
            _bad("resume-from", f"no such checkpoint '{self.resume_from}'")
        return self

    def _check_values(self) -> None:
        """Each field on its own: a valid choice, in range, finite, well formed."""
        for field in dataclasses.fields(self):
            value, flag = getattr(self, field.name), field.name.replace("_", "-")
            if "choices" in field.metadata and value is not None and value not in field.metadata["choices"]:
                _bad(flag, f"'{value}' is not one of {', '.join(field.metadata['choices'])}")
            if isinstance(value, float) and not math.isfinite(value):
                _bad(flag, f"{value} is not a finite number")
        for flag, value, low in [
            ("devices-per-rank", self.devices_per_rank, 1),
            ("micro-batches", self.micro_batches, 1),
            ("epochs", self.epochs, 1),
            ("batch-size", self.batch_size, 1),
            ("backward-passes-per-step", self.backward_passes_per_step, 1),
            ("hidden", self.hidden, 1),
            ("depth", self.depth, 1),
            ("synthetic-samples", self.synthetic_samples, 1),
            ("checkpoint-every", self.checkpoint_every, 0),
            ("keep-checkpoints", self.keep_checkpoints, 1),
            ("commit-every", self.commit_every, 1),
            ("log-every", self.log_every, 1),
            ("max-requeues", self.max_requeues, 0),
            ("max-steps", self.max_steps, 1),
            ("stages", self.stages, 1),
            ("average-every", self.average_every, 1),
            ("local-sgd-warmup", self.local_sgd_warmup, 0),
            ("ps-ranks", self.ps_ranks, 1),
            ("max-staleness", self.max_staleness, 0),
        ]:
            if value is not None and value < low:
                _bad(flag, f"{value} is too small (at least {low})")
        if self.grad_groups is not None and self.grad_groups < 0:
            _bad("grad-groups", f"{self.grad_groups} is too small (at least 0; 0: one allreduce per gradient)")
        if self.lr is not None and not self.lr > 0:
            _bad("lr", f"{self.lr} must be positive")
        if not 0 <= self.momentum < 1:
            _bad("momentum", f"{self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            _bad("weight-decay", f"{self.weight_decay} must not be negative")
        if self.micro_batches > self.batch_size:
            _bad("micro-batches", f"{self.micro_batches} micro-batches cannot split a batch of {self.batch_size}")
        if self.timeline_steps is not None:
            self.timeline_window()  # raises naming the flag
        for ref in self.hook_refs():
            if not HOOK_REF.fullmatch(ref):
                _bad("hooks", f"'{ref}' is not module:Name (e.g. myhooks:LogGradNorm)")
        if self.preempt_signal and self.preempt_signal.upper().removeprefix("SIG") not in PREEMPT_SIGNALS:
            _bad("preempt-signal", f"'{self.preempt_signal}' is not USR1, USR2, TERM or INT")

    def layers(self) -> tuple[int, list[int]]:
        """The reference model --model's layers (children of its nn.Sequential): how many, and which of them hold
        parameters (train.models builds them; a unit test holds the two together). Known without importing torch:
        a pipeline's stages are checked against them before a launch."""
        if self.model == "mlp":
            return 6, [1, 3, 5]
        if self.model == "cnn":
            return 10, [0, 2, 7, 9]
        return 3 + 2 * self.depth + 1, [1, *range(3, 3 + 2 * self.depth, 2), 3 + 2 * self.depth]

    def data_ranks(self, ranks: int) -> int:
        """Of a job's `ranks`, how many take their own share of the data: all but the parameter servers of an async
        job, one per replica of a pipeline (ranks / stages); raises ConfigError when the ranks do not fit the
        layout. Needs with_defaults()."""
        if self.strategy == "pipeline":
            if ranks % self.stages:
                raise ConfigError(
                    f"--stages {self.stages} does not divide {ranks} ranks: each replica is {self.stages} ranks, so "
                    f"use -np {max(1, ranks // self.stages) * self.stages} (or a multiple of {self.stages})"
                )
            return ranks // self.stages
        if self.update != "async":
            return ranks
        if self.ps_ranks >= ranks:
            raise ConfigError(
                f"--ps-ranks {self.ps_ranks} leaves no worker among {ranks} ranks: use -np {self.ps_ranks + 1} or "
                "more (servers are the last ranks, workers the first)"
            )
        return ranks - self.ps_ranks

    def with_defaults(self, slurm: Optional[SlurmEnv] = None) -> TrainConfig:
        """A copy with the fields derived at launch time filled in: lr from the optimizer (DEFAULT_LR); run_dir
        defaults to runs/train-<time>, or inside Slurm to runs/train-<job id> (array: <array job id>_<task id>)
        so that a requeued job finds its checkpoints (`slurm`: the job this process is in; None: read it here).
        The options of the chosen update rule take their defaults (those of the other rules stay None)."""
        derived: dict[str, Any] = {}
        if self.lr is None:
            derived["lr"] = DEFAULT_LR[self.optimizer]
        if self.run_dir is None:
            label = (SlurmEnv.read() if slurm is None else slurm).job_label
            name = f"train-{label}" if label else time.strftime("train-%Y%m%d-%H%M%S")
            derived["run_dir"] = os.path.join("runs", name)
        own = {
            "local-sgd": {"average_every": DEFAULT_AVERAGE_EVERY, "local_sgd_warmup": 0},
            "async": {"ps_ranks": 1, "max_staleness": DEFAULT_MAX_STALENESS},
        }.get(self.update, {})
        if self.strategy == "pipeline":
            own["schedule"] = "1f1b"
        derived.update({k: v for k, v in own.items() if getattr(self, k) is None})
        return dataclasses.replace(self, **derived) if derived else self

    def hook_refs(self) -> list[str]:
        """--hooks as a list of module:Name references."""
        return [h.strip() for h in (self.hooks or "").split(",") if h.strip()]

    def timeline_window(self) -> Optional[tuple[int, int]]:
        """--timeline-steps A:B as (A, B), both included; None when not given."""
        if self.timeline_steps is None:
            return None
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.timeline_steps))
        if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
            raise ConfigError(
                f"--timeline-steps: '{self.timeline_steps}' is not a window of steps A:B with 1 <= A <= B, e.g. 100:110"
            )
        return int(m.group(1)), int(m.group(2))

    @property
    def records_timeline(self) -> bool:
        return self.timeline or self.timeline_steps is not None

    def to_json(self) -> str:
        """The run directory's config.json text (what the worker reads back with from_dict)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, run_dir: RunDir) -> None:
        """Write run_dir's config.json (atomically), unless it already holds exactly this configuration."""
        text = self.to_json()
        try:
            if run_dir.config.read_text() == text:
                return
        except OSError:
            pass
        write_text_atomic(run_dir.config, text)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys are: {', '.join(sorted(names))}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A row of COMBINATIONS: a configuration for which `when` holds cannot meet `meets`, for the reason `message`
    says (formatted with the configuration as `cfg` and the job's number of ranks as `ranks`)."""

    meets: str  # options: its own (validate); elastic: --elastic; gloo: Horovod on Gloo; ranks: more than one rank
    when: Callable[[TrainConfig], bool]
    message: str


def _needs_mpi(what: str) -> str:
    return (
        f"{what} needs MPI (its ranks exchange messages with mpi4py): drop --gloo; mpirun, srun and horovodrun "
        "--mpi all run it"
    )


_PIPELINE = "does not combine with --strategy pipeline: "
_LOCAL_SGD = "does not combine with --update local-sgd: local SGD "
_ASYNC = "does not combine with --update async: the parameter servers "


def _whole_updates(update: str, who: str) -> tuple[Rule, ...]:
    """The rows of an update rule that moves whole parameters or updates (local SGD, async): no sharded state,
    no Adasum, no compression."""
    return (
        Rule("options", lambda c: c.update == update and c.shard_optimizer,
             "--shard-optimizer: " + who + "keep the whole optimizer state"),
        Rule("options", lambda c: c.update == update and c.reduce_op != "average",
             "--reduce-op: " + who + "average (or apply) whole updates"),
        Rule("options", lambda c: c.update == update and c.compression != "none",
             "--compression: " + who + "exchange full-precision tensors"),
    )  # fmt: skip


# What combines with what: every "X does not combine with Y" of a training job, in the order they are checked. The
# launching side (before a launch) and the Trainer (on every rank, used as a library too) read the same rows.
COMBINATIONS: tuple[Rule, ...] = (
    # Options with options (TrainConfig.validate).
    Rule("options", lambda c: c.grad_groups is not None and (c.update != "sync" or c.shard_optimizer or c.strategy == "pipeline"),
         "--grad-groups: applies to the synchronous allreduce of whole gradients (--update sync, not with "
         "--shard-optimizer or --strategy pipeline)"),
    Rule("options", lambda c: c.shard_optimizer and c.reduce_op != "average",
         "--shard-optimizer: needs --reduce-op average: {cfg.reduce_op} combines whole gradients, a rank holds a slice"),
    Rule("options", lambda c: c.shard_optimizer and c.async_checkpoint,
         "--async-checkpoint: not with --shard-optimizer, whose ranks already write their own shards in parallel "
         "(synchronously): drop --async-checkpoint"),
    Rule("options", lambda c: c.autotune and c.deterministic,
         "--autotune: changes the fusion threshold while training, which --deterministic fixes: drop one"),
    Rule("options", lambda c: c.average_every is not None and c.update != "local-sgd",
         "--average-every: applies to --update local-sgd, not {cfg.update}"),
    Rule("options", lambda c: c.local_sgd_warmup is not None and c.update != "local-sgd",
         "--local-sgd-warmup: applies to --update local-sgd, not {cfg.update}"),
    Rule("options", lambda c: c.ps_ranks is not None and c.update != "async",
         "--ps-ranks: applies to --update async, not {cfg.update}"),
    Rule("options", lambda c: c.max_staleness is not None and c.update != "async",
         "--max-staleness: applies to --update async, not {cfg.update}"),
    *_whole_updates("local-sgd", _LOCAL_SGD),
    *_whole_updates("async", _ASYNC),
    Rule("options", lambda c: c.update == "async" and c.strategy != "data",
         "--strategy: {cfg.strategy} does not combine with --update async: workers train whole replicas (--strategy data)"),
    Rule("options", lambda c: c.strategy == "data" and (c.devices_per_rank != 1 or bool(c.balance)),
         "--strategy: --devices-per-rank/--balance need --strategy model, hybrid or pipeline"),
    Rule("options", lambda c: c.stages is not None and c.strategy != "pipeline",
         "--stages: applies to --strategy pipeline, not {cfg.strategy}"),
    Rule("options", lambda c: c.schedule is not None and c.strategy != "pipeline",
         "--schedule: applies to --strategy pipeline, not {cfg.strategy}"),
    Rule("options", lambda c: c.strategy == "pipeline" and c.devices_per_rank != 1,
         "--devices-per-rank: a pipeline stage is a rank with one device: drop it, or use --strategy hybrid"),
    Rule("options", lambda c: c.strategy == "pipeline" and c.update != "sync",
         "--update: " + _PIPELINE + "--update {cfg.update} moves whole replicas' parameters"),
    Rule("options", lambda c: c.strategy == "pipeline" and c.shard_optimizer,
         "--shard-optimizer: " + _PIPELINE + "each stage's optimizer state is already its own"),
    Rule("options", lambda c: c.strategy == "pipeline" and c.reduce_op != "average",
         "--reduce-op: " + _PIPELINE + "Horovod's Adasum has no process sets (one per stage)"),
    # Options with the launch.
    Rule("elastic", lambda c: c.update == "async", ASYNC_NOT_ELASTIC),
    Rule("elastic", lambda c: c.strategy == "pipeline", PIPELINE_NOT_ELASTIC),
    Rule("elastic", lambda c: c.records_timeline, TIMELINE_NOT_ELASTIC),
    Rule("elastic", lambda c: bool(c.grad_groups), GROUPS_NOT_ELASTIC),
    Rule("elastic", lambda c: c.strategy == "model", MODEL_NOT_ELASTIC),
    Rule("elastic", lambda c: c.shard_optimizer, SHARDED_NOT_ELASTIC),
    Rule("gloo", lambda c: c.update == "async", _needs_mpi("--update async")),
    Rule("gloo", lambda c: c.strategy == "pipeline", _needs_mpi("--strategy pipeline")),
    Rule("ranks", lambda c: c.strategy == "model",
         "--strategy model runs one replica on one rank, but this job has {ranks} ranks (-np {ranks}): use -np 1, "
         "or --strategy hybrid for data parallelism across model-parallel replicas"),
)  # fmt: skip


def conflicts(cfg: TrainConfig, elastic: bool = False, gloo: bool = False, ranks: int = 1) -> list[str]:
    """What refuses `cfg` launched so (elastic, on Gloo, on `ranks` ranks): the messages of the rows of COMBINATIONS
    that hold, in order (its own options' rows always apply)."""
    meets = {"options"} | {name for name, on in (("elastic", elastic), ("gloo", gloo), ("ranks", ranks > 1)) if on}
    return [r.message.format(cfg=cfg, ranks=ranks) for r in COMBINATIONS if r.meets in meets and r.when(cfg)]


def check_combinations(cfg: TrainConfig, elastic: bool = False, gloo: bool = False, ranks: int = 1) -> None:
    """Raise ConfigError with the first of conflicts(...): one table for TrainConfig.validate, the launching side and
    the Trainer."""
    found = conflicts(cfg, elastic=elastic, gloo=gloo, ranks=ranks)
    if found:
        raise ConfigError(found[0])


def needs_mpi(cfg: TrainConfig) -> bool:
    """Its ranks exchange mpi4py messages (async's servers, a pipeline's stages): Horovod's controller must be MPI."""
    return any(r.when(cfg) for r in COMBINATIONS if r.meets == "gloo")


def load_yaml_defaults(path: str, valid: set[str]) -> dict[str, Any]:
    """Read a YAML config into click's default_map form; unknown keys fail with the list of valid ones."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file '{path}'")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not a text file; give a YAML file of option: value lines") from None
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path} ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"--config: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must be a mapping of option: value")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - valid)
    if unknown:
        raise ConfigError(f"--config: unknown keys {unknown} in {path}; valid keys are: {', '.join(sorted(valid))}")
    return out
