"""The hang table (issue 30): each kind of hang of a real 2-rank job, under each controller, ends within
--hang-timeout T plus a stated bound, the report names the right rank and the function (from its stack), every
rank's stacks are in the log directory, no process of the job is left, and no traceback reaches the terminal.

    hang                                                  job                 named as
    rank 1 SIGSTOPped after step 25                       train               rank 1 ... is stopped (SIGSTOP)
    rank 1 loops forever in a hook after step 25          train               rank 1 ... is in on_step_end (faulthooks)
    rank 1 alone calls an allreduce after step 25         train               rank 1 ... is in on_step_end (faulthooks)
    rank 1 sleeps in its data loader's __getitem__        run (own program)   rank 1 ... is in __getitem__ (hangprogram)
each under mpirun (Horovod's MPI controller) and horovodrun --gloo (where Horovod's own stall check never fires).
A host whose link goes down is tests/cluster's (test_cluster.py).

Measured detection times (from the fault to hvdtrain's exit) are printed; the bound is T + ENDS_WITHIN_S.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
from test_faults import COMMON, FAULT_STEP, TEST_ENV, run_with_fault, tracebacks, worker

from hvdtrain.launching.watchdog import HANG_STATUS

REPO = Path(__file__).resolve().parents[2]
CONTROLLERS = {"mpi": ["--launcher", "mpirun"], "gloo": ["--gloo"]}
HANG_TIMEOUT_S = 6
# After T: the watchdog's check (0.25 s), the stacks (at most 8 s; ~0.3 s measured), the ranks' and the launcher's
# end (a few s), hvdtrain's report.
ENDS_WITHIN_S = 20.0
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hangs")
    return {
        **os.environ, "TMPDIR": str(tmp), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
    }  # fmt: skip


def _fault_env(env, tmp: Path) -> dict:
    return {**env, "HVDTRAIN_TEST_STEP_SLEEP": "0.05", "HVDTRAIN_TEST_RANK": "1", "HVDTRAIN_TEST_MARK": str(tmp / "mark"),
            "HVDTRAIN_TEST_STEP": str(FAULT_STEP),
            "HVDTRAIN_TEST_MARK_PAUSE": env.get("HVDTRAIN_TEST_MARK_PAUSE", "0")}  # fmt: skip


def hang_in_train(env, tmp: Path, controller: str, hook: str, act=None):
    passed = [a for name in (*TEST_ENV, "HVDTRAIN_TEST_MARK_PAUSE") for a in ("--env", name)]
    argv = [*COMMON, "--run-dir", tmp / "run", "--hooks", f"faulthooks:{hook}", *passed, *CONTROLLERS[controller],
            "--hang-timeout", HANG_TIMEOUT_S]  # fmt: skip
    return run_with_fault(_fault_env(env, tmp), tmp, argv, act or (lambda proc: None), HANG_TIMEOUT_S + ENDS_WITHIN_S)


def assert_hang(ended, kind: str, named: str):
    """The job ended with the hang's status within the bound, its report's one line names rank 1 as `named` and
    rank 0 as waiting; both ranks' stacks are kept; no traceback on the terminal."""
    TIMES[kind] = ended.seconds
    assert ended.status == HANG_STATUS, ended.err
    assert HANG_TIMEOUT_S <= ended.seconds < HANG_TIMEOUT_S + ENDS_WITHIN_S
    lines = ended.err.splitlines()
    assert len(lines) == 1, ended.err
    assert re.match(rf"hvdtrain: error: hang: rank 1 \(\S+\) {named}", lines[0]), lines[0]
    assert re.search(r"; rank 0 waits in \S+", lines[0]), lines[0]
    assert f"(no progress for {HANG_TIMEOUT_S} s: --hang-timeout {HANG_TIMEOUT_S})" in lines[0]
    stacks = re.search(r"every rank's stacks: (\S+)rank\.R\.stacks$", lines[0])
    assert stacks, lines[0]
    for rank in (0, 1):
        assert (Path(stacks.group(1)) / f"rank.{rank}.stacks").read_text().startswith("=== pid ")
    assert not tracebacks(ended.err + ended.out), ended.err + ended.out


@pytest.mark.parametrize("controller", sorted(CONTROLLERS))
def test_a_stopped_rank(controller, env, tmp_path):
    def stop(_proc):
        worker(str(tmp_path / "run"), 1).send_signal(signal.SIGSTOP)

    # rank 1 waits 2 s at its mark: the SIGSTOP lands in the hook of step 25, however long the test takes to send it
    env = {**env, "HVDTRAIN_TEST_MARK_PAUSE": "2"}
    ended = hang_in_train(env, tmp_path, controller, "MarkStep", stop)
    assert_hang(ended, f"SIGSTOP/{controller}", r"is stopped \(SIGSTOP\), in hook at step 25")


@pytest.mark.parametrize("controller", sorted(CONTROLLERS))
def test_an_endless_loop_in_a_hook(controller, env, tmp_path):
    ended = hang_in_train(env, tmp_path, controller, "Spin")
    assert_hang(ended, f"spin/{controller}", r"is in on_step_end \(faulthooks\.py:\d+\) \(hook at step 25\)")


@pytest.mark.parametrize("controller", sorted(CONTROLLERS))
def test_a_collective_only_one_rank_calls(controller, env, tmp_path):
    ended = hang_in_train(env, tmp_path, controller, "Lonely")
    assert_hang(ended, f"lonely/{controller}", r"is in on_step_end \(faulthooks\.py:\d+\) \(hook at step 25\)")


@pytest.mark.parametrize("controller", sorted(CONTROLLERS))
def test_a_rank_asleep_in_its_data_loader(controller, env, tmp_path):
    """A user's own program under `hvdtrain run`, reporting its steps with hvdtrain.progress.step."""
    argv = ["run", "-np", "2", *CONTROLLERS[controller], "--hang-timeout", HANG_TIMEOUT_S, "--output-dir",
            tmp_path / "run", *[a for name in TEST_ENV for a in ("--env", name)], "--", sys.executable,
            REPO / "tests" / "hangprogram.py"]  # fmt: skip
    ended = run_with_fault(_fault_env(env, tmp_path), tmp_path, argv, lambda proc: None, HANG_TIMEOUT_S + ENDS_WITHIN_S)
    assert_hang(ended, f"loader/{controller}", r"is in __getitem__ \(hangprogram\.py:\d+\) at step 2[45]")


def teardown_module():
    if TIMES:
        print("\nhang -> exit (s), --hang-timeout 6: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(TIMES.items())))
