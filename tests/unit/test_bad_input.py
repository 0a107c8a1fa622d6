"""Everything a user can get wrong, through the real command line (`python -m hvdtrain` in a fresh process):
one line `hvdtrain: error: ...` on stderr naming the problem, exit status 2, no traceback, nothing launched and
nothing written. One row per case: the next class of bad input is one more row.

Each row runs in an empty directory holding the files of FILES (made by the test); "nothing written" is that
directory's tree (names, sizes, times) unchanged afterwards, and no process under the test's process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

DIGITS_TRAIN = 1437  # digits' training split: 1797 less 20% held out


def _npz(**arrays):
    def make(path):
        np.savez(path, **arrays)

    return make


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _text(text: str):
    return lambda path: path.write_text(text)


x64, x_img = np.zeros((40, 64), np.float32), np.zeros((40, 1, 8, 8), np.float32)
labels = np.arange(40) % 10

FILES = {
    "binary.yaml": _bytes(bytes(range(256)) * 4),
    "list.yaml": _text("- epochs\n- 3\n"),
    "epochs-list.yaml": _text("epochs: [1, 2]\n"),
    "lr-word.yaml": _text("lr: fast\n"),
    "epochs-half.yaml": _text("epochs: 1.5\n"),
    "gloo-number.yaml": _text("gloo: 3\n"),
    "strategy.yaml": _text("strategy: pipe\n"),
    "broken.yaml": _text("epochs: [1\n"),
    "no-arrays.npz": _npz(a=np.zeros(3)),
    "mismatch.npz": _npz(x=x_img, y=labels[:39]),
    "pickled.npz": _npz(x=np.array([object()] * 40, dtype=object), y=labels),
    "negative.npz": _npz(x=x_img, y=labels - 1),
    "float-labels.npz": _npz(x=x_img, y=labels + 0.5),
    "one-class.npz": _npz(x=x_img, y=np.zeros(40, np.int64)),
    "test-half.npz": _npz(x=x_img, y=labels, x_test=x_img[:5]),
    "test-shape.npz": _npz(x=x_img, y=labels, x_test=x64[:5], y_test=labels[:5]),
    "flat.npz": _npz(x=x64, y=labels),
    "not-a-zip.npz": _text("x,y\n1,2\n"),
    "a-file": _text(""),
    "a-dir/.keep": _text(""),
    "run/metrics.jsonl": _text(
        '{"time": 1.0, "step": 1, "train_loss": 1.0}\n{"time": 2.0, "step": 2, "test_accuracy": 0.5}\n'
    ),
    "userhooks.py": _text(
        "from hvdtrain.train.hooks import Hook\n"
        "print('a side effect of importing userhooks')\n"
        "class Good(Hook):\n    pass\n"
        "class NotAHook:\n    pass\n"
        "class NeedsArgs(Hook):\n    def __init__(self, every):\n        self.every = every\n"
        "def returns_int():\n    return 3\n"
        "number = 3\n"
    ),
    "raisinghooks.py": _text("import json\n\n\ndef setup():\n    raise RuntimeError('no GPU here')\n\n\nsetup()\n"),
    "ipv6-hostfile": _text("fe80::1 slots=2\n"),
}

# Inside an allocation whose host list does not parse.
BAD_NODELIST = ["@SLURM_JOB_ID=1", "@SLURM_NTASKS=2", "@SLURM_JOB_NODELIST=n[3-1]", "@SLURM_TASKS_PER_NODE=2"]

CASES = [
    # config files: not text, not a mapping, wrong types
    (["train", "--config", "binary.yaml"], "binary.yaml is not a text file"),
    (["train", "--config", "list.yaml"], "list.yaml must be a mapping of option: value"),
    (["train", "--config", "epochs-list.yaml"], "--epochs takes a single value, not [1, 2]"),
    (["train", "--config", "lr-word.yaml"], "--lr: 'fast' is not a valid float"),
    (["train", "--config", "epochs-half.yaml"], "--epochs takes a whole number, not 1.5"),
    (["train", "--config", "gloo-number.yaml"], "--gloo takes true or false, not 3"),
    (["train", "--config", "strategy.yaml"], "--strategy: 'pipe' is not one of data, model, hybrid"),
    (["train", "--config", "broken.yaml"], "broken.yaml:2: not valid YAML"),
    (["train", "--config", "missing.yaml"], "no such file 'missing.yaml'"),
    # --data FILE.npz, checked from its headers before launch
    (["train", "--data", "no-arrays.npz"], "no array 'x' in the file (it has ['a'])"),
    (["train", "--data", "mismatch.npz"], "'y' must be one integer label per row of its inputs (40 rows"),
    (["train", "--data", "pickled.npz"], "array 'x' holds Python objects"),
    (["train", "--data", "negative.npz"], "'y' has a negative label (-1)"),
    (["train", "--data", "float-labels.npz"], "dtype float64"),
    (["train", "--data", "one-class.npz"], "a single class"),
    (["train", "--data", "test-half.npz"], "give both x_test and y_test, or neither"),
    (["train", "--data", "test-shape.npz"], "'x_test' must hold samples shaped like those of 'x'"),
    (["train", "--data", "flat.npz"], "--model cnn needs image inputs (channels, height, width)"),
    (["train", "--data", "not-a-zip.npz"], "not an .npz archive"),
    (["train", "--data", "nope.npz"], "no such file 'nope.npz'"),
    # run and log directories that are files, or cannot be made
    (["train", "--run-dir", "a-file"], "a-file: exists and is not a directory"),
    (["train", "--run-dir", "a-file/r"], "a-file is a file, not a directory"),
    (["train", "--run-dir", "/proc/hvdtrain-r"], "cannot create directories in /proc"),
    (["train", "--output-dir", "a-file"], "--output-dir"),
    (["submit", "--run-dir", "a-file/r", "--", "true"], "a-file is a file, not a directory"),
    # every other output path, through the same check (hvdtrain.files.check_output_path)
    (["run", "--output-dir", "a-file", "--", "true"], "--output-dir a-file: exists and is not a directory"),
    (["train", "--hang-timeout", "1e400"], "--hang-timeout 1e400: give a number of seconds"),
    (["run", "--output-dir", "a-file/logs", "--dry-run", "--", "true"], "a-file is a file, not a directory"),
    (["run", "--timeline", "--output-dir", "a-file", "--", "true"], "--output-dir a-file: exists and is not a"),
    (["report", "run", "--plot", "a-dir"], "--plot a-dir: is a directory; give the path of a file (e.g. a-dir/report"),
    (["report", "run", "--plot", "/"], "--plot /: is a directory"),
    # Found by tests/unit/test_contract.py: matplotlib's ValueError for a suffix it has no writer for; a control
    # character of an argument (here the record separator) that split the error line in two.
    (["report", "run", "--plot", "curves.unset"], "'curves.unset' does not end in a picture format's suffix; use .png"),
    (["bench", "train", "--dry-run", "--max-np", "100000000000"], "the sweep runs a job for every np = 1..N"),
    (["bench", "updates", "--dry-run", "--rounds", "9223372036854775808"], "--rounds 9223372036854775808: must be at"),
    (["run", "--dry-run", "\x1e"], "command not found: '\\x1e'; check its spelling or give its full path"),
    (["report", "run", "--plot", "a-file/p.png"], "a-file is a file, not a directory"),
    (["report", "run", "--plot", "/proc/hvdtrain.png"], "--plot /proc/hvdtrain.png: cannot create files in /proc"),
    (["bench", "train", "--output-dir", "a-file", "--dry-run"], "--output-dir a-file: exists and is not a directory"),
    (["bench", "updates", "--out", "a-file/o", "--dry-run"], "--out a-file/o: "),
    # --hooks module:Name, loaded before launch as the ranks will (in a child process): each refusal one line
    (["train", "--hooks", "nohooks:Count"], "--hooks nohooks:Count: no module 'nohooks' in "),
    (["train", "--hooks", "userhooks:Nope", "--dry-run"], "userhooks.py has no 'Nope'; its hooks: Good, NeedsArgs"),
    (["train", "--hooks", "userhooks:NotAHook"], "NotAHook is a class but not a subclass of hvdtrain.train.hooks.Hook"),
    (["train", "--hooks", "userhooks:number"], "number is an int, not a Hook subclass or a function returning a Hook"),
    (["train", "--hooks", "userhooks:NeedsArgs", "--dry-run"], "NeedsArgs() needs arguments (missing a required"),
    (["train", "--hooks", "userhooks:Good,userhooks:returns_int"], "returns_int() returned an int, not a hvdtrain"),
    # numbers: finite, in range, a batch that fits a rank's share
    (["train", "--lr", "inf"], "--lr: inf is not a finite number"),
    (["train", "--lr", "nan"], "--lr: nan is not a finite number"),
    (["train", "--momentum", "1.5"], "--momentum: 1.5 must be in [0, 1)"),
    (["train", "--weight-decay", "-1"], "--weight-decay: -1.0 must not be negative"),
    (["train", "-np", "2", "--batch-size", "5000"], f"a rank's share of the training set (719 of {DIGITS_TRAIN}"),
    (["train", "--data", "synthetic", "--synthetic-samples", "64", "--batch-size", "65"], "(64 of 64 samples"),
    # update rules: their options, and what does not combine with them
    (["train", "--update", "local-sgd", "--average-every", "0"], "--average-every: 0 is too small (at least 1"),
    (["train", "--average-every", "4"], "--average-every: applies to --update local-sgd, not sync"),
    (["train", "--grad-groups", "-1"], "--grad-groups: -1 is too small (at least 0"),
    (["train", "--update", "local-sgd", "--grad-groups", "1"], "--grad-groups: applies to the synchronous allreduce"),
    (["train", "--shard-optimizer", "--grad-groups", "1"], "--grad-groups: applies to the synchronous allreduce"),
    (["train", "-np", "2", "--strategy", "pipeline", "--stages", "2", "--grad-groups", "2"], "--grad-groups: applies"),
    (["train", "--local-sgd-warmup", "10"], "--local-sgd-warmup: applies to --update local-sgd, not sync"),
    (["train", "--update", "local-sgd", "--local-sgd-warmup", "-1"], "--local-sgd-warmup: -1 is too small"),
    (["train", "--update", "local-sgd", "--shard-optimizer"], "--shard-optimizer: does not combine with --update"),
    (["train", "--update", "local-sgd", "--reduce-op", "adasum"], "--reduce-op: does not combine with --update"),
    (["train", "--update", "local-sgd", "--compression", "fp16"], "--compression: does not combine with --update"),
    (["train", "--update", "fast"], "--update: 'fast' is not one of sync, local-sgd, async"),
    (["train", "--ps-ranks", "1"], "--ps-ranks: applies to --update async, not sync"),
    (["train", "--update", "local-sgd", "--max-staleness", "2"], "--max-staleness: applies to --update async"),
    (["train", "--update", "async", "--max-staleness", "-1"], "--max-staleness: -1 is too small (at least 0)"),
    (["train", "--update", "async", "-np", "2", "--ps-ranks", "2"], "--ps-ranks 2 leaves no worker among 2 ranks"),
    (["train", "--update", "async", "-np", "3", "--gloo"], "--update async needs MPI"),
    (["train", "--update", "async", "--strategy", "hybrid"], "--strategy: hybrid does not combine with --update"),
    (["train", "--update", "async", "-np", "2", "--elastic"], "--update async cannot be elastic"),
    (["train", "-np", "2", "--elastic", "--grad-groups", "1"], "--grad-groups cannot be elastic"),
    # bench launch
    (["bench", "launch", "--arms", "mpirun,srun"], "--arms': unknown 'srun'; choose from mpirun"),
    (["bench", "launch", "--rounds", "0"], "--rounds 0: must be at least 1"),
    (["bench", "launch", "--out", "a-file"], "--out a-file: exists and is not a directory"),
    # hosts hvdtrain cannot pass on
    (["run", "-H", "[::1]:2", "-np", "2", "--", "true"], "bad host '[::1]:2': IPv6 addresses cannot be passed on"),
    (["run", "-H", "fe80::1", "--", "true"], "bad host 'fe80::1': IPv6"),
    (["train", "--hostfile", "ipv6-hostfile"], "IPv6 addresses cannot be passed on"),
    # Slurm values sbatch would refuse or misread
    (["submit", "--time", "99:99:99", "--", "true"], "--time '99:99:99': not a Slurm time"),
    (["submit", "--time", "1-24:00:00", "--", "true"], "not a Slurm time"),
    (["submit", "--array", "5-1", "--", "true"], "--array '5-1': not a Slurm array"),
    (["submit", "--array", "0-9:0", "--", "true"], "not a Slurm array"),
    (["submit", "--array", "0-9%0", "--", "true"], "not a Slurm array"),
    (["submit", "--mem", "12XB", "--", "true"], "--mem '12XB': not a memory size"),
    (["submit", "--signal", "FOO", "--", "true"], "--signal 'FOO'"),
    (["submit", "--mpi-plugin", "PMI 2", "--", "true"], "--mpi-plugin 'PMI 2': not an MPI plugin's name"),
    # srun's MPI plugin, and the allocation's hosts as Slurm names them
    (["run", "--mpi-plugin", "pmi2", "-np", "2", "--", "true"], "--mpi-plugin applies to srun only"),
    (["run", "--launcher", "mpirun", "--", "true", *BAD_NODELIST], "SLURM_JOB_NODELIST 'n[3-1]' is not a Slurm host"),
    # Horovod's timeline: the window, and what `hvdtrain timeline` reads
    (["train", "--timeline-steps", "10:5"], "--timeline-steps: '10:5' is not a window of steps A:B"),
    (["timeline", "missing"], "missing does not exist: give a run directory or a timeline.json"),
    (["timeline", "."], "has no timeline.json: train with --timeline"),
    (["timeline", "binary.yaml"], "cannot read the timeline binary.yaml"),
    # Slurm's commands without a configuration
    (["status", "1234", "@SLURM_CONF=/nonexistent/slurm.conf"], "SLURM_CONF=/nonexistent/slurm.conf: no such file"),
    (["logs", "1234", "@SLURM_CONF=/nonexistent/slurm.conf"], "SLURM_CONF=/nonexistent/slurm.conf: no such file"),
]


def tree(root):
    """Every path under `root` with its size and modification time."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def hvdtrain(args, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "hvdtrain", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(proc, needle):
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdtrain: error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    for name, make in FILES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        make(folder / name)
    return folder


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_nothing_launched_nothing_written(args, needle, inputs, tmp_path):
    cwd = tmp_path / "cwd"
    shutil.copytree(inputs, cwd)
    env = dict(a[1:].split("=", 1) for a in args if a.startswith("@"))
    args = [a for a in args if not a.startswith("@")]
    if args[0] in ("status", "logs") and shutil.which("scontrol") is None:
        pytest.skip("Slurm's client commands are not installed")
    before = tree(cwd)
    proc = hvdtrain(args, cwd, env)
    assert_one_line_error(proc, needle)
    assert tree(cwd) == before, "something was written"


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["launch", "dry-run"])
def test_hooks_whose_import_raises_show_the_users_traceback_then_one_line(inputs, tmp_path, dry_run):
    """The user's own code raised: its traceback is theirs (their frames only, none of hvdtrain's or of Python's
    import machinery), then the one line; exit status 2, nothing launched, nothing written."""
    cwd = tmp_path / "cwd"
    shutil.copytree(inputs, cwd)
    before = tree(cwd)
    proc = hvdtrain(["train", "--hooks", "userhooks:Good,raisinghooks:setup", *dry_run], cwd)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    *trace, last = proc.stderr.strip().splitlines()
    assert trace == [
        "Traceback (most recent call last):",
        f'  File "{cwd}/raisinghooks.py", line 8, in <module>',
        "    setup()",
        f'  File "{cwd}/raisinghooks.py", line 5, in setup',
        "    raise RuntimeError('no GPU here')",
        "RuntimeError: no GPU here",
    ]
    assert last == (
        "hvdtrain: error: --hooks raisinghooks:setup: importing raisinghooks raised RuntimeError: no GPU here "
        f"({cwd}/raisinghooks.py:5); fix your code there (its traceback is above)"
    )
    assert tree(cwd) == before, "something was written"


