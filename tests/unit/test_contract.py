"""The command line's error contract, checked by generation: command lines built from the commands' own option
declarations (click's, which hvdtrain generates from its dataclasses), with valid and invalid values, wrong types,
non-finite numbers, odd paths (files, directories, missing parents, unicode and spaces) and options of different
features combined, run through the real CLI (`hvdtrain.cli.cli`, in this process) in --dry-run for the commands
that launch or submit, and for real for those that only read (report, timeline). Each must end in exit 0, or exit 2
with exactly one `hvdtrain: error:` line (warnings aside) and nothing written; never a traceback, never exit 1
(an unforeseen error, which the boundary turns into one line and a kept traceback).

Seeded and bounded in the unit tier (HVDTRAIN_FUZZ_EXAMPLES, default 120 examples); `make fuzz` searches deeper
with a random seed. A failure it finds becomes a row of tests/unit/test_bad_input.py's table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_report import RECORDS

from hvdtrain import errors
from hvdtrain.cli import cli

EXAMPLES = int(os.environ.get("HVDTRAIN_FUZZ_EXAMPLES", "120"))
DEEP = os.environ.get("HVDTRAIN_FUZZ_DEEP", "") not in ("", "0")
GOLDEN_TIMELINE = Path(__file__).parent / "golden" / "timeline.json"
# The commands run: those with --dry-run in it (they launch or submit), the rest for real (they only read and
# plot). Left out: doctor (no input), status and logs (a job id, asked of Slurm; their table test has the cases).
DRY_RUN = ("run", "train", "plan", "bench allreduce", "bench train", "bench updates", "bench launch", "submit")
FOR_REAL = ("report", "timeline")


def commands() -> dict[str, click.Command]:
    found = {}

    def walk(group: click.Group, prefix: str) -> None:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")
            else:
                found[f"{prefix}{name}"] = command

    walk(cli, "")
    return {name: found[name] for name in (*DRY_RUN, *FOR_REAL)}


COMMANDS = commands()

# Paths every example's folder holds (made by `pool`): odd kinds of thing where a command wants a file or folder.
PATHS = [
    "afile", "adir", "run", "run/metrics.jsonl", "timeline.json", "missing/deeper/x", "afile/below",
    "with space/ü ñ", "empty.yaml", "hosts", "", "-", ".", "run/logs", "gen.yaml", "x.png", "adir/x.pdf",
]  # fmt: skip
# User code by reference (--hooks module:Name): a good one and each way one can be wrong (pool writes hookmods.py).
REFS = [
    "hookmods:Good", "hookmods:make_good", "hookmods:Missing", "nomodule:X", "raising:X", "hookmods:NotAHook",
    "hookmods:NeedsArgs", "hookmods:Good,hookmods:Good", "hookmods", ":", "hookmods:Good.nested",
]  # fmt: skip
HOOKMODS = """from hvdtrain.train.hooks import Hook
class Good(Hook):
    pass
def make_good():
    return Good()
class NotAHook:
    pass
class NeedsArgs(Hook):
    def __init__(self, a):
        self.a = a
