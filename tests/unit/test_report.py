"""hvdtrain.report: a run directory's records into a table (time to accuracy, resumes, resizes, preemptions,
requeues, the autotuner's choice) and curves; `hvdtrain report` on bad input."""

import json

import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain import report
from hvdtrain.cli import cli

T = 1_800_000_000.0
RECORDS = [
    {"time": T, "event": "start", "step": 0, "epoch": 0, "ranks": 2, "resumed_from": None, "restart": 0},
    {"time": T + 1, "step": 10, "epoch": 0, "train_loss": 2.0, "lr": 0.1, "samples_per_s": 1000.0},
    {"time": T + 2, "step": 20, "epoch": 1, "test_accuracy": 0.85, "test_loss": 0.5},
    {"time": T + 3, "event": "resize", "step": 25, "old_size": 2, "new_size": 3},
    {"time": T + 4, "step": 30, "epoch": 1, "train_loss": 1.0, "lr": 0.15, "samples_per_s": 3000.0},
    {"time": T + 5, "step": 40, "epoch": 2, "test_accuracy": 0.92, "test_loss": 0.3},
    {"time": T + 6, "event": "preempted", "step": 45, "epoch": 2},
    {"time": T + 100, "event": "start", "step": 45, "epoch": 2, "ranks": 3, "resumed_from": "c/step-45.pt",
     "restart": 1},
    {"time": T + 101, "step": 50, "epoch": 2, "train_loss": 0.5, "lr": 0.15, "samples_per_s": 2000.0},
    {"time": T + 102, "step": 60, "epoch": 3, "test_accuracy": 0.96, "test_loss": 0.1},
]  # fmt: skip
AUTOTUNE = """hierarchical_allreduce,hierarchical_allgather,torus_allreduce,cache_enabled,cycle_time_ms,tensor_fusion_threshold,score
0,0,0, 0,5,4,2.5
0,0,0, 1,25,16,3.5
0,1,0, 1,10,8,1.0
0,0,0, 1,25,16,3.5
"""


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run-a"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + '{"time": 18000')  # cut short
    (d / "result.json").write_text(json.dumps({"preempted": False, "test_accuracy": 0.96}))
    (d / "autotune.csv").write_text(AUTOTUNE)
    return d


def test_the_summary_counts_what_happened(run_dir):
    run = report.load(run_dir)
    assert len(run.records) == len(RECORDS)  # the cut last line is skipped
    s = report.summarize(run, [0.9, 0.95, 0.99])
    assert s["final_accuracy"] == 0.96 and s["final_train_loss"] == 0.5 and s["steps"] == 60
    assert s["wall_seconds"] == 102 and s["samples_per_s"] == 2000.0  # the median window
    assert s["to_accuracy"] == {"0.9": {"step": 40, "seconds": 5.0}, "0.95": {"step": 60, "seconds": 102.0},
                                "0.99": None}  # fmt: skip
    assert (s["starts"], s["resumes"], s["resizes"], s["preemptions"], s["requeues"]) == (2, 1, 1, 1, 1)
    assert s["finished"] is True
    assert s["autotune"] == {
        "samples": 3, "finished": True,
        "best": {"hierarchical_allreduce": 0, "hierarchical_allgather": 0, "torus_allreduce": 0, "cache_enabled": 1,
                 "cycle_time_ms": 25, "tensor_fusion_threshold": 16, "score": 3.5},
    }  # fmt: skip
    text = report.format_table([s], [0.9, 0.95, 0.99])
    assert "5.0 s / 40" in text and "102.0 s / 60" in text
    assert "autotune chose cycle time 25 ms, fusion threshold 16 MiB, response cache on" in text


def test_autotune_still_tuning_and_without_a_log(tmp_path):
    log = tmp_path / "autotune.csv"
    log.write_text(AUTOTUNE.rsplit("0,0,0, 1,25,16,3.5\n", 1)[0])  # the best row not repeated: not finished
    assert report.autotune(log)["finished"] is False and report.autotune(log)["samples"] == 3
    assert report.autotune(tmp_path / "missing.csv") is None


