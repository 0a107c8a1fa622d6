"""What a process reads of its Slurm allocation: host lists expanded (the forms sites use, bad input named in one
line, and against `scontrol show hostnames` where Slurm is installed), the allocation's hosts with their tasks, and
the variables an srun task sees (its step, its MPI plugin)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from hvdtrain.env import SlurmEnv, expand_hostlist
from hvdtrain.errors import UsageError


@pytest.mark.parametrize(
    "text,hosts",
    [
        ("node[009-011]", ["node009", "node010", "node011"]),  # zero-padding kept
        ("gpu2-[02-4]vm1", ["gpu2-02vm1", "gpu2-03vm1", "gpu2-04vm1"]),  # prefix and suffix; width of the first bound
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("n[1,3-5]", ["n1", "n3", "n4", "n5"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),  # the first group outermost
        ("vm", ["vm"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("a[1-010]", [f"a{i}" for i in range(1, 11)]),  # width from the first bound, as Slurm
        ("a[007]", ["a007"]),
        ("b,a[2,1]", ["b", "a2", "a1"]),  # Slurm's order, nothing sorted
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    "text,why",
    [
        ("x[1-3", "unmatched bracket"),
        ("x1-3]", "unmatched bracket"),
        ("x[[1]]", "unmatched bracket"),
        ("x[3-1]", "upward ranges"),
        ("x[]", "'[]' is not a list of numbers"),
        ("x[1,]", "'[1,]' is not a list of numbers"),
        ("x[a-b]", "'[a-b]' is not a list of numbers"),
        ("a,,b", "a name is empty"),
        ("a,", "a name is empty"),
        ("", "a name is empty"),
        ("a b", "a space"),
    ],
)
def test_bad_hostlist_is_one_clear_error(text, why):
    with pytest.raises(UsageError) as e:
        expand_hostlist(text, "SLURM_JOB_NODELIST")
    message = str(e.value)
    assert message.startswith(f"SLURM_JOB_NODELIST '{text}' is not a Slurm host list: ") and why in message
    assert "\n" not in message and message.endswith("expected names like node[01-04],gpu7")


def _random_hostlist(rng: random.Random) -> str:
    """A host list in the forms Slurm 22.05's scontrol reads: names with bracket groups of numbers and upward ranges
    (padded or not), a literal between groups; no text after a name's last group (22.05 refuses a suffix there)."""

    def group() -> str:
        parts = []
        for _ in range(rng.randint(1, 3)):
            first = rng.randint(0, 12)
            width = rng.choice([1, 2, 3])
            last = first + rng.randint(0, 4)
            bounds = str(first).zfill(width) if rng.random() < 0.3 else f"{str(first).zfill(width)}-{last}"
            parts.append(bounds)
        return "[" + ",".join(parts) + "]"

    names = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["n", "node", "gpu2-", "r"])
        if rng.random() < 0.8:
            name += group()
            if rng.random() < 0.3:
                name += rng.choice(["-n", "x"]) + group()
        names.append(name)
    return ",".join(names)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
def test_expand_hostlist_agrees_with_scontrol(tmp_path):
    """200 random host lists expanded here and by `scontrol show hostnames` (which needs a slurm.conf, not a
    running Slurm): the same names in the same order."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlists\nSlurmctldHost=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    rng = random.Random(33)
    for _ in range(200):
        text = _random_hostlist(rng)
        proc = subprocess.run(["scontrol", "show", "hostnames", text], env=env, capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        assert proc.returncode == 0, (text, proc.stderr)
        assert expand_hostlist(text) == proc.stdout.split(), text


ALLOCATION = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "6", "SLURM_JOB_NODELIST": "node[01-03],gpu7",
              "SLURM_TASKS_PER_NODE": "2(x2),1,1", "SLURM_CPUS_PER_TASK": "4"}  # fmt: skip


def test_the_allocations_hosts_with_their_tasks():
    slurm = SlurmEnv.read(ALLOCATION)
    assert slurm.hosts() == [("node01", 2), ("node02", 2), ("node03", 1), ("gpu7", 1)]
    assert slurm.cpus_per_task == 4
    assert SlurmEnv.read({}).hosts() == [] and SlurmEnv.read({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}).hosts() == []
    with pytest.raises(UsageError, match=r"SLURM_TASKS_PER_NODE '2\(x2\)' does not give one count for each of the 4"):
        SlurmEnv.read({**ALLOCATION, "SLURM_TASKS_PER_NODE": "2(x2)"}).hosts()


@pytest.mark.parametrize(
    "environ,tasks,plugin,wired",
    [
        ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "1"}, 2, "pmix", True),
        ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_MPI_TYPE": "pmi2", "PMI_FD": "11", "PMI_RANK": "1"}, 2, "pmi2", True),
        ({"SLURM_STEP_NUM_TASKS": "2"}, 2, None, False),  # srun --mpi=none: no SLURM_MPI_TYPE, nothing to wire up
        # ranks that mpirun's daemons or horovodrun started under a step of their own are not its tasks
        ({"SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_SIZE": "8"}, None, None, False),
        ({"SLURM_STEP_NUM_TASKS": "2", "HOROVOD_RANK": "0", "HOROVOD_SIZE": "4"}, None, None, False),
        ({}, None, None, False),
    ],
)
def test_an_srun_task_its_step_and_plugin(environ, tasks, plugin, wired):
    slurm = SlurmEnv.read(environ)
    assert (slurm.srun_tasks, slurm.mpi_type, slurm.wired_up) == (tasks, plugin, wired)
