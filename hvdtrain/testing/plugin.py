"""The pytest plugin (entry point `hvdtrain`, in every pytest of an environment with hvdtrain; inert unless a test
is marked): `@pytest.mark.ranks(2)` or `@pytest.mark.ranks([1, 2, 4])` (one test per size) runs a test on N ranks.

- A plain `pytest` launches them (`launches`): the tests of one rank count in one job, each rank a pytest session
  writing its results (`results`), shown here as one result per test, each line naming its rank.
- Under a launcher (`hvdtrain run -np 2 -- pytest`, `mpirun -n 2 python -m pytest --with-mpi`), or with `--with-mpi`,
  they run in place: a size other than the world's is skipped, and pytest-mpi's `mpi(min_size=N)`, `--with-mpi` and
  `--only-mpi` keep their meaning; junit XML is written per rank.
Fixtures: `world` (rank, size, local rank; `assert_all`, `allgather`, `barrier`), `hvd` (Horovod initialised),
`comm` (mpi4py's COMM_WORLD), `rank_tmp_path` (the same directory on every rank, made by rank 0).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from hvdtrain.testing import world as worlds

PARAM = "hvdtrain_ranks"  # the parametrisation of ranks([...]): test ids end in [np2]
DEFAULT_TIMEOUT = "300"
_PASSED_ON = ("-p", "-o", "-W", "--import-mode", "--confcutdir", "--pythonwarnings", "--override-ini")


def pytest_addoption(parser):
    group = parser.getgroup("hvdtrain", "hvdtrain: tests on N ranks (@pytest.mark.ranks)")
    group.addoption(
        "--ranks-timeout",
        metavar="SECONDS",
        help="end a ranks test when a rank has made no progress for SECONDS (each test's start is progress, and so "
        "is each hvdtrain Trainer step): the rank is named with every rank's stack; 'auto' or 0 (off) as "
        f"hvdtrain's --hang-timeout [default: ini ranks_timeout, else {DEFAULT_TIMEOUT}]",
    )
    group.addoption("--ranks-gloo", action="store_true", help="launch ranks tests with horovodrun's Gloo controller")
    group.addoption(
        "--ranks-launcher",
        choices=("mpirun", "srun", "horovodrun"),
        help="the launcher of ranks tests [default: srun inside a Slurm allocation, else mpirun (MPICH's mpiexec)]",
    )
    group.addoption(
        "--ranks-dir",
        metavar="DIR",
        help="where launched ranks write their results and rank_tmp_path (on a file system every host shares when "
        "ranks run on other hosts) [default: pytest's temporary directory]",
    )
    group.addoption("--ranks-worker", help=argparse.SUPPRESS)
    parser.addini("ranks_timeout", f"--ranks-timeout's default [{DEFAULT_TIMEOUT}]", default=DEFAULT_TIMEOUT)
    try:  # pytest-mpi's own options where it is installed: the same meaning
        group.addoption("--with-mpi", action="store_true", help="run MPI tests in place (pytest-mpi's meaning)")
        group.addoption("--only-mpi", action="store_true", help="run only MPI tests (pytest-mpi's meaning)")
    except ValueError:
        pass


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "ranks(sizes, launch=None): run the test on each of `sizes` ranks (an int or a list: one test per size); "
        "`launch`: a name, for tests that need a job of their own (hvdtrain.testing)",
    )
    config.addinivalue_line("markers", "mpi(min_size=None): an MPI test, skipped in a smaller world (pytest-mpi)")
    config.addinivalue_line("markers", "timeout(seconds): a ranks test's --ranks-timeout (and pytest-timeout's)")
    world = worlds.current()
    worker = config.getoption("ranks_worker")
    if worker or world.size > 1 or config.getoption("with_mpi"):
        _per_rank_junit(config, world)
        config.pluginmanager.register(InPlace(config, world, worker), "hvdtrain-ranks-in-place")
    else:
        config.pluginmanager.register(Launching(config), "hvdtrain-ranks-launching")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("ranks")
    if marker is None:
        return
    sizes = _sizes(marker)
    if isinstance(marker.args[0] if marker.args else marker.kwargs.get("sizes"), (list, tuple)):
        metafunc.fixturenames.append(PARAM)
        metafunc.parametrize(PARAM, sizes, ids=[f"np{n}" for n in sizes])


def _sizes(marker) -> list[int]:
    given = marker.args[0] if marker.args else marker.kwargs.get("sizes")
    sizes = list(given) if isinstance(given, (list, tuple)) else [given]
    if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
        pytest.fail(f"ranks({given!r}): give a rank count (>= 1) or a list of them, e.g. ranks(2) or ranks([1, 2, 4])",
                    pytrace=False)  # fmt: skip
    return sizes


def size_of(item) -> Optional[int]:
    """The rank count a ranks test runs on, None for any other test."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and PARAM in callspec.params:
        return callspec.params[PARAM]
    marker = item.get_closest_marker("ranks")
    return _sizes(marker)[0] if marker is not None else None


