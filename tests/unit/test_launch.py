"""The launcher's pure parts: host parsing, spec validation, golden argv for each launcher."""

import shlex

import pytest

from hvdtrain import launch
from hvdtrain.errors import UsageError

NO_SLURM: dict = {}


def spec(command=("python", "-c", "pass"), environ=NO_SLURM, **kw):
    return launch.make_spec(list(command), environ=environ, **kw)


# --- hosts ----------------------------------------------------------------------------------------


def test_parse_hosts():
    assert launch.parse_hosts("a:2,b.example.org:4,c") == [
        launch.Host("a", 2),
        launch.Host("b.example.org", 4),
        launch.Host("c", 1),
    ]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("a:x", "bad slot count"),
        ("a:0", "slots must be at least 1"),
        ("a:-3", "slots must be at least 1"),
        ("a:2,,b:2", "bad host list"),
        ("", "bad host list"),
        ("a b:2", "bad host"),
        ("a:2,a:2", "listed twice"),
    ],
)
def test_parse_hosts_rejects(text, needle):
    with pytest.raises(UsageError, match=needle):
        launch.parse_hosts(text)


def test_parse_hostfile(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\n\nnode1 slots=4  # big one\nnode2 slots=2\nnode3:3\nnode4\n")
    assert launch.parse_hostfile(str(f)) == [
        launch.Host("node1", 4),
        launch.Host("node2", 2),
        launch.Host("node3", 3),
        launch.Host("node4", 1),
    ]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("node1 slots=2\nnode2 slots two\n", ":2: cannot parse 'node2 slots two'"),
        ("node1 slots=2\n\nnode2 slots=0\n", ":3: host 'node2' has 0 slots"),
        ("node1 slots=2\nnode1 slots=2\n", "listed twice"),
        ("# only comments\n\n", "lists no hosts"),
        ("node1 slots=2 extra\n", ":1: cannot parse"),
    ],
)
def test_parse_hostfile_rejects(tmp_path, content, needle):
    f = tmp_path / "hosts"
    f.write_text(content)
    with pytest.raises(UsageError, match=needle):
        launch.parse_hostfile(str(f))


def test_missing_hostfile(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        launch.parse_hostfile(str(tmp_path / "nope"))


# --- spec validation --------------------------------------------------------------------------------


def test_defaults():
    s = spec(np=2)
    assert (s.np, s.hosts, s.launcher, s.controller) == (2, [launch.Host("localhost", 2)], "horovodrun", None)


def test_np_defaults_to_all_slots():
    assert spec(hosts="a:2,b:3").np == 5


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"np": 0}, "at least 1"),
        ({"np": -1}, "at least 1"),
        ({"np": 5, "hosts": "a:2,b:2"}, "more than the 4 slots"),
        ({"np": 2, "gloo": True, "mpi": True}, "exclude each other"),
        ({"np": 2, "launcher": "pbsdsh"}, "unknown launcher 'pbsdsh'"),
        ({"np": 2, "launcher": "srun"}, "needs a Slurm allocation"),
        ({"np": 2, "launcher": "mpirun", "gloo": True}, "--gloo needs horovodrun"),
        ({"np": 2, "threads_per_rank": 0}, "at least 1"),
        ({"np": 2, "env": ["1BAD=x"]}, "bad variable name"),
        ({"np": 2, "env": ["HVDTRAIN_SURELY_UNSET_VAR"]}, "is not set here"),
    ],
)
def test_spec_rejects(kw, needle):
    with pytest.raises(UsageError, match=needle):
        spec(**kw)


def test_missing_script(tmp_path):
    with pytest.raises(UsageError, match="script not found: 'nope.py'"):
        spec(["python", "-u", "nope.py"], np=1)
    (tmp_path / "s.py").write_text("")
    assert spec(["python3", "-u", str(tmp_path / "s.py")], np=1).command[-1].endswith("s.py")
    assert spec(["python", "-m", "some.module"], np=1)  # modules are not files


def test_env_forwarding():
    s = spec(np=1, env=["A=1", "B"], environ={"B": "from caller"})
    assert s.env == {"A": "1", "B": "from caller"}


def test_slurm_allocation_defaults():
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NNODES": "2"}
    s = spec(environ=env)
    assert (s.launcher, s.np) == ("srun", 4)
    assert spec(environ=env, np=2).np == 2
    with pytest.raises(UsageError, match="more than the 4 tasks of Slurm job 7"):
        spec(environ=env, np=8)
    # An explicit other launcher inside the allocation still takes np from it.
    assert spec(environ=env, launcher="mpirun").np == 4


