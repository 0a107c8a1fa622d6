"""hvdtrain.testing's pure parts: one result from each rank's report of a phase (the rules in results.py), each
rank's results file read back (a line cut short by a kill left out), and the world read from a launcher's variables
(a Slurm batch script is not a rank)."""

import json

import pytest

from hvdtrain.testing import results, world
from hvdtrain.testing.results import RankReport, combine


def test_a_failure_on_one_rank_fails_the_test_and_names_the_rank():
    got = combine([RankReport(0, "passed"), RankReport(1, "failed", "assert 3 == 4", "long text")])
    assert (got.outcome, got.message) == ("failed", "rank 1: assert 3 == 4")
    assert got.parts == (("rank 1", "long text"),)


def test_ranks_that_fail_alike_are_named_together_and_every_rank_alike_is_said_once():
    three = [RankReport(0, "failed", "x"), RankReport(1, "passed"), RankReport(2, "failed", "x"),
             RankReport(3, "failed", "y")]  # fmt: skip
    assert combine(three).message == "ranks 0, 2: x; rank 3: y"
    every = combine([RankReport(1, "failed", "AssertionError: rank 1: bad", "t1"), RankReport(0, "failed",
                     "AssertionError: rank 1: bad", "t0")])  # fmt: skip
    assert every.message == "every rank: AssertionError: rank 1: bad"
    assert every.parts == (("every rank (ranks 0, 1)", "t0"),)


def test_expected_failures_skips_and_passes():
    xfail = combine([RankReport(0, "skipped", wasxfail="known"), RankReport(1, "skipped", wasxfail="known")])
    assert (xfail.outcome, xfail.wasxfail) == ("skipped", "known")
    xpass = combine([RankReport(0, "passed", wasxfail="known"), RankReport(1, "passed", wasxfail="known")])
    assert (xpass.outcome, xpass.wasxfail) == ("passed", "known")
    same = combine([RankReport(0, "skipped", "no GPU"), RankReport(1, "skipped", "no GPU")])
    assert (same.outcome, same.message) == ("skipped", "no GPU")
    one = combine([RankReport(0, "passed"), RankReport(1, "skipped", "not on 1")])
    assert (one.outcome, one.message) == ("skipped", "rank 1: not on 1")
    assert combine([RankReport(0, "passed"), RankReport(1, "passed")]).outcome == "passed"


def test_each_ranks_output_keeps_its_rank_and_the_slowest_rank_is_the_duration():
    got = combine([RankReport(1, "passed", sections=(("Captured stdout call", "b"),), duration=2.0),
                   RankReport(0, "passed", sections=(("Captured stdout call", "a"),), duration=1.0)])  # fmt: skip
    assert got.sections == (("Captured stdout call (rank 0)", "a"), ("Captured stdout call (rank 1)", "b"))
    assert got.duration == 2.0


def test_results_files_read_back(tmp_path):
    w = results.Writer(str(tmp_path), 1)
    w.write("start", nodeid="t.py::a")
    w.write("report", nodeid="t.py::a", report={"when": "call"})
    w.write("finish", nodeid="t.py::a")
    w.write("start", nodeid="t.py::b")
    w.close()
    with open(tmp_path / "rank-1.jsonl", "a") as f:
        f.write(json.dumps({"event": "finish", "nodeid": "t.py::b"})[:12])  # killed mid-line
    logs = results.read(str(tmp_path))
    assert list(logs) == [1]
    log = logs[1]
    assert log.started == ["t.py::a", "t.py::b"] and log.finished == {"t.py::a"} and not log.ended
    assert log.reports == {"t.py::a": [{"when": "call"}]}


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, world.World()),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
          "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, world.World(1, 3, 1, 3, True)),
        ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"},
         world.World(1, 2, 1, 2, False)),
        ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}, world.World(2, 4, 0, 2, True)),
        # a Slurm batch script: SLURM_PROCID and SLURM_NTASKS, but no launcher started it
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"}, world.World()),
    ],
)  # fmt: skip
def test_the_world_from_the_launchers_variables(environ, expected):
    assert world.current(environ) == expected


def test_a_world_of_one_agrees_without_a_communicator():
    w = world.World()
    assert w.allgather(5) == [5]
    w.assert_all(True)
    with pytest.raises(AssertionError, match="^rank 0: wrong$"):
        w.assert_all(False, "wrong")
    gloo = world.World(0, 2)
    with pytest.raises(RuntimeError, match="use the `hvd` fixture"):
        gloo.allgather(1)