"""
# What Slurm sets in a job, with odd values: a command run inside an allocation reads them.
SLURM_ENV = {
    "SLURM_JOB_ID": ["1", "x", ""], "SLURM_NTASKS": ["2", "0", "-1", "two"],
    "SLURM_JOB_NODELIST": ["localhost", "n[3-1]", "n[01-02]", "a,,b"], "SLURM_TASKS_PER_NODE": ["2", "1(x2)", "x"],
    "SLURM_RESTART_COUNT": ["0", "1", "z"], "SLURM_CPUS_PER_TASK": ["1", "0", "q"],
}  # fmt: skip
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
NUMBERS = st.one_of(
    st.integers(-3, 10), st.integers(-(2**63), 2**63), st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10", "1.5"])
)


def pool(folder: Path) -> None:
    """The files and folders PATHS names, in `folder`."""
    (folder / "afile").write_text("not what anything wants\n")
    (folder / "adir").mkdir()
    (folder / "run").mkdir()
    (folder / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (folder / "run" / "logs").mkdir()
    shutil.copy(GOLDEN_TIMELINE, folder / "timeline.json")
    (folder / "with space").mkdir()
    (folder / "with space" / "ü ñ").write_text("epochs: 1\n")
    (folder / "empty.yaml").write_text("")
    (folder / "hosts").write_text("localhost slots=2\n")
    (folder / "hookmods.py").write_text(HOOKMODS)
    (folder / "raising.py").write_text("raise RuntimeError('the user module fails to import')\n")


def numbers(kind: click.ParamType) -> st.SearchStrategy:
    """Numbers near a range's ends (click's IntRange, FloatRange) and anywhere, as text."""
    low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    near = [st.integers(int(b) - 2, int(b) + 2) for b in (low, high) if b is not None and abs(b) < 2**62]
    inside = [st.integers(int(low), int(low) + 16)] if low is not None and abs(low) < 2**62 else []
    return st.one_of(*near, *inside, *inside, NUMBERS).map(str)


def value(param: click.Parameter) -> st.SearchStrategy:
    """Values for one option or argument: its own choices and numbers near its range, and the wrong kinds."""
    kind = param.type
    wrong = st.one_of(TEXT, st.sampled_from(PATHS), NUMBERS.map(str))
    if param.name == "hooks":
        return st.one_of(st.sampled_from(REFS), wrong)
    if isinstance(kind, click.Choice):
        right = st.sampled_from([str(c) for c in kind.choices])
        if getattr(param, "multiple", False) or "list" == kind.name:
            right = st.lists(right, min_size=1, max_size=3).map(",".join)
    elif isinstance(kind, click.types.ParamType) and kind.name == "list":  # bench's comma lists
        right = st.lists(st.sampled_from([str(c) for c in kind.choices]), min_size=1, max_size=3).map(",".join)
    elif isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
        right = numbers(kind)
    elif isinstance(kind, click.Tuple):
        right = st.tuples(*[numbers(t) for t in kind.types])
        return st.one_of(right, st.tuples(*[wrong for _ in kind.types]))
    elif isinstance(param.default, (str, int, float)) and not isinstance(param.default, bool):
        right = st.sampled_from([str(param.default)])
    else:
        right = st.sampled_from(PATHS)
    return st.one_of(right, right, right, right, wrong)  # mostly right: deeper checks are reached


def option_args(param: click.Option) -> st.SearchStrategy:
    """The argv pieces of one option: its flag (either of a --x/--no-x pair), then its value(s)."""
    if param.is_flag:
        return st.sampled_from([[o] for o in [*param.opts, *param.secondary_opts]])
    flag = st.sampled_from(param.opts)
    values = value(param)
    if isinstance(param.type, click.Tuple):
        return st.tuples(flag, values).map(lambda fv: [fv[0], *fv[1]])
    return st.tuples(flag, values).map(list)


def arguments(name: str, command: click.Command) -> st.SearchStrategy:
    """The command's positional arguments: paths for report and timeline, a command line for run and submit."""
    if name in ("run", "submit"):
        return st.one_of(
            st.just(["--", "true"]), st.just(["--", "python", "-c", "pass"]), st.lists(TEXT, min_size=1, max_size=2)
        )
    if name in FOR_REAL:
        return st.lists(st.sampled_from(PATHS), min_size=1, max_size=2)
    assert not [p for p in command.params if isinstance(p, click.Argument)], f"{name}: arguments not generated"
    return st.just([])


def yaml_value(param: click.Option) -> st.SearchStrategy:
    """A --config file's value for an option: of its type, of another, a list, a mapping, nothing."""
    scalar = st.one_of(
        value(param), st.integers(-5, 100), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), TEXT
    )
    return st.one_of(scalar, scalar, st.lists(scalar, max_size=2), st.dictionaries(TEXT, scalar, max_size=1), st.none())


@st.composite
def config_file(draw, options: list) -> str:
    """YAML text of option: value lines (keys spelled - or _, or no option at all), or not a mapping."""
    import yaml

    keys = draw(st.lists(st.sampled_from(options), max_size=3, unique_by=lambda p: p.name))
    mapping = {}
    for param in keys:
        name = draw(st.sampled_from([param.name, param.name.replace("_", "-"), param.name + "x"]))
        mapping[name] = draw(yaml_value(param))
    return draw(st.one_of(st.just(yaml.safe_dump(mapping)), st.just(yaml.safe_dump(mapping)), TEXT))


