"""MPI launchers as tests meet them: their `--version` outputs, captured verbatim on the Debian 12 test machine
(Open MPI 4.1.4 from Debian's openmpi-bin, MPICH 4.0.2 from Debian's mpich) except where a comment says otherwise,
and a fake launcher that prints one (imported by the test modules of this folder)."""

import sys
from pathlib import Path

# `mpirun --version` (openmpi-bin 4.1.4-3+b1), stdout; exit 0, nothing on stderr.
OPEN_MPI_4_1_4 = "mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n"

# `mpiexec.hydra --version` (mpich 4.0.2-3+b1), stdout; exit 0. The CC line ends in a space.
MPICH_4_0_2 = (
    "HYDRA build details:\n"
    "    Version:                                 4.0.2\n"
    "    Release Date:                            Thu Apr  7 12:34:45 CDT 2022\n"
    "    CC:                              gcc -Wdate-time -D_FORTIFY_SOURCE=2 -g -O2 "
    "-ffile-prefix-map=/build/mpich-1NaQGN/mpich-4.0.2=. -fstack-protector-strong -Wformat "
    "-Werror=format-security  -Wl,-z,relro \n"
    "    Configure options:                       '--with-hwloc-prefix=/usr' '--with-device=ch4:ucx' "
    "'FFLAGS=-O2 -ffile-prefix-map=/build/mpich-1NaQGN/mpich-4.0.2=. -fstack-protector-strong "
    "-fallow-invalid-boz -fallow-argument-mismatch' '--prefix=/usr' 'CFLAGS=-g -O2 "
    "-ffile-prefix-map=/build/mpich-1NaQGN/mpich-4.0.2=. -fstack-protector-strong -Wformat "
    "-Werror=format-security' 'LDFLAGS=-Wl,-z,relro' 'CPPFLAGS=-Wdate-time -D_FORTIFY_SOURCE=2'\n"
    "    Process Manager:                         pmi\n"
    "    Launchers available:                     ssh rsh fork slurm ll lsf sge manual persist\n"
    "    Topology libraries available:            hwloc\n"
    "    Resource management kernels available:   user slurm ll lsf sge pbs cobalt\n"
    "    Demux engines available:                 poll select\n"
)

# Intel MPI's `mpirun --version` (not captured here: no Intel MPI on this machine; the two formats as
# published by users of Intel MPI 2021.10 and 2019 Update 2).
INTEL_MPI_2021 = (
    "Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)\n"
    "Copyright 2003-2023, Intel Corporation.\n"
)
INTEL_MPI_2019 = (
    "Intel(R) MPI Library for Linux* OS, Version 2019 Update 2 Build 20190123 (id: e2d820d49)\n"
    "Copyright 2003-2019, Intel Corporation.\n"
)

# `ldd` of the venv's mpi4py/MPI.cpython-311-x86_64-linux-gnu.so (Open MPI's libmpi), stdout; exit 0.
LDD_MPI4PY = (
    "\tlinux-vdso.so.1 (0x00007f4ca4848000)\n"
    "\tlibmpi.so.40 => /lib/x86_64-linux-gnu/libmpi.so.40 (0x00007f4ca44c1000)\n"
    "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f4ca42df000)\n"
    "\tlibopen-rte.so.40 => /lib/x86_64-linux-gnu/libopen-rte.so.40 (0x00007f4ca4223000)\n"
    "\tlibopen-pal.so.40 => /lib/x86_64-linux-gnu/libopen-pal.so.40 (0x00007f4ca416c000)\n"
    "\t/lib64/ld-linux-x86-64.so.2 (0x00007f4ca484a000)\n"
)


def make_fake_launcher(folder: Path, name: str, output: str, calls: Path = None) -> Path:
    """An executable `folder/name` that prints `output` (whatever its arguments), and appends its arguments as a
    line to `calls` when given: a launcher to ask what it is."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / name
    record = f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n" if calls else ""
    launcher.write_text(f"#!{sys.executable}\nimport sys\n{record}sys.stdout.write({output!r})\n")
    launcher.chmod(0o755)
    return launcher
