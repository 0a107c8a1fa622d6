"""`hvdtrain bench --tiny` for real on 2 ranks: output schema and sane numbers (positive bandwidths and
throughputs, busbw by its formula, ratios computed from the measured values), table printed, PNG written."""

import json
import statistics

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_allreduce_tiny(hvdtrain, tmp_path):
    out = tmp_path / "ar"
    r = hvdtrain("bench", "allreduce", "-np", "2", "--tiny", "--out", out, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "busbw = algbw x 2(n-1)/n" in r.stdout and "hvd-mpi us" in r.stdout and "torch-gloo bus" in r.stdout
    assert (out / "allreduce.png").read_bytes()[:8] == PNG
    result = json.loads((out / "allreduce.json").read_text())
    assert set(result) == {"meta", "rows", "summary"}
    meta, rows, summary = result["meta"], result["rows"], result["summary"]
    assert meta["np"] == 2 and meta["sizes"] == [4, 1024, 65536] and meta["tiny"] is True
    impls = {"memcpy", "mpi4py", "horovod_mpi", "horovod_mpi_oop", "torch_gloo", "horovod_gloo", "horovod_gloo_oop"}
    assert {(r["impl"], r["bytes"]) for r in rows} == {(i, s) for i in impls for s in meta["sizes"]}
    for row in rows:
        assert row["time_s"] > 0 and row["algbw_GBps"] > 0 and row["iters"] >= 1
        assert row["algbw_GBps"] == pytest.approx(row["bytes"] / row["time_s"] / 1e9)
        if row["impl"] != "memcpy":
            assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * 2 * (2 - 1) / 2)

    def busbw(impl):
        return next(r["busbw_GBps"] for r in rows if r["impl"] == impl and r["bytes"] == summary["reference_bytes"])

    assert summary["horovod_mpi_over_mpi4py_busbw"] == pytest.approx(busbw("horovod_mpi") / busbw("mpi4py"))
    assert summary["horovod_gloo_over_torch_gloo_busbw"] == pytest.approx(busbw("horovod_gloo") / busbw("torch_gloo"))
    # Pairs of back-to-back blocks (mpi4py, Horovod in place) at the reference size decide the verdict.
    assert meta["repeats"] == 2 and meta["pairs"] == 2 and all(len(r["block_times_s"]) == 2 for r in rows)
    assert all(r["time_s"] == pytest.approx(statistics.median(r["block_times_s"])) for r in rows)
    paired = summary["paired_at"][str(summary["reference_bytes"])]
    assert paired["pairs"] == 2 and paired["range"][0] <= paired["median"] <= paired["range"][1]
    assert summary["target_met"] == (paired["median"] >= 0.9)
    assert summary["memcpy_peak_GBps"] > 0
    assert set(summary["ring_model"]) == impls - {"memcpy"}
    assert summary["horovod_mpi_oop_over_mpi4py_busbw"] == pytest.approx(busbw("horovod_mpi_oop") / busbw("mpi4py"))
    assert all((out / "logs" / c / "rank.1.log").exists() for c in ("mpi", "gloo"))


def test_bench_train_tiny(hvdtrain, tmp_path):
    out = tmp_path / "tr"
    r = hvdtrain("bench", "train", "--max-np", "2", "--tiny", "--out", out, timeout=420)
    assert r.returncode == 0, r.stdout + r.stderr
    for heading in (
        "samples/s per rank",
        "weak-scaling eff.",
        "trainer/horovod",
        "ablations",
        "ZeRO-1",
        "trainer/nocomm",
        "pipeline across ranks",
    ):
        assert heading in r.stdout
    assert (out / "train.png").read_bytes()[:8] == PNG
    result = json.loads((out / "train.json").read_text())
    assert set(result) == {"meta", "rows", "scaling", "side_by_side", "ablations", "pipeline"}
    assert result["meta"]["controller"] == "mpi" and result["meta"]["np_list"] == [1, 2]
    assert all(w["threads_per_rank"] == 1 for w in result["meta"]["workers"])
    rows = result["rows"]
    configs = {"horovod", "horovod+fp16", "horovod-nofusion", "trainer", "ddp", "sharded", "mpi4py", "nocomm"}
    configs |= {f"pipeline-{s}-m{m}" for s in ("1f1b", "gpipe") for m in (1, 4)}  # --tiny: M = 1, 4
    assert {(r["config"], r["model"], r["np"]) for r in rows} == {
        (c, m, n) for c in configs for m in ("deep_mlp", "wide_mlp") for n in (1, 2)
    }
    for row in rows:
        assert row["per_rank_mean"] > 0 and row["iterations"] == 3 and len(row["rank_means"]) == row["np"]
        replicas = 1 if row["arm"] == "pipeline" else row["np"]  # a pipeline's ranks are one replica
        assert row["total"] == pytest.approx(replicas * row["per_rank_mean"])
        assert row["total_conf"] == pytest.approx(replicas * row["per_rank_conf"])
    assert len(result["pipeline"]) == 16
    total_of = {(r["config"], r["model"], r["np"]): r["total"] for r in rows}
    for p in result["pipeline"]:
        one = total_of[(f"pipeline-{p['schedule']}-m1", p["model"], 1)]
        assert p["speedup"] == pytest.approx(p["total"] / one)
        n, m = p["stages"], p["micro_batches"]
        assert p["bubble"] == pytest.approx((n - 1) / (m + n - 1))
        # measured by what autograd saved: 1F1B holds P - s micro-batches at most, GPipe all M
        held = [min(n - s, m) for s in range(n)] if p["schedule"] == "1f1b" else [m] * n
        assert p["micro_in_flight_peak"] == held and all(b > 0 for b in p["activation_peak_bytes"])
    trainer_rows = [r for r in rows if r["arm"] == "trainer"]
    assert all(r["method"] == "per-step stamps" for r in trainer_rows)
    total = {(r["config"], r["model"], r["np"]): r["total"] for r in rows}
    for s in result["scaling"]:
        assert s["efficiency"] == pytest.approx(s["total"] / (s["np"] * total[(s["config"], s["model"], 1)]))
        assert s["efficiency"] > 0
    assert len(result["side_by_side"]) == 4
    for s in result["side_by_side"]:
        key = (s["model"], s["np"])
        t, h, d = (total[(c, *key)] for c in ("trainer", "horovod", "ddp"))
        assert s["trainer_over_horovod"] == pytest.approx(t / h)
        assert s["trainer_over_ddp"] == pytest.approx(t / d)
        m, c = total[("mpi4py", *key)], total[("nocomm", *key)]
        assert s["trainer_over_mpi4py"] == pytest.approx(t / m) and s["trainer_over_nocomm"] == pytest.approx(t / c)
        assert s["trainer_over_mpi4py_target_met"] == (t / m >= 0.9) and s["trainer_over_ddp_target_met"] == (
            t / d >= 1.3
        )
        assert s["sharded_over_horovod"] == pytest.approx(total[("sharded", *key)] / h)
        # SGD's momentum: the sharded loop keeps 1/np of it per rank (plus < np padding elements per bucket).
        assert s["sharded_state_bytes"] * s["np"] >= s["horovod_state_bytes"]
        assert s["sharded_state_bytes"] * s["np"] < s["horovod_state_bytes"] + 4 * s["np"] * 8
    for a in result["ablations"]:
        key = (a["model"], a["np"])
        assert a["no_fusion_over_base"] == pytest.approx(total[("horovod-nofusion", *key)] / total[("horovod", *key)])
        assert a["fp16_over_base"] == pytest.approx(total[("horovod+fp16", *key)] / total[("horovod", *key)])
    assert not (out / "trainer-runs").exists()


