"""The benchmarks' pure parts (sizes, formulas, statistics, tables, collection) and the `bench` CLI's
validation: bad input is one line and exit 2 with nothing launched; --dry-run prints the exact commands."""

import dataclasses
import math
import subprocess
import sys

import click
import pytest
from clichecks import assert_usage_error
from click.testing import CliRunner

from hvdtrain import render
from hvdtrain.bench import allreduce, launching, plans, plots, report, tables, throughput, updates
from hvdtrain.cli import cli
from hvdtrain.clickopts import launch_options
from hvdtrain.errors import UsageError
from hvdtrain.launching import supervise
from hvdtrain.launching.options import LaunchOptions

MiB = 1024**2


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


# --- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,size",
    [
        ("4", 4),
        ("4B", 4),
        ("1K", 1024),
        ("1KiB", 1024),
        ("1kb", 1024),
        ("64MiB", 64 * MiB),
        ("1G", 1024**3),
        (" 8 ", 8),
    ],
)
def test_parse_size(text, size):
    assert report.parse_size(text) == size


@pytest.mark.parametrize("text,needle", [("3", "multiple of 4"), ("0", "multiple of 4"), ("abc", "cannot read"),
                                         ("4XB", "cannot read"), ("-4", "cannot read"), ("1.5M", "cannot read")])  # fmt: skip
def test_parse_size_rejects(text, needle):
    with pytest.raises(UsageError, match=needle):
        report.parse_size(text)


def test_size_range_and_list():
    assert report.size_range(4, 64) == [4, 8, 16, 32, 64]
    assert report.size_range(4, 100, 4) == [4, 16, 64, 100]  # the maximum is always measured
    assert report.size_range(8, 8) == [8]
    assert len(report.size_range(4, 256 * MiB)) == 27
    assert report.parse_sizes("64MiB,4,1KiB,4") == [4, 1024, 64 * MiB]
    with pytest.raises(UsageError, match="larger than"):
        report.size_range(64, 4)
    with pytest.raises(UsageError, match="bad list"):
        report.parse_sizes("4,,8")


def test_format_bytes():
    assert [report.format_bytes(s) for s in (4, 1024, 1536, 64 * MiB, 1024**3)] == [
        "4 B",
        "1 KiB",
        "1536 B",
        "64 MiB",
        "1 GiB",
    ]


def test_iterations_for():
    assert report.iterations_for(4, 20) == 20
    assert report.iterations_for(16 * MiB, 20) == 20
    assert report.iterations_for(64 * MiB, 20) == 5
    assert report.iterations_for(256 * MiB, 20) == 3  # never fewer than 3 ...
    assert report.iterations_for(256 * MiB, 2) == 2  # ... nor more than asked


# --- formulas and statistics ----------------------------------------------------------------------


def test_busbw_is_algbw_times_2_n_minus_1_over_n():
    assert report.algbw(1e9, 0.5) == pytest.approx(2.0)
    assert report.busbw(2.0, 2) == pytest.approx(2.0)
    assert report.busbw(2.0, 4) == pytest.approx(3.0)
    assert report.busbw(2.0, 8) == pytest.approx(3.5)
    assert report.busbw(2.0, 1) == 0.0
    with pytest.raises(ValueError):
        report.algbw(1, 0)


def test_ring_time():
    assert report.ring_time(1e9, 2, 1.0, 0.001) == pytest.approx(1.001)
    assert report.ring_time(1e9, 4, 1.5, 0.0) == pytest.approx(1.0)


def test_summary_stats_is_mean_and_1_96_population_sigma():
    s = report.summary_stats([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in [1, 2, 3, 4]) / 4)
    assert s == {"mean": 2.5, "sd": pytest.approx(sd), "conf": pytest.approx(1.96 * sd), "n": 4}
    assert report.summary_stats([5.0])["conf"] == 0.0


def test_ratio_and_efficiency():
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(None, 2.0) is None and report.ratio(1.0, 0.0) is None
    assert report.efficiency(180.0, 2, 100.0) == pytest.approx(0.9)
    spread = report.efficiency_spread({"mean": 180.0, "conf": 18.0}, 2, {"mean": 100.0, "conf": 0.0})
    assert spread == pytest.approx(0.09)


