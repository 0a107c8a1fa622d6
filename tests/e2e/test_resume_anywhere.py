"""A checkpoint resumes on any world size and strategy, and the interrupted epoch's samples are each trained on once.

Every job records each rank's sample indices of every step (elastichooks.RecordSamples). The steps of both jobs,
in order, must be consecutive chunks of the epoch's order (a pure function of seed and epoch), each chunk one
step's global batch: what the first job did not reach is dealt over the second job's world, nothing twice, nothing
skipped (but DistributedSampler's padding of the epoch's last, short round, which repeats its first samples).
"""

import collections
import json
import os
import subprocess
from pathlib import Path

import pytest

from hvdtrain.parallel.shards import epoch_order
from hvdtrain.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
HVDTRAIN = [str(REPO / ".venv" / "bin" / "python"), "-m", "hvdtrain"]
COMMON = ["--model", "mlp", "--deterministic", "--epochs", "2", "--log-every", "5", "--hooks",
          "elastichooks:RecordSamples", "--env", "HVDTRAIN_TEST_RECORD"]  # fmt: skip


@pytest.fixture
def train(child_env, tmp_path):
    """`hvdtrain train` with the sample recorder, its records in tmp_path/record-<name>."""

    def call(name: str, *args) -> subprocess.CompletedProcess:
        env = {**child_env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
               "HVDTRAIN_TEST_RECORD": str(tmp_path / f"record-{name}")}  # fmt: skip
        proc = subprocess.run(
            [*HVDTRAIN, "train", *COMMON, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    return call


def steps_of(folder: Path) -> dict[int, dict]:
    """{step: {"epoch", "size", "indices"}}: each step's global batch, every data-parallel rank's indices together
    (the stages of a pipeline's replica read the same samples: one of their records counts)."""
    rows: dict[tuple[int, int], dict] = {}
    for path in folder.glob("*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            same = rows.setdefault((row["step"], row["rank"]), row)
            assert [same[k] for k in ("epoch", "size", "indices")] == [row[k] for k in ("epoch", "size", "indices")]
    steps: dict[int, dict] = {}
    for (number, _rank), row in sorted(rows.items()):
        step = steps.setdefault(number, {"epoch": row["epoch"], "size": row["size"], "indices": [], "ranks": 0})
        assert (step["epoch"], step["size"]) == (row["epoch"], row["size"])
        step["indices"] += row["indices"]
        step["ranks"] += 1
    assert all(s["ranks"] == s["size"] for s in steps.values()), "a rank's record of a step is missing"
    return steps


def check_each_sample_once(jobs: list[dict[int, dict]], samples: int, seed: int = 0) -> None:
    """The steps of the jobs, one after the other, walk each epoch's order in consecutive chunks; each epoch's
    samples are all trained on, and only its last round's padding repeats any."""
    steps = {}
    for job in jobs:
        assert not set(job) & set(steps), "a step was taken by both jobs"
        steps.update(job)
    assert sorted(steps) == list(range(len(steps))), "a step is missing"
    position = collections.Counter()
    for step in sorted(steps):
        s = steps[step]
        order = epoch_order(samples, seed, s["epoch"])
        start = position[s["epoch"]]
        padded = order + order[: len(s["indices"])]  # the last round's padding repeats the epoch's first samples
        assert sorted(s["indices"]) == sorted(padded[start : start + len(s["indices"])]), f"step {step + 1}"
        position[s["epoch"]] = start + len(s["indices"])
    for epoch, done in position.items():
        assert samples <= done < samples + max(s["size"] for s in steps.values()), f"epoch {epoch}: {done} samples"


def train_samples() -> int:
    from hvdtrain.train import datasets

    return len(datasets.digits().train)


# (first job, then the resumed one): each a rank count and its strategy's arguments. The interruption is mid-epoch
# (--max-steps 9 of the first job's ~12-45 steps per epoch), so the resumed job deals the epoch's rest over its world.
MATRIX = {
    "data 4->2": (["-np", 4, "--batch-size", 16], ["-np", 2, "--batch-size", 24]),
    "data 2->3": (["-np", 2], ["-np", 3]),
    "data 3->1": (["-np", 3], ["-np", 1, "--batch-size", 48]),
    "sharded 4->2": (["-np", 4, "--shard-optimizer", "--optimizer", "adam"],
                     ["-np", 2, "--shard-optimizer", "--optimizer", "adam"]),
    "sharded 2->3": (["-np", 2, "--shard-optimizer"], ["-np", 3, "--shard-optimizer"]),
    "sharded 3->1": (["-np", 3, "--shard-optimizer"], ["-np", 1]),
    "local-sgd 4->2": (["-np", 4, "--update", "local-sgd", "--average-every", 4],
                       ["-np", 2, "--update", "local-sgd", "--average-every", 4]),
    "local-sgd 2->3": (["-np", 2, "--update", "local-sgd", "--average-every", 4],
                       ["-np", 3, "--update", "local-sgd", "--average-every", 2]),
    "local-sgd 3->1": (["-np", 3, "--update", "local-sgd", "--average-every", 4], ["-np", 1]),
    "pipeline 4->2": (["-np", 4, "--strategy", "pipeline", "--stages", 2],
                      ["-np", 2, "--strategy", "pipeline", "--stages", 2]),
    "pipeline 2->3": (["-np", 2, "--strategy", "pipeline", "--stages", 2],
                      ["-np", 3, "--strategy", "pipeline", "--stages", 3]),
    "pipeline 3->1": (["-np", 3, "--strategy", "pipeline", "--stages", 3], ["-np", 1]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MATRIX))
def test_a_resume_on_another_world_trains_on_each_sample_of_the_epoch_once(train, tmp_path, case):
    first, second = MATRIX[case]
    run_dir = tmp_path / "run"
    train("first", *first, "--max-steps", 9, "--run-dir", run_dir)
    # A sharded job's checkpoint is the directory of its ranks' files; the others' one file.
    name = "step-00000009" if "--shard-optimizer" in first else "step-00000009.pt"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [name]
    resumed = train("second", *second, "--run-dir", run_dir, "--resume")
    ranks = (int(first[1]), int(second[1]))
    assert f"resumed from {run_dir}/checkpoints/{name} at step 9 (epoch 1, " in resumed.stdout
    if ranks[0] != ranks[1]:
        assert "step 9 of a " in resumed.stdout and f" resumed on {ranks[1]} rank" in resumed.stdout
    check_each_sample_once([steps_of(tmp_path / "record-first"), steps_of(tmp_path / "record-second")],
                           train_samples())  # fmt: skip
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs_done"] == 2 and result["test_accuracy"] > 0.5, result


@pytest.mark.parametrize("update", [[], ["--shard-optimizer"]], ids=["sync", "sharded"])
def test_4x16_resumed_on_2x32_continues_bit_for_bit_as_the_2_rank_run(train, tmp_path, update):
    """The same global batch (64) on 4 ranks of 16 and 2 of 32. A 2x32 run straight through; its checkpoint at
    step 10 passed through a 4x16 job (loaded, resharded over 4 ranks, written again by them: a checkpoint of a
    4-rank job, its learning rate 4-rank's); that one resumed on 2x32 ends bitwise equal to the straight run.
    So a 4-rank checkpoint on 2 ranks continues as the 2-rank run would from the same state: the same samples in
    each step and rank, the 2-rank learning rate, the same optimizer state."""
    two = ["-np", 2, "--batch-size", 32, "--checkpoint-every", 10, "--keep-checkpoints", 10, *update]
    train("straight", *two, "--run-dir", tmp_path / "straight")
    expected = json.loads((tmp_path / "straight" / "result.json").read_text())
    name = "step-00000010" if update else "step-00000010.pt"  # sharded: the directory of the ranks' files
    at_10 = tmp_path / "straight" / "checkpoints" / name

    four = tmp_path / "four"  # a 4x16 job from that state, stopped where it started: it writes its own checkpoint
    through = train(
        "four", "-np", 4, "--batch-size", 16, "--max-steps", 10, "--run-dir", four, "--resume-from", at_10, *update
    )
    assert "step 10 of a 2-rank job resumed on 4 ranks; batch 32 -> 16 per rank; lr 0.1 -> 0.2" in through.stdout
    written = checkpoint.list_checkpoints(four / "checkpoints")[-1]
    assert written.name == name and checkpoint.load(written)["layout"]["ranks"] == 4
    if update:  # each of the 4 ranks wrote its own part of the optimizer state
        assert sorted(p.name for p in written.iterdir() if p.name.startswith("optimizer."))[-1] == "optimizer.3.pt"

    resumed = train("resumed", *two, "--run-dir", tmp_path / "resumed", "--resume-from", written)
    assert "step 10 of a 4-rank job resumed on 2 ranks; batch 16 -> 32 per rank; lr 0.2 -> 0.1" in resumed.stdout
    got = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert got["steps"] == expected["steps"] and got["params_sha256"] == expected["params_sha256"]
    assert got["test_loss"] == expected["test_loss"]
    # Step for step, each rank read what it read in the straight run.
    straight, after = steps_of(tmp_path / "record-straight"), steps_of(tmp_path / "record-resumed")
    assert all(sorted(after[s]["indices"]) == sorted(straight[s]["indices"]) for s in after) and min(after) == 10
