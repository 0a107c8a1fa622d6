"""What crosses the process boundary of the benchmarks, and the benchmarks' own options: small dataclasses.

Both sides import this module, so it imports nothing heavy (no torch, no click). The launching side
resolves a settings class (`AllreduceSettings`, `TrainSettings`: one CLI option per field, its default,
--tiny's default and its help written once, in the field) and writes one worker plan per launch
(`AllreduceWorkerPlan`, `TrainWorkerPlan`) as JSON; every rank reads it back with `from_json`, which
rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Mapping, Optional, Sequence, TypeVar

from hvdtrain.errors import UsageError

T = TypeVar("T")
_UNSET = object()

# Implementations the allreduce worker times, in the order of the report's columns.
# horovod_*: in place (hvd.allreduce_, the path training's DistributedOptimizer takes); *_oop: out of place
# (hvd.allreduce, a new output tensor per call).
IMPLS = ("horovod_mpi", "horovod_mpi_oop", "mpi4py", "horovod_gloo", "horovod_gloo_oop", "torch_gloo")
IMPL_LABELS = {
    "horovod_mpi": "hvd-mpi", "horovod_mpi_oop": "hvd-mpi-oop", "mpi4py": "mpi4py", "horovod_gloo": "hvd-gloo",
    "horovod_gloo_oop": "hvd-gloo-oop", "torch_gloo": "torch-gloo",
}  # fmt: skip

# How the throughput worker drives a step; trainer_lean and trainer_unwatched are diagnostics, run only when asked
# for (trainer_unwatched: the Trainer with hvdtrain.progress's calls made no-ops, the hang watchdog's cost paired).
ARMS = ("horovod", "trainer", "ddp", "sharded", "mpi4py", "nocomm", "pipeline", "trainer_lean", "trainer_unwatched")
DEFAULT_ARMS = ("horovod", "trainer", "ddp", "sharded", "mpi4py", "nocomm", "pipeline")
# The arms that run before Horovod starts (its background thread would slow them); mpi4py, nocomm and pipeline
# (one replica over every rank: no collective, mpi4py messages) need MPI.
BASELINE_ARMS = ("ddp", "mpi4py", "nocomm", "pipeline")
MPI_ARMS = ("mpi4py", "nocomm", "pipeline")
SCHEDULES = ("1f1b", "gpipe")  # the pipeline arm's (parallel.pipe's)
TRAIN_TARGETS = {
    "trainer_over_mpi4py": 0.9,  # what the communication allows
    "trainer_over_ddp": 1.3,
    "trainer_over_nocomm": 0.8,  # the hardware ceiling: N processes that do not communicate
}
# `hvdtrain bench updates`: the update rules it compares (hvdtrain train --update).
UPDATE_MODES = ("sync", "local-sgd", "async")


# --------------------------------------------------------------------------------------------------
# Plans written by the launching side and read by the workers
# --------------------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build dataclass `cls` (and the dataclasses nested in its fields) from `data`; unknown or missing keys
    fail with the list of valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if unknown or missing:
        problem = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
        raise ValueError(f"{cls.__name__}: {problem}; valid keys are: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _build(hints[name], value) for name, value in data.items()})


def _build(kind: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return [_build(args[0], v) for v in value]
    if origin is tuple:
        return tuple(_build(args[0], v) for v in value)
    if origin is dict:
        return {k: _build(args[1], v) for k, v in value.items()}
    return value


class JsonPlan:
    """to_json / from_json for the plan dataclasses below."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return from_dict(cls, json.loads(text))


@dataclasses.dataclass(frozen=True)
class AllreduceWorkerPlan(JsonPlan):
    """One launch of hvdtrain.bench.allreduce_worker."""

    controller: str  # "mpi": memcpy, mpi4py, Horovod (MPI); "gloo": torch.distributed gloo, Horovod (Gloo)
    sizes: list[int]  # message sizes in bytes (float32 tensors of size/4 elements)
    warmup: int  # untimed calls per size
    iters: int  # timed calls per size up to 16 MiB (fewer above, see report.iterations_for)
    repeats: int = 1  # timed blocks of those calls per size; a size's time is the median block's
    paired_sizes: list[int] = dataclasses.field(default_factory=list)  # MPI run: mpi4py and Horovod alternating
    pairs: int = 1  # pairs of back-to-back blocks at each of paired_sizes
    store: str = ""  # torch.distributed's FileStore file (absolute path; the runner fills it in)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """How hvdtrain.train.models.build makes one benchmark model (input 1x8x8, 10 classes)."""

    model: str  # a hvdtrain.train.models name
    hidden: int
    depth: int
    about: str  # why this shape is in the benchmark


