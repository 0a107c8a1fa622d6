"""Across hosts, on the simulated cluster: hvdtrain run under both controllers and every launcher, ranks that
really run on different hosts, results across hosts equal to results on one, threads per host, the network
interface option, multi-node Slurm (submit, templates, preemption), and bounded failures when a host is lost,
a rank stalls, or ssh cannot reach a host."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm"
# Every rank reports where it runs, what Horovod says of it, and one allreduce.
HELLO = """
import os, socket, torch, horovod.torch as hvd
hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()
print(f"REPORT host={socket.gethostname()} rank={hvd.rank()} size={hvd.size()} local_rank={hvd.local_rank()} "
      f"local_size={hvd.local_size()} sum={total:g} threads={os.environ.get('OMP_NUM_THREADS')}", flush=True)
"""


def reports(text: str) -> dict[int, dict[str, str]]:
    """The REPORT lines of a job's output, by rank."""
    out = {}
    for line in text.splitlines():
        if "REPORT " in line:
            fields = dict(kv.split("=", 1) for kv in line.split("REPORT ", 1)[1].split())
            out[int(fields["rank"])] = fields
    return out


def result_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def hello(tmp_path) -> Path:
    path = tmp_path / "hello.py"
    path.write_text(HELLO)
    return path


def assert_spread(found: dict[int, dict[str, str]], layout: dict[int, str], size: int) -> None:
    """Each rank ran on the host `layout` says, with the right local rank, and the allreduce summed all ranks."""
    assert sorted(found) == list(range(size)), found
    for rank, host in layout.items():
        f = found[rank]
        local = [r for r in sorted(layout) if layout[r] == host]
        assert f["host"] == host, (rank, f)
        assert (int(f["local_rank"]), int(f["local_size"])) == (local.index(rank), len(local)), (rank, f)
        assert int(f["size"]) == size and float(f["sum"]) == size * (size + 1) / 2, f


