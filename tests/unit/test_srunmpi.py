"""srun's MPI plugin: what `srun --mpi=list` prints (Slurm 22.05, 23.x, older) read, the plugin chosen for an MPI
flavour from what srun offers (pure), an override checked, the one-line verdict on a task whose MPI cannot see
the step's other tasks, and `python -m hvdtrain.srunmpi` as the job scripts run it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SRUN_MPI_LIST

from hvdtrain import srunmpi
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError
from hvdtrain.srunmpi import choose_mpi_plugin, parse_mpi_list, wire_up_problem

REPO = Path(__file__).resolve().parents[2]
SLURM_22_05 = ["pmix", "none", "cray_shasta", "pmi2", "pmix_v4"]


@pytest.mark.parametrize(
    "text,names",
    [
        (SRUN_MPI_LIST, SLURM_22_05),  # this machine's Slurm 22.05.8
        ("MPI plugin types are...\n\tnone\n\tpmi2\n\tpmix\nspecific pmix plugin versions available: pmix_v4\n",
         ["none", "pmi2", "pmix", "pmix_v4"]),  # 23.x
        ("MPI plugin types are...\n\tnone\n\tpmix\nspecific pmix plugin versions available: pmix_v3,pmix_v5\n",
         ["none", "pmix", "pmix_v3", "pmix_v5"]),
        ("srun: MPI types are...\nsrun: none\nsrun: pmi2\nsrun: pmix_v3\n", ["none", "pmi2", "pmix_v3"]),  # older, stderr
        ("", []),
        ("srun: error: Unable to process configuration file\n", []),
    ],
)  # fmt: skip
def test_parse_mpi_list(text, names):
    assert parse_mpi_list(text) == names


@pytest.mark.parametrize(
    "offered,flavour,override,chosen",
    [
        (SLURM_22_05, "openmpi", None, "pmix"),  # Open MPI 4.1 speaks PMIx, aborts under pmi2
        (SLURM_22_05, "mpich", None, "pmi2"),  # MPICH's simple PMI: singletons under pmix
        (SLURM_22_05, "MPICH", None, "pmi2"),
        (SLURM_22_05, "intel", None, "pmi2"),
        (SLURM_22_05, None, None, "pmix"),  # unknown: Open MPI's order (Horovod's MPI here)
        (["none", "pmi2", "pmix_v3", "pmix_v4"], "openmpi", None, "pmix_v4"),  # no plain pmix: the newest version
        (["none", "pmi2"], "openmpi", None, "pmi2"),
        (["none", "pmix"], "mpich", None, "pmix"),
        (["none", "cray_shasta"], "mpich", None, "cray_shasta"),
        (["none"], "openmpi", None, "pmix"),  # nothing that works: srun itself will say pmix is not there
        ([], "mpich", None, "pmi2"),  # srun did not say: the flavour's first
        ([], None, None, "pmix"),
        (SLURM_22_05, "openmpi", "pmi2", "pmi2"),  # asked for: taken as given
        (SLURM_22_05, "mpich", "none", "none"),
        ([], None, "pmix_v9", "pmix_v9"),  # srun did not say what it offers: not checked
    ],
)
def test_choose_mpi_plugin(offered, flavour, override, chosen):
    assert choose_mpi_plugin(offered, flavour, override) == chosen


def test_an_override_srun_does_not_offer_is_one_line():
    with pytest.raises(UsageError) as e:
        choose_mpi_plugin(SLURM_22_05, "openmpi", "pmi3")
    assert str(e.value) == (
        "srun's MPI plugin 'pmi3' is not offered here (srun --mpi=list: pmix, none, cray_shasta, pmi2, pmix_v4); give "
        "one of those with --mpi-plugin or HVDTRAIN_SRUN_MPI"
    )
    with pytest.raises(UsageError, match="--mpi-plugin 'PMI 2': not an MPI plugin's name"):
        choose_mpi_plugin([], None, "PMI 2")


def test_requested_plugin_order():
    """--mpi-plugin, else HVDTRAIN_SRUN_MPI, else SLURM_MPI_TYPE (srun's own input), else None (chosen)."""
    slurm = SlurmEnv.read({"SLURM_MPI_TYPE": "pmi2"})
    assert srunmpi.requested("pmix", {"HVDTRAIN_SRUN_MPI": "none"}, slurm) == "pmix"
    assert srunmpi.requested(None, {"HVDTRAIN_SRUN_MPI": "none"}, slurm) == "none"
    assert srunmpi.requested(None, {"HVDTRAIN_SRUN_MPI": ""}, slurm) == "pmi2"
    assert srunmpi.requested(None, {}, SlurmEnv()) is None


STEP = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}