MODEL_SHAPES = {
    "deep_mlp": ModelShape("deep_mlp", hidden=128, depth=16, about="many small tensors (36)"),
    "wide_mlp": ModelShape("mlp", hidden=1024, depth=1, about="few large tensors (6)"),
}
TINY_MODEL_SHAPES = {
    "deep_mlp": ModelShape("deep_mlp", hidden=32, depth=4, about="many small tensors (12)"),
    "wide_mlp": ModelShape("mlp", hidden=256, depth=1, about="few large tensors (6)"),
}
# Not run unless named in --models: a model whose optimizer state is worth sharding.
LARGE_MODEL_SHAPES = {
    "big_mlp": ModelShape("deep_mlp", hidden=2048, depth=3, about="12.7 M parameters: the optimizer state"),
}
TINY_LARGE_MODEL_SHAPES = {
    "big_mlp": ModelShape("deep_mlp", hidden=512, depth=1, about="0.3 M parameters: the optimizer state"),
}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One timed run of one arm on one model shape in a throughput worker."""

    arm: str  # one of ARMS
    model: str  # a key of the plan's models
    compression: str  # "none" | "fp16"
    round: int
    schedule: str = ""  # the pipeline arm's: one of SCHEDULES
    micro: int = 0  # the pipeline arm's micro-batches per batch, M

    @property
    def label(self) -> str:
        if self.arm == "pipeline":
            return f"pipeline/{self.model}/{self.schedule}/m{self.micro}"
        return f"{self.arm}/{self.model}" + ("/fp16" if self.compression == "fp16" else "")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Horovod's pytorch_synthetic_benchmark scheme: `warmup` untimed batches, then `iters` timed iterations of
    `batches_per_iter` batches each."""

    batch_size: int
    warmup: int
    iters: int
    batches_per_iter: int

    @property
    def steps(self) -> int:
        """Steps one measurement runs, warm-up included."""
        return self.warmup + self.iters * self.batches_per_iter


@dataclasses.dataclass(frozen=True)
class TrainWorkerPlan(JsonPlan):
    """One launch of hvdtrain.bench.throughput_worker: its measurements, in the order they run."""

    timing: Timing
    lr: float  # for one rank; every arm scales it by the number of ranks
    controller: Optional[str]  # the launch's Horovod controller (recorded in the result)
    models: dict[str, ModelShape]
    measurements: list[Measurement]
    run_root: str  # the Trainer arms' run directories go below it (absolute path)
    store: str = ""  # torch.distributed's FileStore file (absolute path; the runner fills it in)
    pipeline_batch: int = 0  # the pipeline arm's samples per batch (one replica's)


@dataclasses.dataclass(frozen=True)
class UpdatesWorkerPlan(JsonPlan):
    """One launch of hvdtrain.bench.updates_worker: one training run of the built-in job with one update rule."""

    mode: str  # one of UPDATE_MODES
    config: dict[str, Any]  # the TrainConfig's fields
    straggler: float  # the slowed worker's steps take this many times as long (1: none)
    straggler_rank: int  # which worker (its place among the workers)
    round: int
    store: str = ""  # unused (the runner fills it in for every benchmark)


# --------------------------------------------------------------------------------------------------
# The benchmarks' options: one field each, generated into click options by hvdtrain.cli
# --------------------------------------------------------------------------------------------------


# The most rounds a benchmark repeats its jobs (each round is a job per arm: a dry run lists them all), and the most
# ranks a benchmark's job has on this machine (found by tests/unit/test_contract.py: a huge --rounds never ended).
MAX_ROUNDS = 1000
MAX_RANKS = 1024


