"""Which MPI is which, never guessed from a name: the launcher on PATH (`mpirun`, else `mpiexec`) by what its
`--version` prints, and the MPI a compiled library was built against (Horovod's, mpi4py's) by the libmpi its ELF
file names (DT_NEEDED). Two flavours: "openmpi" (Open MPI and its derivatives) and "mpich" (MPICH's Hydra
`mpiexec`, as in Intel MPI, MVAPICH and Cray MPICH; libmpich.so.12 / libmpi.so.12, the MPICH ABI).

Both answers are cached, in this process and on disk (files.cache_dir()/mpi.json, written atomically), keyed by the
file's real path, mtime and size: a launch asks again only when the file changed. A cache that cannot be read or
written costs a probe, never a launch. (A launcher that is a script choosing its MPI from the environment would be
cached by the script: none of the MPIs we know is.) Ground floor: imports nothing above it, nothing heavy.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
from typing import Callable, Optional, Sequence

from hvdtrain.errors import UsageError
from hvdtrain.files import cache_dir

FLAVOURS = {"openmpi": "Open MPI", "mpich": "MPICH"}
LAUNCHER_NAMES = ("mpirun", "mpiexec")  # looked for on PATH in this order
CACHE_NAME = "mpi.json"
CACHE_ENTRIES = 64  # the newest kept: a cache is a convenience, not a history
VERSION_TIMEOUT_S = 10.0
# Where each package's compiled MPI part is, under the package's directory (found without importing it).
PACKAGE_LIBRARIES = {"horovod": "torch/mpi_lib_v2*.so", "mpi4py": "MPI*.so"}
PACKAGE_NAMES = {"horovod": "Horovod", "mpi4py": "mpi4py"}

# `mpirun (Open MPI) 4.1.4`; Open MPI's derivatives print their own name in the parentheses.
_OPEN_MPI_LIKE = re.compile(r"^(?:mpirun|mpiexec|orterun) \(([^)]+)\)\s+(\d\S*)", re.M)
_OPEN_MPI_NAMES = ("Open MPI", "OpenRTE", "Spectrum MPI")
# `Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)`: Hydra's mpiexec
_INTEL_MPI = re.compile(r"^Intel\(R\) MPI Library\b.*?\bVersion (.+?)(?: Build\b|$)", re.M)
# MPICH's (and MVAPICH's) launcher, Hydra: `HYDRA build details:` then `    Version:   4.0.2`
_HYDRA = re.compile(r"^HYDRA build details:\s*\n\s*Version:\s+(\S+)", re.M)
# libmpi sonames: the MPICH ABI (libmpich*.so, libmpi*.so.12: MPICH, Intel MPI, Cray MPICH), then Open MPI's.
_LIBRARIES = (
    ("mpich", re.compile(r"^libmpich\w*\.so|^libmpi\w*\.so\.12(\.|$)")),
    ("openmpi", re.compile(r"^libmpi\.so\.\d+|^libopen-(rte|pal)\.so")),
)


def parse_version(text: str) -> Optional[tuple[str, str, str]]:
    """A launcher's `--version` output -> (flavour, name, version), e.g. ("mpich", "MPICH (Hydra)", "4.0.2");
    None for anything else."""
    if m := _OPEN_MPI_LIKE.search(text):
        if any(name in m.group(1) for name in _OPEN_MPI_NAMES):
            return "openmpi", m.group(1), m.group(2)
        return None
    if m := _INTEL_MPI.search(text):
        return "mpich", "Intel MPI", m.group(1).strip()
    if m := _HYDRA.search(text):
        return "mpich", "MPICH (Hydra)", m.group(1)
    return None


@dataclasses.dataclass(frozen=True)
class Launcher:
    """The MPI launcher a job runs: what it is, and where."""

    flavour: str  # "openmpi" | "mpich"
    name: str  # "Open MPI", "MPICH (Hydra)", "Intel MPI", ...
    version: str
    path: str  # as found on PATH (what runs)
    realpath: str  # the file behind the links (Debian's alternatives, a module's links)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    @property
    def prefix(self) -> str:
        """The installation it belongs to: the directory above its bin/."""
        return os.path.dirname(os.path.dirname(self.realpath))

    def describe(self) -> str:
        """`MPICH (Hydra) 4.0.2 (/opt/m/bin/mpiexec -> /usr/bin/mpiexec.hydra)`"""
        where = self.path if self.realpath == self.path else f"{self.path} -> {self.realpath}"
        return f"{self.label} ({where})"


def launcher_path(path: Optional[str] = None) -> Optional[str]:
    """The MPI launcher on PATH (`path`: another search path): mpirun, else mpiexec; None when neither is."""
    for name in LAUNCHER_NAMES:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def find_launcher(path: Optional[str] = None) -> Launcher:
    """The MPI launcher on PATH and its flavour; UsageError when there is none, or it is no MPI we know."""
    found = launcher_path(path)
    if found is None:
        raise UsageError(
            "neither mpirun nor mpiexec is on PATH; install Open MPI (apt-get install openmpi-bin) or load your "
            "cluster's MPI module, or use --launcher horovodrun"
        )
    return detect(found)


def detect(path: str) -> Launcher:
    """What the launcher at `path` is, from its `--version` (cached by its real path, mtime and size)."""
    try:
        record = _cached("launcher", path, _probe_launcher, ("flavour", "name", "version"))
    except OSError as e:
        raise UsageError(f"cannot run {path}: {e.strerror}; put a working mpirun or mpiexec first on PATH") from None
    return Launcher(record["flavour"], record["name"], record["version"], path, os.path.realpath(path))


def _probe_launcher(path: str) -> dict:
    argv = [path, "--version"]
    try:
        ran = subprocess.run(
            argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, stdin=subprocess.DEVNULL, errors="replace"
        )
    except subprocess.TimeoutExpired:
        raise UsageError(
            f"`{path} --version` gave no answer within {VERSION_TIMEOUT_S:g} s; put a working mpirun or mpiexec "
            "first on PATH"
        ) from None
    found = parse_version(ran.stdout + "\n" + ran.stderr)
    if found is None:
        said = next((line.strip() for line in (ran.stdout + ran.stderr).splitlines() if line.strip()), "nothing")
        raise UsageError(
            f"{path} is no MPI launcher hvdtrain knows: `{path} --version` printed {said!r} (exit {ran.returncode}); "
            "put Open MPI's mpirun or MPICH's mpiexec (Hydra) first on PATH, or use --launcher horovodrun"
        )
    return dict(zip(("flavour", "name", "version"), found))


# --- the MPI a library was built against -----------------------------------------------------------------------

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ = 0, 1, 5, 10


def needed(path: str) -> list[str]:
    """The libraries an ELF file needs (DT_NEEDED, what `readelf -d` lists), read as the dynamic loader reads them
    (program headers, so stripped files too); [] for a file that is not ELF or links nothing."""
    try:
        with open(path, "rb") as f:
            return _needed(f)
    except (OSError, struct.error, ValueError, StopIteration):
        return []


def _needed(f) -> list[str]:
    ident = f.read(16)
    if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return []
    wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
    header = struct.unpack(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"), f.read(48 if wide else 36))
    phoff, phentsize, phnum = header[4], header[8], header[9]
    segments = []  # (type, file offset, virtual address, size in the file)
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        if wide:
            kind, _flags, offset, vaddr, _paddr, size = struct.unpack(order + "IIQQQQ", f.read(40))
        else:
            kind, offset, vaddr, _paddr, size = struct.unpack(order + "IIIII", f.read(20))
        segments.append((kind, offset, vaddr, size))
    dynamic = [(offset, size) for kind, offset, _, size in segments if kind == _PT_DYNAMIC]
    if not dynamic:
        return []
    f.seek(dynamic[0][0])
    data = f.read(dynamic[0][1])
    entry = struct.Struct(order + ("qQ" if wide else "iI"))
    tags = []
    for at in range(0, len(data) - entry.size + 1, entry.size):
        tag, value = entry.unpack_from(data, at)
        if tag == _DT_NULL:
            break
        tags.append((tag, value))
    strtab = next(value for tag, value in tags if tag == _DT_STRTAB)
    strsz = next(value for tag, value in tags if tag == _DT_STRSZ)
    # The string table is named by its address once loaded: find the loaded segment that holds it in the file.
    f.seek(next(o + strtab - v for kind, o, v, size in segments if kind == _PT_LOAD and v <= strtab < v + size))
    table = f.read(strsz)
    return [table[v : table.index(b"\0", v)].decode() for tag, v in tags if tag == _DT_NEEDED]


def library_flavour(soname: str) -> Optional[str]:
    """The MPI flavour a libmpi soname belongs to (libmpi.so.40: "openmpi", libmpich.so.12: "mpich"); None for
    a library that is no MPI."""
    return next((flavour for flavour, pattern in _LIBRARIES if pattern.match(soname)), None)


@dataclasses.dataclass(frozen=True)
class Linked:
    """The MPI a compiled file was built against."""

    file: str  # the compiled file (Horovod's mpi_lib_v2*.so, mpi4py's MPI*.so)
    flavour: Optional[str]  # None: it names no MPI library (built without MPI, or it loads one at run time)
    library: Optional[str] = None  # the libmpi soname it needs, e.g. libmpi.so.40
    path: Optional[str] = None  # where that library is found here (ldd), when someone looked

    def describe(self) -> str:
        """`Open MPI (libmpi.so.40 => /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4)`"""
        if self.flavour is None:
            return "no MPI library linked"
        where = f"{self.library} => {self.path}" if self.path else self.library
        return f"{FLAVOURS[self.flavour]} ({where})"


def linked(file: str) -> Linked:
    """Which MPI `file` was built against, from the libmpi it needs (cached like the launcher)."""
    record = _cached("needed", file, _linked_record, ("flavour", "library"))
    return Linked(file, record["flavour"], record["library"])


def _linked_record(file: str) -> dict:
    for soname in needed(file):
        flavour = library_flavour(soname)
        if flavour is not None:
            return {"flavour": flavour, "library": soname}
    return {"flavour": None, "library": None}


def package_library(package: str) -> Optional[str]:
    """The compiled MPI part of `package` (PACKAGE_LIBRARIES) in this interpreter, found without importing the
    package (importlib's find_spec of a top-level package runs none of its code); None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(folder, PACKAGE_LIBRARIES[package])))
        if found:
            return found[0]
    return None


def built_with(package: str) -> Optional[Linked]:
    """The MPI this interpreter's `package` ("horovod", "mpi4py") was built against; None when not installed."""
    file = package_library(package)
    if file is None:
        return None
    try:
        return linked(file)
    except OSError:
        return None


def mismatch(package: str, built: Linked, launcher: Launcher) -> Optional[tuple[str, str]]:
    """(what, fix) when `package`, built as `built` says, cannot run under `launcher`'s MPI; None when it can (or
    it names no MPI)."""
    if built.flavour is None or built.flavour == launcher.flavour:
        return None
    name = PACKAGE_NAMES[package]
    what = (
        f"{name} was built against {built.describe()} but {os.path.basename(launcher.path)} on PATH is "
        f"{launcher.describe()}"
    )
    fix = (
        f"load the MPI module {name} was built with ({FLAVOURS[built.flavour]}), or build this venv against "
        f"{FLAVOURS[launcher.flavour]}: with it loaded, run scripts/setup.sh (docs/install.md)"
    )
    return what, fix


def mismatches(launcher: Launcher, packages: Sequence[str]) -> list[tuple[str, str]]:
    """(what, fix) of every package of this interpreter that was built against another MPI than `launcher`'s."""
    found = []
    for package in packages:
        built = built_with(package)
        said = mismatch(package, built, launcher) if built is not None else None
        if said is not None:
            found.append(said)
    return found


# --- the cache ---------------------------------------------------------------------------------------------------

_memo: dict[str, dict] = {}  # this process's answers, by cache key


def _cached(kind: str, path: str, compute: Callable[[str], dict], fields: Sequence[str]) -> dict:
    """compute(path), or its answer from an earlier call or launch for the same file (real path, mtime, size).
    OSError when `path` is not there. An answer that lacks `fields` (an older or damaged cache) is computed again."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{kind} {real} {st.st_mtime_ns} {st.st_size}"
    if key in _memo:
        return _memo[key]
    entries = _read_cache()
    record = entries.get(key)
    if not (isinstance(record, dict) and all(f in record for f in fields)):
        record = compute(path)
        entries.pop(key, None)
        entries[key] = record
        _write_cache(entries)
    _memo[key] = record
    return record


def _cache_file():
    return cache_dir() / CACHE_NAME


def _read_cache() -> dict:
    try:
        entries = json.loads(_cache_file().read_text()).get("entries")
    except (OSError, ValueError, AttributeError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(entries: dict) -> None:
    """Atomically (a file of this process's own, renamed over the cache); never raises."""
    path = _cache_file()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    keep = dict(list(entries.items())[-CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"entries": keep}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
