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


def window(step, compute, wait=None, t=0.0):
    """A training window's record with per-rank seconds per step (compute in ms, as a list; wait 1 ms each)."""
    wait = wait if wait is not None else [1.0] * len(compute)
    return {"time": T + t + step, "step": step, "epoch": 0, "train_loss": 1.0, "lr": 0.1, "samples_per_s": 100.0,
            "rank_compute_s": [c / 1e3 for c in compute], "rank_wait_s": [w / 1e3 for w in wait]}  # fmt: skip


def run_of(tmp_path, records, hosts=None):
    d = tmp_path / "run"
    (d / "logs").mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for rank, host in (hosts or {}).items():
        (d / "logs" / f"rank.{rank}.host").write_text(host + "\n")
    return report.load(d)


def test_a_rank_slower_in_three_consecutive_windows_is_a_straggler_named_with_its_host(tmp_path):
    records = [
        RECORDS[0],
        window(10, [6.0, 7.0]),  # 1.17x: not slow
        window(20, [6.0, 12.0]),
        {"time": T + 21, "step": 20, "epoch": 1, "test_accuracy": 0.5, "test_loss": 1.0},  # between windows
        {"time": T + 22, "event": "checkpoint", "step": 20, "path": "c"},
        window(30, [7.0, 12.6]),
        window(40, [6.0, 11.4]),
        window(50, [6.2, 6.0]),
    ]
    run = run_of(tmp_path, records, {0: "node1", 1: "node2"})
    (found,) = report.stragglers(run)
    assert (found["rank"], found["host"], found["windows"], found["first_step"], found["last_step"]) == (
        1, "node2", 3, 20, 40,
    )  # fmt: skip
    assert found["compute_s"] == pytest.approx(0.012) and found["others_median_s"] == pytest.approx(19.0 / 3e3)
    assert found["ratio"] == pytest.approx(0.012 / (19.0 / 3e3))
    assert report.straggler_line(found) == (
        "rank 1 (node2) computed 1.9x the others' median step (12 ms vs 6.33 ms) in the 3 windows ending at steps "
        "20 to 40"
    )
    s = report.summarize(run, [0.9])
    assert s["stragglers"] == [found]
    assert s["ranks"] == [
        {"rank": 0, "host": "node1", "windows": 5, "compute_s": pytest.approx(0.006), "wait_s": pytest.approx(0.001)},
        {"rank": 1, "host": "node2", "windows": 5, "compute_s": pytest.approx(0.0114), "wait_s": pytest.approx(0.001)},
    ]
    text = report.format_table([s], [0.9])
    assert "run: straggler: rank 1 (node2) computed 1.9x the others' median step (12 ms vs 6.33 ms)" in text
    table = text[text.index("rank  host") :].splitlines()
    assert table[1].split() == ["0", "node1", "6", "1", "5"] and table[2].split() == ["1", "node2", "11.4", "1", "5"]


@pytest.mark.parametrize(
    "between,flagged",
    [
        (window(30, [6.0, 7.0]), False),  # a window at the others' pace
        ({"time": T + 31, "event": "resize", "step": 30, "old_size": 2, "new_size": 3}, False),  # another world
        ({"time": T + 31, "event": "start", "step": 30, "ranks": 2, "resumed_from": "c"}, False),  # a resume
        ({"time": T + 31, "step": 30, "epoch": 0, "train_loss": 1.0, "lr": 0.1, "samples_per_s": 9.0}, False),  # old
        ({"time": T + 31, "step": 30, "epoch": 0, "test_accuracy": 0.5, "test_loss": 1.0}, True),  # an evaluation
    ],
)
def test_what_ends_a_run_of_slow_windows(tmp_path, between, flagged):
    records = [window(10, [6.0, 12.0]), window(20, [6.0, 12.0]), between, window(40, [6.0, 12.0])]
    assert bool(report.stragglers(run_of(tmp_path, records))) is flagged


def test_the_rule_compares_with_the_others_median_and_ignores_timer_noise(tmp_path):
    three = [window(s, [10.0, 10.4, 13.2]) for s in (10, 20, 30)]  # 1.27x the others' median: not slow
    assert report.stragglers(run_of(tmp_path / "a", three)) == []
    three = [window(s, [10.0, 10.4, 13.6]) for s in (10, 20, 30)]  # 1.31x
    assert [(f["rank"], f["host"]) for f in report.stragglers(run_of(tmp_path / "b", three))] == [(2, None)]
    tiny = [window(s, [0.2, 0.6]) for s in (10, 20, 30)]  # 3x, but 0.4 ms a step
    assert report.stragglers(run_of(tmp_path / "c", tiny)) == []
    alone = [window(s, [5.0]) for s in (10, 20, 30)]
    run = run_of(tmp_path / "d", alone)
    assert report.stragglers(run) == [] and report.rank_times(run)[0]["compute_s"] == pytest.approx(0.005)
    assert "no straggler" not in report.format_table([report.summarize(run, [0.9])], [0.9])  # one rank: no others


def test_a_run_without_per_rank_times_or_with_damaged_ones_reports_the_rest(tmp_path):
    old = run_of(tmp_path / "old", RECORDS)
    s = report.summarize(old, [0.9])
    assert s["ranks"] == [] and s["stragglers"] == []
    assert "each rank's step" not in report.format_table([s], [0.9])
    damaged = [window(10, [6.0, 12.0]), {**window(20, [6.0, 12.0]), "rank_compute_s": ["x", 1]},
               {**window(30, [6.0, 12.0]), "rank_wait_s": None}, window(40, [6.0, 6.5])]  # fmt: skip
    run = run_of(tmp_path / "damaged", damaged)
    assert report.stragglers(run) == []
    assert [(r["windows"], r["wait_s"]) for r in report.rank_times(run)] == [(3, pytest.approx(0.001))] * 2
    text = report.format_table([report.summarize(run, [0.9])], [0.9])
    assert "run: no straggler (no rank computed over 1.3x the others' median step in 3 consecutive windows)" in text