def test_render_table_aligns_columns():
    text = render.render_table(["name", "value"], [["a", 1.5], ["longer", 22.25], ["c", None]], "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert lines[1].startswith("name") and lines[2].startswith("------")
    assert lines[3].endswith(" 1.500") and lines[4].endswith("22.250") and lines[5].endswith("-")
    assert len({len(line) for line in lines[1:5]}) == 1


# --- allreduce: from raw times to the report -------------------------------------------------------


def fake_allreduce_parts(
    n=2, sizes=(4, 1024, MiB, 64 * MiB), bw=2.0, lat=1e-5, in_place=1.25, paired=None, paired_sizes=(MiB, 64 * MiB)
):
    times = paired or ()

    def rows(impl, scale):
        return [
            {
                "impl": impl,
                "bytes": s,
                "elements": s // 4,
                "iters": 3,
                "time_s": scale * report.ring_time(s, n, bw, lat),
            }
            for s in sizes
        ]

    mpi = {
        "meta": {"np": n, "controller": "mpi"},
        "rows": rows("memcpy", 0.1) + rows("mpi4py", 1.0) + rows("horovod_mpi", in_place) + rows("horovod_mpi_oop", 2),
        "paired": [
            {"bytes": s, "iters": 3, "mpi4py_block_times_s": [1.0, 2.0, 1.0], "horovod_block_times_s": list(times)}
            for s in sizes
            if paired is not None and s in paired_sizes
        ],
    }
    gloo = {"meta": {"np": n, "controller": "gloo"}, "rows": rows("torch_gloo", 1.0) + rows("horovod_gloo", 0.5)}
    return [mpi, gloo]


def test_collect_computes_bandwidths_and_ratios_from_times():
    result = allreduce.collect(fake_allreduce_parts())
    for r in result["rows"]:
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        if r["impl"] != "memcpy":
            assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * 2 * (2 - 1) / 2)
    s = result["summary"]
    assert s["reference_bytes"] == 64 * MiB
    assert s["horovod_mpi_over_mpi4py_busbw"] == pytest.approx(1 / 1.25)
    assert s["horovod_gloo_over_torch_gloo_busbw"] == pytest.approx(2.0)
    assert s["horovod_mpi_oop_over_mpi4py_busbw"] == pytest.approx(0.5)  # out of place, labelled apart
    assert s["horovod_mpi_over_mpi4py_busbw_at"] == {str(MiB): pytest.approx(0.8), str(64 * MiB): pytest.approx(0.8)}
    assert s["target_met"] is False
    assert allreduce.collect(fake_allreduce_parts(in_place=1.05))["summary"]["target_met"] is True  # 0.95 at both
    # Times made by the ring model itself: the fit reproduces the bandwidth and every size exactly.
    fit = s["ring_model"]["mpi4py"]
    assert all(v == pytest.approx(1.0, rel=1e-3) for v in fit["model_over_measured"].values())
    text = tables.allreduce(result)
    assert "hvd-mpi us" in text and "hvd-mpi-oop us" in text and "NOT met" in text
    assert "x mpi4py at 1 MiB and 64 MiB: NOT met" in text


def test_paired_blocks_decide_the_verdict_where_measured():
    # Pairs of back-to-back blocks: mpi4py 1, 2, 1 s against Horovod's; ratios 1/1.25, 2/2.5, 1/0.9.
    result = allreduce.collect(fake_allreduce_parts(in_place=1.25, paired=(1.25, 2.5, 0.9)))
    s = result["summary"]
    paired = s["paired_at"][str(MiB)]
    assert paired["median"] == pytest.approx(0.8) and paired["pairs"] == 3
    assert paired["range"] == [pytest.approx(0.8), pytest.approx(1 / 0.9)]
    assert s["horovod_mpi_over_mpi4py_busbw_at"][str(MiB)] == pytest.approx(0.8) and s["target_met"] is False
    assert s["sweep_horovod_mpi_over_mpi4py_busbw_at"][str(MiB)] == pytest.approx(0.8)
    # The sweep says 0.8 (one implementation's blocks, then the other's); the pairs say 0.95: the pairs decide.
    s = allreduce.collect(fake_allreduce_parts(in_place=1.25, paired=(1 / 0.95, 2 / 0.95, 1 / 0.95)))["summary"]
    assert s["horovod_mpi_over_mpi4py_busbw_at"] == {str(MiB): pytest.approx(0.95), str(64 * MiB): pytest.approx(0.95)}
    assert s["sweep_horovod_mpi_over_mpi4py_busbw_at"][str(64 * MiB)] == pytest.approx(0.8) and s["target_met"] is True
    text = tables.allreduce({**allreduce.collect(fake_allreduce_parts(paired=(1.25, 2.5, 0.9))), "rows": []})
    assert "at 1 MiB: 0.800, median of 3 pairs of back-to-back blocks (0.80-1.11); the sweep above: 0.800" in text
    # No target size measured: the pairs at the reference size decide.
    parts = fake_allreduce_parts(sizes=(4, 1024), paired=(1 / 0.95, 2 / 0.95, 1 / 0.95), paired_sizes=(1024,))
    s = allreduce.collect(parts)["summary"]
    assert s["horovod_mpi_over_mpi4py_busbw"] == pytest.approx(0.8) and s["target_met"] is True


def test_reference_size():
    assert allreduce.reference_size([4, 64 * MiB, 256 * MiB]) == 64 * MiB
    assert allreduce.reference_size([4, 1024]) == 1024
    assert allreduce.reference_size([256 * MiB]) == 256 * MiB