@pytest.mark.parametrize(
    "how",
    [["--gloo"], ["--mpi"], ["--launcher", "mpirun", "--hostfile", "{hostfile}"]],
    ids=["horovodrun-gloo", "horovodrun-mpi", "mpirun-hostfile"],
)
def test_run_spreads_ranks_over_hosts(cluster, tmp_path, hello, how):
    """hvdtrain run -np 4 over node1:2,node2:2 (from node1): ranks 0,1 on node1, 2,3 on node2, by hostname."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the cluster\nnode1 slots=2\nnode2 slots=2\n")
    where = ["-H", "node1:2,node2:2"] if "--hostfile" not in how else []
    args = [a.replace("{hostfile}", str(hostfile)) for a in how]
    proc = cluster.hvdtrain("run", "-np", 4, *where, *args, "--output-dir", tmp_path / "logs", "--",
                            "python", hello, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_spread(reports(proc.stdout), {0: "node1", 1: "node1", 2: "node2", 3: "node2"}, 4)
    for rank in range(4):  # per-rank logs on the shared file system, written on each host
        assert f"rank={rank} " in text(tmp_path / "logs" / f"rank.{rank}.log")


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_threads_per_rank_are_computed_on_each_host(cluster, tmp_path, hello, controller):
    """-H node1:2,node2:1: OMP_NUM_THREADS is cores/2 on node1 and cores/1 on node2, not one value for all."""
    cores = os.cpu_count()
    proc = cluster.hvdtrain("run", "-np", 3, "-H", "node1:2,node2:1", controller, "--", "python", hello, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = reports(proc.stdout)
    assert_spread(found, {0: "node1", 1: "node1", 2: "node2"}, 3)
    assert [int(found[r]["threads"]) for r in range(3)] == [max(1, cores // 2)] * 2 + [cores], found


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_network_interface_is_used_and_checked_on_every_host(cluster, tmp_path, hello, controller):
    """--network-interface eth0 (every host has it) runs; eth9 (none has it) is refused before anything starts."""
    ok = cluster.hvdtrain("run", "-np", 2, "-H", "node1:1,node2:1", controller, "--network-interface", "eth0",
                          "--", "python", hello, cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert_spread(reports(ok.stdout), {0: "node1", 1: "node2"}, 2)
    bad = cluster.hvdtrain("run", "-np", 2, "-H", "node1:1,node2:1", controller, "--network-interface", "eth9",
                           "--output-dir", tmp_path / "bad", "--", "python", hello, cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2, bad.stdout + bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert "eth9" in line and "node1" in line and "eth0" in line, line
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "layout", [[], ["--strategy", "pipeline", "--stages", 2, "--micro-batches", 4]], ids=["data", "pipeline"]
)
def test_train_on_two_hosts_equals_train_on_one(cluster, tmp_path, layout):
    """A deterministic job with 1 rank on each of 2 hosts ends with the same weights as 2 ranks on one host: data
    parallel (the gradients' allreduce crosses the hosts' link), and a pipeline with stage 0 on node1 and stage 1
    on node2 (the activations and their gradients cross it as MPI messages). Same threads per rank in both (BLAS
    sums in an order that depends on its thread count)."""
    common = ["train", *layout, "--model", "mlp", "--deterministic", "--max-steps", 40, "--log-every", 10,
              "--threads-per-rank", 1]  # fmt: skip
    one = cluster.hvdtrain(*common, "-np", 2, "--run-dir", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stdout + one.stderr
    two = cluster.hvdtrain(*common, "-H", "node1:1,node2:1", "--run-dir", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = result_of(tmp_path / "one"), result_of(tmp_path / "two")
    assert a["steps"] == b["steps"] == 40
    assert a["world_size"] == b["world_size"] == (1 if layout else 2)  # a pipeline's 2 ranks are one replica
    assert a["params_sha256"] == b["params_sha256"], (a, b)
    assert "node2" in text(tmp_path / "two" / "logs" / "rank.1.host")
    if layout:
        assert "this rank is stage 1 of replica 0" in text(tmp_path / "two" / "logs" / "rank.1.log")


# --------------------------------------------------------------------------------------------------
# Multi-node Slurm
# --------------------------------------------------------------------------------------------------


def test_sinfo_shows_every_host_as_a_node(cluster):
    proc = cluster.slurm.run(["sinfo", "-h", "-N", "-o", "%N %t"])
    assert sorted(proc.stdout.split()) == sorted([*cluster.nodes, *["idle"] * len(cluster.nodes)]), proc.stdout


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_template_on_two_nodes_starts_one_rank_per_node(cluster, tmp_path, hello, launcher):
    """slurm/data-parallel.sbatch with plain sbatch --nodes 2: a user script under srun --mpi=pmix or mpirun."""
    job = cluster.slurm.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", TEMPLATES / "data-parallel.sbatch", "python", hello],
        cwd=tmp_path, extra_env={"HVDTRAIN_LAUNCHER": launcher},
    )  # fmt: skip
    (task,) = cluster.slurm.wait(job, timeout=180)
    out = text(tmp_path / f"hvdtrain-dp-{job}.out")
    assert task["JobState"] == "COMPLETED", out
    logs = tmp_path / "runs" / f"hvdtrain-dp-{job}" / "logs"
    found = {}
    for r in (0, 1):
        log = logs / f"rank.{r}.log" if launcher == "srun" else logs / "1" / f"rank.{r}" / "stdout"
        found.update(reports(text(log)))
    assert_spread(found, {0: "node1", 1: "node2"}, 2)


def test_submit_two_nodes_default_job_reaches_the_accuracy_bar(cluster, tmp_path):
    """hvdtrain submit --nodes 2 --ntasks-per-node 1 -- hvdtrain train: the README's job, across 2 nodes."""
    job = cluster.slurm.submit("--nodes", "2", "--ntasks-per-node", "1", "--run-dir", tmp_path / "run", "--",
                               "hvdtrain", "train", "--run-dir", tmp_path / "run" / "train", cwd=tmp_path)  # fmt: skip
    (task,) = cluster.slurm.wait(job, timeout=600)
    out = text(tmp_path / "run" / f"slurm-{job}.out")
    assert task["JobState"] == "COMPLETED", out
    res = result_of(tmp_path / "run" / "train")
    assert res["world_size"] == 2 and res["test_accuracy"] >= 0.95, res
    hosts = {text(tmp_path / "run" / "train" / "logs" / f"rank.{r}.host").strip() for r in (0, 1)}
    assert hosts == {"node1", "node2"}, hosts