def test_threads_default():
    assert launch.default_threads(2, cores=8) == 4
    assert launch.default_threads(4, cores=2) == 1
    assert launch.ranks_per_host(5, [launch.Host("a", 2), launch.Host("b", 4)]) == [2, 3]


# --- golden argv ----------------------------------------------------------------------------------

HOSTILE = ["python", "-c", "print('a b'); import sys", "arg with space", "it's", 'q"uote', "$(rm -rf /)"]


def test_horovodrun_argv():
    s = spec(HOSTILE, np=3, hosts="n1:2,n2:2", gloo=True, threads_per_rank=2)
    s.python = "/venv/bin/python"
    argv = launch.build_horovodrun_argv(s, "/logs dir", "horovodrun")
    assert argv == [
        "horovodrun", "-np", "3", "-H", "n1:2,n2:2", "--gloo",
        "/venv/bin/python", "-m", "hvdtrain.rank", "--log-dir", "/logs dir", "--", *HOSTILE,
    ]  # fmt: skip
    # The displayed form round-trips through a shell unchanged.
    assert shlex.split(shlex.join(argv)) == argv


def test_mpirun_argv():
    s = spec(HOSTILE, np=4, env=["NCCL_DEBUG=INFO"], threads_per_rank=1)
    s.python = "/venv/bin/python"
    names = launch.rank_env(s, is_root=True).keys()
    argv = launch.build_mpirun_argv(s, "/logs", names, cores=2)
    assert argv == [
        "mpirun", "-np", "4", "-H", "localhost:4", "--bind-to", "none", "--map-by", "slot", "--oversubscribe",
        "-x", "NCCL_DEBUG", "-x", "OMPI_ALLOW_RUN_AS_ROOT", "-x", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
        "-x", "OMP_NUM_THREADS",
        "/venv/bin/python", "-m", "hvdtrain.rank", "--log-dir", "/logs", "--", *HOSTILE,
    ]  # fmt: skip
    assert "--oversubscribe" not in launch.build_mpirun_argv(s, "/logs", names, cores=8)


def test_srun_argv():
    s = spec(HOSTILE, environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
    s.python = "/venv/bin/python"
    assert launch.build_srun_argv(s, "/l") == [
        "srun", "--ntasks=2", "--mpi=pmix", "--kill-on-bad-exit=1", "--export=ALL",
        "/venv/bin/python", "-m", "hvdtrain.rank", "--log-dir", "/l", "--", *HOSTILE,
    ]  # fmt: skip


def test_rank_env():
    s = spec(np=2, threads_per_rank=3, env=["X=1"])
    assert launch.rank_env(s, is_root=False) == {"OMP_NUM_THREADS": "3", "X": "1"}
    assert launch.rank_env(s, is_root=True)["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"


def test_failure_report(tmp_path):
    (tmp_path / "rank.0.exit").write_text("0\n")
    (tmp_path / "rank.1.exit").write_text("1\n")
    (tmp_path / "rank.1.log").write_text("line\n" * 30 + "ValueError: boom\n")
    report = launch.failure_report(str(tmp_path), 1)
    assert report.startswith("rank 1 failed with exit status 1")
    assert report.rstrip().endswith("ValueError: boom")
    assert report.count("\n") == 15
    assert "exit status 3" in launch.failure_report(str(tmp_path / "none"), 3)


def test_failure_report_names_the_rank_that_failed_first(tmp_path):
    import os

    (tmp_path / "rank.0.exit").write_text("1\n")  # rank 0 died of Horovod's shutdown, after rank 1 raised
    (tmp_path / "rank.1.exit").write_text("1\n")
    os.utime(tmp_path / "rank.1.exit", ns=(1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "rank.0.exit", ns=(2_000_000_000, 2_000_000_000))
    assert launch.failed_ranks(str(tmp_path)) == [(1, 1), (0, 1)]
    assert launch.failure_report(str(tmp_path), 1).startswith("rank 1 failed with exit status 1 (then also ranks 0)")


def test_failure_report_prefers_the_cause_over_horovod_shutdown(tmp_path):
    for r in (0, 1):
        (tmp_path / f"rank.{r}.exit").write_text("1\n")
    (tmp_path / "rank.0.log").write_text("HorovodInternalError: Horovod has been shut down. This was caused by...\n")
    (tmp_path / "rank.1.log").write_text("RuntimeError: boom\n")
    assert launch.failed_ranks(str(tmp_path))[0] == (1, 1)
