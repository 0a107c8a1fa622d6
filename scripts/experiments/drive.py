"""Driver of steps.py: ROUNDS rounds of one `mpirun -np 2` launch of scripts/experiments/steps.py per variant
(mpirun options: yield, bind, cycle time), the order alternating; prints each launch's rank-0 samples/s and its ratios
to the mpi4py loop, then the median ratio per variant (docs/performance-methods.md, "Knobs tried").

    python scripts/experiments/drive.py ROUNDS [VARIANTS]     # e.g. 3 yield,yield-bind; default: every variant
    ARMS=mpi4py,horovod,horovod_g1 STEPS=250 (environment)    # passed on to steps.py
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)

import json, os, subprocess, sys, statistics
# This interpreter (the venv's) for the ranks, steps.py beside this file.
py = sys.executable; steps_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "steps.py")
env = {**os.environ, "PATH": f"{os.path.dirname(py)}:" + os.environ["PATH"], "OMPI_ALLOW_RUN_AS_ROOT": "1",
       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1", "STEPS": os.environ.get("STEPS", "250")}
variants = {
    "base": [],
    "yield": ["--mca", "mpi_yield_when_idle", "1"],
    "yield-cyc2": ["--mca", "mpi_yield_when_idle", "1", "-x", "HOROVOD_CYCLE_TIME=2"],
    "yield-bind": ["--mca", "mpi_yield_when_idle", "1", "--bind-to", "core", "--map-by", "core"],
    "bind": ["--bind-to", "core", "--map-by", "core"],
    "yield-cyc0.2": ["--mca", "mpi_yield_when_idle", "1", "-x", "HOROVOD_CYCLE_TIME=0.2"],
}
chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else list(variants)
arms = os.environ.get("ARMS", "mpi4py,horovod,horovod_g1")
res = {v: [] for v in chosen}
for r in range(int(sys.argv[1])):
    for v in (chosen if r % 2 == 0 else chosen[::-1]):
        out = subprocess.run(["mpirun", "-np", "2", "--bind-to", "none", "--map-by", "slot", *variants[v], py, steps_py, arms],
                             env=env, capture_output=True, text=True).stdout
        import re; d = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", out)]
        d0 = next(x for x in d if x["rank"] == 0)
        ratios = {k: round(d0[k] / d0["mpi4py"], 2) for k in d0 if k not in ("rank", "mpi4py")}
        res[v].append(ratios)
        print(v, d0, ratios, flush=True)
for v, rs in res.items():
    print("MEDIAN", v, {k: statistics.median(x[k] for x in rs) for k in rs[0]})
