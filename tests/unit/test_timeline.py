"""hvdtrain.timeline: repairing a timeline cut short, spans per phase and tensor, the summary's arithmetic, and
`hvdtrain timeline` on bad input. The golden file is a real 2-rank recording (tests/e2e records new ones)."""

import json
from pathlib import Path

import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain import timeline
from hvdtrain.cli import cli
from hvdtrain.rundir import TIMELINE_STEPS_HEADER, RunDir

GOLDEN = Path(__file__).parent / "golden" / "timeline.json"
T0 = 1_700_000_000_000_000  # the timeline's clock zero, microseconds since the epoch


def trace(*events):
    """A timeline as Horovod writes it: the clock's metadata, tensor names, then events."""
    head = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": T0}},
        {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "allreduce.a"}},
        {"name": "process_name", "ph": "M", "pid": 2, "args": {"name": "allreduce.b"}},
    ]
    return [*head, *events]


def ev(ph, pid, ts, name=None):
    e = {"ph": ph, "ts": ts, "pid": pid}
    if name:
        e["name"] = name
    return e


# Two tensors fused into one allreduce: each negotiates, then ALLREDUCE with its activities; a gap of 1 us in
# tensor a's ALLREDUCE falls in no activity (OTHER).
EVENTS = trace(
    ev("B", 1, 100, "NEGOTIATE_ALLREDUCE"), ev("X", 1, 101, "0"), ev("B", 2, 102, "NEGOTIATE_ALLREDUCE"),
    ev("E", 1, 110), ev("E", 2, 110),
    ev("B", 1, 110, "ALLREDUCE"), ev("B", 2, 110, "ALLREDUCE"),
    ev("B", 1, 111, "MEMCPY_IN_FUSION_BUFFER"), ev("B", 2, 111, "MEMCPY_IN_FUSION_BUFFER"),
    ev("E", 1, 114), ev("E", 2, 114),
    ev("B", 1, 114, "MPI_ALLREDUCE"), ev("B", 2, 114, "MPI_ALLREDUCE"), ev("E", 1, 124), ev("E", 2, 124),
    ev("B", 1, 124, "MEMCPY_OUT_FUSION_BUFFER"), ev("E", 1, 126), ev("E", 1, 126),
    ev("B", 2, 126, "MEMCPY_OUT_FUSION_BUFFER"), ev("E", 2, 128), ev("E", 2, 128),
    # after the step: not counted
    ev("B", 1, 900, "NEGOTIATE_ALLREDUCE"), ev("E", 1, 910),
)  # fmt: skip
STEPS = [(1, T0 + 90, T0 + 190)]


def timeline_of(events, tmp_path, text=None):
    path = tmp_path / "timeline.json"
    path.write_text(text if text is not None else json.dumps(events))
    return timeline.read(path)


def test_spans_follow_the_nesting(tmp_path):
    spans = timeline.spans(timeline_of(EVENTS, tmp_path))
    a = [(s.phase, s.start - T0, s.end - T0) for s in spans if s.tensor == "allreduce.a"]
    assert a == [
        ("NEGOTIATE", 100, 110), ("MEMCPY_IN_FUSION_BUFFER", 111, 114), ("MPI_ALLREDUCE", 114, 124),
        ("MEMCPY_OUT_FUSION_BUFFER", 124, 126), ("ALLREDUCE", 110, 126), ("OTHER", 110, 111), ("NEGOTIATE", 900, 910),
    ]  # fmt: skip
    assert {s.op for s in spans} == {"ALLREDUCE"}


def test_summary_adds_up(tmp_path):
    s = timeline.summarize(timeline_of(EVENTS, tmp_path), STEPS)
    assert s["steps"] == [1] and s["step_ms"] == pytest.approx(0.1)
    a, b = s["tensors"]["allreduce.a"], s["tensors"]["allreduce.b"]
    assert a == pytest.approx(
        {"NEGOTIATE": 0.010, "OTHER": 0.001, "MEMCPY_IN_FUSION_BUFFER": 0.003, "MPI_ALLREDUCE": 0.010,
         "MEMCPY_OUT_FUSION_BUFFER": 0.002, "total": 0.026}
    )  # fmt: skip
    assert b["NEGOTIATE"] == pytest.approx(0.008) and b["MEMCPY_OUT_FUSION_BUFFER"] == pytest.approx(0.002)
    for phase, total in s["totals"].items():
        assert total == pytest.approx(a.get(phase, 0) + b.get(phase, 0))
    # Fused tensors share the time: the phase's wall time is the union (MPI_ALLREDUCE: 10 us, not 20).
    assert s["phases"]["MPI_ALLREDUCE"] == pytest.approx({"wall_ms": 0.010, "share": 0.1})
    assert s["phases"]["MEMCPY_OUT_FUSION_BUFFER"]["wall_ms"] == pytest.approx(0.004)
    assert s["communication_ms"] == pytest.approx(0.028)  # 100 .. 128
    assert list(s["phases"])[:2] == ["NEGOTIATE", "MEMCPY_IN_FUSION_BUFFER"]  # a tensor's life, in order
    assert s["spans_outside_steps"] == 1
    text = timeline.format_summary(s)
    assert "allreduce.a" in text and "MPI_ALLREDUCE" in text and "steps 1-1 (1)" in text


def test_without_steps_the_whole_recording_is_one_window(tmp_path):
    s = timeline.summarize(timeline_of(EVENTS, tmp_path), [])
    assert s["steps"] == [] and s["step_ms"] == pytest.approx(0.810)  # 100 .. 910
    assert s["spans_outside_steps"] == 0