def option(
    default: Any, help: str, *, tiny: Any = _UNSET, low: Optional[int] = None, high: Optional[int] = None,
    choices: Sequence[str] = (),
):  # fmt: skip
    """A settings field: its default, its default under --tiny, its --help text, the smallest and largest values it
    takes and, for a comma-separated list, the valid items."""
    meta: dict[str, Any] = {"help": help, "low": low, "high": high, "choices": tuple(choices)}
    if tiny is not _UNSET:
        meta["tiny"] = tiny
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class AllreduceSettings:
    """`hvdtrain bench allreduce`'s own options."""

    out: str = option("runs/bench-allreduce", "Directory for allreduce.json/.png, parts/, logs/.")
    sizes: Optional[str] = option(
        None, "Comma-separated message sizes, e.g. 4,1KiB,64MiB (excludes --min/--max-bytes).", tiny="4,1KiB,64KiB"
    )
    min_bytes: str = option("4", "Smallest message; K/M/G are binary, e.g. 1KiB.")
    max_bytes: str = option("256MiB", "Largest message.")
    step_factor: int = option(2, "Multiply the size by this each step.", low=2)
    warmup: int = option(5, "Untimed calls per size.", tiny=1, low=0)
    iters: int = option(20, "Timed calls per block up to 16 MiB, fewer above.", tiny=3, low=1)
    repeats: int = option(
        5,
        "Timed blocks of --iters calls per size; its time is the median block's, with the blocks' range.",
        tiny=2,
        low=1,
    )
    pairs: int = option(
        15, "Pairs of back-to-back mpi4py/Horovod blocks at 1 MiB and 64 MiB (their median decides the target).",
        tiny=2, low=1,
    )  # fmt: skip
    tiny: bool = option(False, "A few small sizes and iterations: the smoke run of the test suite.")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """`hvdtrain bench train`'s own options."""

    out: str = option("runs/bench-train", "Directory for train.json/.png, parts/, logs/.")
    max_np: Optional[int] = option(
        None, "Sweep np = 1..N; N is -np if given, else SLURM_NTASKS inside an allocation, else the cores.", low=1
    )
    models: tuple[str, ...] = option(
        tuple(MODEL_SHAPES),
        "Comma-separated model shapes (big_mlp, 12.7 M parameters, only when named).",
        choices=(*MODEL_SHAPES, *LARGE_MODEL_SHAPES),
    )
    arms: tuple[str, ...] = option(
        DEFAULT_ARMS,
        "Comma-separated arms (trainer_lean, trainer_unwatched: diagnostics, see docs/performance-methods.md).",
        choices=ARMS,
    )
    batch_size: int = option(32, "Samples per rank per batch.", tiny=16, low=1)
    warmup: int = option(10, "Untimed warm-up batches.", tiny=2, low=0)
    iters: int = option(10, "Timed iterations per round.", tiny=3, low=1)
    batches_per_iter: int = option(10, "Batches per timed iteration.", tiny=2, low=1)
    rounds: int = option(
        3,
        "Rounds of every measurement, one after another (alternating arm order); ratios: median of rounds.",
        tiny=1,
        low=1,
        high=MAX_ROUNDS,
    )
    ablations: bool = option(True, "Also fusion off and fp16 compression.")
    micro_batches: str = option(
        "1,2,4,8",
        "Pipeline arm: comma-separated micro-batch counts M; at each np it runs one replica of P = np stages.",
        tiny="1,4",
    )
    schedules: tuple[str, ...] = option(SCHEDULES, "Pipeline arm: comma-separated schedules.", choices=SCHEDULES)
    pipeline_batch: int = option(256, "Pipeline arm: samples per batch of the one replica.", tiny=32, low=1)
    tiny: bool = option(False, "Small models and few batches: the smoke run of the test suite.")

    def micro_counts(self) -> list[int]:
        """--micro-batches as whole numbers, each at least 1 and at most --pipeline-batch."""
        values = _floats(self.micro_batches, "--micro-batches", low=1.0, high=float(self.pipeline_batch))
        if any(not v.is_integer() for v in values):
            raise UsageError(f"--micro-batches '{self.micro_batches}': give whole numbers, e.g. 1,2,4,8")
        return [int(v) for v in values]

    @property
    def timing(self) -> Timing:
        return Timing(self.batch_size, self.warmup, self.iters, self.batches_per_iter)

    @property
    def model_shapes(self) -> dict[str, ModelShape]:
        catalogue = (
            {**TINY_MODEL_SHAPES, **TINY_LARGE_MODEL_SHAPES} if self.tiny else {**MODEL_SHAPES, **LARGE_MODEL_SHAPES}
        )
        return {name: catalogue[name] for name in self.models}


@dataclasses.dataclass(frozen=True)
class UpdatesSettings:
    """`hvdtrain bench updates`'s own options."""

    out: str = option("runs/bench-updates", "Directory for updates.json/.png, parts/, logs/, runs/.")
    workers: int = option(2, "Ranks that train (async adds --ps-ranks server ranks to them).", low=1, high=MAX_RANKS)
    modes: tuple[str, ...] = option(UPDATE_MODES, "Comma-separated update rules.", choices=UPDATE_MODES)
    stragglers: str = option("1,2", "Comma-separated slow-down factors of the last worker (1: none).")
    epochs: int = option(10, "Epochs of the digits CNN per run.", tiny=2, low=1)
    batch_size: int = option(32, "Samples per worker per step.", low=1)
    average_every: int = option(4, "local-sgd: H.", low=1)
    local_sgd_warmup: int = option(0, "local-sgd: synchronous steps first.", low=0)
    ps_ranks: int = option(1, "async: server ranks.", low=1, high=MAX_RANKS)
    max_staleness: int = option(4, "async: S.", low=0)
    targets: str = option("0.9,0.95", "Comma-separated test accuracies to time.")
    rounds: int = option(1, "Repeat every run (alternating the modes' order).", low=1, high=MAX_ROUNDS)
    tiny: bool = option(False, "Two epochs: the smoke run of the test suite.")

    def factors(self) -> list[float]:
        return _floats(self.stragglers, "--stragglers", low=1.0, high=None)

    def accuracy_targets(self) -> list[float]:
        return accuracy_list(self.targets)