def _per_rank_junit(config, world: worlds.World) -> None:
    """--junitxml=report.xml: rank 0 writes report.xml, rank R report.rankR.xml (no two ranks on one file)."""
    path = getattr(config.option, "xmlpath", None)
    if path and world.size > 1 and world.rank > 0:
        p = Path(path)
        config.option.xmlpath = str(p.with_name(f"{p.stem}.rank{world.rank}{p.suffix}"))


class InPlace:
    """Every rank runs this pytest session (a launched rank, or under the user's own launcher): a ranks test whose
    size is not the world's is skipped, pytest-mpi's markers and options mean what they mean there; each test's
    start is a step of the rank's progress (hvdtrain's watchdog sees a test that hangs). A rank of a launch
    (`worker`: its results directory) writes what happens to its results file."""

    def __init__(self, config, world: worlds.World, worker: Optional[str]):
        from hvdtrain.testing import results

        self.config, self.world, self.index = config, world, 0
        self.writer = results.Writer(worker, world.rank) if worker else None
        self.shared = Path(worker).parent / "tmp" if worker else None

    def pytest_collection_modifyitems(self, config, items):
        with_mpi, only_mpi = config.getoption("with_mpi"), config.getoption("only_mpi")
        for item in items:
            reason = self._skip_reason(item, with_mpi, only_mpi)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))

    def _skip_reason(self, item, with_mpi: bool, only_mpi: bool) -> Optional[str]:
        size, mpi = size_of(item), item.get_closest_marker("mpi")
        if size is not None and size != self.world.size:
            return f"needs {size} rank{'s' if size > 1 else ''}; this world has {self.world.size}"
        if mpi is not None:
            min_size = mpi.kwargs.get("min_size", mpi.args[0] if mpi.args else None)
            if not (with_mpi or self.world.size > 1 or self.writer):
                return "an MPI test: run it under mpirun -n N python -m pytest --with-mpi (pytest-mpi's meaning)"
            if min_size is not None and self.world.size < min_size:
                return f"needs at least {min_size} ranks; this world has {self.world.size}"
        if only_mpi and size is None and mpi is None:
            return "not an MPI test (--only-mpi)"
        return None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        from hvdtrain import progress

        self.index += 1
        progress.step(self.index)
        if self.writer:
            self.writer.write("start", nodeid=item.nodeid)
        yield
        if self.writer:
            self.writer.write("finish", nodeid=item.nodeid)

    def pytest_collectreport(self, report):
        if self.writer and report.failed:
            self.writer.write("collect-error", nodeid=report.nodeid, text=report.longreprtext)

    def pytest_runtest_logreport(self, report):
        if self.writer:
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
            self.writer.write("report", nodeid=report.nodeid, report=data)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.writer:
            self.writer.write("end")
            self.writer.close()
            if session.exitstatus == pytest.ExitCode.TESTS_FAILED:  # told in the results, not by the rank's status
                session.exitstatus = pytest.ExitCode.OK


