"""`hvdtrain run` with real processes: Horovod allreduce on 2 ranks under Gloo and MPI, mpirun, failures."""

import json
import time

import pytest
from patchcheck import requires_patch

ALLREDUCE = """
import json, os, sys
import torch
import horovod.torch as hvd
hvd.init()
r = hvd.rank()
total = hvd.allreduce(torch.tensor([float(r + 1), 10.0 * (r + 1)]), op=hvd.Sum, name="x")
mean = hvd.allreduce(torch.tensor([float(r)]), op=hvd.Average, name="y")
out = {"rank": r, "size": hvd.size(), "sum": total.tolist(), "mean": mean.item(),
       "mpi": hvd.mpi_enabled(), "gloo": hvd.gloo_enabled()}
with open(os.path.join(sys.argv[1], f"out.{r}.json"), "w") as f:
    json.dump(out, f)
print("allreduce", out)
"""

FAILING = """
import sys, time
import torch
import horovod.torch as hvd
hvd.init()
if hvd.rank() == 1:
    raise RuntimeError("boom on purpose from rank 1")
hvd.allreduce(torch.ones(1), name="never_completes")  # rank 0 would wait here forever without the launcher
time.sleep(300)
"""


@pytest.fixture
def script(tmp_path):
    def make(text, name="job.py"):
        p = tmp_path / name
        p.write_text(text)
        return p

    return make


def check_both_ranks(out_dir, controller):
    results = [json.loads((out_dir / f"out.{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["size"] == 2
        assert res["sum"] == [3.0, 30.0]  # 1+2, 10+20
        assert res["mean"] == 0.5
        if controller == "gloo":
            assert res["gloo"]
        elif controller == "mpi":
            assert res["mpi"]


@pytest.mark.parametrize(
    "flags,controller",
    [(["--gloo"], "gloo"), (["--mpi"], "mpi"), (["--launcher", "mpirun"], "mpi")],
)
def test_allreduce_on_two_ranks(hvdtrain, script, tmp_path, flags, controller):
    job = script(ALLREDUCE)
    result = hvdtrain("run", "-np", "2", *flags, "--", "python", job, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    check_both_ranks(tmp_path, controller)


def test_output_dir_has_one_log_per_rank(hvdtrain, script, tmp_path):
    job = script(ALLREDUCE)
    logs = tmp_path / "logs dir"
    result = hvdtrain("run", "-np", "2", "--output-dir", logs, "--", "python", job, tmp_path)
    assert result.returncode == 0, result.stderr
    for r in range(2):
        assert f"'rank': {r}" in (logs / f"rank.{r}.log").read_text()
        assert (logs / f"rank.{r}.exit").read_text().strip() == "0"
    assert f"per-rank logs: {logs}" in result.stdout


@pytest.mark.parametrize("flags", [[], ["--launcher", "mpirun"]])
def test_failing_rank_fails_the_job_fast_and_is_named(hvdtrain, script, flags):
    job = script(FAILING)
    start = time.monotonic()
    result = hvdtrain("run", "-np", "2", *flags, "--", "python", job, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    err = result.stderr.strip().splitlines()
    report = [line for line in err if line.startswith("hvdtrain: error: ")]
    assert report and "rank 1 failed with exit status 1" in report[0], result.stderr
    assert "boom on purpose from rank 1" in result.stderr  # its last lines are shown


def test_exit_status_is_the_jobs(hvdtrain, script):
    job = script("import sys; sys.exit(3)")
    result = hvdtrain("run", "-np", "2", "--launcher", "mpirun", "--", "python", job)
    assert result.returncode == 3
    assert "exit status 3" in result.stderr


BLOCKING = """
import json, os, sys, time
import torch
import horovod.torch as hvd
hvd.init()
r, n = hvd.rank(), hvd.size()
hvd.allreduce(torch.zeros(1), op=hvd.Sum, name="t")  # negotiated once; cached from here on
t0 = time.perf_counter()
for i in range(5):
    y = hvd.allreduce(torch.tensor([float(r + i)]), op=hvd.Sum, name="t")
    assert y.item() == sum(k + i for k in range(n)), y
with open(os.path.join(sys.argv[1], f"out.{r}.json"), "w") as f:
    json.dump({"seconds": time.perf_counter() - t0}, f)
"""


@requires_patch
@pytest.mark.parametrize("controller", ["--mpi", "--gloo"])
def test_a_blocking_collective_does_not_wait_out_the_cycle(hvdtrain, script, tmp_path, controller):
    """hvdtrain's Horovod patch (scripts/patches): a caller blocked on a result wakes the background thread.
    With a 400 ms cycle, 5 synchronous allreduces one after another take well under 2.5 cycles; with the wake
    turned off (HOROVOD_WAKE_ON_WAIT=0, stock Horovod's plain sleep) each waits for the next cycle."""
    job = script(BLOCKING)
    seconds = {}
    for wake in ("1", "0"):
        out = tmp_path / f"wake{wake}"
        out.mkdir()
        result = hvdtrain(
            "run", "-np", "2", controller, "--env", "HOROVOD_CYCLE_TIME=400", "--env", f"HOROVOD_WAKE_ON_WAIT={wake}",
            "--", "python", job, out,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        seconds[wake] = max(json.loads((out / f"out.{r}.json").read_text())["seconds"] for r in range(2))
    assert seconds["1"] < 1.0, seconds
    assert seconds["0"] > 1.2, seconds  # the control: the same job waits for cycles without the wake
