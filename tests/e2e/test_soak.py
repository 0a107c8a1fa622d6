"""Soak: 30 short 2-rank Horovod jobs back to back through `hvdtrain run`, alternating the Gloo and MPI
controllers. Every job succeeds, leaves no process and no temporary file behind, and the per-launch overhead
(the launch's wall time less the job's own time, from its first line of Python to its last) is reported."""

import json
import os
import statistics
import subprocess
import time

import psutil
from conftest import HVDTRAIN

JOBS = 30
JOB = """\
import time
started = time.time()
import json, sys
import torch
import horovod.torch as hvd
hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()
assert total == hvd.size() * (hvd.size() + 1) / 2, total
print("SOAK " + json.dumps({"rank": hvd.rank(), "started": started, "ended": time.time()}), flush=True)
"""


def test_thirty_jobs_back_to_back_leave_nothing_behind(child_env, tmp_path, capsys):
    script = tmp_path / "soak_job.py"
    script.write_text(JOB)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**child_env, "TMPDIR": str(tmp)}
    overheads = {"gloo": [], "mpi": []}
    for i in range(JOBS):
        controller = "gloo" if i % 2 == 0 else "mpi"
        begun = time.time()
        proc = subprocess.run(
            [*HVDTRAIN, "run", "-np", "2", f"--{controller}", "--", "python", str(script)], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        finished = time.time()
        assert proc.returncode == 0, f"job {i} ({controller}): {proc.stdout[-2000:]}{proc.stderr}"
        records = [json.loads(line.split("SOAK ", 1)[1]) for line in proc.stdout.splitlines() if "SOAK " in line]
        assert sorted(r["rank"] for r in records) == [0, 1], proc.stdout[-2000:]
        own = max(r["ended"] for r in records) - min(r["started"] for r in records)
        overheads[controller].append(finished - begun - own)
        left = [p for p in psutil.process_iter(["cmdline"]) if str(script) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"job {i} ({controller}) left {[(p.pid, p.info['cmdline'][:3]) for p in left]}"
        assert sorted(os.listdir(tmp)) == [], f"job {i} ({controller}) left {os.listdir(tmp)} in TMPDIR"
    with capsys.disabled():
        for controller, values in overheads.items():
            q = statistics.quantiles(values, n=4)
            print(
                f"\nsoak: {len(values)} {controller} launches: overhead (wall - job) median {statistics.median(values):.2f} s, "
                f"quartiles {q[0]:.2f}-{q[2]:.2f} s, max {max(values):.2f} s"
            )
