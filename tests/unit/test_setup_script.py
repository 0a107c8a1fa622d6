"""scripts/setup.sh as an ordinary user (--user): what is missing from PATH is one line naming it and the fix,
exit 2, before anything is written; and scripts/cuda_toolkit.py's layout of PyPI's NVIDIA packages as a
CUDA_HOME. The whole set-up as an ordinary user runs in the login tier (tests/login)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "setup.sh"
MPI_TOOLS = ("mpicc", "mpicxx", "mpic++", "mpiCC", "mpirun", "mpiexec", "mpif77", "mpif90", "mpifort", "mpiexec.hydra")


def path_without_mpi(tmp_path: Path, extra: Optional[dict[str, str]] = None) -> str:
    """A PATH of one folder holding every program of /usr/bin but the MPI's (and `extra`: name -> target)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for entry in Path("/usr/bin").iterdir():
        if entry.name not in MPI_TOOLS and not entry.name.startswith(("mpicc.", "mpirun.", "mpiexec.")):
            (folder / entry.name).symlink_to(entry)
    for name, target in (extra or {}).items():
        (folder / name).symlink_to(target)
    return str(folder)


def run_setup(tmp_path: Path, path: str, *args: str) -> subprocess.CompletedProcess:
    env = {"HOME": str(tmp_path / "home"), "PATH": path, "HVDTRAIN_VENV": str(tmp_path / "venv"),
           "HVDTRAIN_CACHE": str(tmp_path / "cache")}  # fmt: skip
    return subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True, timeout=60)


def assert_one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup.sh: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "venv").exists() and not (tmp_path / "cache").exists()


def test_no_mpicc_names_the_module_to_load(tmp_path):
    proc = run_setup(tmp_path, path_without_mpi(tmp_path), "--user")
    assert_one_line(proc, "no mpicc on PATH", "module load openmpi")
    assert_nothing_written(tmp_path)


def test_an_mpicc_without_its_launcher(tmp_path):
    proc = run_setup(tmp_path, path_without_mpi(tmp_path, {"mpicc": "/usr/bin/mpicc.openmpi"}), "--user")
    assert_one_line(proc, "no mpirun or mpiexec on PATH")
    assert_nothing_written(tmp_path)


@pytest.mark.skipif(not Path("/usr/bin/mpicc.mpich").exists(), reason="needs Debian's mpich (scripts/setup.sh --slurm)")
def test_compiler_and_launcher_of_two_mpis(tmp_path):
    path = path_without_mpi(tmp_path, {"mpicc": "/usr/bin/mpicc.mpich", "mpirun": "/usr/bin/mpirun.openmpi"})
    proc = run_setup(tmp_path, path, "--user")
    assert_one_line(proc, "different MPIs", "module purge")
    assert_nothing_written(tmp_path)


def test_slurm_packages_need_root(tmp_path):
    proc = run_setup(tmp_path, os.environ["PATH"], "--user", "--slurm")
    assert_one_line(proc, "--slurm", "as root")
    assert_nothing_written(tmp_path)


def test_an_unknown_option(tmp_path):
    proc = run_setup(tmp_path, os.environ["PATH"], "--usr")
    assert proc.returncode == 2 and "unknown option '--usr'" in proc.stderr
    assert_nothing_written(tmp_path)


# --- scripts/cuda_toolkit.py ----------------------------------------------------------------------------------


def cuda_toolkit():
    spec = importlib.util.spec_from_file_location("cuda_toolkit", REPO / "scripts" / "cuda_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lay_out_makes_a_cuda_home_of_the_packages(tmp_path):
    site = tmp_path / "site" / "nvidia"
    files = ["cu13/bin/nvcc", "cu13/include/cuda_runtime.h", "cu13/include/crt/host_config.h",
             "cu13/lib/libcudart.so.13", "cu13/lib/libcudart_static.a", "cu13/nvvm/bin/cicc",
             "nccl/include/nccl.h", "nccl/lib/libnccl.so.2"]  # fmt: skip
    for name in files:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(name)
    home = tmp_path / "home"
    cuda_toolkit().lay_out(tmp_path / "site", home)
    assert (home / "bin" / "nvcc").read_text() == "cu13/bin/nvcc"
    assert (home / "include" / "crt" / "host_config.h").exists() and (home / "include" / "nccl.h").exists()
    # the linker's names beside the versioned ones; static archives as they are
    assert (home / "lib64" / "libcudart.so").resolve() == (site / "cu13/lib/libcudart.so.13").resolve()
    assert (home / "lib64" / "libnccl.so").resolve() == (site / "nccl/lib/libnccl.so.2").resolve()
    assert (home / "lib64" / "libcudart_static.a").exists() and not (home / "lib64" / "libcudart_static.so").exists()
    assert (home / "nvvm" / "bin" / "cicc").exists()


def test_requirements_pin_what_torch_installed_and_take_the_build_pieces_at_its_cuda(monkeypatch):
    module = cuda_toolkit()
    installed = {"nvidia-cuda-runtime": "13.0.96", "nvidia-nccl-cu13": "2.29.7"}
    monkeypatch.setattr(module.md, "version", lambda name: installed[name])
    reqs = module.requirements("13.0")
    assert "nvidia-cuda-nvcc==13.0.*" in reqs and "nvidia-cuda-cccl==13.0.*" in reqs
    assert "nvidia-cuda-runtime==13.0.96" in reqs and "nvidia-nccl-cu13==2.29.7" in reqs


def test_an_unknown_cuda_major_names_the_way_out(capsys):
    with pytest.raises(SystemExit):
        cuda_toolkit().requirements("11.8")
    assert "set CUDA_HOME to a CUDA 11.8 toolkit" in capsys.readouterr().err


def test_nvcc_version_reads_the_release():
    module = cuda_toolkit()
    assert (
        module.parse_nvcc_version(
            "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88"
        )
        == "13.0"
    )
    assert module.parse_nvcc_version("") is None


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="no CUDA toolkit in /usr/local/cuda")
def test_nvcc_version_of_a_real_nvcc():
    assert cuda_toolkit().nvcc_version(Path("/usr/local/cuda/bin/nvcc")) is not None
