"""Against a real local Slurm: the templates with plain sbatch, `hvdtrain submit`, arrays, and a job that is
signalled mid-training, checkpoints, requeues itself, resumes, and ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm"
HOROVOD_HELLO = "import horovod.torch as hvd; hvd.init(); print(f'hello rank {hvd.rank()} of {hvd.size()}', flush=True)"


def result_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_template_data_parallel_train_reaches_the_accuracy_bar(slurm, tmp_path):
    """slurm/data-parallel.sbatch with plain sbatch: 2 tasks, `hvdtrain train` (the CNN on digits) >= 95%."""
    start = time.monotonic()
    job = slurm.sbatch(
        ["--ntasks-per-node=2", TEMPLATES / "data-parallel.sbatch", "hvdtrain", "train", "--run-dir", tmp_path / "dp",
         "--epochs", "10"],
        cwd=tmp_path,
    )  # fmt: skip
    (task,) = slurm.wait(job, timeout=400)
    out = text(tmp_path / f"hvdtrain-dp-{job}.out")
    assert task["JobState"] == "COMPLETED", out
    res = result_of(tmp_path / "dp")
    assert res["world_size"] == 2 and res["test_accuracy"] >= 0.95, res
    assert f"test accuracy: {res['test_accuracy']:.4f}" in out
    assert (tmp_path / "dp" / "logs" / "rank.1.log").is_file()
    print(f"data-parallel template: {res['test_accuracy']:.4f} in {time.monotonic() - start:.0f} s wall")


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_template_starts_horovod_ranks_with_srun_pmix_or_mpirun(slurm, tmp_path, launcher):
    """A user script (not hvdtrain) started on every task by the template: Horovod sees 2 ranks; rank logs."""
    job = slurm.sbatch(
        ["--ntasks-per-node=2", TEMPLATES / "data-parallel.sbatch", "python", "-c", HOROVOD_HELLO],
        cwd=tmp_path, extra_env={"HVDTRAIN_LAUNCHER": launcher},
    )  # fmt: skip
    (task,) = slurm.wait(job, timeout=180)
    out = text(tmp_path / f"hvdtrain-dp-{job}.out")
    assert task["JobState"] == "COMPLETED", out
    logs = tmp_path / "runs" / f"hvdtrain-dp-{job}" / "logs"
    if launcher == "srun":
        found = [text(logs / f"rank.{r}.log") for r in (0, 1)]
    else:  # mpirun --output-filename DIR: DIR/1/rank.R/stdout
        found = [text(logs / "1" / f"rank.{r}" / "stdout") for r in (0, 1)]
    for r in (0, 1):
        assert f"hello rank {r} of 2" in found[r], (out, found)
    assert "--mpi=pmix" in out if launcher == "srun" else "'mpirun'" in out


def test_submit_array_sweep_gives_three_distinct_results(slurm, tmp_path):
    """`hvdtrain submit --array 0-2`: {task} becomes the task id; 3 runs, 3 different trained models."""
    run = tmp_path / "sweep"
    job = slurm.submit(
        "--array", "0-2", "--ntasks-per-node", "1", "--run-dir", run, "--job-name", "sweep", "--",
        "hvdtrain", "train", "--model", "mlp", "--max-steps", "30", "--seed", "{task}", "--run-dir", f"{run}/seed-{{task}}",
        cwd=tmp_path,
    )  # fmt: skip
    tasks = slurm.wait(job, timeout=300)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2"]
    assert all(t["JobState"] == "COMPLETED" for t in tasks), [(t["JobId"], t["JobState"]) for t in tasks]
    results = [result_of(run / f"seed-{i}") for i in range(3)]
    assert all(r["steps"] == 30 for r in results)
    assert len({r["params_sha256"] for r in results}) == 3, results
    status = slurm.hvdtrain("status", job)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 3, status.stdout
    logs = slurm.hvdtrain("logs", f"{job}_1")
    assert logs.returncode == 0 and "test accuracy:" in logs.stdout, logs.stdout + logs.stderr
    rank0 = slurm.hvdtrain("logs", f"{job}_2", "--rank", "0")
    assert rank0.returncode == 0 and "seed-2" in rank0.stdout.splitlines()[0], rank0.stdout + rank0.stderr


def test_template_array_sweep_values(slurm, tmp_path):
    """slurm/array-sweep.sbatch with plain sbatch: {value} from HVDTRAIN_SWEEP_VALUES, one run per task."""
    script = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
    job = slurm.sbatch(
        ["--array=0-2", TEMPLATES / "array-sweep.sbatch", "python", "-c", script, "out-{task}.txt", "lr={value} job={job}"],
        cwd=tmp_path, extra_env={"HVDTRAIN_SWEEP_VALUES": "0.5 a&b 2"},
    )  # fmt: skip
    tasks = slurm.wait(job, timeout=180)
    assert all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    got = [text(tmp_path / f"out-{i}.txt") for i in range(3)]
    assert got == [f"lr=0.5 job={job}", f"lr=a&b job={job}", f"lr=2 job={job}"]
    assert (tmp_path / f"hvdtrain-sweep-{job}_1.out").is_file()


@pytest.mark.parametrize("name", ["a b", "a'; echo x"])
def test_submit_hostile_run_dir(slurm, tmp_path, name):
    """Run directories with spaces and quotes survive sbatch's #SBATCH parsing and the script."""
    run = tmp_path / name
    probe = "import os; print('rank', os.environ['SLURM_PROCID'], 'of', os.environ['SLURM_NTASKS'])"
    job = slurm.submit("--ntasks-per-node", "2", "--run-dir", run, "--", "python", "-c", probe, cwd=tmp_path)
    (task,) = slurm.wait(job, timeout=120)
    out = text(run / f"slurm-{job}.out")
    assert task["JobState"] == "COMPLETED", out
    assert (run / "job.sbatch").is_file()
    for r in (0, 1):
        assert f"rank {r} of 2" in text(run / "logs" / f"rank.{r}.log")
    logs = slurm.hvdtrain("logs", job, "--rank", "1")
    assert logs.returncode == 0 and "rank 1 of 2" in logs.stdout, logs.stdout + logs.stderr
    assert not (tmp_path / "x").exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]
    whole = slurm.hvdtrain("logs", job)
    assert whole.returncode == 0 and whole.stdout.splitlines()[0] == f"==> {run}/slurm-{job}.out <==", whole.stdout
    status = slurm.hvdtrain("status", job)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and f"output {run}/slurm-{job}.out" in status.stdout


