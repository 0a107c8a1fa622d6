"""`hvdtrain bench launch`: how long a job takes to start, through each launcher, and where a training job's
start-up goes.

Arms, each a whole command timed from its start to its exit (wall clock), alternating in rotated order every round:
    mpirun               plain `mpirun -np N --bind-to none --map-by slot python -m hvdtrain.bench.trivial_job`
                         (with an MPICH-family MPI on PATH: `mpiexec -n N -bind-to none python -m ...`, Hydra's own)
    hvdtrain             `hvdtrain run -np N -- python -m ...trivial_job` (the default launcher: mpirun here)
    hvdtrain-horovodrun  the same with --launcher horovodrun (the default before, and horovodrun's MPI path)
    horovodrun           plain `horovodrun -np N python -m ...trivial_job`
The trivial job is hvd.init and one allreduce. Then `hvdtrain train -np N --max-steps 1` through the default
launcher and through horovodrun: its result.json's start-up phases (hvdtrain.startup) per round.

The arms are commands a user types, so this benchmark starts them itself (subprocess, argv lists), the one
process-starting place outside supervise.run_job among the benchmarks: what run_job adds is what is measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from hvdtrain import mpi
from hvdtrain.bench import plans, report, runner
from hvdtrain.errors import HvdtrainError, UsageError
from hvdtrain.launching.argv import ROOT_ENV, find_horovodrun
from hvdtrain.render import render_table
from hvdtrain.rundir import RunDir

TRAIN_ARMS = ("hvdtrain", "hvdtrain-horovodrun")  # `hvdtrain train` through the default launcher / horovodrun
JOB = "hvdtrain.bench.trivial_job"
TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    settings: plans.LaunchSettings
    out: Path
    runs: list[tuple[int, str, str]]  # (round, "job" | "train", arm), in the order they run
    hydra: bool = False  # the MPI on PATH is MPICH's Hydra: the plain arm runs its mpiexec


def make_plan(options: Mapping[str, Any]) -> LaunchPlan:
    """Validate the options (LaunchSettings' fields; None: not given); raises UsageError before anything runs."""
    settings = plans.resolve(plans.LaunchSettings, {k: v for k, v in options.items() if v is not None})
    out = runner.out_dir(settings.out)
    commands = {"mpirun": mpi.launcher_path(), "horovodrun": shutil.which(find_horovodrun())}  # as the arms run them
    for tool in ("mpirun", "horovodrun") if "horovodrun" in settings.arms else ("mpirun",):
        if commands[tool] is None:
            raise UsageError(f"{tool} is not on PATH: this benchmark times it; install it or put it on PATH")
    hydra = mpi.find_launcher().flavour == "mpich"
    runs = []
    for r in range(settings.rounds):
        runs += [(r, "job", arm) for arm in rotated(settings.arms, r)]
        if settings.train:
            runs += [(r, "train", arm) for arm in rotated(TRAIN_ARMS, r)]
    return LaunchPlan(settings, out, runs, hydra)


def rotated(items: Sequence[str], by: int) -> list[str]:
    """`items` started at position `by` (mod len): every arm runs first in some round."""
    k = by % len(items)
    return [*items[k:], *items[:k]]


def arm_argv(arm: str, what: str, np: int, run_dir: str, cores: Optional[int] = None, hydra: bool = False) -> list[str]:
    """The command of one arm (pure): the trivial job ("job"), or one step of the built-in job ("train")."""
    py = sys.executable
    beside = Path(py).parent / "hvdtrain"  # the console script of this interpreter's environment
    hvdtrain = [str(beside)] if beside.exists() else [py, "-m", "hvdtrain"]
    if what == "train":
        argv = [*hvdtrain, "train", "-np", str(np), "--max-steps", "1", "--epochs", "1", "--run-dir", run_dir]
        return argv + (["--launcher", "horovodrun"] if arm == "hvdtrain-horovodrun" else [])
    job = [py, "-m", JOB]
    if arm == "mpirun":
        return [*plain_mpirun(np, cores, hydra), *job]
    if arm == "horovodrun":
        return [find_horovodrun(), "-np", str(np), *job]
    argv = [*hvdtrain, "run", "-np", str(np)]
    return argv + (["--launcher", "horovodrun"] if arm == "hvdtrain-horovodrun" else []) + ["--", *job]


def plain_mpirun(np: int, cores: Optional[int] = None, hydra: bool = False) -> list[str]:
    """The MPI's own launcher as a user types it for `np` ranks on this machine (MPICH's mpiexec under Hydra)."""
    if hydra:
        return ["mpiexec", "-n", str(np), "-bind-to", "none"]
    over = ["--oversubscribe"] if np > (cores or os.cpu_count() or 1) else []
    return ["mpirun", "-np", str(np), "--bind-to", "none", "--map-by", "slot", *over]


def run(plan: LaunchPlan, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    s = plan.settings
    samples: list[dict] = []
    with scratch("hvdtrain-bench-launch-", dry_run, "RUN_DIR") as where:
        for r, what, arm in plan.runs:
            run_dir = str(where / f"{what}-{arm}-{r}")
            argv = arm_argv(arm, what, s.ranks, run_dir, hydra=plan.hydra)
            if dry_run:
                echo(f"# round {r}, {what}, {arm}\n{shlex.join(argv)}")
                continue
            samples.append({"round": r, "what": what, "arm": arm, **timed(argv, run_dir if what == "train" else None)})
    if dry_run:
        return {}
    result = collect(samples, s)
    return save(plan.out / "launch.json", result, table(result), echo)


@contextlib.contextmanager
def scratch(prefix: str, dry_run: bool, placeholder: str) -> Iterator[Path]:
    """A temporary directory for the commands' files, removed after them (a dry run: `placeholder`, nothing made)."""
    if dry_run:
        yield Path(placeholder)
        return
    where = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def save(path: Path, result: dict, text: str, echo: Callable[[str], None]) -> dict:
    """The result as JSON at `path` (its directory made), its table said, and where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(path, result)
    echo(text)
    echo(f"wrote {path}")
    return result


def timed(argv: list[str], run_dir: Optional[str] = None, what: str = "bench launch", cwd=None) -> dict:
    env = {**os.environ, **(ROOT_ENV if os.geteuid() == 0 else {})}
    started = time.perf_counter()
    proc = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise HvdtrainError(f"{what}: `{' '.join(argv)}` exited with status {proc.returncode}: {' | '.join(tail)}")
    out: dict[str, Any] = {"seconds": seconds}
    if run_dir is not None:
        out["startup_s"] = json.loads(RunDir(run_dir).result.read_text())["startup_s"]
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method; the values themselves for fewer than 2), min and max."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": q[1], "q1": q[0], "q3": q[2], "min": min(values), "max": max(values), "n": len(values)}


def collect(samples: Sequence[dict], settings: plans.LaunchSettings) -> dict:
    """Per arm: the spread of the job's wall time and its median over plain mpirun's; per train arm: the wall
    time and each start-up phase's median."""
    jobs = {arm: spread([x["seconds"] for x in samples if x["what"] == "job" and x["arm"] == arm])
            for arm in settings.arms}  # fmt: skip
    base = jobs.get("mpirun", {}).get("median")
    for row in jobs.values():
        row["vs_mpirun"] = report.ratio(row["median"], base)
    train = {}
    for arm in TRAIN_ARMS:
        mine = [x for x in samples if x["what"] == "train" and x["arm"] == arm]
        if not mine:
            continue
        phases = list(dict.fromkeys(p for x in mine for p in _ordered(x["startup_s"])))
        train[arm] = {
            "wall": spread([x["seconds"] for x in mine]),
            "phases": {p: statistics.median(x["startup_s"].get(p, 0.0) for x in mine) for p in phases},
        }
    return {"meta": {**report.machine_info(), "np": settings.ranks, "rounds": settings.rounds}, "job": jobs,
            "train": train}  # fmt: skip


PHASES = ("launch", "imports", "hvd.init", "data", "model", "broadcast", "restore", "first step")


def _ordered(phases: Mapping[str, float]) -> list[str]:
    return sorted(phases, key=lambda p: PHASES.index(p) if p in PHASES else len(PHASES))


def table(result: dict) -> str:
    np, rounds = result["meta"]["np"], result["meta"]["rounds"]
    rows = [[arm, r["median"], f"{r['q1']:.2f}-{r['q3']:.2f}", f"{r['min']:.2f}-{r['max']:.2f}", r["vs_mpirun"]]
            for arm, r in result["job"].items()]  # fmt: skip
    out = [render_table(["launcher", "median s", "quartiles", "min-max", "x mpirun"], rows,
                        f"a trivial Horovod job (hvd.init + one allreduce) on {np} ranks, {rounds} rounds")]  # fmt: skip
    if result["train"]:
        phases = list(dict.fromkeys(p for t in result["train"].values() for p in _ordered(t["phases"])))
        rows = [[arm, t["wall"]["median"], *[t["phases"].get(p) for p in phases], sum(t["phases"].values())]
                for arm, t in result["train"].items()]  # fmt: skip
        out += ["", render_table(["hvdtrain train", "wall s", *phases, "to 1st step"], rows,
                                 "time to the first step of the built-in job, by phase (medians, s)")]  # fmt: skip
    return "\n".join(out)
