"""`hvdtrain report` on real runs: a 2-rank job with Horovod's autotuner, stopped and resumed; the report's
numbers are the run's own (result.json, metrics.jsonl), the resume is counted and the autotuner's choice is its
log's best row."""

import csv
import json


def test_report_of_an_autotuned_run_resumed_once(hvdtrain, tmp_path):
    run = tmp_path / "run"
    # Horovod scores a sample every 5 x STEPS_PER_SAMPLE cycles of each tensor; no warm-up: the log fills in a
    # short run.
    common = ["train", "-np", 2, "--model", "mlp", "--autotune", "--env", "HOROVOD_AUTOTUNE_WARMUP_SAMPLES=0",
              "--env", "HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE=2", "--run-dir", run]  # fmt: skip
    for extra in (["--epochs", 3], ["--epochs", 6, "--resume"]):
        proc = hvdtrain(*common, *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    proc = hvdtrain("report", run, "--targets", "0.5,0.9", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    (s,) = out["runs"]
    result = json.loads((run / "result.json").read_text())
    assert s["steps"] == result["steps"] and s["final_accuracy"] == result["test_accuracy"] and s["finished"]
    assert (s["starts"], s["resumes"], s["preemptions"], s["requeues"], s["resizes"]) == (2, 1, 0, 0, 0)
    reached = s["to_accuracy"]["0.5"]
    assert reached is not None and 0 < reached["step"] <= s["steps"] and 0 < reached["seconds"] <= s["wall_seconds"]
    with open(run / "autotune.csv") as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))
    assert rows and s["autotune"]["best"]["score"] == max(float(r["score"]) for r in rows)
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG" and out["plot"] == str(run / "report.png")

    text = hvdtrain("report", run).stdout
    assert "run: autotune" in text and f"curves: {run}/report.png" in text