def test_allreduce_plot_writes_png(tmp_path):
    path = plots.allreduce(allreduce.collect(fake_allreduce_parts()), tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_controller_specs(clean_env):
    def decided(**options):
        specs = allreduce.controller_specs([sys.executable, "-m", allreduce.WORKER], LaunchOptions(np=2, **options))
        return [(s.launcher, s.controller) for s in specs]

    assert decided(launcher=None) == [("mpirun", "mpi"), ("horovodrun", "gloo")]  # the defaults of each
    assert decided(launcher="horovodrun") == [("horovodrun", "mpi"), ("horovodrun", "gloo")]
    assert decided(launcher="horovodrun", gloo=True) == [("horovodrun", "gloo")]
    assert decided(mpi=True) == [("mpirun", "mpi")]
    assert decided(launcher="mpirun") == [("mpirun", "mpi")]


# --- train: from per-iteration rates to the report -------------------------------------------------


def test_measurement_order_puts_ddp_first_and_alternates():
    measurements = throughput.measurement_order(["a", "b"], ["horovod", "trainer", "ddp"], rounds=2, fp16=True)
    order = [dataclasses.asdict(m) for m in measurements]
    arms = [m["arm"] for m in order]
    assert arms[:4] == ["ddp"] * 4 and "ddp" not in arms[4:]
    round0 = [
        (m["arm"], m["compression"]) for m in order if m["round"] == 0 and m["model"] == "a" and m["arm"] != "ddp"
    ]
    round1 = [
        (m["arm"], m["compression"]) for m in order if m["round"] == 1 and m["model"] == "a" and m["arm"] != "ddp"
    ]
    assert round0 == [("horovod", "none"), ("trainer", "none"), ("horovod", "fp16")]
    assert round1 == [("trainer", "none"), ("horovod", "none"), ("horovod", "fp16")]
    # After ddp, round by round: the references (Horovod shut down; its background thread would slow them), then
    # the Horovod arms, each group's order alternating every round.
    arms = [(m.arm, m.round) for m in throughput.measurement_order(["a"], plans.DEFAULT_ARMS, rounds=2, fp16=False)]
    assert arms == [("ddp", 0), ("ddp", 1), ("mpi4py", 0), ("nocomm", 0), ("horovod", 0), ("trainer", 0),
                    ("sharded", 0), ("nocomm", 1), ("mpi4py", 1), ("sharded", 1), ("trainer", 1), ("horovod", 1)]  # fmt: skip


def test_pipeline_arms_run_with_the_references_on_the_models_that_split():
    pipes = [("1f1b", 1), ("gpipe", 4)]
    order = throughput.measurement_order(["a", "b"], plans.DEFAULT_ARMS, rounds=2, fp16=False, pipelines=pipes,
                                         piped=["a"])  # fmt: skip
    piped = [(m.model, m.schedule, m.micro, m.round) for m in order if m.arm == "pipeline"]
    assert piped == [("a", "1f1b", 1, 0), ("a", "gpipe", 4, 0), ("a", "gpipe", 4, 1), ("a", "1f1b", 1, 1)]
    for r in (0, 1):  # in each round with the references, before that round's Horovod arms
        first_horovod = next(i for i, m in enumerate(order) if m.arm not in plans.BASELINE_ARMS and m.round == r)
        assert all(i < first_horovod for i, m in enumerate(order) if m.arm == "pipeline" and m.round == r)
    assert [m.label for m in order if m.arm == "pipeline"][0] == "pipeline/a/1f1b/m1"
    shapes = plans.MODEL_SHAPES
    assert throughput.pipeline_fits(shapes["deep_mlp"], 4) and not throughput.pipeline_fits(shapes["wide_mlp"], 4)


@pytest.mark.parametrize(
    "text,needle", [("0,2", "between 1 and 256"), ("1.5", "whole numbers"), ("2,300", "between 1 and 256")]
)
def test_pipeline_micro_batches_are_checked(text, needle):
    with pytest.raises(UsageError, match=needle):
        plans.resolve(plans.TrainSettings, {"micro_batches": text}).micro_counts()
    assert plans.resolve(plans.TrainSettings, {"micro_batches": "8,1,8"}).micro_counts() == [8, 1]


def fake_pipeline_parts():
    """np 1 and 2 runs of the pipeline arm (one replica: every rank's rate is the replica's)."""

    def m(n, schedule, micro, rate):
        return {"arm": "pipeline", "model": "m", "compression": "none", "round": 0, "schedule": schedule,
                "micro": micro, "stages": n, "rank_rates": [[rate, rate] for _ in range(n)],
                "activation_peak_bytes": [100 * micro] * n, "micro_in_flight_peak": [micro] * n}  # fmt: skip

    one = [m(1, "gpipe", 1, 100.0), m(1, "gpipe", 4, 90.0)]
    two = [m(2, "gpipe", 1, 80.0), m(2, "gpipe", 4, 150.0)]
    return [(True, {"meta": {"np": n, "threads_per_rank": 1}, "measurements": ms}) for n, ms in ((1, one), (2, two))]


def test_pipeline_rows_put_the_speed_up_beside_the_bubble_model(tmp_path):
    result = throughput.collect(fake_pipeline_parts())
    rows = {(p["stages"], p["micro_batches"]): p for p in result["pipeline"]}
    assert rows[(2, 4)]["total"] == 150.0  # one replica: not np x the rate
    assert rows[(2, 4)]["speedup"] == pytest.approx(1.5)
    assert rows[(2, 4)]["bubble"] == pytest.approx(1 / 5) and rows[(2, 4)]["ideal_speedup"] == pytest.approx(8 / 5)
    assert rows[(2, 1)]["speedup"] == pytest.approx(0.8) and rows[(1, 4)]["speedup"] == pytest.approx(0.9)
    assert rows[(2, 4)]["activation_peak_bytes"] == [400, 400] and rows[(2, 4)]["micro_in_flight_peak"] == [4, 4]
    assert not [s for s in result["scaling"] if s["config"].startswith("pipeline")]
    text = tables.train(result)
    assert "pipeline across ranks" in text and "400 / 400" in text
    assert plots.train(result, tmp_path / "p.png").stat().st_size > 0


def fake_train_parts():
    def part(n, fusion, rates):
        ms = [{"arm": arm, "model": "m", "compression": comp, "round": 0, "rank_rates": [list(v) for _ in range(n)]}
              for (arm, comp), v in rates.items()]  # fmt: skip
        for m in ms:  # momentum buffers of 1000 float32 parameters, or 1/n of them
            if m["arm"] in ("horovod", "sharded"):
                m["optimizer_state_bytes"] = 4000 if m["arm"] == "horovod" else 4000 // n
        return fusion, {"meta": {"np": n, "threads_per_rank": 1}, "measurements": ms}

    one = {
        ("horovod", "none"): [100, 100],
        ("trainer", "none"): [99, 99],
        ("ddp", "none"): [90, 110],
        ("horovod", "fp16"): [80, 80],
    }
    two = {
        ("horovod", "none"): [90, 90],
        ("trainer", "none"): [81, 81],
        ("ddp", "none"): [50, 50],
        ("horovod", "fp16"): [45, 45],
        ("sharded", "none"): [72, 72],
        ("mpi4py", "none"): [100, 100],
        ("nocomm", "none"): [110, 110],
    }
    return [part(1, True, one), part(1, False, {("horovod", "none"): [100, 100]}), part(2, True, two),
            part(2, False, {("horovod", "none"): [30, 30]})]  # fmt: skip


def test_train_collect():
    result = throughput.collect(fake_train_parts())
    rows = {(r["config"], r["np"]): r for r in result["rows"]}
    assert rows[("horovod", 2)]["total"] == 180 and rows[("horovod", 2)]["per_rank_mean"] == 90
    assert rows[("ddp", 1)]["per_rank_conf"] == pytest.approx(1.96 * 10)
    assert rows[("horovod-nofusion", 2)]["rank_means"] == [30, 30]
    eff = {(s["config"], s["np"]): s["efficiency"] for s in result["scaling"]}
    assert eff[("horovod", 2)] == pytest.approx(0.9) and eff[("horovod", 1)] == 1.0
    sbs = {s["np"]: s for s in result["side_by_side"]}
    assert sbs[2]["trainer_over_horovod"] == pytest.approx(162 / 180)
    assert sbs[2]["trainer_over_ddp"] == pytest.approx(162 / 100)
    # Against the references (np=2 only): what MPI allows and the hardware ceiling; the issue's targets.
    assert sbs[2]["trainer_over_mpi4py"] == pytest.approx(162 / 200) and sbs[1]["trainer_over_mpi4py"] is None
    assert sbs[2]["horovod_over_nocomm"] == pytest.approx(180 / 220) and sbs[2]["mpi4py_over_nocomm"] == pytest.approx(
        200 / 220
    )
    assert [sbs[2][f"{k}_target_met"] for k in ("trainer_over_mpi4py", "trainer_over_ddp", "trainer_over_nocomm")] == [
        False, True, False]  # fmt: skip
    assert sbs[1]["trainer_over_mpi4py_target_met"] is None and sbs[1]["trainer_over_ddp_target_met"] is False
    abl = {a["np"]: a for a in result["ablations"]}
    assert abl[2]["no_fusion_over_base"] == pytest.approx(60 / 180) and abl[2]["fp16_over_base"] == pytest.approx(0.5)
    assert sbs[2]["sharded_over_horovod"] == pytest.approx(144 / 180) and sbs[1]["sharded_total"] is None
    assert sbs[2]["horovod_state_bytes"] == 4000 and sbs[2]["state_sharded_over_horovod"] == pytest.approx(0.5)
    text = tables.train(result)
    assert "trainer/horovod" in text and "no fusion" in text and "180 +- 0" in text
    assert "sharded optimizer (ZeRO-1) vs DistributedOptimizer" in text
    assert "against the references" in text and "trainer/nocomm" in text


def test_paired_ratio_per_round():
    def m(arm, r, rate):
        return {"arm": arm, "model": "m", "compression": "none", "round": r, "rank_rates": [[rate, rate]]}

    part = {"meta": {"np": 1, "threads_per_rank": 1}, "measurements": [
        m("horovod", 0, 100), m("trainer", 0, 99), m("trainer", 1, 50), m("horovod", 1, 40), m("trainer", 2, 90), m("horovod", 2, 100)
    ]}  # fmt: skip
    (line,) = throughput.side_by_side(throughput.throughput_rows([(True, part)]))
    assert line["trainer_over_horovod_per_round"] == pytest.approx([0.99, 1.25, 0.9])
    assert line["trainer_over_horovod_median_round"] == pytest.approx(0.99)
    assert line["trainer_over_horovod"] == pytest.approx((99 + 50 + 90) / (100 + 40 + 100))


def test_reference_verdicts_take_the_median_of_rounds():
    def m(arm, r, rate):
        return {"arm": arm, "model": "m", "compression": "none", "round": r, "rank_rates": [[rate], [rate]]}

    # Round 1 caught the machine in a slow spell during the references: the rounds 0.95, 2.0, 0.92 (pooled 1.07).
    rates = {"mpi4py": (100, 30, 100), "trainer": (95, 60, 92), "nocomm": (110, 40, 110), "horovod": (90, 50, 90)}
    part = {"meta": {"np": 2, "threads_per_rank": 1},
            "measurements": [m(arm, r, v[r]) for r in range(3) for arm, v in rates.items()]}  # fmt: skip
    (line,) = throughput.side_by_side(throughput.throughput_rows([(True, part)]))
    assert line["trainer_over_mpi4py"] == pytest.approx(247 / 230)
    assert line["trainer_over_mpi4py_per_round"] == pytest.approx([0.95, 2.0, 0.92])
    assert line["trainer_over_mpi4py_median_round"] == pytest.approx(0.95) and line["trainer_over_mpi4py_target_met"]
    assert line["trainer_over_nocomm_median_round"] == pytest.approx(95 / 110)
    assert line["trainer_over_nocomm_target_met"] and line["mpi4py_over_nocomm_median_round"] == pytest.approx(10 / 11)
    assert "trainer_over_ddp_per_round" not in line  # DDP runs all its rounds first: not paired
    rates["trainer"] = (85, 60, 80)
    part["measurements"] = [m(arm, r, v[r]) for r in range(3) for arm, v in rates.items()]
    (line,) = throughput.side_by_side(throughput.throughput_rows([(True, part)]))
    assert line["trainer_over_mpi4py"] > 0.9 and line["trainer_over_mpi4py_median_round"] == pytest.approx(0.85)
    assert line["trainer_over_mpi4py_target_met"] is False  # the median of rounds decides, not the pooled ratio
    assert tables._with_rounds(line, "trainer_over_mpi4py") == f"{(85 + 60 + 80) / 230:.3f} [0.85: 0.80-2.00]"


def test_train_plot_writes_png(tmp_path):
    path = plots.train(throughput.collect(fake_train_parts()), tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rates_from_stamps():
    from hvdtrain.bench.throughput_worker import rates_from_stamps

    timing = plans.Timing(warmup=2, iters=2, batches_per_iter=3, batch_size=10)
    stamps = [0.0, 5.0, 9.0, 10.0, 10.5, 11.0, 11.5, 13.0, 14.0]  # 2 warm-up steps, then 2 x 3 timed steps
    assert rates_from_stamps(stamps, timing) == pytest.approx([30 / 2.0, 30 / 3.0])


# --- CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sizes", "3"], "multiple of 4"),
        (["--sizes", "4,abc"], "cannot read size 'abc'"),
        (["--sizes", "4", "--min-bytes", "8"], "excludes"),
        (["--min-bytes", "1MiB", "--max-bytes", "4"], "larger than"),
        (["--iters", "0"], "--iters 0"),
        (["--repeats", "0"], "--repeats 0"),
        (["--pairs", "0"], "--pairs 0"),
        (["--warmup", "-1"], "--warmup -1"),
        (["--step-factor", "1"], "--step-factor"),
        (["-np", "1"], "at least 2 ranks"),
        (["--gloo", "--mpi"], "exclude each other"),
        (["--launcher", "pdsh"], "unknown launcher"),
        (["-np", "3", "-H", "localhost:2"], "more than the 2 slots"),
        (["--iters", "x"], "is not a valid integer"),
    ],
)
def test_bench_allreduce_bad_input(args, needle, no_processes, clean_env, tmp_path):
    assert_usage_error(invoke("bench", "allreduce", "-np", "2", "--out", tmp_path / "o", *args), needle)
    assert no_processes == []
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--max-np", "0"], "--max-np 0"),
        (["-np", "2", "--max-np", "3"], "disagree"),
        (["--models", "resnet"], "unknown 'resnet'"),
        (["--arms", "horovod,jax"], "unknown 'jax'"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--rounds", "0"], "--rounds 0"),
        (["--batches-per-iter", "0"], "--batches-per-iter 0"),
        (["--gloo", "--mpi"], "exclude each other"),
        (["--max-np", "3", "-H", "localhost:2"], "more than the 2 slots"),
        (["--threads-per-rank", "0"], "at least 1"),
    ],
)
def test_bench_train_bad_input(args, needle, no_processes, clean_env, tmp_path):
    assert_usage_error(invoke("bench", "train", "--out", tmp_path / "o", *args), needle)
    assert no_processes == []
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--stragglers", "0.5"], "--stragglers '0.5': every value must be at least 1"),
        (["--stragglers", "two"], "give comma-separated numbers"),
        (["--targets", "0.9,1.5"], "--targets '0.9,1.5': every value must be between 0 and 1"),
        (["--modes", "sync,hogwild"], "unknown 'hogwild'"),
        (["-np", "2"], "-np: give --workers"),
        (["--gloo"], "the async mode needs MPI"),
        (["--workers", "0"], "--workers 0"),
        (["--average-every", "0"], "--average-every 0"),
    ],
)
def test_bench_updates_bad_input(args, needle, no_processes, clean_env, tmp_path):
    assert_usage_error(invoke("bench", "updates", "--out", tmp_path / "o", *args), needle)
    assert no_processes == []
    assert not (tmp_path / "o").exists()


