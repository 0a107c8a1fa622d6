"""hvdtrain's pytest plugin (hvdtrain.testing) through pytest's own pytester: real pytest sessions that launch real
ranks (mpirun; horovodrun with Gloo), one result per test with each line naming its rank, every kind of rank
trouble (a failing rank, a hung one with its stack, one that exits) ending in a result and never in a hang, and the
in-place meaning under a launcher (pytest-mpi's markers and options, junit XML per rank)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

pytest_plugins = ["pytester"]

LIMIT_S = 240  # each pytest session's hard bound

RESULTS = """
import os
import pytest

@pytest.mark.ranks(2)
def test_passes(world):
    assert (world.rank, world.size) in ((0, 2), (1, 2))

@pytest.mark.ranks(2)
def test_fails_on_rank_1(world):
    print(f"output of rank {world.rank}")
    assert world.rank + 2 == 2

@pytest.mark.ranks(2)
@pytest.mark.xfail(reason="known to fail")
def test_expected_to_fail(world):
    assert world.rank < 0

@pytest.mark.ranks(2)
def test_skipped_on_every_rank(world):
    pytest.skip("not here")

@pytest.mark.ranks([1, 2, 3])
def test_horovod_allreduce(hvd, world):
    import torch
    total = hvd.allreduce(torch.tensor([float(world.rank + 1)], dtype=torch.float64), op=hvd.Sum)
    assert total.item() == world.size * (world.size + 1) / 2
    print(f"pid {os.getpid()}")

@pytest.mark.ranks(3)
def test_mpi4py_and_the_shared_directory(comm, world, rank_tmp_path):
    (rank_tmp_path / f"from-{world.rank}").write_text("x")
    comm.Barrier()
    assert sorted(p.name for p in rank_tmp_path.iterdir()) == ["from-0", "from-1", "from-2"]
    assert comm.allreduce(world.rank) == 3

def test_plain():
    pass
"""

TROUBLE = """
import os
import time
import pytest

@pytest.mark.ranks(2)
def test_before(world):
    pass

@pytest.mark.ranks(2)
@pytest.mark.timeout(5)
def test_rank_1_hangs(hvd, world):
    import torch
    if world.rank == 1:
        while True:
            time.sleep(0.05)
    hvd.allreduce(torch.ones(1), name="only.rank.0")

@pytest.mark.ranks(2)
def test_rank_1_exits(world):
    if world.rank == 1:
        os._exit(3)
    time.sleep(30)

@pytest.mark.ranks(2)
def test_after_them(world):
    world.assert_all(world.rank == 0, f"rank {world.rank} is not 0")
"""


@pytest.fixture
def ranks_env(monkeypatch):
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    monkeypatch.setenv("COLUMNS", "400")  # the short summary's lines whole


def _workers() -> list[psutil.Process]:
    """Ranks of the plugin's launches still running anywhere on this machine."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if "--ranks-worker" in (p.info["cmdline"] or []):
            found.append(p)
    return found


def _line(result, start: str) -> str:
    return next((line for line in result.outlines if line.startswith(start)), "")


def test_one_result_per_test_with_its_ranks_named(pytester, ranks_env):
    pytester.makepyfile(test_results=RESULTS)
    result = pytester.runpytest_subprocess("-rA", "--junitxml=report.xml", timeout=LIMIT_S)
    result.assert_outcomes(passed=6, failed=1, skipped=1, xfailed=1)
    out = result.stdout.str()
    # each size of ranks([1, 2, 3]) is a test of its own; the tests of one size ran in one launch
    result.stdout.fnmatch_lines(["PASSED test_results.py::test_horovod_allreduce[[]np1[]]",
                                 "PASSED test_results.py::test_horovod_allreduce[[]np3[]]"])  # fmt: skip
    assert "hvdtrain: 3 launch(es) of ranks tests" in out  # np2, np1, np3 (the two 3-rank tests together)
    assert _line(result, "FAILED test_results.py::test_fails_on_rank_1") == (
        "FAILED test_results.py::test_fails_on_rank_1 - rank 1: assert (1 + 2) == 2"
    )
    assert "XFAIL test_results.py::test_expected_to_fail - known to fail" in out
    assert "SKIPPED [1] test_results.py" in out and ": not here" in out
    # every rank's output, each under its own heading
    result.stdout.fnmatch_lines(["*Captured stdout call (rank 0)*", "output of rank 0",
                                 "*Captured stdout call (rank 1)*", "output of rank 1"])  # fmt: skip
    junit = ET.parse(pytester.path / "report.xml").getroot()
    cases = {c.get("name"): c for c in junit.iter("testcase")}
    assert cases["test_fails_on_rank_1"].find("failure").get("message").startswith("rank 1: assert (1 + 2) == 2\n")
    assert _workers() == []


def test_a_hung_rank_and_a_rank_that_exits_end_their_tests_and_the_rest_run(pytester, ranks_env):
    pytester.makepyfile(test_trouble=TROUBLE)
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-rA", timeout=LIMIT_S)
    took = time.monotonic() - started
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    hang = _line(result, "FAILED test_trouble.py::test_rank_1_hangs")
    assert "hang: rank 1 (" in hang and ") is in test_rank_1_hangs (test_trouble.py:" in hang, hang
    # every rank's stack, the test's own frames without pytest's below them
    result.stdout.fnmatch_lines(["*rank 0's stacks*", '*horovod/torch/mpi_ops.py", line * in synchronize',
                                 '*test_trouble.py", line 16 in test_rank_1_hangs', "*rank 1's stacks*",
                                 '*test_trouble.py", line 15 in test_rank_1_hangs'])  # fmt: skip
    assert "_pytest/runner.py" not in out
    exits = _line(result, "FAILED test_trouble.py::test_rank_1_exits")
    assert "rank 1 failed with exit status 3" in exits, exits
    # the tests after each launch's failure ran in a launch of their own, and assert_all failed on every rank alike
    assert _line(result, "FAILED test_trouble.py::test_after_them") == (
        "FAILED test_trouble.py::test_after_them - every rank: AssertionError: rank 1: rank 1 is not 0"
    )
    assert "PASSED test_trouble.py::test_before" in out
    print(f"a hang (timeout 5 s) and an exiting rank: the session took {took:.1f} s")
    assert took < 90
    assert _workers() == []


