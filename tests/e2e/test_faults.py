"""The fault table (issue 29, part 3): one row per fault of a real 2-rank job, and what must hold.

    fault                                            launchers            bound    resumes (== uninterrupted)
    kill -9 of rank 1 mid-training (after step 25)   mpirun, hvd-mpi, gloo  20 s   under gloo; `report` reads
    kill -9 of rank 1 during rank 0's ckpt write     mpirun, hvd-mpi, gloo  20 s   under hvd-mpi (tmp skipped)
    SIGTERM to rank 0 during its checkpoint write    mpirun                 20 s   yes (tmp skipped)
    rank 1 stalls (stops calling collectives)        mpirun           T + 20 s     -  (--stall-timeout T = 6)
    rank 1 raises in user code (a hook)              gloo                   20 s   -  (its traceback shown whole)
    kill -9 of hvdtrain's group, --timeline on       mpirun                 20 s   yes; `timeline`, `report` read
    kill -9 of rank 1 of a user's Horovod program    mpirun, hvd-mpi, gloo  20 s   -  (`hvdtrain run`)

For every row: the job ends within the bound after the fault (measured here: 0.3-1.3 s for a kill, 12 s for the
stall); stderr is the cause in one line, then only the last lines of the failing rank's log (or the log that shows
it best), each as `  | line`; no traceback of hvdtrain's, Horovod's or a launcher's own anywhere on the terminal
(stderr and stdout) nor in the logs of hvdtrain's workers (a rank that raised in user code shows its traceback,
and it is the user's); no process of the job left; where the job wrote checkpoints, `--resume` starts from the last
complete one and ends with the weights of an uninterrupted run (deterministic mode, CPU: bit for bit, as
tests/e2e/test_train.py's resume test), saying on stderr what it passed over.

The moments are timed by the tests' hook module (tests/faulthooks.py: a mark file written at the moment; steps
slowed so that a kill lands mid-training; rank 0's checkpoint write paused once its data is in the temporary file).
Left out: a full disk (owned by the full-disk work) and a lost host (tests/cluster). Horovod 0.28.1's stall
shutdown does not act under --gloo (a rank stalled 140 s was never named), so the stall row runs under mpirun; the
hang watchdog, which does, has its own table (tests/e2e/test_hangs.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest
from conftest import HVDTRAIN
from jobprocs import job_processes, kill_all, wait_gone

from hvdtrain.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = {"mpirun": ["--launcher", "mpirun"], "horovodrun-mpi": ["--mpi"], "horovodrun-gloo": ["--gloo"]}
STEPS = 60
COMMON = ["train", "-np", "2", "--model", "mlp", "--deterministic", "--max-steps", str(STEPS), "--epochs", "20",
          "--checkpoint-every", "10", "--log-every", "5"]  # fmt: skip
FAULT_STEP = 25  # MarkStep, Stall, UserError: after this step; SlowWrite: the checkpoint of step 30
WRITE_STEP = 30
ENDS_WITHIN_S = 20.0  # from a rank's death to hvdtrain's exit (measured here: 0.3-1.5 s)
STALL_TIMEOUT_S = 6
GONE_WITHIN_S = 10.0
TEST_ENV = ("HVDTRAIN_TEST_STEP_SLEEP", "HVDTRAIN_TEST_STEP", "HVDTRAIN_TEST_RANK", "HVDTRAIN_TEST_MARK")
# A line a launcher prefixes with the rank (mpirun: "[1,0]<stdout>:", horovodrun's Gloo: "[0]<stderr>:"), or the
# report's "  | " before a log's line.
PREFIX = re.compile(r"^(\[[\d,]+\]<std(out|err)>:|  \| )")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tests' child_env (tests/conftest.py), for the module: one uninterrupted run is shared by every row."""
    tmp = tmp_path_factory.mktemp("faults")
    return {
        **os.environ, "TMPDIR": str(tmp), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",  # faulthooks, for --hooks
    }  # fmt: skip