def test_signal_to_the_batch_shell_reaches_mpirun_ranks(slurm, tmp_path):
    """--signal=B:USR2@T / scancel --batch: the script's trap passes the signal on (hvdtrain -> mpirun -> ranks);
    with --no-requeue the job checkpoints at one step on every rank and ends."""
    run = tmp_path / "b"
    job = slurm.sbatch(
        ["--ntasks-per-node=2", TEMPLATES / "data-parallel.sbatch", "hvdtrain", "train", "--launcher", "mpirun",
         "--max-steps", "300", "--log-every", "5", "--no-eval-every-epoch", "--no-requeue", "--run-dir", run],
        cwd=tmp_path,
    )  # fmt: skip
    out_file = tmp_path / f"hvdtrain-dp-{job}.out"
    deadline = time.monotonic() + 240
    while not re.search(r"step (1\d|[2-9]\d)/300", text(out_file)):
        assert time.monotonic() < deadline, f"no progress line in time:\n{text(out_file)}"
        time.sleep(0.5)
    slurm.run(["scancel", "--batch", "--signal=USR2", job])
    (task,) = slurm.wait(job, timeout=120)
    out = text(out_file)
    assert task["JobState"] == "COMPLETED", out
    m = re.search(r"preempted at step (\d+)", out)
    assert m and int(m.group(1)) < 300, out
    res = result_of(run)
    assert res["preempted"] and res["steps"] == int(m.group(1)) and res["requeued"] is None, res
    assert (run / "checkpoints" / f"step-{int(m.group(1)):08d}.pt").is_file()


