"""`hvdtrain doctor`: version parsing against real outputs, states, and a table that never contradicts itself.

The outputs below were captured verbatim on the Debian 12 test machine (Open MPI 4.1.4 and Slurm 22.05.8
from Debian's packages; MPICH 4.0.2 from Debian's `mpich` package), except where a comment says otherwise.
"""

import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from fakempi import INTEL_MPI_2019, INTEL_MPI_2021, LDD_MPI4PY, MPICH_4_0_2, OPEN_MPI_4_1_4

from hvdtrain import doctor, mpi
from hvdtrain.cli import cli
from hvdtrain.doctor import Ran

# `sbatch --version` with a slurm.conf (SLURM_CONF=...), slurm-client 22.05.8-4+deb12u3: stdout, exit 0.
SBATCH_DEBIAN = "slurm-wlm 22.05.8\n"
# Upstream builds print their package name `slurm` instead (not captured here).
SBATCH_UPSTREAM = "slurm 22.05.8\n"
# `sbatch --version` with no /etc/slurm/slurm.conf and SLURM_CONF unset: exit 1, nothing on stdout, stderr:
SBATCH_NO_CONF = (
    "sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
    "sbatch: error: fetch_config: DNS SRV lookup failed\n"
    "sbatch: error: _establish_config_source: failed to fetch config\n"
    "sbatch: fatal: Could not establish a configuration source\n"
)
# `SLURM_CONF=/nonexistent sbatch --version`: exit 1 after 59 s of retries, stderr:
SBATCH_MISSING_CONF = (
    "sbatch: error: s_p_parse_file: cannot stat file /nonexistent: No such file or directory, "
    "retrying in 1sec up to 60sec\n"
    "sbatch: error: ClusterName needs to be specified\n"
    "sbatch: fatal: Unable to process configuration file\n"
)
# `scontrol ping` with a slurm.conf: stdout; exit 1 when slurmctld is not running, exit 0 when it is.
PING_DOWN = (
    "Slurmctld(primary) at vm is DOWN\n"
    "*****************************************\n"
    "** RESTORE SLURMCTLD DAEMON TO SERVICE **\n"
    "*****************************************\n"
)
PING_UP = "Slurmctld(primary) at vm is UP\n"


@pytest.mark.parametrize(
    "text, expected, flavour",
    [
        (OPEN_MPI_4_1_4, "Open MPI 4.1.4", "openmpi"),
        (MPICH_4_0_2, "MPICH (Hydra) 4.0.2", "mpich"),
        (INTEL_MPI_2021, "Intel MPI 2021.10", "mpich"),  # Intel MPI's mpiexec is Hydra
        (INTEL_MPI_2019, "Intel MPI 2019 Update 2", "mpich"),
        ("mpirun (IBM Spectrum MPI) 10.4.0.3\n", "IBM Spectrum MPI 10.4.0.3", "openmpi"),  # an Open MPI (not captured)
        ("mpirun (Foo MPI) 1.0\n", None, None),  # the form alone says nothing of the flavour
        ("", None, None),
        ("bash: mpirun: command not found\n", None, None),
        (SBATCH_NO_CONF, None, None),
    ],
)
def test_parse_mpi_version(text, expected, flavour):
    """What the doctor shows, and the flavour the launching side goes by (hvdtrain.mpi.parse_version)."""
    assert doctor.parse_mpi_version(text) == expected
    assert (mpi.parse_version(text) or [None])[0] == flavour


@pytest.mark.parametrize(
    "text, expected",
    [
        (SBATCH_DEBIAN, "22.05.8"),
        (SBATCH_UPSTREAM, "22.05.8"),
        (SBATCH_NO_CONF, None),
        (SBATCH_MISSING_CONF, None),
        (OPEN_MPI_4_1_4, None),
        ("", None),
    ],
)
def test_parse_slurm_version(text, expected):
    assert doctor.parse_slurm_version(text) == expected


def test_real_mpirun_version_is_read():
    """Whatever MPI this machine has, its own `mpirun --version` must parse (the bug of issue #8)."""
    mpirun = shutil.which("mpirun")
    if not mpirun:
        pytest.skip("no mpirun on PATH")
    ran = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    assert doctor.parse_mpi_version(ran.stdout + ran.stderr), ran.stdout + ran.stderr