def element_ends(text):
    """The offset just past each element of a JSON array text."""
    decoder, ends, i = json.JSONDecoder(), [], text.index("[") + 1
    while True:
        while text[i] in " \n\r\t,":
            i += 1
        if text[i] == "]":
            return ends
        _, i = decoder.raw_decode(text, i)
        ends.append(i)


@pytest.mark.parametrize("fraction", [i / 50 for i in range(50)])
def test_a_file_cut_anywhere_reads_as_its_whole_events(tmp_path, fraction):
    """Horovod writes `[`, the metadata, then each event followed by `]` (overwritten by the next `,`): a kill
    can leave any prefix; reading keeps exactly the events that were whole."""
    text = GOLDEN.read_text()
    whole, ends = json.loads(text), element_ends(text)
    cut = 1 + int(fraction * (len(text) - 2))
    t = timeline_of(None, tmp_path, text[:cut])
    assert t.events == whole[: sum(end <= cut for end in ends)]
    assert t.dropped_bytes == cut - max([e for e in ends if e <= cut], default=cut) or t.events == []


def test_repair_rewrites_only_a_broken_file(tmp_path):
    path = tmp_path / "timeline.json"
    text = GOLDEN.read_text()
    path.write_text(text)
    assert timeline.repair(path) == 0 and path.read_text() == text
    path.write_text(text[:-30])
    assert timeline.repair(path) > 0
    assert json.loads(path.read_text()) == json.loads(text)[: len(json.loads(path.read_text()))]


def test_the_golden_recording_summarizes(tmp_path):
    s = timeline.summarize(timeline.read(GOLDEN), timeline.read_steps(RunDir(GOLDEN.parent).timeline_steps))
    assert s["steps"] and "MPI_ALLREDUCE" in s["phases"]
    assert any(name.startswith("allreduce.") for name in s["tensors"])
    assert 0 < s["communication_share"] <= 1


def test_steps_file_cut_short_keeps_whole_lines(tmp_path):
    path = RunDir(tmp_path).timeline_steps
    path.write_text(f"{TIMELINE_STEPS_HEADER}\n5,10,20\n6,20,30\n7,30")
    assert timeline.read_steps(path) == [(5, 10.0, 20.0), (6, 20.0, 30.0)]


def test_steps_file_cut_short_is_said(tmp_path):
    path = RunDir(tmp_path).timeline_steps
    path.write_text(f"{TIMELINE_STEPS_HEADER}\n5,10,20\n6,2")
    said = []
    assert timeline.read_steps(path, warn=said.append) == [(5, 10.0, 20.0)]
    assert said == [f"{path}: skipped a line cut short (a killed job)"]


def write_run(tmp_path, text, steps=None):
    RunDir(tmp_path).timeline.write_text(text)
    if steps is not None:
        RunDir(tmp_path).timeline_steps.write_text(
            TIMELINE_STEPS_HEADER + "\n" + "".join(f"{s},{a},{b}\n" for s, a, b in steps)
        )
    return tmp_path


def test_a_timeline_a_killed_job_never_closed_reads_and_says_so(tmp_path):
    """Horovod's writer killed: the array never closed, with or without a partial event after the last whole one.
    The CLI summarizes the whole events and says on stderr what it skipped, in one line."""
    text = json.dumps(EVENTS)[:-1]  # no closing bracket
    cut = text + ', {"ph": "B", "ts": 95'
    for written, warning in [
        (text, "read up to its last whole event (a killed job never closed the file)"),
        (cut, f"skipped a partial last event of {len(cut) - len(text)} bytes (a killed job never closed the file)"),
    ]:
        run = write_run(tmp_path, written, STEPS)
        result = CliRunner().invoke(cli, ["timeline", str(run), "--json"])
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines() == [f"hvdtrain: warning: {run / 'timeline.json'}: {warning}"]
        assert json.loads(result.stdout)["tensors"]["allreduce.a"]["total"] == pytest.approx(0.026)


@pytest.mark.parametrize(
    "text,steps,needle",
    [
        ("[", None, "timeline.json holds no recorded operation (the job ended before Horovod recorded one"),
        ('[{"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": 5}},\n{"na',
         None, "holds no recorded operation"),
        (json.dumps(trace()), None, "holds no recorded operation"),
        # the steps recorded after the timeline ended (it was killed first): nothing inside them
        (json.dumps(EVENTS), [(40, T0 + 5000, T0 + 6000)], "holds no operation inside the recorded steps 40-40"),
    ],
)  # fmt: skip
def test_a_timeline_with_nothing_to_summarize_is_one_line(tmp_path, text, steps, needle):
    run = write_run(tmp_path, text, steps)
    assert_usage_error(CliRunner().invoke(cli, ["timeline", str(run)]), needle)
    assert not RunDir(tmp_path).timeline_plot.exists()


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: p / "missing", "does not exist: give a run directory or a timeline.json"),
        (lambda p: p, "has no timeline.json: train with --timeline"),
        (lambda p: (p / "x.json").write_text('{"a": 1}') and p / "x.json", "is not a Horovod timeline"),
        (lambda p: (p / "y.json").write_text("[1, 2") and p / "y.json", "y.json holds no recorded operation"),
    ],
)
def test_bad_input_is_one_line(tmp_path, make, needle):
    target = make(tmp_path)
    assert_usage_error(CliRunner().invoke(cli, ["timeline", str(target)]), needle)
    assert not RunDir(tmp_path).timeline_plot.exists()