def test_a_task_without_wire_up_is_refused_before_mpi_starts():
    """srun --mpi=none: no PMIx or PMI variable, every MPI rank would be rank 0 of 1 (Open MPI aborts instead)."""
    problem = wire_up_problem(SlurmEnv.read(STEP))
    assert problem == (
        "srun started 2 tasks with --mpi=none and each MPI rank has no PMI to find the others by: they would run as 2 "
        "singletons (rank 0 of 1 each); try --mpi=pmix (--mpi-plugin pmix, or HVDTRAIN_SRUN_MPI=pmix)"
    )
    assert "try --mpi=pmi2" in wire_up_problem(SlurmEnv.read(STEP), flavour="mpich")
    for fine in (
        {**STEP, "SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "1"},
        {**STEP, "SLURM_MPI_TYPE": "pmi2", "PMI_FD": "11", "PMI_RANK": "1"},
        {**STEP, "SLURM_STEP_NUM_TASKS": "1"},  # a step of one task is a world of one
        {**STEP, "OMPI_COMM_WORLD_SIZE": "2"},  # started by mpirun's daemon under its step
        {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"},  # the batch step (mpirun's ranks), not an srun task
        {},
    ):
        assert wire_up_problem(SlurmEnv.read(fine)) is None, fine


def test_a_world_smaller_than_the_step_names_the_plugin_and_the_one_to_try():
    """After MPI started: MPICH under srun --mpi=pmix sees a world of 1 in each of the step's tasks."""
    slurm = SlurmEnv.read({**STEP, "SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "1"})
    assert wire_up_problem(slurm, world_size=1) == (
        "srun started 2 tasks with --mpi=pmix and each MPI rank has a world of 1: they would run as 2 singletons "
        "(rank 0 of 1 each); try --mpi=pmi2 (--mpi-plugin pmi2, or HVDTRAIN_SRUN_MPI=pmi2)"
    )
    v4 = SlurmEnv.read({**STEP, "SLURM_MPI_TYPE": "pmix_v4", "PMIX_RANK": "1"})
    assert "try --mpi=pmi2" in wire_up_problem(v4, world_size=1)  # pmix_v4 is pmix: not the one to try
    assert wire_up_problem(slurm, world_size=2) is None
    assert wire_up_problem(SlurmEnv.read({**STEP, "HOROVOD_SIZE": "2"}), world_size=1) is None  # elastic, Gloo


def test_read_offered_from_a_real_srun_output(tmp_path, monkeypatch):
    """`srun --mpi=list` run for real: a fake srun printing Slurm 23's list; no srun, or a SLURM_CONF naming a missing
    file (srun would retry it for a minute): nothing offered, at once."""
    fake = tmp_path / "srun"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --mpi=list ] || exit 9\nprintf \'MPI plugin types are...\\n\\tnone\\n\\tpmi2\\n\\tpmix\\n'
        "specific pmix plugin versions available: pmix_v4\\n'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert srunmpi.read_offered() == ("none", "pmi2", "pmix", "pmix_v4")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    start = time.monotonic()
    assert srunmpi.read_offered() == ()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("SLURM_CONF")
    assert srunmpi.read_offered() == () and time.monotonic() - start < 5


def _entry_point(tmp_path, **env) -> subprocess.CompletedProcess:
    """`python -m hvdtrain.srunmpi` as a job script runs it, with a fake srun offering Slurm 22.05's plugins."""
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!/bin/sh\nprintf '{SRUN_MPI_LIST.encode('unicode_escape').decode()}'\n")
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HVDTRAIN_"))}
    full = {**base, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "hvdtrain.srunmpi"], env=full, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_the_job_scripts_entry_point(tmp_path):
    chosen = _entry_point(tmp_path)
    assert (chosen.returncode, chosen.stdout) == (0, "pmix\n"), chosen.stderr
    assert _entry_point(tmp_path, SLURM_MPI_TYPE="pmi2").stdout == "pmi2\n"
    assert _entry_point(tmp_path, SLURM_MPI_TYPE="pmi2", HVDTRAIN_SRUN_MPI="pmix_v4").stdout == "pmix_v4\n"
    refused = _entry_point(tmp_path, HVDTRAIN_SRUN_MPI="pmi3")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("hvdtrain: error: srun's MPI plugin 'pmi3' is not offered here")