# --- states -------------------------------------------------------------------------------------------


def test_mpi_status():
    assert doctor.mpi_status("/usr/bin/mpirun", Ran(0, OPEN_MPI_4_1_4)) == doctor.Status("ok", "Open MPI 4.1.4")
    assert doctor.mpi_status(None, None).state == "missing"
    broken = doctor.mpi_status("/usr/bin/mpirun", Ran(127, "", "mpirun: error while loading shared libraries\n"))
    assert broken.state == "unreadable" and "(exit 127)" in broken.detail
    odd = doctor.mpi_status("/usr/bin/mpirun", Ran(0, "some other launcher 1.0\n"))
    assert odd.state == "unreadable" and "some other launcher 1.0" in odd.detail


CONF = "/etc/slurm/slurm.conf"


@pytest.mark.parametrize(
    "sbatch, conf_found, version, ping, state, version_seen, detail",
    [
        (None, False, None, None, "missing", None, "sbatch is not on PATH"),
        ("/usr/bin/sbatch", False, None, None, "unconfigured", None, "no slurm.conf at"),
        (
            "/usr/bin/sbatch",
            False,
            Ran(1, "", SBATCH_NO_CONF),
            None,
            "unconfigured",
            None,
            "sbatch: fatal: Could not establish a configuration source",
        ),
        (
            "/usr/bin/sbatch",
            True,
            Ran(1, "", SBATCH_MISSING_CONF),
            None,
            "unconfigured",
            None,
            "Unable to process configuration file",
        ),
        ("/usr/bin/sbatch", True, Ran(0, "Slurm, some version\n"), None, "unreadable", None, "Slurm, some version"),
        ("/usr/bin/sbatch", True, Ran(0, SBATCH_DEBIAN), Ran(1, PING_DOWN), "unreachable", "22.05.8", "is DOWN"),
        (
            "/usr/bin/sbatch",
            True,
            Ran(0, SBATCH_DEBIAN),
            Ran(None, "", "no answer within 15 s"),
            "unreachable",
            "22.05.8",
            "no answer",
        ),
        ("/usr/bin/sbatch", True, Ran(0, SBATCH_DEBIAN), Ran(0, PING_UP), "ok", "22.05.8", "is UP"),
        ("/usr/bin/sbatch", True, Ran(0, SBATCH_UPSTREAM), None, "ok", "22.05.8", "not checked"),
    ],
)
def test_slurm_status(sbatch, conf_found, version, ping, state, version_seen, detail):
    status = doctor.slurm_status(sbatch, CONF, conf_found, version, ping)
    assert (status.state, status.version) == (state, version_seen)
    assert detail in status.detail


# --- report -> problems, notes, table -----------------------------------------------------------------


def make_report(mpi=None, slurm=None, **changes):
    """A healthy report (Slurm answering), with `mpi` / `slurm` Status and other keys replaced."""
    mpi = mpi or doctor.Status("ok", "Open MPI 4.1.4")
    slurm = slurm or doctor.Status("ok", "22.05.8", "Slurmctld(primary) at vm is UP")
    report = {
        "python": "3.11.2",
        "executable": "/work/.venv/bin/python",
        "torch": "2.13.0+cpu",
        "horovod": "0.28.1",
        "horovod_build": {"frameworks": {"PyTorch": True}, "controllers": {"MPI": True, "Gloo": True}},
        "mpi4py": "4.0.1",
        "errors": {},
        "mpi": mpi.version,
        "mpi_status": {"state": mpi.state, "version": mpi.version, "detail": mpi.detail},
        "slurm": slurm.version,
        "slurm_status": {"state": slurm.state, "version": slurm.version, "detail": slurm.detail},
        "tools": {t: f"/usr/bin/{t}" for t in ("horovodrun", "mpirun", "srun", "sbatch", "squeue", "scontrol")},
        "cores": 2,
        "memory_gib": 7.7,
        "gpus": [],
    }
    report.update(changes)
    return report