def test_template_hybrid_on_two_nodes(cluster, tmp_path):
    """slurm/hybrid.sbatch with --nodes 2 (and no GPUs here: --gpus-per-node=0): one hybrid replica per node, the
    model split over 2 CPU "devices" on each, data parallel across the nodes."""
    job = cluster.slurm.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", TEMPLATES / "hybrid.sbatch", "hvdtrain", "train",
         "--strategy", "hybrid", "--devices-per-rank", "2", "--model", "mlp", "--max-steps", "10",
         "--run-dir", tmp_path / "hy"],
        cwd=tmp_path,
    )  # fmt: skip
    (task,) = cluster.slurm.wait(job, timeout=300)
    assert task["JobState"] == "COMPLETED", text(tmp_path / f"hvdtrain-hybrid-{job}.out")
    res = result_of(tmp_path / "hy")
    assert res["world_size"] == 2 and res["steps"] == 10, res
    hosts = {text(tmp_path / "hy" / "logs" / f"rank.{r}.host").strip() for r in (0, 1)}
    assert hosts == {"node1", "node2"}, hosts


def test_template_array_sweep_on_two_nodes(cluster, tmp_path):
    """slurm/array-sweep.sbatch with --nodes 2: every task runs one training job over both nodes."""
    job = cluster.slurm.sbatch(
        ["--array=0-1", "--nodes=2", "--ntasks-per-node=1", TEMPLATES / "array-sweep.sbatch", "hvdtrain", "train",
         "--model", "mlp", "--max-steps", "10", "--lr", "{value}", "--run-dir", tmp_path / "lr-{value}"],
        cwd=tmp_path, extra_env={"HVDTRAIN_SWEEP_VALUES": "0.05 0.1"},
    )  # fmt: skip
    tasks = cluster.slurm.wait(job, timeout=300)
    assert all(t["JobState"] == "COMPLETED" for t in tasks), [(t["JobId"], t["JobState"]) for t in tasks]
    for lr in ("0.05", "0.1"):
        res = result_of(tmp_path / f"lr-{lr}")
        assert res["world_size"] == 2 and res["steps"] == 10, res


TRAIN_2N = ["hvdtrain", "train", "--model", "mlp", "--deterministic", "--max-steps", "100", "--epochs", "50",
            "--log-every", "5", "--checkpoint-every", "10", "--no-eval-every-epoch"]  # fmt: skip
NODES_2 = ["--nodes", "2", "--ntasks-per-node", "1"]


@pytest.fixture(scope="module")
def reference_2node(cluster, tmp_path_factory) -> dict:
    """The uninterrupted 2-node run that interrupted ones must end equal to."""
    base = tmp_path_factory.mktemp("ref")
    job = cluster.slurm.submit(*NODES_2, "--run-dir", base, "--", *TRAIN_2N, "--run-dir", base / "t", cwd=base)
    (task,) = cluster.slurm.wait(job, timeout=300)
    assert task["JobState"] == "COMPLETED", text(base / f"slurm-{job}.out")
    return result_of(base / "t")


def _submit_and_wait_for_progress(cluster, tmp_path, *extra) -> tuple[str, Path]:
    job = cluster.slurm.submit(*NODES_2, "--run-dir", tmp_path / "job", "--", *TRAIN_2N, *extra,
                               "--run-dir", tmp_path / "job" / "t", cwd=tmp_path)  # fmt: skip
    out_file = tmp_path / "job" / f"slurm-{job}.out"
    deadline = time.monotonic() + 240
    while not re.search(r"step ([1-9]\d)/100", text(out_file)):
        assert time.monotonic() < deadline, f"no progress line in time:\n{text(out_file)}"
        time.sleep(0.5)
    return job, out_file


def _wait_for_requeue_and_end(cluster, job) -> dict:
    """Release the requeued job as soon as its first run is gone, then wait for its end."""
    slurm = cluster.slurm
    slurm.release_requeued(job)
    (task,) = slurm.wait(job, timeout=300, until=lambda t: t[0]["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"))
    return task


def test_two_node_job_signalled_checkpoints_requeues_resumes_and_matches(cluster, tmp_path, reference_2node):
    """scancel --signal=USR2 on a 2-node job: both ranks stop at one step, rank 0 checkpoints and requeues, the
    requeued job resumes and ends with the weights of an uninterrupted 2-node run."""
    job, out_file = _submit_and_wait_for_progress(cluster, tmp_path)
    cluster.slurm.run(["scancel", "--signal=USR2", job])
    task = _wait_for_requeue_and_end(cluster, job)
    out = text(out_file)
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", (task, out)
    m = re.search(r"preempted at step (\d+)", out)
    assert m and 10 <= int(m.group(1)) < 100, out
    res = result_of(tmp_path / "job" / "t")
    assert res["steps"] == reference_2node["steps"] == 100 and res["world_size"] == 2
    assert res["params_sha256"] == reference_2node["params_sha256"]


