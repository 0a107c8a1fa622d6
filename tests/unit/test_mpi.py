"""hvdtrain.mpi: the launcher on PATH and its flavour from what it prints (fake launchers printing real outputs),
cached by the file; the MPI a library was built against, read from its ELF file (checked against readelf); the
words of a mismatch."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from fakempi import MPICH_4_0_2, OPEN_MPI_4_1_4, make_fake_launcher

from hvdtrain import mpi
from hvdtrain.errors import UsageError


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A process that has asked nothing yet, with its own cache directory (returned)."""
    monkeypatch.setattr(mpi, "_memo", {})
    cache = tmp_path / "cache"
    monkeypatch.setenv("HVDTRAIN_CACHE", str(cache))
    return cache


def test_the_launcher_is_mpirun_else_mpiexec_and_its_flavour_is_what_it_prints(tmp_path, fresh):
    module = tmp_path / "mpich" / "bin"
    make_fake_launcher(module, "mpiexec.hydra", MPICH_4_0_2)
    (module / "mpiexec").symlink_to("mpiexec.hydra")
    found = mpi.find_launcher(str(module))
    assert (found.flavour, found.name, found.version) == ("mpich", "MPICH (Hydra)", "4.0.2")
    assert found.path == str(module / "mpiexec") and found.realpath == str(module / "mpiexec.hydra")
    assert found.prefix == str(tmp_path / "mpich")
    assert found.describe() == f"MPICH (Hydra) 4.0.2 ({module / 'mpiexec'} -> {module / 'mpiexec.hydra'})"
    make_fake_launcher(module, "mpirun", OPEN_MPI_4_1_4)  # a name says nothing: mpirun here is Open MPI's
    found = mpi.find_launcher(str(module))
    assert (found.flavour, found.label, found.path) == ("openmpi", "Open MPI 4.1.4", str(module / "mpirun"))
    with pytest.raises(UsageError, match="^neither mpirun nor mpiexec is on PATH; install Open MPI"):
        mpi.find_launcher(str(tmp_path / "empty"))


def test_detection_is_cached_by_the_file_across_processes(tmp_path, fresh, monkeypatch):
    calls = tmp_path / "calls"
    launcher = make_fake_launcher(tmp_path / "bin", "mpirun", MPICH_4_0_2, calls)
    assert mpi.detect(str(launcher)).flavour == "mpich"
    assert mpi.detect(str(launcher)).flavour == "mpich"
    assert calls.read_text() == "--version\n"  # asked once
    monkeypatch.setattr(mpi, "_memo", {})  # a new process: the file on disk answers
    assert mpi.detect(str(launcher)).version == "4.0.2" and calls.read_text() == "--version\n"
    entries = json.loads((fresh / mpi.CACHE_NAME).read_text())["entries"]
    st = launcher.stat()
    assert entries == {
        f"launcher {launcher} {st.st_mtime_ns} {st.st_size}": {
            "flavour": "mpich", "name": "MPICH (Hydra)", "version": "4.0.2",
        }
    }  # fmt: skip
    make_fake_launcher(tmp_path / "bin", "mpirun", OPEN_MPI_4_1_4, calls)  # another MPI in its place
    monkeypatch.setattr(mpi, "_memo", {})
    assert mpi.detect(str(launcher)).flavour == "openmpi"
    assert calls.read_text() == "--version\n--version\n"
    assert not [p for p in fresh.iterdir() if p.name != mpi.CACHE_NAME]  # no temporary file left


def test_a_cache_that_cannot_be_written_or_read_never_fails_a_launch(tmp_path, fresh, monkeypatch):
    calls = tmp_path / "calls"
    launcher = str(make_fake_launcher(tmp_path / "bin", "mpirun", MPICH_4_0_2, calls))
    monkeypatch.setenv("HVDTRAIN_CACHE", str(launcher))  # a file: no directory can be made there
    assert mpi.detect(launcher).flavour == "mpich"
    monkeypatch.setattr(mpi, "_memo", {})
    assert mpi.detect(launcher).flavour == "mpich" and calls.read_text() == "--version\n" * 2
    monkeypatch.setenv("HVDTRAIN_CACHE", str(fresh))
    fresh.mkdir()
    for damaged in ("{not json", '{"entries": [1, 2]}', "[]", json.dumps({"entries": {"x": 1}})):
        (fresh / mpi.CACHE_NAME).write_text(damaged)
        monkeypatch.setattr(mpi, "_memo", {})
        assert mpi.detect(launcher).flavour == "mpich"
    assert len(calls.read_text().splitlines()) == 6
    key = next(iter(json.loads((fresh / mpi.CACHE_NAME).read_text())["entries"]))
    (fresh / mpi.CACHE_NAME).write_text(json.dumps({"entries": {key: {"flavour": "mpich"}}}))  # fields missing
    monkeypatch.setattr(mpi, "_memo", {})
    assert mpi.detect(launcher).version == "4.0.2" and len(calls.read_text().splitlines()) == 7