@pytest.mark.parametrize(
    "args,size,needle",
    [
        (["train", "--run-dir", "{mnt}/r"], "64k,ro", "--run-dir {mnt}/r: cannot create directories in {mnt} "
         "(Read-only file system); choose another path"),
        (["report", "run", "--plot", "{mnt}/p.png"], "64k,ro", "--plot {mnt}/p.png: cannot create files in {mnt} "),
        (["train", "--run-dir", "{mnt}/r"], "256k", "--run-dir {mnt}/r: only 0 B free on {mnt} (at least 1 MiB "
         "needed); free some space or choose another path"),
        (["report", "run", "--plot", "{mnt}/p.png"], "256k", "--plot {mnt}/p.png: only 0 B free on {mnt}"),
        (["timeline", "{mnt}/timeline.json"], "256k", "--plot {mnt}/timeline.png: only 0 B free on {mnt}"),
        (["bench", "launch", "--out", "{mnt}/b", "--dry-run"], "256k", "--out {mnt}/b: only 0 B free on {mnt}"),
        (["run", "--output-dir", "{mnt}/logs", "--", "true"], "256k", "--output-dir {mnt}/logs: only 0 B free"),
        (["submit", "--run-dir", "{mnt}/s", "--dry-run", "--", "true"], "256k", "--run-dir {mnt}/s: only 0 B free"),
    ],
    ids=["train-ro", "report-ro", "train-full", "report-full", "timeline-full", "bench-full", "run-full", "submit-full"],
)  # fmt: skip
def test_an_output_path_on_a_read_only_or_full_file_system(inputs, tmp_path, args, size, needle):
    """Only trying tells a read-only file system (root may write anywhere its permissions allow); the free space
    is read. A small tmpfs in a private mount namespace (tests/fullfs.py), gone with the command."""
    import fullfs

    cwd, mnt = tmp_path / "cwd", tmp_path / "mnt"
    shutil.copytree(inputs, cwd)
    before = tree(cwd)
    ro = size.endswith(",ro")
    setup = [] if ro else ["sh", "-c", f'touch {mnt}/timeline.json; exec "$@"', "sh"]  # a timeline to read
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    args = [a.format(mnt=mnt) for a in args]
    proc = fullfs.run([*setup, sys.executable, "-m", "hvdtrain", *args], mnt, size=size, leave=None if ro else 0,
                      cwd=cwd, env=env)  # fmt: skip
    assert_one_line_error(proc, needle.format(mnt=mnt))
    assert tree(cwd) == before, "something was written"


def test_far_more_ranks_than_cores_is_a_warning(tmp_path):
    cores = os.cpu_count() or 1
    proc = hvdtrain(["run", "-np", str(4 * cores), "--dry-run", "--", "true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"hvdtrain: warning: -np {4 * cores} puts {4 * cores} ranks on the {cores} cores")
    assert len(proc.stderr.splitlines()) == 1
    quiet = hvdtrain(["run", "-np", str(cores), "--dry-run", "--", "true"], tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""
