"""`hvdtrain bench pytest`: what hvdtrain's pytest plugin costs over running pytest under mpirun by hand.

A file of trivial tests, each on N ranks (`pytestmark = pytest.mark.ranks(N)`; each test asks the `world` fixture
for its place, or, in the `hvd` file, whose module imports torch, does one Horovod allreduce), run by both arms, alternating in rotated order every round, each a whole command timed
from its start to its exit:
    plugin   `python -m pytest FILE`: the plugin launches one job of N ranks for all the tests and shows one result
             per test (each rank's reports folded into one)
    mpirun   `mpirun -np N python -m pytest FILE --with-mpi`: every rank runs the session in place (what users
             of pytest-mpi type; MPICH's `mpiexec -n N` under Hydra), N interleaved sessions' output
The plugin's target: at most 1.5x the mpirun arm's median.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from hvdtrain import mpi
from hvdtrain.bench import launching, plans, report, runner
from hvdtrain.errors import UsageError
from hvdtrain.render import render_table


@dataclasses.dataclass(frozen=True)
class PytestPlan:
    settings: plans.PytestSettings
    out: Path
    runs: list[tuple[int, str, str]]  # (round, body, arm), in the order they run
    hydra: bool = False


def make_plan(options: Mapping[str, Any]) -> PytestPlan:
    """Validate the options (PytestSettings' fields; None: not given); raises UsageError before anything runs."""
    settings = plans.resolve(plans.PytestSettings, {k: v for k, v in options.items() if v is not None})
    out = runner.out_dir(settings.out)
    if mpi.launcher_path() is None:
        raise UsageError("mpirun is not on PATH: this benchmark times it; install an MPI or put it on PATH")
    runs = [
        (r, body, arm) for r in range(settings.rounds) for body in settings.bodies
        for arm in launching.rotated(plans.PYTEST_ARMS, r)
    ]  # fmt: skip
    return PytestPlan(settings, out, runs, mpi.find_launcher().flavour == "mpich")


def test_file(tests: int, ranks: int, body: str = "world") -> str:
    """The tests both arms run: `tests` trivial tests on `ranks` ranks each; `body` world: each asks the world for
    its place; hvd: the module imports torch (as test modules of training code do) and each test is one Horovod
    allreduce (Horovod initialised once per rank)."""
    head = f"import pytest\n\npytestmark = pytest.mark.ranks({ranks})\n"
    if body == "hvd":
        head = "import torch\n" + head
        test = f"(hvd):\n    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == {ranks}\n"
    else:
        test = f"(world):\n    assert world.size == {ranks}\n"
    return head + "".join(f"\n\ndef test_{i}{test}" for i in range(tests))


def arm_argv(arm: str, path: str, ranks: int, hydra: bool = False) -> list[str]:
    """One arm's command (pure)."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    if arm == "mpirun":
        return [*launching.plain_mpirun(ranks, hydra=hydra), *pytest, "--with-mpi"]
    return pytest


def run(plan: PytestPlan, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    s = plan.settings
    samples: list[dict] = []
    with launching.scratch("hvdtrain-bench-pytest-", dry_run, "DIR") as where:
        for body in s.bodies:
            if not dry_run:
                (where / f"test_{body}.py").write_text(test_file(s.tests, s.ranks, body))
        for r, body, arm in plan.runs:
            argv = arm_argv(arm, str(where / f"test_{body}.py"), s.ranks, plan.hydra)
            if dry_run:
                echo(f"# round {r}, {body} tests, {arm}\n{shlex.join(argv)}")
                continue
            timing = launching.timed(argv, what="bench pytest", cwd=str(where))
            samples.append({"round": r, "body": body, "arm": arm, **timing})
    if dry_run:
        return {}
    result = collect(samples, s)
    return launching.save(plan.out / "pytest.json", result, table(result), echo)


def collect(samples, settings: plans.PytestSettings) -> dict:
    """Per kind of test file and arm: the spread of the whole command's wall time, per test, and over mpirun's."""
    bodies = {}
    for body in settings.bodies:
        mine = [x for x in samples if x["body"] == body]
        arms = {arm: launching.spread([x["seconds"] for x in mine if x["arm"] == arm]) for arm in plans.PYTEST_ARMS}
        for row in arms.values():
            row["vs_mpirun"] = report.ratio(row["median"], arms["mpirun"]["median"])
            row["per_test_ms"] = 1000 * row["median"] / settings.tests
        bodies[body] = arms
    meta = {**report.machine_info(), "np": settings.ranks, "tests": settings.tests, "rounds": settings.rounds}
    return {"meta": meta, "bodies": bodies}


def table(result: dict) -> str:
    m = result["meta"]
    rows = [
        [body, arm, r["median"], f"{r['q1']:.2f}-{r['q3']:.2f}", f"{r['min']:.2f}-{r['max']:.2f}", r["per_test_ms"],
         r["vs_mpirun"]]
        for body, arms in result["bodies"].items() for arm, r in arms.items()
    ]  # fmt: skip
    return render_table(
        ["tests", "arm", "median s", "quartiles", "min-max", "ms/test", "x mpirun"], rows,
        f"{m['tests']} trivial tests on {m['np']} ranks, the whole pytest command, {m['rounds']} rounds",
    )  # fmt: skip