def test_healthy_report_is_ready_for_slurm_too():
    table = doctor.to_table(make_report())
    assert doctor.assess(make_report()) == ([], [])
    assert "MPI " in table and "Open MPI 4.1.4" in table
    assert table.splitlines()[-1] == "OK: ready for distributed training, local and through Slurm"


def test_missing_mpi_is_a_problem_never_ready():
    report = make_report(mpi=doctor.mpi_status(None, None), tools={**make_report()["tools"], "mpirun": None})
    problems, _ = doctor.assess(report)
    table = doctor.to_table(report)
    assert [p["what"] for p in problems] == ["mpirun is not on PATH"]
    assert "apt-get install openmpi-bin" in problems[0]["fix"]
    assert "MISSING" in table and "PROBLEM: mpirun is not on PATH" in table
    assert "OK" not in table.splitlines()[-1] and table.splitlines()[-1].startswith("NOT READY")


def test_unreadable_mpi_is_a_problem():
    report = make_report(mpi=doctor.mpi_status("/usr/bin/mpirun", Ran(1, "", "mpirun: fatal\n")))
    table = doctor.to_table(report)
    assert "version UNREADABLE" in table and "PROBLEM: MPI is installed but unusable" in table
    assert table.splitlines()[-1].startswith("NOT READY")


def test_slurm_installed_not_configured_is_its_own_state():
    slurm = doctor.slurm_status("/usr/bin/sbatch", CONF, False, Ran(1, "", SBATCH_NO_CONF), None)
    report = make_report(slurm=slurm)
    problems, notes = doctor.assess(report)
    table = doctor.to_table(report)
    assert problems == []
    assert len(notes) == 1 and "installed but not configured" in notes[0]["what"]
    assert "SLURM_CONF" in notes[0]["fix"] and "slurm-local.sh start" in notes[0]["fix"]
    assert "installed, NOT CONFIGURED (no slurm.conf at /etc/slurm/slurm.conf" in table
    assert "not installed" not in table
    assert table.splitlines()[-1].startswith("OK: ready for local distributed training")
    assert "Slurm is not usable here" in table.splitlines()[-1]


def test_slurm_absent_is_a_note_not_a_problem():
    report = make_report(slurm=doctor.slurm_status(None, CONF, False, None, None))
    problems, notes = doctor.assess(report)
    table = doctor.to_table(report)
    assert problems == [] and "Slurm is not installed" in notes[0]["what"]
    assert "not installed (needed only for submit / status / logs)" in table
    assert "through Slurm" not in table and table.splitlines()[-1].startswith("OK: ready for local")


def test_slurmctld_down_is_shown_as_unreachable():
    slurm = doctor.slurm_status("/usr/bin/sbatch", CONF, True, Ran(0, SBATCH_DEBIAN), Ran(1, PING_DOWN))
    table = doctor.to_table(make_report(slurm=slurm))
    assert "22.05.8, slurmctld UNREACHABLE (`scontrol ping`: Slurmctld(primary) at vm is DOWN)" in table
    assert "NOTE: Slurm is configured but slurmctld does not answer" in table
    assert "through Slurm" not in table


@pytest.mark.parametrize("missing", ["torch", "horovod", "mpi4py"])
def test_every_missing_row_is_a_problem(missing):
    report = make_report(**{missing: None}, errors={missing: "ModuleNotFoundError: No module named 'x'"})
    problems, _ = doctor.assess(report)
    table = doctor.to_table(report)
    assert "MISSING" in table
    assert len(problems) == 1 and "No module named 'x'" in problems[0]["what"]
    assert table.splitlines()[-1].startswith("NOT READY")


def test_horovod_without_mpi_controller_is_a_problem():
    build = {"frameworks": {"PyTorch": True}, "controllers": {"MPI": False, "Gloo": True}}
    table = doctor.to_table(make_report(horovod_build=build))
    assert "PROBLEM: Horovod was built without the MPI controller" in table
    assert "OK" not in table.splitlines()[-1]


def build_row(table: str) -> str:
    return next(line.split(None, 1)[1] for line in table.splitlines() if line.split()[:1] == ["build"])