def test_bench_updates_tiny(hvdtrain, tmp_path):
    """Every mode with and without a straggler, for real: the curves, the counts and the table."""
    out = tmp_path / "u"
    r = hvdtrain("bench", "updates", "--tiny", "--out", out, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "update rules on the digits CNN" in r.stdout and "throughput kept" in r.stdout
    assert (out / "updates.png").read_bytes()[:8] == PNG
    result = json.loads((out / "updates.json").read_text())
    assert {(row["mode"], row["straggler"]) for row in result["rows"]} == {
        (m, f) for m in ("sync", "local-sgd", "async") for f in (1.0, 2.0)
    }
    for run in result["runs"]:
        assert [p["epoch"] for p in run["curve"]] == [1, 2]
        assert run["curve"][0]["seconds"] < run["curve"][1]["seconds"] and run["samples_per_s_per_worker"] > 0
        assert run["workers"] == 2 and run["final_accuracy"] == run["curve"][-1]["test_accuracy"]
        if run["mode"] == "async":
            assert run["messages_per_step"] == 2.0  # one push and one reply per server (1) per step
        elif run["mode"] == "local-sgd":
            assert run["collectives_per_step"] == pytest.approx(1 / 4, abs=0.02)  # one average every H = 4 steps
    assert not (out / "runs").exists()  # the runs' directories are scratch


def test_bench_launch_tiny(hvdtrain, tmp_path):
    """Every launcher arm once, and the built-in job's start-up by phase through the default launcher and
    horovodrun: times positive, ratios from the measured medians, nothing left in the scratch directories."""
    out = tmp_path / "bl"
    r = hvdtrain("bench", "launch", "--tiny", "--out", out, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "x mpirun" in r.stdout and "to 1st step" in r.stdout
    result = json.loads((out / "launch.json").read_text())
    jobs = result["job"]
    assert sorted(jobs) == sorted(["mpirun", "hvdtrain", "hvdtrain-horovodrun", "horovodrun"])  # JSON: sorted keys
    assert result["meta"]["np"] == 2
    for row in jobs.values():
        assert row["n"] == 1 and row["median"] == row["min"] == row["max"] > 0
        assert row["vs_mpirun"] == pytest.approx(row["median"] / jobs["mpirun"]["median"])
    phases = ["launch", "imports", "hvd.init", "data", "model", "broadcast", "first step"]
    for arm in ("hvdtrain", "hvdtrain-horovodrun"):
        t = result["train"][arm]
        assert sorted(t["phases"]) == sorted(phases) and all(v >= 0 for v in t["phases"].values())
        assert 0 < sum(t["phases"].values()) < t["wall"]["median"]
    assert [p.name for p in out.iterdir()] == ["launch.json"]


def test_bench_pytest_tiny(hvdtrain, tmp_path):
    """The plugin's arm and plain mpirun's over the same file of trivial 2-rank tests: both ran (each a real pytest
    command that passed), the ratio is the medians', and nothing is left of the scratch file."""
    out = tmp_path / "bp"
    r = hvdtrain("bench", "pytest", "--tiny", "--out", out, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "pytest.json").read_text())
    arms = result["bodies"]["world"]
    assert sorted(arms) == ["mpirun", "plugin"] and result["meta"]["tests"] == 5
    for row in arms.values():
        assert row["n"] == 1 and row["median"] > 0
        assert row["vs_mpirun"] == pytest.approx(row["median"] / arms["mpirun"]["median"])
    assert [p.name for p in out.iterdir()] == ["pytest.json"]
