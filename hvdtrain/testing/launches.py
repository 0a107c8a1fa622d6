"""The launching pytest's side: the marked tests of one launch key (rank count, timeout, named launch) run as one
job through hvdtrain's own launcher (`supervise.run_job`: mpirun, MPICH's mpiexec, srun inside an allocation,
horovodrun with Gloo by option), each rank a pytest session of those tests (`--ranks-worker`), its results in its
own file (`results`). The hang watchdog is the per-test timeout: a rank with no progress (each test's start is a
step) for the timeout ends the job, naming the rank and keeping every rank's stacks. A launch that fails during a
test (a hang, a rank that died) fails that test with what the launch said, and the tests after it run in a new
launch; one that fails before any test started fails them all with its one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from hvdtrain.errors import HvdtrainError
from hvdtrain.render import ranks_words
from hvdtrain.rundir import RunDir
from hvdtrain.testing import results

STOPPED = (130, 143)  # a job stopped by Ctrl-C or SIGTERM (run_job: 128 + the signal)


@dataclasses.dataclass(frozen=True)
class Key:
    """Which launch a test belongs to: tests with the same key run in one job."""

    size: int
    timeout: Optional[float]  # the watchdog's bound (--hang-timeout): None is auto, 0 off
    name: Optional[str] = None  # ranks(..., launch="name"): a launch of its own

    @property
    def label(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name) if self.name else ""
        return f"np{self.size}" + (f"-{name}" if name else "")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the launching pytest starts its ranks (the plugin's options)."""

    base: Path  # where each launch's results, logs and shared temporary directories go
    rootpath: Path  # the session's root: node ids are relative to it (the ranks' sessions have the same)
    worker_args: tuple[str, ...]  # pytest's own arguments for each rank's session (rootdir, ini file, plugins)
    gloo: bool = False
    launcher: Optional[str] = None
    show_output: bool = False  # -s: the ranks' output on the terminal, not in the launch's output.log


@dataclasses.dataclass
class TestRun:
    """What the launch that ran a test says of it: each rank's serialised reports (by phase, in order), and the
    launch's failure when the launch failed while this test ran (`during`) or after it ended (`after`)."""

    reports: dict[int, list[dict]]
    during: Optional[str] = None
    after: Optional[str] = None
    stacks: dict[int, str] = dataclasses.field(default_factory=dict)


def _timeout_arg(timeout: Optional[float]) -> str:
    return "auto" if timeout is None else f"{timeout:g}"


def _stacks(where: Path, size: int) -> dict[int, str]:
    """Each rank's stacks, as the hang watchdog had them dumped into the launch's logs."""
    logs = RunDir(where).logs
    out = {}
    for rank in range(size):
        path = logs.stacks(rank)
        if path.is_file():
            out[rank] = path.read_text(errors="replace").rstrip()
    return out


class Launches:
    """Runs each key's tests once, on first demand (`run_for`), and keeps what each test's launch said."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.runs: dict[str, TestRun] = {}
        self.count = 0  # jobs launched

    def run_for(self, key: Key, nodeid: str, group: Sequence[str]) -> TestRun:
        """`nodeid`'s run: launching its key's tests that have not run yet (`group`, in order) when it has none."""
        if nodeid not in self.runs:
            self._run_group(key, [n for n in group if n not in self.runs])
        return self.runs[nodeid]

    def _run_group(self, key: Key, nodeids: list[str]) -> None:
        remaining = list(nodeids)
        while remaining:
            self.count += 1
            where = self.settings.base / f"{key.label}-{self.count}"
            failure = self._launch(key, remaining, where)
            logs = results.read(str(where / "results"))
            done = [n for n in remaining if all(n in logs.get(r, results.RankLog()).finished for r in range(key.size))]
            for n in done:
                self.runs[n] = TestRun(_reports(logs, n, key.size))
            if failure is None:
                for n in remaining:
                    if n not in self.runs:
                        self.runs[n] = TestRun(_reports(logs, n, key.size), during=_not_run(logs, key.size, where))
                return
            stacks = _stacks(where, key.size)
            left = [n for n in remaining if n not in self.runs]
            errors = [e for _, log in sorted(logs.items()) for e in log.errors]
            started = [n for n in left if any(n in log.started for log in logs.values())]
            if started and not errors:  # the launch failed during this test: it fails, the tests after it run again
                self.runs[started[0]] = TestRun(_reports(logs, started[0], key.size), during=failure, stacks=stacks)
                remaining = [n for n in left if n != started[0]]
                continue
            if not left:  # every test ran; the ranks' session failed after the last
                self.runs[done[-1]].after, self.runs[done[-1]].stacks = failure, stacks
            if errors:  # a rank could not collect the tests: another launch would fail the same way
                failure = f"{failure}\n" + "\n".join(errors)
            for n in left:  # failed before any test started, or a rank could not collect them
                self.runs[n] = TestRun(_reports(logs, n, key.size), during=failure, stacks=stacks)
            return

    def _launch(self, key: Key, nodeids: Sequence[str], where: Path) -> Optional[str]:
        """Run the ranks' sessions of `nodeids`; None when the job succeeded, else its one line."""
        from hvdtrain.launching import preflight, supervise
        from hvdtrain.launching.options import LaunchOptions
        from hvdtrain.launching.spec import make_spec

        where.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pytest", *self.settings.worker_args,
            "--ranks-worker", str(where / "results"), *(f"{self.settings.rootpath}/{n}" for n in nodeids),
        ]  # fmt: skip
        options = LaunchOptions(
            np=key.size,
            gloo=self.settings.gloo,
            launcher=self.settings.launcher,
            hang_timeout=_timeout_arg(key.timeout),
            output_dir=str(RunDir(where).logs.path),
        )
        try:
            spec = make_spec(command, options)
            preflight.preflight(spec)
            with contextlib.ExitStack() as stack:
                out = None if self.settings.show_output else stack.enter_context(open(where / "output.log", "wb"))
                status = supervise.run_job(spec, echo=lambda _line: None, output=out)
        except HvdtrainError as e:
            status, failure = getattr(e, "exit_code", 1), str(e)
        else:
            failure = None
        if status in STOPPED:  # Ctrl-C or SIGTERM: the session stops, not just this test
            raise KeyboardInterrupt(failure or "stopped")
        return failure


def _reports(logs: dict[int, results.RankLog], nodeid: str, size: int) -> dict[int, list[dict]]:
    return {r: logs[r].reports.get(nodeid, []) for r in range(size) if r in logs}


def _not_run(logs: dict[int, results.RankLog], size: int, where: Path) -> str:
    """Why a launch that succeeded did not run a test on every rank."""
    missing = [r for r in range(size) if r not in logs]
    if missing:
        return (
            f"{ranks_words(missing)} wrote no results in {where / 'results'}: ranks on other hosts need it on "
            "a file system they share with this one (--ranks-dir)"
        )
    return f"the ranks' pytest sessions did not run this test (see {where / 'output.log'})"
