"""The login-node tier: as an ordinary user, for each MPI module (Open MPI, MPICH): `module load <mpi>` ->
`scripts/setup.sh` (no root, what PyPI serves) -> `hvdtrain train -np 2` reaches the accuracy bar -> `hvdtrain run`
of a user's own Horovod script gives the single-process sums -> a job through the local Slurm with
`hvdtrain submit`, as that user."""

from __future__ import annotations

import json
import re

import pytest

SCRIPT = """\
import json, os, sys
import torch, horovod.torch as hvd
from mpi4py import MPI
hvd.init()
x = torch.arange(6, dtype=torch.float64) * (hvd.rank() + 1)
out = {
    "rank": hvd.rank(), "size": hvd.size(), "local_size": hvd.local_size(),
    "horovod_sum": hvd.allreduce(x, op=hvd.Sum).tolist(),
    "mpi4py_sum": MPI.COMM_WORLD.allreduce(hvd.rank() + 1),
    "mpi_library": MPI.Get_library_version().splitlines()[0],
    "nccl_built": bool(hvd.nccl_built()), "torch_cuda": torch.version.cuda,
}
with open(os.path.join(sys.argv[1], f"rank{hvd.rank()}.json"), "w") as f:
    json.dump(out, f)
"""
FLAVOUR_WORDS = {"openmpi": "Open MPI", "mpich": "MPICH"}


def test_setup_as_the_user_builds_against_the_loaded_mpi(login):
    proc = login.setup
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ready = [line for line in proc.stdout.splitlines() if "ready:" in line]
    assert ready, proc.stdout[-2000:]
    # PyPI's torch is a CUDA build: Horovod gets NCCL operations; the MPI is the module's.
    assert re.search(r"torch 2\.13\.0\+cu\d+", ready[0]) and "NCCL" in ready[0], ready[0]
    assert f"{login.mpi} " in ready[0], ready[0]
    assert "apt-get" not in proc.stdout + proc.stderr
    again = login.run("bash", "scripts/setup.sh", timeout=300)
    assert again.returncode == 0 and "ready (nothing changed)" in again.stdout, again.stdout + again.stderr


def test_main_job_reaches_the_accuracy_bar(login):
    run_dir = login.repo / "runs" / f"train-{login.mpi}"
    proc = login.run("hvdtrain", "train", "-np", "2", "--run-dir", str(run_dir), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"test accuracy: ([0-9.]+)", proc.stdout)
    assert found and float(found.group(1)) >= 0.95, proc.stdout[-2000:]


def test_run_of_a_users_script_sums_like_one_process(login):
    out = login.repo / "runs" / f"script-{login.mpi}"
    proc = login.shell(
        f"mkdir -p {out} && cat > {out}/check.py <<'EOF'\n{SCRIPT}EOF\n"
        f"hvdtrain run -np 2 -- python {out}/check.py {out}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(login.shell(f"cat {out}/rank{r}.json").stdout) for r in range(2)]
    expected = [float(i * (1 + 2)) for i in range(6)]  # rank r sends i * (r + 1)
    for rank in ranks:
        assert rank["size"] == 2 and rank["horovod_sum"] == expected and rank["mpi4py_sum"] == 3, rank
        assert FLAVOUR_WORDS[login.mpi] in rank["mpi_library"], rank  # mpi4py runs on the module's MPI
        assert rank["nccl_built"] and rank["torch_cuda"], rank
    assert sorted(r["rank"] for r in ranks) == [0, 1]


@pytest.mark.timeout(900)
def test_submit_as_the_user_runs_through_slurm(login):
    run_dir = login.repo / "runs" / f"submit-{login.mpi}"
    slurm = login.slurm()
    proc = login.run(
        "hvdtrain", "submit", "--ntasks-per-node", "2", "--time", "20", "--run-dir", str(run_dir), "--",
        "hvdtrain", "train", "--max-steps", "60", "--run-dir", str(run_dir / "train"),
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = slurm.track(re.search(r"^submitted job (\d+)$", proc.stdout, re.M).group(1))
    tasks = slurm.wait(job, timeout=600)
    log = login.shell(f"cat {run_dir}/slurm-*.out; ls -R {run_dir} | head -50").stdout
    assert tasks[0]["JobState"] == "COMPLETED", (tasks, log[-4000:])
    assert tasks[0]["UserId"].startswith("hvdlogin"), tasks
    result = json.loads(login.shell(f"cat {run_dir}/train/result.json").stdout)
    assert result["world_size"] == 2 and result["steps"] == 60, result
    assert "test accuracy:" in log, log[-4000:]


def test_bench_launch_against_the_modules_own_launcher(login):
    """`hvdtrain bench launch` as the user: `hvdtrain run` against the plain launcher of the loaded MPI (Open MPI's
    mpirun, MPICH's mpiexec), alternating; the table (median, quartiles, ratio) goes to the tier's output for
    docs/install.md. Asserted: both arms ran every round, and the plain arm is the module's own launcher."""
    out = login.repo / "runs" / f"bench-launch-{login.mpi}"
    proc = login.run(
        "hvdtrain", "bench", "launch", "--ranks", "2", "--rounds", "7", "--arms", "mpirun,hvdtrain", "--no-train",
        "--out", str(out), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\n[login] {login.mpi}: hvdtrain bench launch --ranks 2 --rounds 7 --arms mpirun,hvdtrain\n{proc.stdout}")
    result = json.loads(login.shell(f"cat {out}/launch.json").stdout)
    assert set(result["job"]) == {"mpirun", "hvdtrain"}, result
    assert all(row["n"] == 7 for row in result["job"].values()), result
    plain = "mpiexec -n 2 -bind-to none" if login.mpi == "mpich" else "mpirun -np 2 --bind-to none"
    dry = login.run("hvdtrain", "bench", "launch", "--arms", "mpirun", "--rounds", "1", "--no-train", "--dry-run")
    assert dry.returncode == 0 and plain in dry.stdout, dry.stdout + dry.stderr
