import os
import subprocess

import pytest
from fakempi import MPICH_4_0_2, make_fake_launcher
from fakessh import make_fake_ssh, set_machine

from hvdtrain import mpi
from hvdtrain.errors import UsageError
from hvdtrain.launching import supervise


class ProcessStarted(AssertionError):
    pass


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hvdtrain-cache")


@pytest.fixture(autouse=True)
def own_cache(session_cache, monkeypatch):
    """hvdtrain's cache (what the MPI on PATH is, which MPI a library links) is the session's, not ~/.cache: the fake
    launchers tests make stay out of the user's."""
    monkeypatch.setenv("HVDTRAIN_CACHE", str(session_cache))


@pytest.fixture
def no_processes(monkeypatch):
    """Fail the test if anything tries to start a process through the launcher. What the MPI on PATH is has been
    asked before (a probe, cached, as the previous launch would have done)."""
    try:
        mpi.find_launcher()
    except UsageError:
        pass
    started = []

    def refuse(argv, *a, **k):
        started.append(argv)
        raise ProcessStarted(f"a process was started: {argv}")

    monkeypatch.setattr(supervise.subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    return started


@pytest.fixture
def clean_env(monkeypatch):
    """No Slurm variables from the surrounding shell."""
    import os

    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    """The fake ssh first on PATH; returns the file its calls are logged to (one line of arguments each)."""
    log = tmp_path / "ssh-calls"
    make_fake_ssh(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    set_machine(monkeypatch, ("eth0", "lo", "wlan0"), {"lo": {"127.0.0.1"}, "eth0": {"10.0.0.1"}})
    return log


@pytest.fixture
def fake_mpich(tmp_path, monkeypatch):
    """An MPICH module first on PATH, as `module load mpich` makes it: mpirun and mpiexec, links to a fake Hydra
    mpiexec that answers --version as MPICH 4.0.2's (nothing is launched with it); returns that file."""
    bin_dir = tmp_path / "mpich" / "bin"
    hydra = make_fake_launcher(bin_dir, "mpiexec.hydra", MPICH_4_0_2)
    for name in ("mpirun", "mpiexec"):
        (bin_dir / name).symlink_to(hydra.name)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return hydra


# What `srun --mpi=list` prints with this project's Slurm 22.05 (Debian's slurm-wlm): the unit tests choose srun's
# plugin from it wherever they run, srun installed or not.
SRUN_MPI_LIST = (
    "MPI plugin types are...\n\tpmix\n\tnone\n\tcray_shasta\n\tpmi2\nspecific pmix plugin versions available: pmix_v4\n"
)


@pytest.fixture(autouse=True)
def srun_offers(monkeypatch):
    """srun's MPI plugins as Slurm 22.05 here offers them (no process started)."""
    from hvdtrain import srunmpi

    offered = tuple(srunmpi.parse_mpi_list(SRUN_MPI_LIST))
    monkeypatch.setattr(srunmpi, "offered_plugins", lambda: offered)
    return offered