@st.composite
def command_lines(draw) -> tuple[list[str], str, dict]:
    """(argv, a --config file's text for gen.yaml, Slurm's variables to set)."""
    name = draw(st.sampled_from(sorted(COMMANDS)))
    command = COMMANDS[name]
    options = [p for p in command.params if isinstance(p, click.Option) and p.name not in ("help", "dry_run", "config")]
    chosen = draw(st.lists(st.sampled_from(options), max_size=6, unique_by=lambda p: p.name)) if options else []
    argv = [*name.split()]
    if name in DRY_RUN:
        argv.append("--dry-run")
    text = ""
    if any(p.name == "config" for p in command.params) and draw(st.booleans()):
        text = draw(config_file(options))
        argv += ["--config", "gen.yaml"]
    for param in chosen:
        argv += draw(option_args(param))
    slurm = draw(st.dictionaries(st.sampled_from(sorted(SLURM_ENV)), st.just(""), max_size=4))
    env = {key: draw(st.sampled_from(SLURM_ENV[key])) for key in slurm}
    return argv + draw(arguments(name, command)), text, env


MEMORY_LIMIT = 4 << 30  # address space an example may add to the test process's
EXAMPLE_LIMIT_S = 60  # a dry run or a report takes well under a second (a --hooks check about one)


class TooSlow(BaseException):
    """An example ran past EXAMPLE_LIMIT_S: a hang, or work (a dry run's plan) growing with a number given."""


def _too_slow(signum, frame):
    raise TooSlow(f"the command ran past {EXAMPLE_LIMIT_S} s")


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder per example, under this; hvdtrain's cache (where an unforeseen error's traceback goes) beside."""
    import resource

    import psutil

    base = tmp_path_factory.mktemp("contract")
    old_cwd, old_cache = os.getcwd(), os.environ.get("HVDTRAIN_CACHE")
    os.environ["HVDTRAIN_CACHE"] = str(base / "cache")
    # Memory as a limit too: a command whose work grows with a number given fails here (MemoryError, the boundary's
    # exit 1), not by the machine's OOM killer.
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + MEMORY_LIMIT, old_limit[1]))
    yield base
    resource.setrlimit(resource.RLIMIT_AS, old_limit)
    os.chdir(old_cwd)
    if old_cache is None:
        os.environ.pop("HVDTRAIN_CACHE", None)
    else:
        os.environ["HVDTRAIN_CACHE"] = old_cache


@settings(
    max_examples=EXAMPLES, derandomize=not DEEP, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(example=command_lines())
def test_every_command_line_is_success_or_one_line_exit_2(example, workdir):
    argv, config_text, slurm_env = example
    folder = workdir / "example"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    folder.mkdir()
    pool(folder)
    (folder / "gen.yaml").write_text(config_text)
    os.chdir(folder)
    errors.keep_tracebacks_in(None)
    before = tree(folder)
    env = {**dict.fromkeys(k for k in os.environ if k.startswith("SLURM_")), **slurm_env}  # None: unset
    signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(EXAMPLE_LIMIT_S)
    try:
        result = CliRunner().invoke(cli, argv, env=env, catch_exceptions=True)
    finally:
        signal.alarm(0)
    os.chdir(workdir)
    shown = (
        f"{' '.join(f'{k}={v}' for k, v in slurm_env.items())} hvdtrain {' '.join(argv)}\ngen.yaml: {config_text!r}\n"
        f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    event(f"{argv[0]} exit {result.exit_code}")
    if result.exit_code == 2:
        event(" ".join(result.stderr.split(":")[1:3])[:60])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert not (workdir / "cache" / "tracebacks").exists(), shown
    assert result.exit_code in (0, 2), shown
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if not line.startswith("hvdtrain: warning: ")]
        assert len(lines) == 1 and lines[0].startswith("hvdtrain: error: "), shown
        assert tree(folder) == before, "something was written\n" + shown