class Launching:
    """A plain pytest: each ranks test is run by the launch of its key (`launches`), on first demand, and shown as
    one result (`reported`)."""

    def __init__(self, config):
        self.config = config
        self.launches = None
        self.keys: dict = {}  # each ranks test's launch key (launches.Key), by node id
        self.groups: dict = {}  # each key's tests, in the session's order
        self.timeout = self._timeout()  # checked here: a bad value is one line before anything is collected

    def pytest_collection_modifyitems(self, config, items):
        for item in items:
            if item.get_closest_marker("mpi") is not None and size_of(item) is None:
                item.add_marker(pytest.mark.skip(reason="an MPI test: run it under mpirun -n N python -m pytest "
                                                        "--with-mpi, or mark it ranks(N)"))  # fmt: skip

    def pytest_collection_finish(self, session):
        """Each selected ranks test's key and each key's tests, once the session's tests are final."""
        for item in session.items:
            key = self._key(item)
            if key is not None:
                self.keys[item.nodeid] = key
                self.groups.setdefault(key, []).append(item.nodeid)

    def _key(self, item):
        from hvdtrain.testing.launches import Key

        size = size_of(item)
        if size is None:
            return None
        marker, timeout = item.get_closest_marker("timeout"), self.timeout
        if marker is not None and (marker.args or "timeout" in marker.kwargs):
            timeout = float(marker.args[0] if marker.args else marker.kwargs["timeout"])
        launch = item.get_closest_marker("ranks").kwargs.get("launch")
        return Key(size, timeout, launch)

    def _timeout(self) -> Optional[float]:
        from hvdtrain.errors import UsageError
        from hvdtrain.launching.spec import parse_hang_timeout

        given = self.config.getoption("ranks_timeout") or self.config.getini("ranks_timeout")
        try:
            return parse_hang_timeout(given)
        except UsageError as e:
            raise pytest.UsageError(f"--ranks-timeout: {e}") from None

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        """The launch, when this test's has not run yet: outside every other plugin's wrapper (pytest-timeout's
        timer would count a whole launch against its first test)."""
        key = self.keys.get(item.nodeid)
        if key is not None:
            if self.launches is None:
                self.launches = self._launches()
            self.launches.run_for(key, item.nodeid, self.groups[key])
        yield

    @pytest.hookimpl(tryfirst=True, specname="pytest_runtest_protocol")
    def pytest_runtest_protocol_shown(self, item, nextitem):  # "pytest_": pytest reads only such names
        """A ranks test's result, from its launch, in place of running it here."""
        from hvdtrain.testing.reported import emit

        key = self.keys.get(item.nodeid)
        if key is None:
            return None
        emit(item, self.launches.runs[item.nodeid], key.size)
        return True

    def _launches(self):
        from hvdtrain.testing.launches import Launches, Settings

        opt = self.config.option
        return Launches(
            Settings(
                base=self._base(),
                rootpath=self.config.rootpath,
                worker_args=tuple(self._worker_args()),
                gloo=opt.ranks_gloo,
                launcher=opt.ranks_launcher,
                show_output=getattr(opt, "capture", "fd") == "no",
            )
        )

    def _base(self) -> Path:
        given = self.config.getoption("ranks_dir")
        if given:
            Path(given).mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="ranks-", dir=given))
        factory = getattr(self.config, "_tmp_path_factory", None)
        return factory.mktemp("ranks") if factory is not None else Path(tempfile.mkdtemp(prefix="pytest-ranks-"))

    def _worker_args(self) -> list[str]:
        """pytest's arguments for each rank's session: this session's root and ini file, its capture mode and the
        options that change how tests are found or run (-p, -o, -W, --import-mode, --confcutdir)."""
        config = self.config
        # No terminal in the ranks: their results go to files (collection errors too), and a terminal's summary
        # costs each rank's session about a third of a second (other plugins' summaries: hypothesis imports itself)
        args = ["-p", "no:cacheprovider", "-p", "no:timeout", "-p", "no:terminal", "--rootdir", str(config.rootpath)]
        if config.inipath:
            args += ["-c", str(config.inipath)]
        args.append(f"--capture={getattr(config.option, 'capture', 'fd')}")
        given = list(config.invocation_params.args)
        for i, arg in enumerate(given):
            if arg in _PASSED_ON and i + 1 < len(given):
                args += [arg, given[i + 1]]
            elif arg.split("=", 1)[0] in _PASSED_ON or (arg[:2] in _PASSED_ON and not arg.startswith("--")):
                args.append(arg)  # --import-mode=importlib, -pxdist
        return args

    def pytest_terminal_summary(self, terminalreporter):
        if self.launches is not None and self.launches.count:
            terminalreporter.write_line(
                f"hvdtrain: {self.launches.count} launch(es) of ranks tests; their results and logs: "
                f"{self.launches.settings.base}"
            )


def _rank_tmp_path(request, world: worlds.World) -> Path:
    plugin = request.config.pluginmanager.get_plugin("hvdtrain-ranks-in-place")
    if world.size == 1:
        return request.getfixturevalue("tmp_path")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-120:]
    if plugin is not None and plugin.shared is not None:  # a launch: its shared directory, known to every rank
        path = plugin.shared / name
        if world.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 60
        while not path.is_dir():
            if time.monotonic() > deadline:
                pytest.fail(f"rank_tmp_path: rank 0's {path} never appeared here (a file system the hosts share?)")
            time.sleep(0.01)
        return path
    made = tempfile.mkdtemp(prefix=f"ranks-{name[-40:]}-") if world.rank == 0 else None
    return Path(world.allgather(made)[0])


@pytest.fixture(scope="session")
def world() -> worlds.World:
    """This rank's place: rank, size, local_rank, local_size; `world.assert_all(cond, message)` fails the test on
    every rank when it fails on any (naming those), `world.allgather(value)`, `world.barrier()`."""
    return worlds.current()


@pytest.fixture(scope="session")
def hvd(world):
    """`horovod.torch`, initialised once per rank for the session's tests (one thread per rank by default)."""
    from hvdtrain.parallel import horovod

    h = horovod.init()
    if h.size() != world.size:
        pytest.fail(f"Horovod sees {h.size()} rank(s) but the launcher started {world.size}: each rank initialised "
                    "alone (no MPI wire-up between them)", pytrace=False)  # fmt: skip
    return h


@pytest.fixture(scope="session")
def comm(world):
    """mpi4py's MPI.COMM_WORLD (ranks started by an MPI launcher)."""
    if world.size > 1 and not world.mpi:
        pytest.fail("comm: these ranks were not started by MPI (horovodrun --gloo): use the hvd fixture", pytrace=False)
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def rank_tmp_path(request, world) -> Path:
    """A directory for this test, the same path on every rank, made by rank 0 before any rank gets it."""
    return _rank_tmp_path(request, world)


@pytest.fixture
def mpi_tmp_path(rank_tmp_path) -> Path:
    """pytest-mpi's name for rank_tmp_path."""
    return rank_tmp_path
