"""`hvdtrain doctor`: what this machine has for distributed training, and what is missing with its fix.

Probes run in subprocesses or by reading metadata, so a broken torch or Horovod install is reported, not
raised. `collect` gathers facts; the pure functions below turn command output into versions and states, and
`assess` turns the facts into `problems` (not ready: each with a fix) and `notes` (fine for local runs, e.g.
no Slurm). The table and the exit status both come from `assess`, so they cannot disagree. Which MPI each part
uses (`mpi_parts`): the launcher on PATH by its --version, Horovod's and mpi4py's by the libmpi their libraries
need (hvdtrain.mpi, as the launching side reads them), with where ldd finds that library; a part built against
another MPI than the launcher's is a problem.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hvdtrain import mpi

SETUP_FIX = "run scripts/setup.sh (it builds Horovod 0.28.1 with PyTorch, MPI and Gloo)"
PATCH_FIX = "run scripts/setup.sh without --stock-horovod (it rebuilds Horovod 0.28.1 with hvdtrain's patch)"
MPI_FIX = "apt-get install openmpi-bin libopenmpi-dev (or load your cluster's MPI module)"
# Where Debian's Slurm clients look for their config when SLURM_CONF is unset.
DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"

# Prints the versions and Horovod's build flags as JSON; run in a child so an import crash is contained.
_PROBE = r"""
import json, sys
out = {}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_available"] = torch.cuda.is_available()
    out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import horovod, horovod.torch as hvd
    out["horovod"] = horovod.__version__
    out["horovod_build"] = {
        "frameworks": {"PyTorch": True},
        "controllers": {"MPI": hvd.mpi_built(), "Gloo": hvd.gloo_built()},
        "tensor_operations": {"NCCL": hvd.nccl_built() != 0, "DDL": hvd.ddl_built(), "CCL": hvd.ccl_built(),
                              "MPI": hvd.mpi_built(), "Gloo": hvd.gloo_built()},
    }
    # hvdtrain's patch (scripts/patches): its library exports AnyBlockingWait (wake on wait), and its
    # DistributedOptimizer takes flat_groups. A Horovod laid out otherwise is stock.
    import inspect
    try:
        import ctypes, horovod.torch.mpi_lib_v2 as lib
        wake = hasattr(ctypes.CDLL(lib.__file__), "_ZN7horovod6common15AnyBlockingWaitEv")
    except Exception:
        wake = False
    out["horovod_build"]["wake_on_wait"] = wake
    out["horovod_build"]["flat_groups"] = "flat_groups" in inspect.signature(hvd.DistributedOptimizer).parameters
    out["horovod_build"]["patched"] = wake
