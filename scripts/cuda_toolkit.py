"""The CUDA pieces Horovod's build needs where the venv's torch is a CUDA build: prints the build variables for
scripts/setup.sh to export, or nothing for a CPU-only torch.

Horovod's CMake asks for the CUDA toolkit (nvcc, the runtime's headers and library) whenever torch was built with
CUDA, and for NCCL with HOROVOD_GPU_OPERATIONS=NCCL. A login node rarely has a toolkit that matches the torch PyPI
serves, and a partial one (an `nvcc` on PATH without the headers beside it) is worse than none: torch then guesses
CUDA_HOME from it and CMake fails with "Could NOT find CUDAToolkit (missing: CUDAToolkit_INCLUDE_DIR ...)". So:

- a toolkit named by CUDA_HOME (or CUDA_PATH), as `module load cuda` sets it, is used when its nvcc reports
  torch's CUDA major.minor and its headers are there;
- otherwise the same pieces come from PyPI's NVIDIA packages (nvcc, its front-end headers and NVVM, the CCCL
  headers, the runtime and NCCL at the versions torch itself installed), installed once into
  <cache>/cuda/<key>/ and laid out as a CUDA_HOME (bin, include, lib64, nvvm) with the unversioned library
  names the linker looks for.

The kernels are built for the architectures torch was built for. The result runs on a machine without a GPU
(every CPU operation, as before) and gives a GPU cluster NCCL operations from the same set-up.

    python scripts/cuda_toolkit.py --cache DIR     # `export NAME=VALUE` lines, or nothing
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

# PyPI's package names for a CUDA major version: the build-only pieces (taken at torch's CUDA major.minor) and
# those torch installed itself (taken at the installed version, so that headers and libraries agree).
_BUILD_ONLY = {
    12: ["nvidia-cuda-nvcc-cu12", "nvidia-cuda-cccl-cu12"],
    13: ["nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cccl"],
}
_FROM_TORCH = {12: ["nvidia-cuda-runtime-cu12", "nvidia-nccl-cu12"], 13: ["nvidia-cuda-runtime", "nvidia-nccl-cu13"]}


def fail(message: str) -> None:
    print(f"[setup] ERROR: {message}", file=sys.stderr)
    sys.exit(1)


def nvcc_version(nvcc: Path) -> str | None:
    """'13.0' from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88"), or None."""
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_nvcc_version(out)


def parse_nvcc_version(text: str) -> str | None:
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else None