# A user's hook (hvdtrain train --hooks) that makes rank 1 stop calling collectives at step 25, in the job's first
# run only: the rank's main thread sleeps (as in a hung read), its Horovod background thread goes on.
STALL_HOOK = """
import os, time
from hvdtrain.train.hooks import Hook

class StallOnce(Hook):
    def on_step_end(self, trainer):
        if trainer.rank == 1 and trainer.state.step == 25 and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            print("rank 1 stops calling collectives", flush=True)
            time.sleep(3600)
"""


@pytest.mark.parametrize(
    "bound, named",
    [(["--stall-timeout", "8"], r"rank 1 stalled: rank 0 waited more than 8 s"),
     (["--hang-timeout", "8"], r"hang: rank 1 \(node2\) is in on_step_end \(stallhook\.py:\d+\) \(hook at step 25\)")],
    ids=["stall-timeout", "hang-timeout"],
)  # fmt: skip
def test_two_node_job_with_a_stalled_rank_requeues_from_its_checkpoint_and_matches(
    cluster, tmp_path, reference_2node, bound, named
):
    """Rank 1 (node2) stops calling collectives at step 25: Horovod's stall shutdown (--stall-timeout) or hvdtrain's
    hang watchdog (--hang-timeout, its wrapper on node2 reporting to node1 over the cluster's network, srun the
    launcher) ends the job naming rank 1, hvdtrain requeues it, and the requeued job resumes from the step-20
    checkpoint and ends with the uninterrupted weights."""
    (tmp_path / "stallhook.py").write_text(STALL_HOOK)
    job, out_file = _submit_and_wait_for_progress(cluster, tmp_path, *bound, "--hooks", "stallhook:StallOnce")
    task = _wait_for_requeue_and_end(cluster, job)
    out = text(out_file)
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", (task, out)
    assert re.search(rf"hvdtrain: error: {named}", out), out
    assert "requeued Slurm job" in out and "resumed from" in out and "step-00000020.pt at step 20" in out, out
    res = result_of(tmp_path / "job" / "t")
    assert res["steps"] == 100 and res["params_sha256"] == reference_2node["params_sha256"], res


# --------------------------------------------------------------------------------------------------
# Faults: bounded, named, never a hang
# --------------------------------------------------------------------------------------------------


