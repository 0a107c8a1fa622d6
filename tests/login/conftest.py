"""A cluster login node on this machine: an ordinary account, Lmod with modulefiles for the Open MPI and the MPICH
installed from Debian, and the local Slurm. Root is used only to make the site (modules, Slurm's daemons) and the
account; every command of the tests runs as that user, in a clean login environment (`env -i`, PATH=/usr/bin:/bin,
then `module load <mpi>`), so pip sees only what a user sees: PyPI, and the torch it serves (a CUDA build).

At the end every process of the user is gone (asserted before anything is killed), and the account, its home, its
jobs and the modulefiles are removed."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from slurmjobs import Slurm

REPO = Path(__file__).resolve().parents[2]
USER = "hvdlogin"
HOME = Path("/home") / USER
SITE = Path("/opt/hvdtrain-login")  # what the admins install: the MPIs' module trees and modulefiles
LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
SLURM_SCRIPT = REPO / "scripts" / "slurm-local.sh"
SLURM_STATE = "/tmp/hvdtrain-slurm"

# module name -> (version, the programs of its bin folder: name -> Debian's file)
MPIS = {
    "openmpi": ("4.1.4", {"mpicc": "mpicc.openmpi", "mpicxx": "mpicxx.openmpi", "mpirun": "mpirun.openmpi",
                          "mpiexec": "mpiexec.openmpi", "ompi_info": "ompi_info"}),
    "mpich": ("4.0.2", {"mpicc": "mpicc.mpich", "mpicxx": "mpicxx.mpich", "mpirun": "mpirun.mpich",
                        "mpiexec": "mpiexec.hydra", "hydra_pmi_proxy": "hydra_pmi_proxy", "mpichversion": "mpichversion"}),
}  # fmt: skip


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "making an ordinary account needs root; run the tests as root (make test does)"
    missing = [p for p in (LMOD_INIT, Path("/usr/bin/mpicc.mpich"), Path("/usr/bin/mpicc.openmpi")) if not p.exists()]
    missing += [Path(b) for b in ("useradd", "runuser", "slurmctld") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(map(str, missing))} missing: run scripts/setup.sh --slurm (make test does)"
    return None


def _write_site() -> None:
    """Each MPI as a site installs it: a prefix with bin/, and a Lua modulefile in one family (loading one MPI
    unloads the other)."""
    shutil.rmtree(SITE, ignore_errors=True)
    for name, (version, programs) in MPIS.items():
        bin_dir = SITE / name / version / "bin"
        bin_dir.mkdir(parents=True)
        for prog, target in programs.items():
            (bin_dir / prog).symlink_to(Path("/usr/bin") / target)
        modulefile = SITE / "modulefiles" / name / f"{version}.lua"
        modulefile.parent.mkdir(parents=True, exist_ok=True)
        modulefile.write_text(
            f'whatis("{name} {version}")\nfamily("mpi")\nprepend_path("PATH", "{bin_dir}")\n'
            f'setenv("MPI_HOME", "{bin_dir.parent}")\n'
        )
    subprocess.run(["chmod", "-R", "a+rX", str(SITE)], check=True)


def _remove_account() -> None:
    if _user_exists():
        subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
        time.sleep(0.5)
        subprocess.run(["userdel", "-r", "-f", USER], capture_output=True)
    shutil.rmtree(HOME, ignore_errors=True)


def _user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
        return True
    except KeyError:
        return False


def _make_account() -> None:
    """The account, and a copy of this working tree (what the user cloned) in its home."""
    _remove_account()
    subprocess.run(["useradd", "--create-home", "--home-dir", str(HOME), "--shell", "/bin/bash", USER], check=True)
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
        check=True,
    ).stdout  # fmt: skip
    dest = HOME / "hvdtrain"
    dest.mkdir()
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(HOME)], check=True)


class Login:
    """Commands run as the user in a login shell with one MPI module loaded; every call has a timeout."""

    def __init__(self, mpi: str):
        self.mpi = mpi
        self.venv = HOME / f"venv-{mpi}"
        self.repo = HOME / "hvdtrain"

    def prefix(self) -> list[str]:
        """runuser + a clean environment + Lmod + `module load`, then the argv given (as "$@")."""
        shell = (
            f"source {LMOD_INIT} && module use {SITE / 'modulefiles'} && module load {self.mpi} "
            f'&& {{ [ ! -x {self.venv}/bin/python ] || source {self.venv}/bin/activate; }} && cd {self.repo} && exec "$@"'
        )
        env = [f"HOME={HOME}", f"USER={USER}", f"LOGNAME={USER}", "SHELL=/bin/bash", "PATH=/usr/bin:/bin",
               "LANG=C.UTF-8", f"HVDTRAIN_VENV={self.venv}"]  # fmt: skip
        return ["runuser", "-u", USER, "--", "env", "-i", *env, "bash", "-c", shell, "login"]

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(), *argv], capture_output=True, text=True, timeout=timeout)

    def shell(self, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run("bash", "-c", script, timeout=timeout)

    def slurm(self) -> Slurm:
        return Slurm({"PATH": os.environ["PATH"]}, prefix=self.prefix())


@pytest.fixture(scope="session")
def site():
    """The site: modulefiles for both MPIs, and the local Slurm (started here when not running; stopped at the
    end when started here). Then the account; afterwards nothing of the user is left."""
    why = _why_not()
    if why:
        pytest.skip(f"the login tier cannot run here: {why}")
    _write_site()
    env = {**os.environ, "HVDTRAIN_SLURM_DIR": SLURM_STATE}
    proc = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"scripts/slurm-local.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    started = proc.stdout.strip().splitlines()[-1] == "started"
    _make_account()
    yield
    subprocess.run(["scancel", "-u", USER], env=env, capture_output=True, timeout=30)
    deadline = time.monotonic() + 30  # cancelled jobs' steps end within KillWait
    while _user_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _user_processes()
    _remove_account()
    shutil.rmtree(SITE, ignore_errors=True)
    if started:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
    assert not left, f"processes of {USER} left behind: {left}"


def _user_processes() -> list[str]:
    proc = subprocess.run(["pgrep", "-a", "-u", USER], capture_output=True, text=True)
    return proc.stdout.splitlines()


@pytest.fixture(scope="module", params=sorted(MPIS))
def login(request, site) -> Login:
    """A login shell with this MPI loaded, after `scripts/setup.sh` ran as the user in it (no root)."""
    login = Login(request.param)
    start = time.monotonic()
    proc = login.run("bash", "scripts/setup.sh", timeout=1800)
    login.setup_seconds = time.monotonic() - start
    login.setup = proc
    print(f"\n[login] {request.param}: scripts/setup.sh as {USER} took {login.setup_seconds:.0f} s", flush=True)
    return login


def quoted(argv) -> str:
    return shlex.join(map(str, argv))