def test_bench_updates_plan_gives_async_its_servers_and_alternates_the_modes(no_processes, clean_env, tmp_path):
    plan = updates.make_plan({"out": str(tmp_path / "o"), "rounds": 2, "stragglers": "1,3"}, launch=LaunchOptions())
    names = [job.name for job in plan.jobs]
    assert names[:6] == ["sync-x1-r0", "local-sgd-x1-r0", "async-x1-r0", "async-x1-r1", "local-sgd-x1-r1",
                         "sync-x1-r1"]  # fmt: skip
    assert len(names) == 12
    by = {job.name: job for job in plan.jobs}
    assert by["async-x3-r0"].spec.np == 3 and by["async-x3-r0"].spec.controller == "mpi"
    assert by["sync-x3-r0"].spec.np == 2
    assert by["sync-x3-r0"].plan.straggler == 3.0 and by["sync-x3-r0"].plan.straggler_rank == 1
    cfg = by["local-sgd-x1-r0"].plan.config
    assert (cfg["update"], cfg["average_every"], cfg["ps_ranks"]) == ("local-sgd", 4, None)
    assert by["async-x1-r0"].plan.config["max_staleness"] == 4


def _updates_part(mode, straggler, rate, accuracies, **extra):
    curve = [{"epoch": i + 1, "step": 10 * (i + 1), "seconds": 2.0 * (i + 1), "test_accuracy": a}
             for i, a in enumerate(accuracies)]  # fmt: skip
    return {"mode": mode, "straggler": straggler, "round": 0, "workers": 2, "samples_per_s_per_worker": rate,
            "steps": 10 * len(accuracies), "seconds_training": 2.0 * len(accuracies),
            "final_accuracy": accuracies[-1], "curve": curve, **extra}  # fmt: skip