STEPS = 400  # ~2 s of training at ~5 ms a step: the signal, sent after step 10 shows, lands before the end


def _train_args(run_dir: Path) -> list[str]:
    return ["hvdtrain", "train", "--deterministic", "--max-steps", str(STEPS), "--epochs", "50", "--log-every", "5",
            "--no-eval-every-epoch", "--run-dir", str(run_dir)]  # fmt: skip


def test_signalled_job_checkpoints_requeues_resumes_and_matches(slurm, tmp_path):
    """scancel --signal=USR2 mid-training: all ranks stop at one step, rank 0 checkpoints and requeues the
    job; the requeued job resumes by itself and ends with the same weights as an uninterrupted run."""
    start = time.monotonic()
    ref = slurm.submit("--ntasks-per-node", "2", "--run-dir", tmp_path / "ref", "--job-name", "ref", "--",
                       *_train_args(tmp_path / "ref" / "train"), cwd=tmp_path)  # fmt: skip
    job = slurm.submit("--ntasks-per-node", "2", "--run-dir", tmp_path / "pre", "--job-name", "pre", "--",
                       *_train_args(tmp_path / "pre" / "train"), cwd=tmp_path)  # fmt: skip
    out_file = tmp_path / "pre" / f"slurm-{job}.out"

    # Wait for a progress line (training is under way), then send the warning signal to the job's steps.
    deadline = time.monotonic() + 240
    while not re.search(rf"step (1\d|[2-9]\d)/{STEPS}", text(out_file)):
        assert time.monotonic() < deadline, f"no progress line in time:\n{text(out_file)}"
        assert slurm.show(job)[0]["JobState"] in ("PENDING", "RUNNING"), text(out_file)
        time.sleep(0.5)
    slurm.run(["scancel", "--signal=USR2", job])

    # The job requeues itself; Slurm holds a requeued job for ~2 minutes (BeginTime): release it once it is gone.
    slurm.release_requeued(job)
    (task,) = slurm.wait(
        job, timeout=300, until=lambda t: t[0]["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    )
    (ref_task,) = slurm.wait(ref, timeout=300)
    out = text(out_file)
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", (task, out)
    assert ref_task["JobState"] == "COMPLETED", text(tmp_path / "ref" / f"slurm-{ref}.out")

    m = re.search(r"preempted at step (\d+)", out)
    assert m and 10 <= int(m.group(1)) < STEPS, out
    assert f"requeued Slurm job {job}" in out
    assert "restart 1," in out  # the job script's banner of the second run
    assert f"step-{int(m.group(1)):08d}.pt" in out
    res, ref_res = result_of(tmp_path / "pre" / "train"), result_of(tmp_path / "ref" / "train")
    assert res["steps"] == ref_res["steps"] == STEPS and not res["preempted"]
    assert res["params_sha256"] == ref_res["params_sha256"]
    print(f"preempted at step {m.group(1)}, requeued, resumed, equal weights in {time.monotonic() - start:.0f} s wall")


def test_sigkill_of_hvdtrain_in_a_job_ends_its_srun_ranks(slurm, tmp_path):
    """The OOM killer (or kill -9) takes `hvdtrain train` inside an allocation: srun gets SIGTERM from the kernel
    and ends the step, and each rank's wrapper sees its launcher gone; no rank of the job is left."""
    import psutil

    run = tmp_path / "k"
    job = slurm.sbatch(
        ["--ntasks-per-node=2", TEMPLATES / "data-parallel.sbatch", "hvdtrain", "train", "--epochs", "500",
         "--log-every", "5", "--run-dir", run],
        cwd=tmp_path,
    )  # fmt: skip
    out_file = tmp_path / f"hvdtrain-dp-{job}.out"
    deadline = time.monotonic() + 240
    while not re.search(r"step (1\d|[2-9]\d)/", text(out_file)):
        assert time.monotonic() < deadline, f"no progress line in time:\n{text(out_file)}"
        time.sleep(0.5)

    def of_job(*module):
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if str(run) in " ".join(cmd) and (not module or cmd[1:3] == list(module)):
                found.append(p)
        return found

    (launcher,) = [
        p for p in of_job() if p.info["cmdline"][1].endswith("/hvdtrain") and p.info["cmdline"][2] == "train"
    ]
    assert len(of_job("-m", "hvdtrain.worker")) == 2
    launcher.kill()
    deadline = time.monotonic() + 15
    while of_job("-m", "hvdtrain.worker") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not of_job("-m", "hvdtrain.worker"), "ranks outlived hvdtrain"
    slurm.wait(job, timeout=60)


# A rank's view of its srun step: OMP_NUM_THREADS, and the CPUs Slurm gave the step (scontrol show step).
STEP_PROBE = (
    "import os, re, subprocess; step = os.environ['SLURM_JOB_ID'] + '.' + os.environ['SLURM_STEP_ID']; "
    "shown = subprocess.run(['scontrol', 'show', 'step', step], capture_output=True, text=True, timeout=30).stdout; "
    "print('probe', os.environ['SLURM_PROCID'], os.environ.get('OMP_NUM_THREADS'), "
    "re.search(r'CPUs=(\\d+)', shown).group(1), flush=True)"
)


@pytest.mark.parametrize("how", ["template", "hvdtrain run"])
def test_cpus_per_task_reaches_the_srun_step_and_openmp(slurm, tmp_path, how):
    """--cpus-per-task=2, 2 tasks: Slurm >= 22.05's srun does not take the job's value by itself; the job script
    (a user command) and hvdtrain's own srun (`hvdtrain run`) pass it on: each rank sees OMP_NUM_THREADS=2 and the
    step holds 2 CPUs per task. SLURM_EXACT=1 (srun --exact) makes the step hold only what srun asked for; without
    it a step holds all of the job's CPUs on the node, whatever srun was told."""
    command = ["python", "-c", STEP_PROBE]
    if how == "hvdtrain run":
        command = ["hvdtrain", "run", "--output-dir", str(tmp_path / "logs"), "--", *command]
    job = slurm.sbatch(
        ["--ntasks-per-node=2", "--cpus-per-task=2", TEMPLATES / "data-parallel.sbatch", *command],
        cwd=tmp_path, extra_env={"SLURM_EXACT": "1"},
    )  # fmt: skip
    (task,) = slurm.wait(job, timeout=180)
    out = text(tmp_path / f"hvdtrain-dp-{job}.out")
    assert task["JobState"] == "COMPLETED", out
    logs = tmp_path / "runs" / f"hvdtrain-dp-{job}" / "logs" if how == "template" else tmp_path / "logs"
    probes = sorted(line.split()[1:] for r in (0, 1) for line in text(logs / f"rank.{r}.log").splitlines()
                    if line.startswith("probe "))  # fmt: skip
    assert probes == [["0", "2", "4"], ["1", "2", "4"]], (out, probes)


def test_a_step_whose_mpi_plugin_gives_no_world_ends_in_one_line(slurm, tmp_path):
    """srun --mpi=none under Open MPI (each rank alone: Open MPI would abort in MPI_Init with twenty lines a rank; an
    MPICH would run N singletons): the rank wrappers stop before the command, the job fails at once, and its verdict
    is one line naming the plugin in use and the one to try."""
    run = tmp_path / "none"
    start = time.monotonic()
    job = slurm.submit(
        "--ntasks-per-node", "2", "--no-requeue", "--run-dir", run, "--",
        "hvdtrain", "run", "--mpi-plugin", "none", "--", "python", "-c", HOROVOD_HELLO,
        cwd=tmp_path,
    )  # fmt: skip
    (task,) = slurm.wait(job, timeout=120)
    out = text(run / f"slurm-{job}.out")
    assert task["JobState"] == "FAILED" and task["ExitCode"] == "2:0", out
    verdict = [line for line in out.splitlines() if line.startswith("hvdtrain: error: rank ")]
    assert len(verdict) == 1, out
    assert "failed with exit status 2" in verdict[0] and "srun started 2 tasks with --mpi=none" in verdict[0]
    assert verdict[0].endswith("try --mpi=pmix (--mpi-plugin pmix, or HVDTRAIN_SRUN_MPI=pmix)"), verdict
    assert not re.search(r"hello rank \d", out) and "OMPI was not built" not in out  # the command never started
    print(f"--mpi=none refused in {time.monotonic() - start:.0f} s wall")


def test_time_limit_warning_checkpoints_requeues_and_the_resumed_job_finishes(slurm, tmp_path):
    """--time=2 --signal=USR2@60: Slurm itself sends the warning (its checks run every 30 s, so 30-60 s after the
    start; nobody calls scancel), the ranks checkpoint, rank 0 requeues the job, and the requeued run resumes and
    finishes. The first run is slowed (slurmhooks.SlowFirstRun: 0.1 s a step) so that it cannot finish before
    its limit; the requeued one runs at full speed."""
    steps = 1000
    run = tmp_path / "limit"
    start = time.monotonic()
    job = slurm.submit(
        "--ntasks-per-node", "2", "--time", "2", "--signal", "USR2@60", "--run-dir", run, "--job-name", "limit", "--",
        "hvdtrain", "train", "--model", "mlp", "--max-steps", str(steps), "--epochs", "50", "--log-every", "5",
        "--no-eval-every-epoch", "--hooks", "slurmhooks:SlowFirstRun", "--run-dir", run / "train",
        cwd=tmp_path, extra_env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "HVDTRAIN_TEST_STEP_SLEEP": "0.1"},
    )  # fmt: skip
    slurm.release_requeued(job)
    (task,) = slurm.wait(
        job, timeout=240, until=lambda t: t[0]["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    )
    out = text(run / f"slurm-{job}.out")
    assert task["JobState"] == "COMPLETED" and int(task["Restarts"]) >= 1, (task, out)
    m = re.search(r"preempted at step (\d+)", out)
    assert m and 0 < int(m.group(1)) < steps, out
    assert f"requeued Slurm job {job}" in out and "restart 1," in out
    assert f"step-{int(m.group(1)):08d}.pt" in out
    res = result_of(run / "train")
    assert res["steps"] == steps and not res["preempted"], res
    print(f"time limit: preempted at step {m.group(1)}, requeued, finished in {time.monotonic() - start:.0f} s wall")


PLACE_TEST = """import os

import pytest


@pytest.mark.ranks([1, 2])
def test_place(world):
    assert os.environ["SLURM_STEP_ID"] not in ("batch", "extern")  # a task of an srun step, not the batch script
    assert int(os.environ["SLURM_PROCID"]) == world.rank and world.size in (1, 2)
"""


def test_the_pytest_plugin_launches_its_tests_with_srun_inside_an_allocation(slurm, tmp_path):
    """A plain `pytest` in a batch script (2 tasks) launches its ranks tests through srun: each rank a task of a
    step (its SLURM_PROCID its rank), both sizes passed."""
    (tmp_path / "test_place.py").write_text(PLACE_TEST)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nexec python -m pytest -p no:cacheprovider --color=no -rA test_place.py\n")
    job = slurm.sbatch(["--ntasks=2", "--output", tmp_path / "out.txt", script], cwd=tmp_path)
    (task,) = slurm.wait(job, timeout=180)
    out = text(tmp_path / "out.txt")
    assert task["JobState"] == "COMPLETED", out
    assert "PASSED test_place.py::test_place[np1]" in out and "PASSED test_place.py::test_place[np2]" in out, out