def test_unreachable_host_is_refused_before_anything_starts(cluster, tmp_path, hello):
    """A wrong key for every host: one line naming the hosts and ssh's error, exit 2, no rank started anywhere."""
    bad_config = tmp_path / "ssh_config"
    key = tmp_path / "wrong_key"
    cluster.run("node1", ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key]).check_returncode()
    good = Path(cluster.ssh_config).read_text()
    bad_config.write_text(re.sub(r"IdentityFile \S+", f"IdentityFile {key}", good))
    proc = cluster.hvdtrain("run", "-np", 3, "-H", "node1:1,node2:2", "--ssh-config", bad_config,
                            "--output-dir", tmp_path / "logs", "--", "python", hello, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "node2" in line and "Permission denied" in line, line
    assert not (tmp_path / "logs").exists()  # nothing written, nothing started


def test_host_down_before_launch_is_refused_in_one_line(cluster, tmp_path, hello):
    """node2's link is down: ssh's connect times out; one line naming node2, exit 2, nothing started on node1."""
    cluster.fault("link", "node2", "down")
    try:
        start = time.monotonic()
        proc = cluster.hvdtrain("run", "-np", 2, "-H", "node1:1,node2:1", "--output-dir", tmp_path / "logs",
                                "--", "python", hello, cwd=tmp_path)  # fmt: skip
        took = time.monotonic() - start
    finally:
        cluster.fault("link", "node2", "up")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "cannot reach host node2 over ssh" in line and "timed out" in line, line
    assert not (tmp_path / "logs").exists() and took < 30, took


def test_stalled_rank_ends_the_job_and_is_named(cluster, tmp_path):
    """Rank 1 (on node2) stops calling collectives: the job ends after --stall-timeout, naming rank 1."""
    script = tmp_path / "stall.py"
    script.write_text(
        "import time, torch, horovod.torch as hvd\nhvd.init()\n"
        "for step in range(1000):\n"
        "    if hvd.rank() == 1 and step == 3:\n        time.sleep(3600)\n"
        "    hvd.allreduce(torch.ones(4), name=f'grad.{step}')\n"
    )
    start = time.monotonic()
    proc = cluster.hvdtrain("run", "-np", 2, "-H", "node1:1,node2:1", "--stall-timeout", 10, "--", "python", script,
                            cwd=tmp_path, timeout=120)  # fmt: skip
    took = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout + proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert "rank 1" in first and "grad.3" in first and "stall" in first, proc.stderr
    assert took < 60, took
    print(f"stalled rank named, job ended {took:.1f} s after launch (--stall-timeout 10)")


def test_lost_host_ends_the_job_within_a_minute_and_is_named(cluster, tmp_path):
    """Every process on node2 is SIGKILLed mid-job: the job ends non-zero within 60 s, naming node2 and its ranks."""
    script = tmp_path / "long.py"
    script.write_text(
        "import time, torch, horovod.torch as hvd\nhvd.init()\nprint('started', flush=True)\n"
        "for step in range(100000):\n    hvd.allreduce(torch.ones(4), name='g')\n    time.sleep(0.01)\n"
    )
    log = tmp_path / "out.log"
    proc = cluster.popen("node1", ["python", "-m", "hvdtrain", "run", "-np", 4, "-H", "node1:2,node2:2",
                                   "--output-dir", tmp_path / "logs", "--", "python", script], tmp_path, log)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while text(log).count("started") < 4:
            assert proc.poll() is None and time.monotonic() < deadline, text(log)
            time.sleep(0.2)
        cluster.fault("kill", "node2")
        killed = time.monotonic()
        status = proc.wait(timeout=90)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.restart()
    out = text(log)
    assert status != 0 and took < 60, (status, took, out)
    error = [line for line in out.splitlines() if line.startswith("hvdtrain: error:")]
    assert error and "node2" in error[0] and "ranks 2, 3" in error[0], out
    print(f"lost host named, job ended {took:.1f} s after node2's processes were killed")


LINK_DOWN_SCRIPT = """
import time, torch, horovod.torch as hvd
import hvdtrain.progress as progress
hvd.init()
print('started', flush=True)
for step in range(100000):
    progress.step(step)
    hvd.allreduce(torch.ones(4), name='g')
    time.sleep(0.01)
"""
HANG_TIMEOUT_S = 10


@pytest.mark.parametrize("controller", [["--gloo"], ["--launcher", "mpirun"]], ids=["gloo", "mpi"])
def test_a_host_whose_link_goes_down_is_named_by_the_hang_watchdog(cluster, tmp_path, controller):
    """node2's link goes down mid-job (its processes live on, its connections never close): the hang watchdog on
    node1 hears nothing from node2's wrappers for --hang-timeout and ends the job, naming node2's ranks; once the
    link is back, nothing of the job is left on either host."""
    script = tmp_path / "steps.py"
    script.write_text(LINK_DOWN_SCRIPT)
    log = tmp_path / "out.log"
    argv = ["python", "-m", "hvdtrain", "run", "-np", 4, "-H", "node1:2,node2:2", *controller, "--hang-timeout",
            HANG_TIMEOUT_S, "--output-dir", tmp_path / "logs", "--", "python", script]  # fmt: skip
    proc = cluster.popen("node1", argv, tmp_path, log)
    try:
        deadline = time.monotonic() + 120
        while text(log).count("started") < 4:
            assert proc.poll() is None and time.monotonic() < deadline, text(log)
            time.sleep(0.2)
        cluster.fault("link", "node2", "down")
        cut = time.monotonic()
        status = proc.wait(timeout=HANG_TIMEOUT_S + 60)
        took = time.monotonic() - cut
    finally:
        cluster.fault("link", "node2", "up")
        if proc.poll() is None:
            proc.kill()
    out = text(log)
    error = [line for line in out.splitlines() if line.startswith("hvdtrain: error:")]
    assert status == 124 and error, out
    assert re.match(r"hvdtrain: error: hang: rank 2 \(node2\): no word from its host for \d+ s .*; rank 3 \(node2\): "
                    r"no word from its host", error[0]), error[0]  # fmt: skip
    assert HANG_TIMEOUT_S <= took < HANG_TIMEOUT_S + 45, took
    deadline = time.monotonic() + 60
    while left := [p for node in cluster.nodes for p in cluster.run(node, ["pgrep", "-f", str(script)]).stdout.split()]:
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(1)
    print(f"link down named by the watchdog, job ended {took:.1f} s after the link went down (--hang-timeout 10)")
