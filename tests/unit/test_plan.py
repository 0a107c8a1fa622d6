"""hvdtrain.plan's cost model on made-up measurements (the formulas of docs/plan.md, one by one), the
recommendation rule (never a layout that does not fit, never an approximate one), the command it prints, and
`hvdtrain plan` on bad input. tests/e2e/test_plan.py measures and validates it for real."""

import dataclasses
import json

import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain import plan
from hvdtrain.cli import cli
from hvdtrain.config import TrainConfig
from hvdtrain.plan import measure, model, render

MiB = 1024**2
W, STATE, A = 4 * MiB, 4 * MiB, 8 * MiB  # parameters (= gradients), optimizer state, activations of a batch


def costs(**over):
    stages = {}
    for m in (1, 2, 4):
        for s in range(2):  # two equal stages: half the parameters, the activations and the time each
            stages[f"2:{s}:{m}"] = model.Stage(s * 3, s * 3 + 3, 32 // m, 0.010 / 2 / m, A // 2 // m, 1000, W // 2)
    base = dict(model="mlp", layers=6, param_bytes=W, buffer_bytes=0, state_bytes=STATE, data_bytes=MiB, batch=32,
                step_seconds=0.010, activation_bytes=A, optimizer_seconds=0.002, threads=1, stages=stages)  # fmt: skip
    return model.Costs(**{**base, **over})


PROBE = model.Probe(ranks=2, base_rss_bytes=200 * MiB, comm_seconds=0.001, latency_seconds=0.0005, busbw_Bps=4e9,
                   p2p_seconds=0.00002, compute_seconds=0.010)  # fmt: skip


def by_label(cands):
    return {render.label(vars(c)): c for c in cands}


def test_the_formulas():
    assert model.ring_bytes(1000, 2) == 1000 and model.ring_bytes(1000, 4) == 1500 and model.ring_bytes(1000, 1) == 0
    assert model.bubble(2, 1) == 0.5 and model.bubble(4, 4) == pytest.approx(3 / 7)
    c = by_label(model.candidates(costs(), PROBE, ranks=2, cores=2, memory_bytes=10**12, batch=32))
    base = 200 * MiB - (2 * W + STATE + A)  # what the probe's rank held besides the whole model's state
    data = c["data"]
    assert data.memory_bytes == base + 2 * W + STATE + A and data.comm_bytes == W and data.collectives == 1
    assert data.step_seconds == pytest.approx(0.010 + 0.002 + 0.001) and data.samples_per_s == pytest.approx(64 / 0.013)
    sharded = c["sharded"]  # 1/n of the state and of the step, a second collective
    assert sharded.memory_bytes == base + 2 * W + STATE // 2 + A
    assert sharded.step_seconds == pytest.approx(0.010 + 0.001 + 0.001 + 0.0005)
    local = c["local-sgd H=4"]
    assert local.comm_bytes == W // 4 and not local.exact
    assert local.step_seconds == pytest.approx(0.012 + (W / 4e9 + 0.0005) / 4)
    # 2 equal stages, 1 replica, M = 4: (M + P - 1) x a stage's micro-batch, 2(P-1)M messages, the stage's step
    pipe = c["pipeline P=2 M=4 1f1b"]
    assert pipe.bubble == pytest.approx(1 / 5) and pipe.comm_bytes == 0
    assert pipe.step_seconds == pytest.approx(5 * 0.010 / 8 + 8 * 0.00002 + 0.002 / 2)
    assert pipe.samples_per_s == pytest.approx(32 / pipe.step_seconds)
    # 1F1B keeps min(P - s, M) micro-batches on stage s (2 on stage 0), GPipe all M
    assert pipe.memory_bytes == base + (W // 2) * 3 + 2 * (A // 8)
    assert c["pipeline P=2 M=4 gpipe"].memory_bytes == base + (W // 2) * 3 + 4 * (A // 8)


def test_compute_slows_with_contention_and_with_more_ranks_than_cores():
    two = by_label(model.candidates(costs(), PROBE, ranks=2, cores=2, memory_bytes=10**12, batch=32))["data"]
    probe4 = dataclasses.replace(PROBE, ranks=4)  # its comm measured at 4 ranks: only the compute differs
    four = by_label(model.candidates(costs(), probe4, ranks=4, cores=2, memory_bytes=10**12, batch=32))["data"]
    assert four.step_seconds - two.step_seconds == pytest.approx(0.010)  # each rank computes at half speed
    contended = dataclasses.replace(PROBE, compute_seconds=0.015)  # the probe's ranks computing at once: 1.5x
    cands = by_label(model.candidates(costs(), contended, ranks=2, cores=2, memory_bytes=10**12, batch=32))
    assert cands["data"].step_seconds - two.step_seconds == pytest.approx(0.005)
    pipe = by_label(model.candidates(costs(), PROBE, 2, 2, 10**12, 32))["pipeline P=2 M=4 1f1b"]
    assert cands["pipeline P=2 M=4 1f1b"].step_seconds - pipe.step_seconds == pytest.approx(0.5 * 5 * 0.010 / 8)


def test_the_recommendation_fits_and_is_exact():
    cands = model.candidates(costs(), PROBE, ranks=2, cores=2, memory_bytes=10**12, batch=32)
    best = model.recommend(cands)
    assert best.exact and best.fits
    assert best.samples_per_s == max(c.samples_per_s for c in cands if c.exact)
    # Only the pipeline's stages fit: it is recommended, whatever data parallelism (sharded or not) would do.
    limit = by_label(cands)["sharded"].memory_bytes - 1
    tight = model.candidates(costs(), PROBE, ranks=2, cores=2, memory_bytes=limit, batch=32)
    best = model.recommend(tight)
    assert best.layout == "pipeline" and best.memory_bytes <= limit
    assert all(c.fits == (c.memory_bytes <= limit) for c in tight)
    assert model.recommend(model.candidates(costs(), PROBE, 2, 2, memory_bytes=MiB, batch=32)) is None


def test_the_plan_prints_the_command():
    cfg = TrainConfig(model="deep_mlp", depth=4)
    cands = model.candidates(costs(), PROBE, ranks=2, cores=2, memory_bytes=10**12, batch=32)
    best = model.recommend(cands)
    assert (
        render.train_command(cfg, best, 2, None, None)
        == " ".join(["hvdtrain train -np 2 --model deep_mlp --depth 4", *best.args]).strip()
    )
    assert render.train_command(cfg, best, 8, 4, 2).startswith("hvdtrain submit --nodes 4 --ntasks-per-node 2 -- ")
    result = {"ranks": 2, "memory_said": "x", "costs": vars(costs()) | {"stages": {}}, "probe": vars(PROBE),
              "candidates": [vars(c) for c in cands], "recommended": vars(best), "why": ["  because"],
              "command": "hvdtrain train -np 2"}  # fmt: skip
    text = plan.format_plan(result)
    assert "recommended: " in text and text.endswith("  because\n  hvdtrain train -np 2")
    assert "local-sgd H=4" in text and "pipeline P=2 M=4 1f1b" in text


def test_busbw_comes_from_a_bench_allreduce_json(tmp_path):
    path = tmp_path / "allreduce.json"
    rows = [{"impl": "horovod_mpi", "bytes": b, "busbw_GBps": g} for b, g in ((MiB, 1.0), (64 * MiB, 3.0))]
    rows.append({"impl": "mpi4py", "bytes": MiB, "busbw_GBps": 9.0})
    path.write_text(json.dumps({"rows": rows}))
    rows = plan.bench_rows(str(path))
    assert measure.bench_busbw(rows, 2 * MiB) == 1e9 and measure.bench_busbw(rows, 40 * MiB) == 3e9


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--nodes", "2"], "--nodes and --ntasks-per-node go together"),
        (["-np", "2", "--nodes", "2", "--ntasks-per-node", "1"], "-np excludes --nodes"),
        (["--nodes", "2", "--ntasks-per-node", "1", "--validate", "5"], "--validate runs the layouts on this machine"),
        (["-np", "2", "--bench-json", "missing.json"], "--bench-json: no such file 'missing.json'"),
        (["-np", "2", "--bench-json", "."], "--bench-json: no such file '.'"),
        (["-np", "64"], "--batch-size 32 is more than a rank's share"),
        (["-np", "0"], "0 is not in the range x>=1"),
        (["--model", "resnet"], "'resnet' is not one of"),
        (["-np", "2", "--memory-per-rank", "0"], "0.0 is not in the range x>0"),
    ],
)
def test_bad_input_is_one_line_nothing_started(args, needle, no_processes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_usage_error(CliRunner().invoke(cli, ["plan", *args]), needle)
    assert no_processes == [] and list(tmp_path.iterdir()) == []


def test_a_message_costs_what_the_probes_real_pipeline_left_over():
    # The probe's 2-stage pipeline took 14 ms where its stages compute 10 ms: 2 ms for each of its 2 messages.
    probe = dataclasses.replace(PROBE, pipeline_seconds=0.014)
    assert model.p2p_seconds(costs(), probe, 1.0) == pytest.approx(0.002)
    assert model.p2p_seconds(costs(), PROBE, 1.0) == PROBE.p2p_seconds  # no pipeline ran: the ping-pong
    pipe = by_label(model.candidates(costs(), probe, 2, 2, 10**12, 32))["pipeline P=2 M=4 1f1b"]
    assert pipe.step_seconds == pytest.approx(5 * 0.010 / 8 + 8 * 0.002 + 0.002 / 2)


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"rows": [{"impl": "mpi4py", "bytes": 4, "busbw_GBps": 1.0}]}', "holds no Horovod allreduce rows"),
        ('{"meta": {}}', "not a `hvdtrain bench allreduce` result"),
        ("not json", "not a `hvdtrain bench allreduce` result"),
    ],
)
def test_a_bench_json_is_read_before_anything_starts(content, needle, no_processes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "allreduce.json").write_text(content)
    assert_usage_error(CliRunner().invoke(cli, ["plan", "-np", "2", "--bench-json", "allreduce.json"]), needle)
    assert no_processes == [] and [p.name for p in tmp_path.iterdir()] == ["allreduce.json"]


def test_a_dry_run_checks_the_options_and_shows_the_probe_runs_nothing(no_processes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["plan", "--dry-run", "-np", "2", "--model", "deep_mlp", "--validate", "5"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# measure deep_mlp in this process on ") and lines[0].endswith("then a 2-rank probe:")
    assert any(" -m hvdtrain.plan.probe " in line for line in lines), result.stdout
    assert lines[-1] == "# then the fastest fitting layout of each kind, 5 steps each (hvdtrain train)"
    assert list(tmp_path.iterdir()) == []
    bad = CliRunner().invoke(cli, ["plan", "--dry-run", "--nodes", "2"])
    assert_usage_error(bad, "--nodes and --ntasks-per-node go together")