def test_stock_horovod_is_a_note_and_the_patched_build_is_shown():
    base = {"frameworks": {"PyTorch": True}, "controllers": {"MPI": True, "Gloo": True}}
    stock = {**base, "wake_on_wait": False, "flat_groups": False, "patched": False}
    problems, notes = doctor.assess(make_report(horovod_build=stock))
    assert problems == [] and any("Horovod is stock" in n["what"] and "--stock-horovod" in n["fix"] for n in notes)
    table = doctor.to_table(make_report(horovod_build=stock))
    assert build_row(table) == "stock Horovod (without hvdtrain's patch: see NOTE)"
    assert table.splitlines()[-1].startswith("OK")
    assert json.loads(doctor.to_json(make_report(horovod_build=stock)))["horovod_build"]["patched"] is False

    patched = {**base, "wake_on_wait": True, "flat_groups": True, "patched": True}
    problems, notes = doctor.assess(make_report(horovod_build=patched))
    assert problems == [] and not any("Horovod" in n["what"] for n in notes)
    assert build_row(doctor.to_table(make_report(horovod_build=patched))).startswith("hvdtrain's patch (wake on wait")

    # An older patch (no flat groups) is a note with the fix; a report from before the `patched` field says it
    # as wake_on_wait; no Horovod at all: no build to tell.
    older = {**patched, "flat_groups": False}
    assert any("older hvdtrain patch" in n["what"] for n in doctor.assess(make_report(horovod_build=older))[1])
    assert build_row(doctor.to_table(make_report(horovod_build=older))).startswith("hvdtrain's patch, an older one")
    assert doctor.horovod_patched({**base, "wake_on_wait": False}) is False
    assert doctor.horovod_patched(base) is None and build_row(doctor.to_table(make_report(horovod_build=None))) == "-"


# --- collect() and the CLI, with a fake at the subprocess boundary ------------------------------------


@pytest.fixture
def debian_machine(monkeypatch):
    """This machine as captured: Open MPI 4.1.4, Slurm installed without a slurm.conf; no real probes run."""
    calls = []
    probe = {"torch": "2.13.0+cpu", "horovod": "0.28.1", "mpi4py": "4.0.1", "gpus": []}
    probe["horovod_build"] = make_report()["horovod_build"]
    outputs = {
        "mpirun": Ran(0, OPEN_MPI_4_1_4),
        "ldd": Ran(0, LDD_MPI4PY),
        "sbatch": Ran(1, "", SBATCH_NO_CONF),
        "scontrol": Ran(1, "", SBATCH_NO_CONF.replace("sbatch", "scontrol")),
    }

    def fake_run(argv, timeout=15):
        calls.append(argv)
        if argv[1] == "-c":
            return Ran(0, json.dumps(probe) + "\n")
        return outputs[argv[0].rsplit("/", 1)[-1]]

    monkeypatch.setattr(doctor, "_run", fake_run)
    built = {p: mpi.Linked(f"/venv/{p}/mpi.so", "openmpi", "libmpi.so.40") for p in ("horovod", "mpi4py")}
    monkeypatch.setattr(mpi, "built_with", built.get)
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.setattr(doctor, "DEFAULT_SLURM_CONF", "/nonexistent/hvdtrain-test/slurm.conf")
    return calls


def test_collect_reads_open_mpi_and_unconfigured_slurm(debian_machine):
    report = doctor.collect()
    assert report["mpi"] == "Open MPI 4.1.4"
    assert report["slurm_status"]["state"] == "unconfigured"
    assert report["problems"] == [] and len(report["notes"]) == 1
    assert ["/usr/bin/scontrol", "ping"] not in debian_machine  # no ping without a working sbatch


def test_collect_names_the_mpi_of_each_part(debian_machine):
    """The launcher on PATH as the launching side sees it; Horovod's and mpi4py's MPI from their libraries, with
    where ldd finds that library here."""
    parts = doctor.collect()["mpi_parts"]
    assert parts["launcher"] == {
        "flavour": "openmpi", "name": "Open MPI", "version": "4.1.4", "path": "/usr/bin/mpirun",
        "realpath": os.path.realpath("/usr/bin/mpirun"),
    }  # fmt: skip
    libmpi = os.path.realpath("/lib/x86_64-linux-gnu/libmpi.so.40")
    for package in ("horovod", "mpi4py"):
        file = f"/venv/{package}/mpi.so"
        assert parts[package] == {"file": file, "flavour": "openmpi", "library": "libmpi.so.40", "path": libmpi}
        assert ["ldd", file] in debian_machine


