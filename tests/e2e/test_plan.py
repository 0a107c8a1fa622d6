"""`hvdtrain plan` validated for real on this machine: it measures the default model, probes 2 ranks, and
`--validate` runs the fastest fitting layout of each kind (data, sharded, local SGD, a pipeline); the predicted
step time and memory per rank are within the factors docs/plan.md states of the measured ones, and the
recommendation fits and is synchronous."""

import json

STEP_FACTOR = 2.5  # predicted step time within x / 2.5 .. x * 2.5 of the measured (docs/plan.md)
MEMORY_FACTOR = 1.5  # predicted memory per rank within x / 1.5 .. x * 1.5 of the largest peak RSS


def test_the_plan_holds_against_real_runs(hvdtrain):
    proc = hvdtrain("plan", "-np", 2, "--validate", 60, "--json", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    best = out["recommended"]
    assert best["fits"] and best["exact"] and best["memory_bytes"] <= out["memory_per_rank_bytes"]
    assert out["command"].startswith("hvdtrain train -np 2") and best["samples_per_s"] == max(
        c["samples_per_s"] for c in out["candidates"] if c["fits"] and c["exact"]
    )
    assert {c["layout"] for c in out["candidates"]} == {"data", "sharded", "local-sgd", "pipeline"}
    rows = out["validation"]
    assert {r["layout"].split()[0] for r in rows} == {"data", "sharded", "local-sgd", "pipeline"}
    for r in rows:
        assert 1 / STEP_FACTOR <= r["step_ratio"] <= STEP_FACTOR, r
        assert 1 / MEMORY_FACTOR <= r["memory_ratio"] <= MEMORY_FACTOR, r