def test_bench_updates_collect_table_and_plot(tmp_path):
    parts = [
        _updates_part("sync", 1.0, 1000.0, [0.8, 0.92, 0.96], collectives_per_step=8.0),
        _updates_part("sync", 2.0, 500.0, [0.8, 0.91, 0.94], collectives_per_step=8.0),
        _updates_part("async", 1.0, 900.0, [0.85, 0.95, 0.97], messages_per_step=2.0),
        _updates_part("async", 2.0, 810.0, [0.85, 0.9, 0.96], messages_per_step=2.0),
    ]
    settings = plans.resolve(plans.UpdatesSettings, {"modes": "sync,async"})
    result = updates.collect(parts, settings)
    sync1 = report.find(result["rows"], mode="sync", straggler=1.0)
    assert (sync1["seconds_to_0.9"], sync1["step_to_0.9"], sync1["seconds_to_0.95"]) == (4.0, 20, 6.0)
    assert report.find(result["rows"], mode="sync", straggler=2.0)["seconds_to_0.95"] is None  # never reached
    assert report.find(result["rows"], mode="async", straggler=1.0)["step_to_0.95"] == 20
    kept = {s["mode"]: s["throughput_kept"] for s in result["slowdowns"]}
    assert kept == {"sync": 0.5, "async": pytest.approx(0.9)}
    text = tables.updates(result)
    assert "s to 0.95" in text and "2.00 msgs" in text and "8.00 coll." in text and "throughput kept" in text
    assert plots.updates(result, tmp_path / "u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_out_must_be_a_directory(no_processes, clean_env, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert_usage_error(invoke("bench", "allreduce", "-np", "2", "--out", f), "not a directory")
    assert_usage_error(invoke("bench", "train", "--out", f), "not a directory")


def test_bench_allreduce_dry_run(no_processes, clean_env, tmp_path):
    result = invoke("bench", "allreduce", "-np", "2", "--tiny", "--out", tmp_path / "o", "--dry-run")
    assert result.exit_code == 0, result.output
    commands = [line for line in result.output.splitlines() if "hvdtrain.bench.allreduce_worker" in line]
    assert len(commands) == 2
    assert commands[0].startswith("mpirun -np 2 -H localhost:2 ") and " --gloo " in commands[1]
    assert no_processes == [] and not (tmp_path / "o").exists()
    only_mpi = invoke("bench", "allreduce", "-np", "2", "--launcher", "mpirun", "--out", tmp_path / "o", "--dry-run")
    lines = [line for line in only_mpi.output.splitlines() if "allreduce_worker" in line]
    assert len(lines) == 1 and lines[0].startswith("mpirun -np 2")


def test_bench_train_dry_run(no_processes, clean_env, tmp_path):
    result = invoke("bench", "train", "--max-np", "2", "--tiny", "--out", tmp_path / "o", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    commands = [line for line in out if "hvdtrain.bench.throughput_worker" in line]
    assert len(commands) == 4  # np 1 and 2, fusion on and off
    assert all(c.startswith("mpirun -np ") for c in commands)  # MPI, through the default launcher
    assert out.count("export HOROVOD_FUSION_THRESHOLD=0") == 2 and all(" --threads 1 -- " in c for c in commands)
    assert no_processes == [] and not (tmp_path / "o").exists()
    assert "mpi4py/deep_mlp, nocomm/deep_mlp" in result.output  # the references, under MPI
    plain = invoke("bench", "train", "--max-np", "1", "--no-ablations", "--gloo", "--out", tmp_path / "o", "--dry-run")
    assert [line for line in plain.output.splitlines() if "throughput_worker" in line][0].count("--gloo") == 1
    assert "mpi4py/" not in plain.output and "nocomm/" not in plain.output  # left out under Gloo
    named = invoke("bench", "train", "--gloo", "--arms", "horovod,mpi4py", "--out", tmp_path / "o", "--dry-run")
    assert_usage_error(named, "--arms mpi4py: the reference loops run on MPI (mpi4py), not under Gloo; drop --gloo")


def test_bench_checks_the_hosts_before_the_first_job(fake_ssh, clean_env, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(supervise, "run_job", lambda spec, **kw: started.append(spec))
    result = invoke("bench", "allreduce", "-np", "2", "-H", "down2.invalid:2", "--tiny", "--out", tmp_path / "o")
    assert_usage_error(result, "cannot reach host down2.invalid over ssh")
    assert started == [] and not (tmp_path / "o").exists()


def test_bench_modules_import_nothing_heavy():
    code = (
        "import sys, hvdtrain.cli, hvdtrain.bench.allreduce, hvdtrain.bench.throughput, hvdtrain.bench.report, "
        "hvdtrain.bench.plans, hvdtrain.bench.runner, hvdtrain.bench.tables, hvdtrain.bench.plots, "
        "hvdtrain.bench.updates; "
        "sys.exit(sorted({'torch', 'horovod', 'numpy', 'matplotlib', 'mpi4py'} & set(sys.modules)) != [])"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _expected_default_text(field):
    """What --help must show for a settings field, worked out from the dataclass alone."""

    def show(value):
        return ",".join(value) if isinstance(value, tuple) else str(value)

    if field.default is True:
        return f"[default: --{field.name.replace('_', '-')}]"
    shown = [] if field.default is None or field.default is False else [f"default: {show(field.default)}"]
    if "tiny" in field.metadata:
        shown.append(f"tiny: {show(field.metadata['tiny'])}")
    return f"[{'; '.join(shown)}]" if shown else None


@pytest.mark.parametrize(
    "name,module,settings,args",
    [("allreduce", allreduce, plans.AllreduceSettings, ["-np", "2"]),
     ("train", throughput, plans.TrainSettings, ["--max-np", "1"]),
     ("updates", updates, plans.UpdatesSettings, [])],
)  # fmt: skip
def test_bench_options_are_generated_from_the_settings(
    name, module, settings, args, monkeypatch, no_processes, clean_env, tmp_path
):
    command = cli.commands["bench"].commands[name]
    shared = {p.name for p in click.command()(launch_options(lambda **_: None)).params} | {"help"}
    own = [p for p in command.params if p.name not in shared]
    fields = dataclasses.fields(settings)
    # Exactly one option per field, named after it, and nothing else of its own.
    assert [p.name for p in own] == [f.name for f in fields]
    # Compared without white space: click wraps lines at spaces and after hyphens (local-sgd).
    help_text = "".join(invoke("bench", name, "--help").output.split())
    for field, param in zip(fields, own):
        assert param.opts[0] == "--" + field.name.replace("_", "-")
        expected = _expected_default_text(field)
        # The default shown once, taken from the dataclass; click adds none of its own.
        assert param.help.count("default:") == (1 if expected and "default:" in expected else 0), param.help
        assert not param.show_default
        if expected:
            assert param.help.endswith(expected), (param.help, expected)
        assert "".join(param.help.split()) in help_text
    # Options not given take the dataclass's defaults, or its tiny defaults with --tiny.
    parsed = []
    monkeypatch.setattr(module, "run", lambda plan, **_: parsed.append(plan.settings))
    out = str(tmp_path / "o")
    for extra in ([], ["--tiny"]):
        result = invoke("bench", name, *args, "--out", out, *extra)
        assert result.exit_code == 0, result.output
    given = {"out": out, **({"max_np": 1} if name == "train" else {})}
    tiny = {f.name: f.metadata["tiny"] for f in fields if "tiny" in f.metadata}
    assert parsed == [settings(**given), settings(**given, **tiny, tiny=True)]
    assert no_processes == []


def test_worker_plans_round_trip_through_json():
    measurements = throughput.measurement_order(["deep_mlp"], plans.DEFAULT_ARMS, rounds=2, fp16=True)
    train = plans.TrainWorkerPlan(
        plans.Timing(batch_size=16, warmup=2, iters=3, batches_per_iter=2), 0.01, "mpi",
        dict(plans.TINY_MODEL_SHAPES), measurements, run_root="/runs/x", store="/runs/x/.store",
    )  # fmt: skip
    back = plans.TrainWorkerPlan.from_json(train.to_json())
    assert back == train and back.timing.steps == 8
    assert isinstance(back.measurements[0], plans.Measurement) and back.measurements[0].label == "ddp/deep_mlp"
    assert isinstance(back.models["wide_mlp"], plans.ModelShape)
    ar = plans.AllreduceWorkerPlan("gloo", [4, 1024], warmup=1, iters=3)
    assert plans.AllreduceWorkerPlan.from_json(ar.to_json()) == ar
    with pytest.raises(ValueError, match=r"unknown keys \['iter'\]; valid keys are: controller, sizes"):
        plans.AllreduceWorkerPlan.from_json(ar.to_json().replace('"iters"', '"iter"'))


# --- launch: arms, spread, report -----------------------------------------------------------------


def test_launch_arms_rotate_and_build_the_commands_users_type(no_processes, tmp_path):
    assert [launching.rotated("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    job = ["-m", launching.JOB]
    mpirun = launching.arm_argv("mpirun", "job", 2, "unused", cores=2)
    assert mpirun[:7] == ["mpirun", "-np", "2", "--bind-to", "none", "--map-by", "slot"] and mpirun[-2:] == job
    assert "--oversubscribe" in launching.arm_argv("mpirun", "job", 3, "unused", cores=2)
    # an MPICH-family MPI on PATH: the plain arm is Hydra's own mpiexec
    assert launching.arm_argv("mpirun", "job", 2, "unused", hydra=True) == ["mpiexec", "-n", "2", "-bind-to", "none",
                                                                           sys.executable, *job]  # fmt: skip
    default = launching.arm_argv("hvdtrain", "job", 2, "unused")
    assert default[-6:] == ["run", "-np", "2", "--", sys.executable, *job][-6:] and "--launcher" not in default
    assert default[default.index("run") - 1].endswith("hvdtrain") or default[:3] == [sys.executable, "-m", "hvdtrain"]
    assert launching.arm_argv("hvdtrain-horovodrun", "job", 2, "x")[-6:-4] == ["--launcher", "horovodrun"]
    assert launching.arm_argv("horovodrun", "job", 4, "x")[0].endswith("horovodrun")
    train = launching.arm_argv("hvdtrain-horovodrun", "train", 2, str(tmp_path / "r"))
    assert train[-8:] == ["--max-steps", "1", "--epochs", "1", "--run-dir", str(tmp_path / "r"), "--launcher",
                          "horovodrun"]  # fmt: skip
    plan = launching.make_plan({"tiny": True, "out": str(tmp_path / "o")})
    assert len(plan.runs) == 4 + 2 and not (tmp_path / "o").exists() and no_processes == []
    assert_usage_error(invoke("bench", "launch", "--arms", "mpirun,srun"), "srun")
    assert_usage_error(invoke("bench", "launch", "--ranks", "0"), "--ranks 0: must be at least 1")


def test_launch_collect_medians_quartiles_ratio_and_phases():
    settings = plans.resolve(plans.LaunchSettings, {"arms": "mpirun,hvdtrain", "rounds": 5})
    samples = [{"what": "job", "arm": "mpirun", "seconds": s} for s in (3.0, 3.2, 3.1, 2.9, 9.0)]
    samples += [{"what": "job", "arm": "hvdtrain", "seconds": s} for s in (3.3, 3.4, 3.2, 3.1, 3.5)]
    phases = [{"launch": 0.5, "imports": 1.0, "first step": 0.2}, {"launch": 0.7, "imports": 1.2, "first step": 0.4}]
    samples += [{"what": "train", "arm": "hvdtrain", "seconds": s, "startup_s": p} for s, p in zip((5, 7), phases)]
    result = launching.collect(samples, settings)
    m, h = result["job"]["mpirun"], result["job"]["hvdtrain"]
    assert (m["median"], m["q1"], m["q3"], m["min"], m["max"], m["n"]) == (3.1, 3.0, 3.2, 2.9, 9.0, 5)
    assert h["median"] == 3.3 and h["vs_mpirun"] == pytest.approx(3.3 / 3.1) and m["vs_mpirun"] == 1.0
    t = result["train"]["hvdtrain"]
    assert t["wall"]["median"] == 6 and t["phases"] == pytest.approx({"launch": 0.6, "imports": 1.1, "first step": 0.3})
    assert list(t["phases"]) == ["launch", "imports", "first step"] and "hvdtrain-horovodrun" not in result["train"]
    text = launching.table(result)
    assert "x mpirun" in text and "1.065" in text and "to 1st step" in text and "2.000" in text


# --- pytest: the plugin against mpirun -------------------------------------------------------------


def test_bench_pytest_files_commands_and_plan(no_processes, tmp_path):
    from hvdtrain.bench import pytests

    world = pytests.test_file(3, 2, "world")
    assert world.count("def test_") == 3 and "pytest.mark.ranks(2)" in world and "import torch" not in world
    compile(world, "test_world.py", "exec")
    hvd = pytests.test_file(4, 3, "hvd")
    assert hvd.startswith("import torch\n") and hvd.count("hvd.allreduce") == 4 and "== 3" in hvd
    compile(hvd, "test_hvd.py", "exec")
    plugin = pytests.arm_argv("plugin", "F.py", 2)
    assert plugin == [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "F.py"]
    assert pytests.arm_argv("mpirun", "F.py", 2)[:3] == ["mpirun", "-np", "2"]
    assert pytests.arm_argv("mpirun", "F.py", 2)[-2:] == ["F.py", "--with-mpi"]
    assert pytests.arm_argv("mpirun", "F.py", 2, hydra=True)[:3] == ["mpiexec", "-n", "2"]
    plan = pytests.make_plan({"tiny": True, "out": str(tmp_path / "o")})
    assert plan.runs == [(0, "world", "plugin"), (0, "world", "mpirun")] and not (tmp_path / "o").exists()
    full = pytests.make_plan({"rounds": 2, "out": str(tmp_path / "o")})
    assert full.runs[:4] == [(0, "world", "plugin"), (0, "world", "mpirun"), (0, "hvd", "plugin"), (0, "hvd", "mpirun")]
    assert full.runs[4] == (1, "world", "mpirun")  # rotated: each arm runs first in some round
    assert_usage_error(invoke("bench", "pytest", "--bodies", "world,gpu"), "gpu")
    assert_usage_error(invoke("bench", "pytest", "--tests", "0"), "--tests 0: must be at least 1")
    assert no_processes == []


def test_bench_pytest_collects_each_bodys_arms_against_mpirun():
    from hvdtrain.bench import pytests

    settings = plans.resolve(plans.PytestSettings, {"tests": 10, "rounds": 3, "bodies": "world"})
    samples = [{"body": "world", "arm": "mpirun", "seconds": s} for s in (1.0, 1.2, 1.1)]
    samples += [{"body": "world", "arm": "plugin", "seconds": s} for s in (1.5, 1.6, 1.7)]
    result = pytests.collect(samples, settings)
    arms = result["bodies"]["world"]
    assert arms["plugin"]["vs_mpirun"] == pytest.approx(1.6 / 1.1) and arms["mpirun"]["vs_mpirun"] == 1.0
    assert arms["plugin"]["per_test_ms"] == pytest.approx(160.0)
    assert "x mpirun" in pytests.table(result) and "1.455" in pytests.table(result)
