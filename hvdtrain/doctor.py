"""`hvdtrain doctor`: what this machine has for distributed training, and what is missing with its fix.

Probes run in subprocesses or by reading metadata, so a broken torch or Horovod install is reported, not
raised. Each probe returns facts; `problems` lists (what, fix) pairs.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

SETUP_FIX = "run scripts/setup.sh (it builds Horovod 0.28.1 with PyTorch, MPI and Gloo)"

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
except Exception as e:
    out["horovod_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
try:
    import mpi4py
    out["mpi4py"] = mpi4py.__version__
except Exception as e:
    out["mpi4py_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _version_of(argv: list[str], pattern: str) -> str | None:
    try:
        text = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, text)
    return m.group(1) if m else None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def collect() -> dict:
    """Gather the report: versions, Horovod build, tools on PATH, hardware, and problems with fixes."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
        py = json.loads(probe.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        py = {"torch_error": f"probe failed: {e}"}
    tools = {t: shutil.which(t) for t in ("horovodrun", "mpirun", "srun", "sbatch", "squeue", "scontrol")}
    venv_hvdrun = Path(sys.executable).parent / "horovodrun"
    if venv_hvdrun.exists():
        tools["horovodrun"] = str(venv_hvdrun)
    report = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": py.get("torch"),
        "horovod": py.get("horovod"),
        "horovod_build": py.get("horovod_build"),
        "mpi4py": py.get("mpi4py"),
        "mpi": _version_of(["mpirun", "--version"], r"\(Open MPI\)\s+(\S+)|mpirun \(.*\)\s+(\S+)") if tools["mpirun"] else None,
        "slurm": _version_of(["sbatch", "--version"], r"slurm\s+(\S+)") if tools["sbatch"] else None,
        "tools": tools,
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": py.get("gpus", []),
        "problems": [],
    }
    problems = report["problems"]
    if "torch_error" in py:
        problems.append({"what": f"torch does not import ({py['torch_error']})", "fix": SETUP_FIX})
    if "horovod_error" in py:
        problems.append({"what": f"horovod.torch does not import ({py['horovod_error']})", "fix": SETUP_FIX})
    build = report["horovod_build"] or {}
    for controller, built in build.get("controllers", {}).items():
        if not built:
            problems.append({"what": f"Horovod was built without the {controller} controller", "fix": SETUP_FIX})
    if "mpi4py_error" in py:
        problems.append({"what": "mpi4py does not import", "fix": "pip install --no-binary mpi4py mpi4py"})
    if not tools["mpirun"]:
        problems.append({"what": "mpirun is not on PATH", "fix": "apt-get install openmpi-bin libopenmpi-dev"})
    if not tools["horovodrun"]:
        problems.append({"what": "horovodrun is not on PATH", "fix": SETUP_FIX})
    return report


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True)


def _flags(d: dict) -> str:
    return " ".join(f"[{'X' if v else ' '}] {k}" for k, v in d.items())


def to_table(report: dict) -> str:
    build = report["horovod_build"] or {}
    rows = [
        ("Python", f"{report['python']} ({report['executable']})"),
        ("torch", report["torch"] or "MISSING"),
        ("Horovod", report["horovod"] or "MISSING"),
        ("  frameworks", _flags(build.get("frameworks", {})) or "-"),
        ("  controllers", _flags(build.get("controllers", {})) or "-"),
        ("  tensor ops", _flags(build.get("tensor_operations", {})) or "-"),
        ("mpi4py", report["mpi4py"] or "MISSING"),
        ("MPI", report["mpi"] or "MISSING"),
        ("Slurm", report["slurm"] or "not installed (needed only for sbatch/srun)"),
    ]
    rows += [(f"  {tool}", path or "-") for tool, path in report["tools"].items()]
    rows += [
        ("cores", str(report["cores"])),
        ("memory", f"{report['memory_gib']} GiB"),
        ("GPUs", ", ".join(report["gpus"]) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if report["problems"]:
        lines.append("")
        lines += [f"PROBLEM: {p['what']} -> fix: {p['fix']}" for p in report["problems"]]
    else:
        lines += ["", "OK: ready for distributed training"]
    return "\n".join(lines)