except Exception as e:
    out["horovod_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
try:
    import mpi4py
    out["mpi4py"] = mpi4py.__version__
except Exception as e:
    out["mpi4py_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Ran:
    """What one probe command did."""

    rc: int | None  # exit status; None when it could not start or ran past its timeout
    out: str  # stdout
    err: str = ""  # stderr, or why it did not run


@dataclass(frozen=True)
class Status:
    """One tool's state: ok, missing, unreadable (installed, version not readable), unconfigured, unreachable."""

    state: str
    version: str | None = None
    detail: str = ""  # what the probe saw, shown in the table


# `slurm-wlm 22.05.8` (Debian's packages) or `slurm 22.05.8` (upstream builds)
_SLURM = re.compile(r"^slurm(?:-wlm)? (\d+\.\d+\S*)\s*$", re.M)


def parse_mpi_version(text: str) -> str | None:
    """`mpirun --version` output -> "Open MPI 4.1.4", "MPICH (Hydra) 4.0.2", "Intel MPI 2021.10"; else None
    (mpi.parse_version, whose flavour the launching side goes by)."""
    found = mpi.parse_version(text)
    return f"{found[1]} {found[2]}" if found else None


def parse_slurm_version(text: str) -> str | None:
    """`sbatch --version` output -> "22.05.8"; None for anything else (its errors when it has no config)."""
    m = _SLURM.search(text)
    return m.group(1) if m else None


def _said(ran: Ran) -> str:
    """The line that says why a command failed: its `fatal:` line, else its last line of output."""
    lines = [line.strip() for line in (ran.err + "\n" + ran.out).splitlines() if line.strip()]
    fatal = [line for line in lines if "fatal:" in line]
    said = (fatal or lines or [""])[-1]
    if ran.rc is None:
        return said or "did not run"
    return f"{said} (exit {ran.rc})" if said else f"exit {ran.rc}"


def mpi_status(mpirun: str | None, version: Ran | None) -> Status:
    """State of MPI from the launcher's path (mpirun, else mpiexec; None: neither on PATH) and what its `--version`
    did."""
    if not mpirun:
        return Status("missing", detail="mpirun is not on PATH")
    name = os.path.basename(mpirun)
    if version is None or version.rc != 0:
        said = _said(version) if version else "not run"
        return Status("unreadable", detail=f"`{name} --version` failed ({said})")
    found = parse_mpi_version(version.out + "\n" + version.err)
    if found is None:
        first = next((line.strip() for line in version.out.splitlines() if line.strip()), "no output")
        return Status("unreadable", detail=f"`{name} --version` printed no known version: {first!r}")
    return Status("ok", found)


def slurm_status(sbatch: str | None, conf: str, conf_found: bool, version: Ran | None, ping: Ran | None) -> Status:
    """State of Slurm from `sbatch`'s path, the config file looked for, and what the probes did.

    `version` is `sbatch --version` (None: not run, as there is no config to run it with); `ping` is
    `scontrol ping` (None: not run).
    """
    if not sbatch:
        return Status("missing", detail="sbatch is not on PATH")
    if version is None:
        return Status("unconfigured", detail=f"no slurm.conf at {conf}")
    if version.rc != 0:
        said = _said(version)
        if not conf_found:
            return Status("unconfigured", detail=f"no slurm.conf at {conf}; `sbatch --version`: {said}")
        if "config" in said.lower():
            return Status("unconfigured", detail=f"{conf} is not usable; `sbatch --version`: {said}")
        return Status("unreadable", detail=f"`sbatch --version`: {said}")
    found = parse_slurm_version(version.out)
    if found is None:
        first = next((line.strip() for line in version.out.splitlines() if line.strip()), "no output")
        return Status("unreadable", detail=f"`sbatch --version` printed no known version: {first!r}")
    if ping is None:
        return Status("ok", found, "slurmctld not checked (no scontrol)")
    answer = next((line.strip() for line in (ping.out + "\n" + ping.err).splitlines() if line.strip()), "")
    if ping.rc != 0:
        return Status("unreachable", found, f"`scontrol ping`: {answer or _said(ping)}")
    return Status("ok", found, answer)


def _run(argv: list[str], timeout: float = 15) -> Ran:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        return Ran(None, "", f"{type(e).__name__}: {e}")
    except subprocess.TimeoutExpired:
        return Ran(None, "", f"no answer within {timeout:g} s")
    return Ran(p.returncode, p.stdout, p.stderr)


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _probe_python() -> dict:
    ran = _run([sys.executable, "-c", _PROBE], timeout=120)
    try:
        return json.loads(ran.out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        why = f"probe failed: {_said(ran)}"
        return {"torch_error": why, "horovod_error": why, "mpi4py_error": why}


def _probe_slurm(tools: dict) -> Status:
    explicit = os.environ.get("SLURM_CONF")
    conf = explicit or DEFAULT_SLURM_CONF
    conf_found = Path(conf).is_file()
    version = ping = None
    # SLURM_CONF naming a missing file makes every Slurm client retry it for 60 s. Without SLURM_CONF and
    # without the default file they try configless Slurm (DNS SRV records), which fails fast.
    if tools["sbatch"] and (conf_found or not explicit):
        version = _run([tools["sbatch"], "--version"])
        if version.rc == 0 and tools["scontrol"]:
            ping = _run([tools["scontrol"], "ping"])
    return slurm_status(tools["sbatch"], conf, conf_found, version, ping)


def collect() -> dict:
    """Gather the report: versions, Horovod build, tools on PATH, hardware, and problems and notes."""
    py = _probe_python()
    tools = {t: shutil.which(t) for t in ("horovodrun", "mpirun", "mpiexec", "srun", "sbatch", "squeue", "scontrol")}
    venv_hvdrun = Path(sys.executable).parent / "horovodrun"
    if venv_hvdrun.exists():
        tools["horovodrun"] = str(venv_hvdrun)
    launcher = tools["mpirun"] or tools["mpiexec"]  # as the launching side looks for it (mpi.launcher_path)
    version = _run([launcher, "--version"]) if launcher else None
    mpi_found = mpi_status(launcher, version)
    slurm = _probe_slurm(tools)
    report = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": py.get("torch"),
        "horovod": py.get("horovod"),
        "horovod_build": py.get("horovod_build"),
        "mpi4py": py.get("mpi4py"),
        "errors": {k.removesuffix("_error"): v for k, v in py.items() if k.endswith("_error")},
        "mpi": mpi_found.version,
        "mpi_status": asdict(mpi_found),
        "mpi_parts": {"launcher": launcher_part(launcher, version), **{p: _built_part(p) for p in mpi.PACKAGE_NAMES}},
        "slurm": slurm.version,
        "slurm_status": asdict(slurm),
        "tools": tools,
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": py.get("gpus", []),
    }
    report["problems"], report["notes"] = assess(report)
    return report


def launcher_part(path: str | None, version: Ran | None) -> dict | None:
    """The MPI launcher on PATH as the launching side sees it (mpi.Launcher's fields), from what `--version`
    printed; None when there is none, or it is no MPI hvdtrain knows (the MPI row says why)."""
    found = mpi.parse_version(version.out + "\n" + version.err) if path and version and version.rc == 0 else None
    if found is None:
        return None
    return asdict(mpi.Launcher(*found, path, os.path.realpath(path)))


def parse_ldd(text: str, soname: str) -> str | None:
    """Where `ldd` says `soname` is found (`libmpi.so.40 => /lib/x86_64-linux-gnu/libmpi.so.40 (0x...)`); None when
    it is not listed or not found."""
    m = re.search(rf"^\s*{re.escape(soname)} => (/\S+)", text, re.M)
    return m.group(1) if m else None


def _built_part(package: str) -> dict | None:
    """Which MPI this interpreter's `package` was built against (mpi.Linked's fields), with where that library is
    found here; None when the package is not installed."""
    built = mpi.built_with(package)
    if built is None:
        return None
    ran = _run(["ldd", built.file]) if built.library else None
    path = parse_ldd(ran.out, built.library) if ran and ran.rc == 0 else None
    return asdict(replace(built, path=os.path.realpath(path) if path else None))


def _mpi_problems(parts: dict) -> list[dict]:
    """A part built against another MPI than the launcher's on PATH (mpi.mismatch's words)."""
    if not parts.get("launcher"):
        return []
    launcher = mpi.Launcher(**parts["launcher"])
    found = [mpi.mismatch(p, mpi.Linked(**parts[p]), launcher) for p in mpi.PACKAGE_NAMES if parts.get(p)]
    return [{"what": what, "fix": fix} for what, fix in filter(None, found)]


def assess(report: dict) -> tuple[list[dict], list[dict]]:
    """(problems, notes) from the report's facts, each {"what", "fix"}: a problem means not ready at all;
    a note is something only some uses need (Slurm), fine for local runs."""
    problems: list[dict] = []
    notes: list[dict] = []
    errors = report.get("errors", {})
    for key, name in (("torch", "torch"), ("horovod", "horovod.torch")):
        if not report[key]:
            problems.append({"what": f"{name} does not import ({errors.get(key, 'not installed')})", "fix": SETUP_FIX})
    build = report["horovod_build"] or {}
    for controller, built in build.get("controllers", {}).items():
        if not built:
            problems.append({"what": f"Horovod was built without the {controller} controller", "fix": SETUP_FIX})
    notes += _build_notes(build)
    if not report["mpi4py"]:
        problems.append(
            {
                "what": f"mpi4py does not import ({errors.get('mpi4py', 'not installed')})",
                "fix": "pip install --no-binary mpi4py mpi4py",
            }
        )
    mpi = report["mpi_status"]
    if mpi["state"] == "missing":
        problems.append({"what": "mpirun is not on PATH", "fix": MPI_FIX})
    elif mpi["state"] != "ok":
        problems.append(
            {
                "what": f"MPI is installed but unusable: {mpi['detail']}",
                "fix": f"check `{report['tools'].get('mpirun') or 'mpirun'} --version` runs; {MPI_FIX}",
            }
        )
    problems += _mpi_problems(report.get("mpi_parts") or {})
    if not report["tools"].get("horovodrun"):
        problems.append({"what": "horovodrun is not on PATH", "fix": SETUP_FIX})
    notes += _slurm_notes(report["slurm_status"])
    return problems, notes


def _build_notes(build: dict) -> list[dict]:
    """What to say of a Horovod without hvdtrain's patch, or with an older one."""
    notes: list[dict] = []
    patched = horovod_patched(build)
    if patched is False:
        notes.append(
            {
                "what": "Horovod is stock (without hvdtrain's patch): everything works, slower on CPU ranks (a "
                "blocking collective waits out the 1 ms cycle, an idle rank spins in MPI, gradient groups go through "
                "the fusion buffer)",
                "fix": f"for the patched build (docs/horovod-patch.md), {PATCH_FIX}",
            }
        )
    elif patched and build.get("flat_groups") is False:
        notes.append(
            {
                "what": "Horovod has an older hvdtrain patch, without flat groups (gradient groups go through the "
                "fusion buffer)",
                "fix": PATCH_FIX,
            }
        )
    return notes


def _slurm_notes(slurm: dict) -> list[dict]:
    """What to say when Slurm is missing, unconfigured or unreachable: only submit, status and logs need it."""
    notes: list[dict] = []
    if slurm["state"] == "missing":
        notes.append(
            {
                "what": "Slurm is not installed: only `hvdtrain submit`, `status` and `logs` need it",
                "fix": "use a cluster's login node, or scripts/setup.sh --slurm for a local one",
            }
        )
    elif slurm["state"] == "unconfigured":
        notes.append(
            {
                "what": "Slurm is installed but not configured (see the Slurm row)",
                "fix": "export SLURM_CONF=<your cluster's slurm.conf>, or start a one-node Slurm here: "
                "scripts/slurm-local.sh start",
            }
        )
    elif slurm["state"] == "unreachable":
        notes.append(
            {
                "what": "Slurm is configured but slurmctld does not answer (see the Slurm row)",
                "fix": "start it (scripts/slurm-local.sh start for the local one), or check SlurmctldHost in "
                "slurm.conf and that munged runs",
            }
        )
    elif slurm["state"] != "ok":
        notes.append({"what": "Slurm's version is unreadable (see the Slurm row)", "fix": "check `sbatch --version`"})
    return notes


def horovod_patched(build: dict) -> bool | None:
    """Whether the Horovod in `horovod_build` has hvdtrain's patch; None when there is no Horovod to tell. Reports
    from before the `patched` field say it as `wake_on_wait`."""
    return build.get("patched", build.get("wake_on_wait"))


def _build_cell(build: dict) -> str:
    patched = horovod_patched(build)
    if patched is None:
        return "-"
    if not patched:
        return "stock Horovod (without hvdtrain's patch: see NOTE)"
    if build.get("flat_groups") is False:
        return "hvdtrain's patch, an older one (no flat groups)"
    return "hvdtrain's patch (wake on wait, idle cycles, flat groups: docs/horovod-patch.md)"


def verdict(problems: list[dict], slurm_state: str) -> str:
    """The table's last line: never "ready" with a problem, never "Slurm" unless Slurm answers."""
    if problems:
        return f"NOT READY: {len(problems)} problem(s) above"
    if slurm_state == "ok":
        return "OK: ready for distributed training, local and through Slurm"
    return "OK: ready for local distributed training (hvdtrain run / train); Slurm is not usable here (see NOTE)"


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True)


def _flags(d: dict) -> str:
    return " ".join(f"[{'X' if v else ' '}] {k}" for k, v in d.items())


def _mpi_cell(status: dict, launcher: dict | None) -> str:
    """The MPI launcher on PATH: its version and where it is (which file, behind the links)."""
    if status["state"] == "ok":
        return mpi.Launcher(**launcher).describe() if launcher else status["version"]
    if status["state"] == "missing":
        return f"MISSING ({status['detail']})"
    return f"installed, version UNREADABLE ({status['detail']})"


def _built_cell(part: dict | None) -> str:
    """The MPI a part was built against: `Open MPI (libmpi.so.40 => /usr/lib/...)`; "-" when not installed."""
    return mpi.Linked(**part).describe() if part else "-"


def _slurm_cell(slurm: dict) -> str:
    state, version, detail = slurm["state"], slurm["version"], slurm["detail"]
    return {
        "ok": f"{version} ({detail})" if detail else str(version),
        "missing": "not installed (needed only for submit / status / logs)",
        "unconfigured": f"installed, NOT CONFIGURED ({detail})",
        "unreachable": f"{version}, slurmctld UNREACHABLE ({detail})",
    }.get(state, f"installed, version UNREADABLE ({detail})")


def to_table(report: dict) -> str:
    """The report as aligned rows, then PROBLEM and NOTE lines with fixes, then one verdict line."""
    problems, notes = assess(report)
    build = report["horovod_build"] or {}
    parts = report.get("mpi_parts") or {}
    rows = [
        ("Python", f"{report['python']} ({report['executable']})"),
        ("torch", report["torch"] or "MISSING"),
        ("Horovod", report["horovod"] or "MISSING"),
        ("  frameworks", _flags(build.get("frameworks", {})) or "-"),
        ("  controllers", _flags(build.get("controllers", {})) or "-"),
        ("  tensor ops", _flags(build.get("tensor_operations", {})) or "-"),
        ("  build", _build_cell(build)),
        ("  MPI", _built_cell(parts.get("horovod"))),
        ("mpi4py", f"{report['mpi4py']}, {_built_cell(parts.get('mpi4py'))}" if report["mpi4py"] else "MISSING"),
        ("MPI", _mpi_cell(report["mpi_status"], parts.get("launcher"))),
        ("Slurm", _slurm_cell(report["slurm_status"])),
    ]
    rows += [(f"  {tool}", path or "-") for tool, path in report["tools"].items()]
    rows += [
        ("cores", str(report["cores"])),
        ("memory", f"{report['memory_gib']} GiB"),
        ("GPUs", ", ".join(report["gpus"]) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("")
    lines += [f"PROBLEM: {p['what']} -> fix: {p['fix']}" for p in problems]
    lines += [f"NOTE: {n['what']} -> {n['fix']}" for n in notes]
    lines.append(verdict(problems, report["slurm_status"]["state"]))
    return "\n".join(lines)
