"""RunDir owns every name of a run directory; these are the names users, scripts and docs rely on."""

import ast
from pathlib import Path

import hvdtrain
from hvdtrain.rundir import RankLogs, RunDir, checkpoint_step


def test_names():
    run = RunDir("runs/a b")
    base = Path("runs/a b")
    assert (run.config, run.metrics, run.result, run.job_script) == (
        base / "config.json",
        base / "metrics.jsonl",
        base / "result.json",
        base / "job.sbatch",
    )
    assert run.tensorboard == base / "tensorboard" and run.checkpoints == base / "checkpoints"
    assert run.checkpoint(42) == base / "checkpoints" / "step-00000042.pt"
    assert run.logs.log(3) == base / "logs" / "rank.3.log" and run.logs.exit(3) == base / "logs" / "rank.3.exit"
    assert run.logs.host(3) == base / "logs" / "rank.3.host"
    assert run.logs.task("2").log(0) == base / "logs" / "task-2" / "rank.0.log" and run.logs.task(None) == run.logs
    assert run.slurm_output("77") == base / "slurm-77.out"
    assert run.slurm_output("77", "2") == base / "slurm-77_2.out"


def test_checkpoint_step_and_exit_records(tmp_path):
    assert checkpoint_step(RunDir(tmp_path).checkpoint(7)) == 7
    assert checkpoint_step(".step-00000007.pt.x.tmp") is None and checkpoint_step("step-7.pt") is None
    logs = RankLogs(tmp_path)
    for rank in (0, 11):
        logs.exit(rank).write_text("0\n")
    (tmp_path / "rank.x.exit").write_text("1\n")
    logs.host(4).write_text("node2\n")
    (tmp_path / ".rank.5.host.tmp").write_text("half")  # an atomic write in progress is not a record
    assert sorted(rank for rank, _ in logs.exit_records()) == [0, 11]
    assert [rank for rank, _ in logs.host_records()] == [4]


# --- no run-directory name outside rundir.py ---------------------------------------------------------

PACKAGE = Path(hvdtrain.__file__).parent
SENTINEL = 987654321  # stands for a rank, step, slot, job or task in a templated name
# (file, string) pairs that spell a run-directory name for another reason.
NOT_NAMES = {
    ("report.py", "interrupted"): "the Trainer's event and result key, not the file",
    ("train/trainer.py", "interrupted"): "the event and result key it records",
    ("slurm/__init__.py", "logs"): "__all__: the function slurm.logs",
}


def run_dir_names() -> tuple[set[str], set[str]]:
    """(every file and folder name RunDir and RankLogs give, the templated ones as f-string shapes with {} for
    each field: rank.{}.log, step-{}.pt, ...)."""
    run = RunDir("R")
    logs, n = run.logs, SENTINEL
    paths = [v for v in vars(run).values() if isinstance(v, Path)] + [logs.path]
    templated = [run.checkpoint(n), run.ps_log(n), run.slurm_output(str(n)), run.slurm_output(str(n), str(n)),
                 logs.log(n), logs.exit(n), logs.host(n), logs.task(str(n)).path, logs.openmpi_output(n),
                 logs.worker_log("HOST", n), logs.worker_exit("HOST", n), logs.worker_host("HOST", n)]  # fmt: skip
    names = {part for p in paths for part in p.relative_to(run.path).parts}
    shapes = {
        part.replace(str(n), "{}").replace("HOST", "{}")
        for p in templated
        for part in p.relative_to(run.path).parts
        if str(n) in part or "HOST" in part
    }
    return names | {p.relative_to(run.path).parts[0] for p in templated}, shapes


def _strings(tree: ast.AST):
    """(line, text) of every string constant, and of every f-string as its shape ({} for each field)."""
    inside = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside:
            yield node.lineno, node.value


def test_no_run_directory_name_is_spelled_outside_rundir():
    # Every name in a run directory is RunDir's (or RankLogs'): a string elsewhere that is one of them, or a
    # path ending or starting with one ("logs/x", "x/result.json"), or an f-string of a templated one
    # (f"rank.{r}.log"), is a second owner that a rename would miss. Text (help, messages: with spaces) may
    # name them.
    names, shapes = run_dir_names()
    assert {"config.json", "logs", "result.json", "timeline.steps.csv", "report.png"} <= names
    assert {"rank.{}.log", "step-{}.pt", "worker.{}.{}.exit"} <= shapes
    leaks = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "rundir.py":
            continue
        for line, text in _strings(ast.parse(path.read_text())):
            parts = text.split("/")
            if any(c.isspace() for c in text):
                continue
            if (parts[0] in names or parts[-1] in names or parts[-1] in shapes) and (rel, text) not in NOT_NAMES:
                leaks.append(f"hvdtrain/{rel}:{line}: {text!r}")
    assert leaks == [], "run-directory names outside hvdtrain/rundir.py (take them from RunDir):\n" + "\n".join(leaks)