def test_the_cli_writes_one_png_for_several_runs(run_dir, tmp_path, monkeypatch):
    other = tmp_path / "run-b"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps(RECORDS[1]) + "\n")  # a run from before start records
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["report", str(run_dir), str(other), "--json"])
    assert result.exit_code == 0, result.output
    # What it skipped, one line each on stderr: run-a's cut last line, run-b's missing result.json.
    assert result.stderr.splitlines() == [
        f"hvdtrain: warning: {run_dir}/metrics.jsonl: skipped a truncated last line (a killed job)",
        f"hvdtrain: warning: {other}: no result.json (the run did not finish: killed, or still running); reported "
        "from metrics.jsonl alone",
    ]  # fmt: skip
    out = json.loads(result.stdout)
    assert out["plot"] == "report.png" and (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["final_accuracy"] for r in out["runs"]] == [0.96, None]
    assert out["runs"][1]["wall_seconds"] == 0 and out["runs"][1]["finished"] is False


@pytest.mark.parametrize(
    "make,args,needle",
    [
        (lambda p: None, ["missing"], "missing is not a directory: give run directories"),
        (lambda p: (p / "empty").mkdir(), ["empty"], "empty has no metrics.jsonl"),
        (lambda p: (p / "e").mkdir() or (p / "e" / "metrics.jsonl").write_text(""), ["e"], "holds no complete record"),
        # A job killed within its first record (the cut line is not said: the error is the only line).
        (
            lambda p: (p / "k").mkdir() or (p / "k" / "metrics.jsonl").write_text('{"time": 1.5, "ev'),
            ["k"],
            "k/metrics.jsonl holds no complete record: the run was killed (or is still starting) before it logged",
        ),
        (
            lambda p: (p / "n").mkdir() or (p / "n" / "metrics.jsonl").write_text('[1]\n"x"\n'),
            ["n"],
            "n/metrics.jsonl holds no complete record",
        ),
        (lambda p: None, [".", "--targets", "1.5"], "--targets '1.5': every value must be between 0 and 1"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, make, args, needle):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    assert_usage_error(CliRunner().invoke(cli, ["report", *args]), needle)
    assert not list(tmp_path.rglob("report.png"))


def test_what_a_killed_job_leaves_is_skipped_and_said(tmp_path):
    """A job killed mid-write: metrics.jsonl's last line cut, a line of something else, no result.json but the
    temporary file of its write, the autotuner's last row cut short. Each is skipped and said in one line; the
    report is the records that are whole."""
    d = tmp_path / "killed"
    d.mkdir()
    whole = "".join(json.dumps(r) + "\n" for r in RECORDS[:5])
    (d / "metrics.jsonl").write_text(whole + "not json\n" + json.dumps(RECORDS[5]) + "\n" + json.dumps(RECORDS[6])[:9])
    (d / ".result.json.tmp").write_text('{"steps": ')
    (d / "autotune.csv").write_text(AUTOTUNE.splitlines()[0] + "\n0,0,0, 0,5,4,2.5\n0,0,0, 1,2")
    said = []
    run = report.load(d, warn=said.append)
    assert run.records == RECORDS[:6] and run.result is None
    assert said == [
        f"{d}/metrics.jsonl: skipped a truncated last line (a killed job)",
        f"{d}/metrics.jsonl: skipped 1 line(s) that are not metrics records (line 6)",
        f"{d}/.result.json.tmp: skipped (the unfinished write of a killed job)",
        f"{d}: no result.json (the run did not finish: killed, or still running); reported from metrics.jsonl alone",
        f"{d}/autotune.csv: skipped 1 row(s) cut short (a killed job)",
    ]
    s = report.summarize(run, [0.9])
    assert (s["steps"], s["final_accuracy"], s["finished"], s["autotune"]["samples"]) == (40, 0.92, False, 1)


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]))  # killed before "\n"
    (d / "result.json").write_text("[1, 2]")  # not what hvdtrain writes
    said = []
    run = report.load(d, warn=said.append)
    assert run.records == RECORDS[:2] and run.result is None
    assert said == [f"{d}/result.json: skipped, it is not a JSON object"]