def site_toolkit(cuda: str) -> Path | None:
    """The toolkit CUDA_HOME/CUDA_PATH names, where it is whole and of torch's CUDA version."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(name)
        if (
            home
            and (Path(home) / "include" / "cuda_runtime.h").exists()
            and nvcc_version(Path(home) / "bin" / "nvcc") == cuda
        ):
            return Path(home)
    return None


def requirements(cuda: str) -> list[str]:
    major = int(cuda.split(".")[0])
    if major not in _BUILD_ONLY:
        fail(
            f"torch is built for CUDA {cuda}, for which hvdtrain knows no PyPI packages: set CUDA_HOME to a CUDA {cuda} toolkit (e.g. `module load cuda/{cuda}`) and run again"
        )
    reqs = [f"{name}=={cuda}.*" for name in _BUILD_ONLY[major]]
    for name in _FROM_TORCH[major]:
        try:
            reqs.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            reqs.append(name if "nccl" in name else f"{name}=={cuda}.*")
    return reqs


def _link(target: Path, link: Path) -> None:
    if not link.exists() and not link.is_symlink():
        link.symlink_to(target)


def lay_out(site: Path, home: Path) -> None:
    """A CUDA_HOME made of symlinks to the packages' files: bin/, include/, lib64/ (with libX.so beside
    libX.so.N), nvvm/. Each package has bin, include and lib folders under nvidia/<name>/ (nvidia/cu13/ holds
    all of CUDA 13's in one)."""
    for sub in ("bin", "include", "lib64"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for pkg in sorted((site / "nvidia").iterdir()):
        for sub, dest in (("bin", "bin"), ("include", "include"), ("lib", "lib64")):
            folder = pkg / sub
            if folder.is_dir():
                for entry in folder.iterdir():
                    _link(entry, home / dest / entry.name)
        if (pkg / "nvvm").is_dir():
            _link(pkg / "nvvm", home / "nvvm")
    for lib in list((home / "lib64").iterdir()):
        plain = re.match(r"(lib.+\.so)\.\d+$", lib.name)
        if plain:
            _link(lib, home / "lib64" / plain.group(1))


def pypi_toolkit(cuda: str, cache: Path) -> Path:
    reqs = requirements(cuda)
    key = hashlib.sha256(" ".join(reqs).encode()).hexdigest()[:12]
    root = cache / "cuda" / f"{cuda}-{key}"
    home = root / "home"
    if (home / "bin" / "nvcc").exists() and nvcc_version(home / "bin" / "nvcc") == cuda:
        return home
    print(f"[setup] CUDA {cuda} build pieces from PyPI: {' '.join(reqs)}", file=sys.stderr)
    site = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--upgrade", "--target", str(site), *reqs],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        fail(
            f"pip could not install the CUDA {cuda} build pieces ({' '.join(reqs)}): {proc.stderr.strip().splitlines()[-1:]}"
        )
    lay_out(site, home)
    if nvcc_version(home / "bin" / "nvcc") != cuda:
        fail(f"the nvcc installed from PyPI in {home} does not run or is not CUDA {cuda}; remove {root} and run again")
    return home


def torch_nccl(cache: Path) -> Path | None:
    """NCCL as torch installed it (nvidia/nccl/ in the venv), with libnccl.so beside libnccl.so.2, for a site
    toolkit that has no NCCL of its own."""
    try:
        import nvidia.nccl as pkg
    except ImportError:
        return None
    src = Path(next(iter(pkg.__path__)))
    if not (src / "include" / "nccl.h").exists():
        return None
    dest = cache / "cuda" / f"nccl-{hashlib.sha256(str(src).encode()).hexdigest()[:12]}"
    for sub in ("include", "lib"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for entry in (src / sub).iterdir():
            _link(entry, dest / sub / entry.name)
    _link(src / "lib" / "libnccl.so.2", dest / "lib" / "libnccl.so")
    return dest


def arch_list(torch) -> str:
    """'75,80,86,90,100,120' from torch's own build ("sm_75 sm_80 ..."), without a GPU."""
    flags = torch._C._cuda_getArchFlags() or ""
    return ",".join(sorted({m for m in re.findall(r"sm_(\d+)", flags)}, key=int))


def build_env(cache: Path) -> dict[str, str]:
    import torch

    cuda = torch.version.cuda
    if cuda is None:
        return {}
    cuda = ".".join(cuda.split(".")[:2])
    home = site_toolkit(cuda) or pypi_toolkit(cuda, cache)
    env = {
        "CUDA_HOME": str(home),
        "HOROVOD_CUDA_HOME": str(home),
        "CUDAToolkit_ROOT": str(home),
        "HOROVOD_GPU_OPERATIONS": "NCCL",
    }
    nccl = home if (home / "include" / "nccl.h").exists() else torch_nccl(cache)
    if nccl is not None:  # else Horovod's FindNCCL looks in the toolkit and the system's folders
        lib = nccl / ("lib64" if nccl == home else "lib")
        env.update(HOROVOD_NCCL_INCLUDE=str(nccl / "include"), HOROVOD_NCCL_LIB=str(lib), HOROVOD_NCCL_LINK="SHARED")
    archs = arch_list(torch)
    if archs:
        env["HOROVOD_BUILD_CUDA_CC_LIST"] = archs
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, type=Path)
    args = parser.parse_args()
    for name, value in build_env(args.cache).items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