LAUNCH_ARMS = ("mpirun", "hvdtrain", "hvdtrain-horovodrun", "horovodrun")


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """`hvdtrain bench launch`'s own options."""

    out: str = option("runs/bench-launch", "Directory for launch.json.")
    ranks: int = option(2, "Ranks of every job (all on this machine).", low=1, high=MAX_RANKS)
    arms: tuple[str, ...] = option(LAUNCH_ARMS, "Comma-separated launchers to time.", choices=LAUNCH_ARMS)
    rounds: int = option(7, "Runs of every arm (alternating, rotated order).", tiny=1, low=1, high=MAX_ROUNDS)
    train: bool = option(True, "Also time the built-in job's start-up, by phase (hvdtrain train --max-steps 1).")
    tiny: bool = option(False, "One round: the smoke run of the test suite.")


PYTEST_ARMS = ("plugin", "mpirun")
PYTEST_BODIES = ("world", "hvd")


@dataclasses.dataclass(frozen=True)
class PytestSettings:
    """`hvdtrain bench pytest`'s own options."""

    out: str = option("runs/bench-pytest", "Directory for pytest.json.")
    ranks: int = option(2, "Ranks every test runs on (all on this machine).", low=1, high=MAX_RANKS)
    tests: int = option(50, "Trivial tests in the file both arms run.", tiny=5, low=1, high=10000)
    bodies: tuple[str, ...] = option(
        PYTEST_BODIES,
        "Comma-separated kinds of test file: world (each test asks its place) or hvd (torch imported by the module, "
        "each test one Horovod allreduce).",
        tiny=("world",),
        choices=PYTEST_BODIES,
    )
    rounds: int = option(5, "Runs of every arm (alternating, rotated order).", tiny=1, low=1, high=MAX_ROUNDS)
    tiny: bool = option(False, "One round of 5 tests: the smoke run of the test suite.")


def accuracy_list(text: str) -> list[float]:
    """--targets: comma-separated test accuracies in [0, 1]."""
    return _floats(text, "--targets", low=0.0, high=1.0)


def _floats(text: str, flag_name: str, low: float, high: Optional[float]) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{flag_name} '{text}': give comma-separated numbers, e.g. 1,2") from None
    bad = [v for v in values if not (v >= low and (high is None or v <= high))]
    if not values or bad:
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise UsageError(f"{flag_name} '{text}': every value must be {bound}")
    return list(dict.fromkeys(values))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_csv(text: str, valid: Sequence[str], flag: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), every item one of `valid`, duplicates dropped; else a UsageError naming `flag`."""
    items = [t.strip() for t in text.split(",")]
    bad = [t for t in items if t not in valid]
    if not text.strip() or bad:
        what = ", ".join(repr(b) for b in bad) or "empty list"
        raise UsageError(f"{flag}: unknown {what}; choose from {', '.join(valid)}")
    return tuple(dict.fromkeys(items))


def show(value: Any) -> str:
    """A default as the user would type it."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def help_text(field: dataclasses.Field) -> str:
    """The field's help with its valid items and its defaults, e.g. 'Untimed calls per size. [default: 5; tiny: 1]'."""
    meta = field.metadata
    text = meta["help"]
    if meta["choices"]:
        text += f" Choose from {', '.join(meta['choices'])}."
    if isinstance(field.default, bool):
        return text + (f" [default: {flag(field.name)}]" if field.default else "")
    shown = [f"default: {show(field.default)}"] if field.default is not None else []
    if "tiny" in meta:
        shown.append(f"tiny: {show(meta['tiny'])}")
    return text + (f" [{'; '.join(shown)}]" if shown else "")


def resolve(cls: type[T], given: Mapping[str, Any]) -> T:
    """Settings from the options the user gave (None or absent: not given): the field's default, or its tiny
    default when `given['tiny']`; comma-separated lists parsed and checked against the field's choices; every
    number checked against its lower bound. Raises UsageError naming the flag."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"unknown options {unknown}; valid ones are: {', '.join(names)}")
    tiny = bool(given.get("tiny"))
    values = {}
    for f in dataclasses.fields(cls):
        value = given.get(f.name)
        if value is None:
            value = f.metadata["tiny"] if tiny and "tiny" in f.metadata else f.default
        if f.metadata["choices"] and value is not None:
            text = value if isinstance(value, str) else ",".join(value)
            value = parse_csv(text, f.metadata["choices"], flag(f.name))
        low, high = f.metadata["low"], f.metadata["high"]
        if low is not None and value is not None and value < low:
            raise UsageError(f"{flag(f.name)} {value}: must be at least {low}")
        if high is not None and value is not None and value > high:
            raise UsageError(f"{flag(f.name)} {value}: must be at most {high}")
        values[f.name] = value
    return cls(**values)