@pytest.mark.parametrize(
    "output", ["mpirun (Foo MPI) 1.0\n", "usage: mpirun [options]\n", ""], ids=["other", "usage", "nothing"]
)
def test_an_unknown_launcher_is_a_usage_error_naming_it_and_what_it_printed(tmp_path, fresh, output):
    calls = tmp_path / "calls"
    launcher = make_fake_launcher(tmp_path / "bin", "mpirun", output, calls)
    said = output.strip() or "nothing"
    for _ in range(2):  # not cached: asked again
        with pytest.raises(UsageError) as e:
            mpi.detect(str(launcher))
        message = str(e.value)
        assert message.startswith(f"{launcher} is no MPI launcher hvdtrain knows: `{launcher} --version` printed ")
        assert f"printed {said!r} (exit 0); put Open MPI's mpirun or MPICH's mpiexec (Hydra) first on PATH" in message
        assert "\n" not in message
    assert calls.read_text() == "--version\n" * 2


def test_needed_lists_what_readelf_does():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    files = [os.path.realpath(sys.executable), *filter(None, (mpi.package_library(p) for p in ("horovod", "mpi4py")))]
    files += [f for f in ("/usr/bin/mpiexec.hydra", "/usr/lib/x86_64-linux-gnu/libmpich.so.12") if os.path.exists(f)]
    for file in files:
        dynamic = subprocess.run([readelf, "-d", file], capture_output=True, text=True).stdout
        assert mpi.needed(file) == re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]", dynamic), file


def test_needed_of_what_is_no_elf_file_is_nothing(tmp_path):
    assert mpi.needed(str(tmp_path / "missing")) == []
    (tmp_path / "text").write_text("#!/bin/sh\n")
    assert mpi.needed(str(tmp_path / "text")) == []
    cut = tmp_path / "cut.so"
    cut.write_bytes(open(os.path.realpath(sys.executable), "rb").read(200))  # headers that point past the end
    assert mpi.needed(str(cut)) == []


@pytest.mark.parametrize(
    "soname,flavour",
    [
        ("libmpi.so.40", "openmpi"),  # Open MPI 3, 4, 5
        ("libmpi.so.20", "openmpi"),  # Open MPI 2
        ("libopen-rte.so.40", "openmpi"),
        ("libmpich.so.12", "mpich"),  # Debian's MPICH
        ("libmpichcxx.so.12", "mpich"),
        ("libmpi.so.12", "mpich"),  # MPICH built upstream, Intel MPI: the MPICH ABI
        ("libmpi.so.12.1.1", "mpich"),
        ("libmpi_gnu_123.so.12", "mpich"),  # Cray MPICH
        ("libmpi_cxx.so.40", None),  # Open MPI's C++ bindings: libmpi.so.40 says it
        ("libc.so.6", None),
        ("libmpix.so.1", None),
    ],
)
def test_library_flavour(soname, flavour):
    assert mpi.library_flavour(soname) == flavour


def test_built_with_reads_the_library_without_importing_the_package(tmp_path):
    if mpi.package_library("horovod") is None:
        pytest.skip("Horovod is not installed in this interpreter")
    probe = (
        "import sys; from hvdtrain import mpi; b = mpi.built_with('horovod'); "
        "print(b.flavour, b.library, 'horovod' in sys.modules, 'mpi4py' in sys.modules)"
    )
    env = {**os.environ, "HVDTRAIN_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    needed = mpi.needed(mpi.package_library("horovod"))
    library = next(n for n in needed if mpi.library_flavour(n))
    assert out.split() == [mpi.library_flavour(library), library, "False", "False"]
    assert mpi.built_with("surely_no_such_package_here") is None


def test_mismatch_says_what_was_built_against_what_and_the_fix():
    hydra = mpi.Launcher("mpich", "MPICH (Hydra)", "4.0.2", "/opt/m/bin/mpiexec", "/usr/bin/mpiexec.hydra")
    built = mpi.Linked("/venv/horovod/torch/mpi_lib_v2.so", "openmpi", "libmpi.so.40")
    what, fix = mpi.mismatch("horovod", built, hydra)
    assert what == (
        "Horovod was built against Open MPI (libmpi.so.40) but mpiexec on PATH is MPICH (Hydra) 4.0.2 "
        "(/opt/m/bin/mpiexec -> /usr/bin/mpiexec.hydra)"
    )
    assert fix.startswith(
        "load the MPI module Horovod was built with (Open MPI), or build this venv against MPICH: with it loaded, "
        "run scripts/setup.sh"
    )
    located = mpi.Linked(built.file, "openmpi", "libmpi.so.40", "/usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4")
    assert (
        "Open MPI (libmpi.so.40 => /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4)"
        in mpi.mismatch("mpi4py", located, hydra)[0]
    )
    assert mpi.mismatch("horovod", mpi.Linked(built.file, "mpich", "libmpich.so.12"), hydra) is None
    assert mpi.mismatch("horovod", mpi.Linked(built.file, None), hydra) is None  # no MPI linked: nothing to say