def test_gloo_launch(pytester, ranks_env):
    pytester.makepyfile(
        test_gloo="""
import pytest

@pytest.mark.ranks(2)
def test_allreduce_over_gloo(hvd, world):
    import torch
    assert not world.mpi
    assert hvd.allreduce(torch.tensor([world.rank + 1.0]), op=hvd.Sum).item() == 3.0
    world.assert_all(True)
"""
    )
    result = pytester.runpytest_subprocess("--ranks-gloo", timeout=LIMIT_S)
    result.assert_outcomes(passed=1)


def test_bad_marker_is_one_line(pytester, ranks_env):
    pytester.makepyfile(test_bad="import pytest\n\n@pytest.mark.ranks(0)\ndef test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(timeout=LIMIT_S)
    out = result.stdout.str()
    assert "\nranks(0): give a rank count (>= 1) or a list of them, e.g. ranks(2) or ranks([1, 2, 4])\n" in out
    assert "Traceback" not in out
    assert result.ret != 0


IN_PLACE = """
import pytest

@pytest.mark.mpi(min_size=2)
def test_needs_two(comm):
    assert comm.allreduce(1) == comm.size

@pytest.mark.mpi(min_size=4)
def test_needs_four(comm):
    pass

@pytest.mark.ranks([1, 2])
def test_sizes(world):
    assert world.size in (1, 2)

def test_not_mpi():
    pass
"""


def _mpirun_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # fmt: skip
    argv = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable, "-m", "pytest",
            "-p", "no:cacheprovider", "--color=no", "-rs", *args]  # fmt: skip
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LIMIT_S)


def test_in_place_under_mpirun_has_pytest_mpis_meaning(tmp_path):
    (tmp_path / "test_in_place.py").write_text(IN_PLACE)
    done = _mpirun_pytest(tmp_path, "--with-mpi", "--junitxml=report.xml", "test_in_place.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("3 passed, 2 skipped") == 2, done.stdout  # each rank's session
    assert "needs at least 4 ranks; this world has 2" in done.stdout
    assert "needs 1 rank; this world has 2" in done.stdout
    # junit XML per rank: rank 0 at the path given, rank 1 beside it
    assert sorted(p.name for p in tmp_path.glob("report*.xml")) == ["report.rank1.xml", "report.xml"]
    only = _mpirun_pytest(tmp_path, "--with-mpi", "--only-mpi", "test_in_place.py")
    assert only.stdout.count("2 passed, 3 skipped") == 2, only.stdout
    assert "not an MPI test (--only-mpi)" in only.stdout


def test_in_place_under_hvdtrain_run(tmp_path):
    (tmp_path / "test_in_place.py").write_text(IN_PLACE)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "hvdtrain", "run", "-np", "2", "--", sys.executable, "-m", "pytest", "-p",
         "no:cacheprovider", "--color=no", "test_in_place.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LIMIT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("3 passed, 2 skipped") == 2, done.stdout


def test_a_rank_that_cannot_collect_the_tests_fails_them_at_once_with_its_error(pytester, ranks_env):
    """Importing the module fails on rank 1 only: every test of the launch errs with rank 1's import error, after one
    launch (another would fail the same way)."""
    pytester.makepyfile(
        test_collect="""
import os
import pytest

if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
    raise ImportError("this module cannot be imported on rank 1")

@pytest.mark.ranks(2)
def test_a(world):
    pass

@pytest.mark.ranks(2)
def test_b(world):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-rA", timeout=LIMIT_S)
    result.assert_outcomes(errors=2)  # never started: errors at setup, as pytest reports a test that could not start
    assert "hvdtrain: 1 launch(es) of ranks tests" in result.stdout.str()
    result.stdout.fnmatch_lines(["*ImportError: this module cannot be imported on rank 1*"])


SLOW = """
import time
import pytest

@pytest.mark.ranks(2)
def test_sleeps(world):
    print("started", flush=True)
    time.sleep(120)

@pytest.mark.ranks(2)
def test_never_reached(world):
    pass
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_ctrl_c_or_kill_of_pytest_leaves_no_rank(tmp_path, signum):
    """Ctrl-C stops the session (not only the test: the next one is not launched); SIGKILL of pytest itself ends its
    ranks too (the launcher is tied to it, the rank wrappers to the launcher). Either way, no rank is left."""
    (tmp_path / "test_slow.py").write_text(SLOW)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--color=no", "-s", "test_slow.py"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:  # -s: the ranks' output as it comes
            if "started" in line:
                break
        time.sleep(0.5)
        os.kill(proc.pid, signum)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 15
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _workers() == []
    if signum == signal.SIGINT:
        assert proc.returncode == 2 and "KeyboardInterrupt" in out, out  # pytest's own status for an interrupted run
        assert "no tests ran" in out and "hvdtrain: 1 launch(es) of ranks tests" in out, out  # no second launch