def hvdtrain(env, cwd, *args, timeout=240):
    return subprocess.run([*HVDTRAIN, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    """result.json of the job run straight through (mpirun)."""
    tmp = tmp_path_factory.mktemp("straight")
    proc = hvdtrain(env, tmp, *COMMON, "--run-dir", tmp / "run", *LAUNCHERS["mpirun"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    return json.loads((tmp / "run" / "result.json").read_text())


@dataclasses.dataclass
class Ended:
    status: int
    seconds: float  # from the fault to hvdtrain's exit
    out: str
    err: str
    run_dir: Path  # the run directory (train), or the --output-dir of the rank logs (run)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.run_dir.glob("**/rank.*.log")))


def worker(marker: str, rank: int, program: str = "hvdtrain.worker") -> psutil.Process:
    """The process of `rank` running `program` (python -m MODULE, or python SCRIPT) in the job of `marker`."""
    for p in job_processes(marker):
        try:
            cmd = p.cmdline()
            if cmd[1:3] == ["-m", program] or cmd[1:2] == [program]:
                e = p.environ()
                if e.get("OMPI_COMM_WORLD_RANK", e.get("HOROVOD_RANK")) == str(rank):
                    return p
        except psutil.Error:
            continue
    raise AssertionError(f"no {program} of rank {rank} is running")


def run_with_fault(
    env, tmp: Path, argv: list, act: Callable[[subprocess.Popen], None], bound: float = ENDS_WITHIN_S
) -> Ended:
    """`hvdtrain ARGV` in a session of its own (as from a terminal); once the file tmp/mark is there, `act` (a
    signal; nothing when the program is the fault); then the job must end within `bound` seconds, and no process
    of it (everything whose command line holds `tmp`) may be left."""
    mark = tmp / "mark"
    with open(tmp / "stdout.txt", "w") as out, open(tmp / "stderr.txt", "w") as err:
        proc = subprocess.Popen([*HVDTRAIN, *map(str, argv)], cwd=tmp, env=env, stdout=out, stderr=err,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not mark.exists():
            why = f"the job ended ({proc.returncode}) before its fault: {(tmp / 'stderr.txt').read_text()}"
            assert proc.poll() is None, why
            assert time.monotonic() < deadline, "the fault's moment never came"
            time.sleep(0.05)
        act(proc)
        started = time.monotonic()
        try:
            proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end within {bound} s of the fault")
        seconds = time.monotonic() - started
        print(f"{tmp.name}: ended {seconds:.1f} s after the fault, status {proc.returncode}")
        left = wait_gone(str(tmp), GONE_WITHIN_S)
        assert not left, f"left behind: {[(p.pid, p.cmdline()[:4]) for p in left]}"
    finally:
        kill_all(proc, str(tmp))
    out, err = (tmp / "stdout.txt").read_text(), (tmp / "stderr.txt").read_text()
    return Ended(proc.returncode, seconds, out, err, tmp / "run")


def train_with_fault(env, tmp: Path, args: list, hook: str, act=None, rank: int = 0, bound=ENDS_WITHIN_S) -> Ended:
    """`hvdtrain train` (COMMON) with the faulthooks hook `hook` of `rank`; `act(run_dir)` at its mark."""
    fault_env = {**env, "HVDTRAIN_TEST_STEP_SLEEP": "0.05", "HVDTRAIN_TEST_RANK": str(rank),
                 "HVDTRAIN_TEST_MARK": str(tmp / "mark"),
                 "HVDTRAIN_TEST_STEP": str(WRITE_STEP if hook == "SlowWrite" else FAULT_STEP)}  # fmt: skip
    passed = [a for name in TEST_ENV for a in ("--env", name)]
    argv = [*COMMON, "--run-dir", tmp / "run", "--hooks", f"faulthooks:{hook}", *passed, *args]
    return run_with_fault(fault_env, tmp, argv, lambda proc: act and act(tmp / "run", proc), bound)


def tracebacks(text: str) -> list[list[str]]:
    """Every Python traceback in `text` (launchers' and the report's prefixes removed): its lines, up to and with
    the exception's line."""
    lines = [PREFIX.sub("", line) for line in text.splitlines()]
    found, current = [], None
    for line in lines:
        if line.startswith("Traceback (most recent call last):"):
            current = [line]
            found.append(current)
        elif current is not None:
            current.append(line)
            if not line.startswith(" "):  # the exception's line ends it
                current = None
    return found


def assert_reported(
    ended: Ended, cause: str, bound: float = ENDS_WITHIN_S, user_error: Optional[str] = None, logs_too: bool = True
):
    """The row's common rules: the bound, the one-line cause then only log lines, no traceback but the user's (on
    the terminal; and in the rank logs, `logs_too`, where the ranks run hvdtrain's worker)."""
    assert ended.status != 0
    assert ended.seconds < bound, f"ended {ended.seconds:.1f} s after the fault (bound {bound} s)"
    first, *rest = ended.err.splitlines() or [""]
    assert re.match(cause, first), ended.err
    assert all(line.startswith("  | ") for line in rest), ended.err
    places = [("the terminal", ended.err + ended.out), *([("the rank logs", ended.logs())] if logs_too else [])]
    for where, text in places:
        for tb in tracebacks(text):
            assert user_error and tb[-1] == user_error, f"a traceback on {where}:\n" + "\n".join(tb)
            assert any("faulthooks.py" in line for line in tb), "\n".join(tb)


def assert_resumes(env, tmp: Path, launcher: str, uninterrupted: dict, skipped: tuple[str, ...] = ()) -> Path:
    """--resume from the last complete checkpoint finishes with the uninterrupted run's weights; stderr says what
    it passed over (`skipped`: a fragment per line) and nothing else. Returns the checkpoint it resumed from."""
    run_dir = tmp / "run"
    newest = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    assert not (run_dir / "result.json").exists(), "the job finished before its fault: nothing was tested"
    proc = hvdtrain(env, tmp, *COMMON, "--run-dir", run_dir, "--resume", *LAUNCHERS[launcher])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert f"resumed from {newest} at step {checkpoint.checkpoint_step(newest)}" in proc.stdout
    warnings = proc.stderr.splitlines()
    assert len(warnings) == len(skipped) and all(s in w for s, w in zip(skipped, warnings)), proc.stderr
    got = json.loads((run_dir / "result.json").read_text())
    assert got["steps"] == uninterrupted["steps"] == STEPS
    assert got["params_sha256"] == uninterrupted["params_sha256"]
    return newest


def kill(rank: int, signum: int = signal.SIGKILL) -> Callable[[Path, subprocess.Popen], None]:
    return lambda run_dir, _: worker(str(run_dir), rank).send_signal(signum)


# ------------------------------------------------------------------------------------------------ the rows


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_kill_9_of_a_rank_mid_training(launcher, env, tmp_path, uninterrupted):
    """Rank 1's worker SIGKILLed after step 25 (checkpoints of steps 10 and 20 written): the report names rank 1
    and its status, 137, within 20 s; the job's status is the rank's (horovodrun's Gloo path: its own, 1). The run
    directory reads (`hvdtrain report`: no result.json, said); under horovodrun --gloo it resumes (once per
    launcher in this module: the other resumes are below)."""
    ended = train_with_fault(env, tmp_path, LAUNCHERS[launcher], "MarkStep", kill(1))
    assert_reported(ended, r"hvdtrain: error: rank 1 failed with exit status 137\b")
    assert ended.status == (1 if launcher == "horovodrun-gloo" else 137)
    assert [p.name for p in checkpoint.list_checkpoints(ended.run_dir / "checkpoints")][:2] == [
        checkpoint.checkpoint_name(10), checkpoint.checkpoint_name(20)
    ]  # fmt: skip
    if launcher == "mpirun":
        report = hvdtrain(env, tmp_path, "report", ended.run_dir, "--json")
        assert report.returncode == 0 and "no result.json (the run did not finish" in report.stderr, report.stderr
        assert json.loads(report.stdout)["runs"][0]["finished"] is False
    if launcher == "horovodrun-gloo":
        assert_resumes(env, tmp_path, launcher, uninterrupted)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_kill_9_of_a_rank_during_a_checkpoint_write(launcher, env, tmp_path, uninterrupted):
    """Rank 1's worker SIGKILLed while rank 0 writes the checkpoint of step 30 (its state in the temporary file,
    not renamed): the launcher ends rank 0 in the middle of the write, which leaves its temporary file; the report
    names rank 1. Under horovodrun --mpi, --resume passes over the temporary file, says so, resumes from step 20."""
    ended = train_with_fault(env, tmp_path, LAUNCHERS[launcher], "SlowWrite", kill(1))
    assert_reported(ended, r"hvdtrain: error: rank 1 failed with exit status 137\b")
    ckpt_dir = ended.run_dir / "checkpoints"
    assert checkpoint.interrupted_writes(ckpt_dir), "the write should have been cut"
    assert checkpoint.list_checkpoints(ckpt_dir)[-1].name == checkpoint.checkpoint_name(20)
    if launcher == "horovodrun-mpi":
        assert_resumes(env, tmp_path, launcher, uninterrupted, skipped=("unfinished checkpoint write",))


def test_sigterm_to_the_rank_writing_a_checkpoint(env, tmp_path, uninterrupted):
    """SIGTERM to rank 0 while it writes the checkpoint of step 30 (mpirun): it dies at once (Python's default
    handler: no cleanup), the report names it with status 143, and --resume passes over its temporary file."""
    ended = train_with_fault(env, tmp_path, LAUNCHERS["mpirun"], "SlowWrite", kill(0, signal.SIGTERM))
    assert_reported(ended, r"hvdtrain: error: rank 0 failed with exit status 143\b")
    newest = assert_resumes(env, tmp_path, "mpirun", uninterrupted, skipped=("unfinished checkpoint write",))
    assert newest.name == checkpoint.checkpoint_name(20)


def test_a_stalled_rank(env, tmp_path):
    """Rank 1 stops calling collectives after step 25 (mpirun): Horovod's stall shutdown ends the job within
    --stall-timeout + 20 s, naming rank 1 and the tensor rank 0 waited for."""
    args = [*LAUNCHERS["mpirun"], "--stall-timeout", str(STALL_TIMEOUT_S)]
    ended = train_with_fault(env, tmp_path, args, "Stall", rank=1, bound=STALL_TIMEOUT_S + ENDS_WITHIN_S)
    cause = rf"hvdtrain: error: rank 1 stalled: rank 0 waited more than {STALL_TIMEOUT_S} s for it to submit \S+"
    assert_reported(ended, cause, bound=STALL_TIMEOUT_S + ENDS_WITHIN_S)
    assert ended.seconds >= STALL_TIMEOUT_S


def test_a_rank_that_raises_in_user_code(env, tmp_path):
    """Rank 1's hook raises ValueError after step 25 (horovodrun --gloo: rank 0 sees Horovod shut down, horovodrun
    ends with a traceback of its own): the report names rank 1, exit status 1, and its last lines are the user's
    traceback, whole, ending in the user's exception; no other traceback anywhere."""
    error = f"ValueError: user code failed on rank 1 after step {FAULT_STEP}"
    ended = train_with_fault(env, tmp_path, LAUNCHERS["horovodrun-gloo"], "UserError", rank=1)
    cause = (
        r"hvdtrain: error: rank 1 failed with exit status 1( \(then also ranks 0\))?; last lines of \S+/rank\.1\.log:$"
    )
    assert_reported(ended, cause, user_error=error)
    assert ended.err.rstrip().endswith(f"  | {error}"), ended.err
    assert tracebacks(ended.err), ended.err


def test_kill_9_of_the_whole_job_while_it_records_a_timeline(env, tmp_path, uninterrupted):
    """SIGKILL to hvdtrain's process group (the OOM killer, kill -9 -PGID) while it records --timeline: nothing is
    left; the run directory it leaves reads: the timeline as the kill left it, the report (no result.json, said),
    and --resume (config.json lost too), equal to the uninterrupted run."""
    ended = train_with_fault(env, tmp_path, ["--timeline"], "MarkStep", lambda _, p: os.killpg(p.pid, signal.SIGKILL))
    assert ended.status == -signal.SIGKILL and ended.err == ""
    run_dir = ended.run_dir
    timeline = hvdtrain(env, tmp_path, "timeline", run_dir, "--json")
    assert timeline.returncode == 0, timeline.stderr
    # Horovod ends the array after each event (the next one overwrites the bracket): a kill between events leaves
    # a whole file, one within an event a partial last event, dropped and said.
    for warning in timeline.stderr.splitlines():
        assert warning.startswith(f"hvdtrain: warning: {run_dir}/timeline.json: skipped a partial last event")
    assert "MPI_ALLREDUCE" in json.loads(timeline.stdout)["phases"]
    report = hvdtrain(env, tmp_path, "report", run_dir)
    assert report.returncode == 0 and "no result.json (the run did not finish" in report.stderr, report.stderr
    (run_dir / "config.json").unlink()  # lost as well: a resume takes its settings from the command line
    assert_resumes(env, tmp_path, "mpirun", uninterrupted)


# A user's Horovod program under `hvdtrain run` (no hvdtrain code on its ranks): rank 0 marks its 20th allreduce.
SCRIPT = """
import os, time
import torch
import horovod.torch as hvd
hvd.init()
for i in range(100000):
    hvd.allreduce(torch.ones(1000), name="grad")
    if i == 20 and hvd.rank() == 0:
        open(os.environ["HVDTRAIN_TEST_MARK"], "w").close()
    time.sleep(0.01)
"""


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_kill_9_of_a_rank_of_a_users_horovod_program(launcher, env, tmp_path):
    """`hvdtrain run` of a plain Horovod script, rank 1 SIGKILLed mid-loop. With Gloo rank 0 sees Horovod shut down
    under it and its script, which does not catch that, printed Horovod's traceback (3 of 6 kills here before the
    fix, on the terminal and in the report): now one line on the terminal and in the report, whole in the log."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    logs = tmp_path / "run" / "logs"
    argv = ["run", "-np", "2", *LAUNCHERS[launcher], "--output-dir", logs, "--env", "HVDTRAIN_TEST_MARK", "--",
            "python", script]  # fmt: skip
    kill = lambda _: worker(str(tmp_path), 1, str(script)).send_signal(signal.SIGKILL)  # noqa: E731
    ended = run_with_fault({**env, "HVDTRAIN_TEST_MARK": str(tmp_path / "mark")}, tmp_path, argv, kill)
    ended.run_dir = logs
    assert_reported(ended, r"hvdtrain: error: rank 1 failed with exit status 137\b", logs_too=False)
    if "HorovodInternalError" in ended.logs():  # Horovod raised under rank 0 (Gloo: always, here)
        folded = "hvdtrain: Horovod shut down under this rank (another rank failed or left the job); its traceback is"
        assert folded in ended.out and folded in ended.err, ended.out[-3000:] + ended.err