def test_parse_ldd():
    assert doctor.parse_ldd(LDD_MPI4PY, "libmpi.so.40") == "/lib/x86_64-linux-gnu/libmpi.so.40"
    assert doctor.parse_ldd(LDD_MPI4PY, "libmpich.so.12") is None
    assert doctor.parse_ldd("\tlibmpi.so.40 => not found\n", "libmpi.so.40") is None


MPICH_ON_PATH = {
    "flavour": "mpich", "name": "MPICH (Hydra)", "version": "4.0.2", "path": "/opt/mpich/bin/mpiexec",
    "realpath": "/opt/mpich/bin/mpiexec",
}  # fmt: skip
BUILT_OPEN_MPI = {
    "file": "/venv/horovod/torch/mpi_lib_v2.so", "flavour": "openmpi", "library": "libmpi.so.40",
    "path": "/usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4",
}  # fmt: skip


def test_a_part_built_for_another_mpi_than_the_launchers_is_a_problem_with_its_fix():
    mpi4py = {**BUILT_OPEN_MPI, "file": "/venv/mpi4py/MPI.so", "flavour": "mpich", "library": "libmpich.so.12"}
    parts = {"launcher": MPICH_ON_PATH, "horovod": BUILT_OPEN_MPI, "mpi4py": mpi4py}
    report = make_report(mpi=doctor.Status("ok", "MPICH (Hydra) 4.0.2"), mpi_parts=parts)
    problems, _ = doctor.assess(report)
    assert problems == [
        {
            "what": "Horovod was built against Open MPI (libmpi.so.40 => /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4) "
            "but mpiexec on PATH is MPICH (Hydra) 4.0.2 (/opt/mpich/bin/mpiexec)",
            "fix": "load the MPI module Horovod was built with (Open MPI), or build this venv against MPICH: with it "
            "loaded, run scripts/setup.sh (docs/install.md)",
        }
    ]  # mpi4py was built against MPICH: nothing to say of it
    rows = dict(line.split(None, 1) for line in doctor.to_table(report).splitlines() if line and ":" not in line[:9])
    assert rows["MPI"] == "MPICH (Hydra) 4.0.2 (/opt/mpich/bin/mpiexec)"
    assert rows["mpi4py"] == "4.0.1, MPICH (libmpich.so.12 => /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4)"
    table = doctor.to_table(report)
    assert "  MPI          Open MPI (libmpi.so.40 => /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4)" in table
    assert f"PROBLEM: {problems[0]['what']} -> fix: {problems[0]['fix']}" in table
    assert table.splitlines()[-1] == "NOT READY: 1 problem(s) above"
    assert json.loads(doctor.to_json(report))["mpi_parts"] == parts
    same = {**parts, "launcher": {**MPICH_ON_PATH, "flavour": "openmpi", "name": "Open MPI", "version": "4.1.4"}}
    assert [p["what"].split()[0] for p in doctor.assess(make_report(mpi_parts=same))[0]] == ["mpi4py"]
    unknown = {**parts, "launcher": None}  # no launcher to compare with: the MPI row says why
    assert doctor.assess(make_report(mpi_parts=unknown))[0] == []


def test_collect_does_not_run_sbatch_for_a_named_absent_config(debian_machine, monkeypatch):
    """SLURM_CONF naming a missing file makes sbatch retry for 60 s: the doctor must not wait for that."""
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/hvdtrain-test/slurm.conf")
    report = doctor.collect()
    assert report["slurm_status"]["state"] == "unconfigured"
    assert not [argv for argv in debian_machine if argv[0].endswith("sbatch")]


def test_cli_json_and_exit_status(debian_machine):
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["mpi"] == "Open MPI 4.1.4" and report["mpi_status"]["state"] == "ok"
    assert report["slurm_status"]["state"] == "unconfigured" and report["problems"] == []
    table = CliRunner().invoke(cli, ["doctor"])
    assert table.exit_code == 0 and "OK: ready for local distributed training" in table.output
