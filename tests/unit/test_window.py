"""The reporting window's one allreduce: [loss, samples, stop votes] and, in the same vector, each rank's work and
wait seconds per step at its own place (parallel.horovod.PendingSum's `own`), so the sum holds every rank's. N ranks
are played in this process by a fake of Horovod's allreduce that sums what each of them handed in; and the
Publisher the Trainer times steps with outside hvdtrain (progress.publisher(create=True))."""

import dataclasses
import time

import pytest
import torch

from hvdtrain import progress
from hvdtrain.parallel import horovod
from hvdtrain.train.reporting import ReportWindow, WindowReport


class ProcessSet:
    """A process set as this rank sees it: its place and the set's size."""

    def __init__(self, size: int):
        self.place, self.members = 0, size

    def rank(self) -> int:
        return self.place

    def size(self) -> int:
        return self.members


class Allreduce:
    """Horovod's async sum over the ranks of a set, for N ranks taking turns in one process: every rank hands its
    tensor in under a name; synchronize gives the sum once all N have (every one of the same shape, as Horovod
    requires)."""

    Sum = "sum"

    def __init__(self, global_size: int):
        self.global_process_set = ProcessSet(global_size)
        self.handed: dict[str, list[torch.Tensor]] = {}
        self.sets: list[ProcessSet] = []

    def allreduce_async(self, tensor, op, name, process_set):
        assert op == self.Sum
        self.sets.append(process_set)
        self.handed.setdefault(name, []).append(tensor.clone())
        return name

    def synchronize(self, name):
        tensors = self.handed[name]
        assert len(tensors) == self.sets[-1].size() and len({t.shape for t in tensors}) == 1
        return torch.stack(tensors).sum(0)


@pytest.fixture
def ranks(monkeypatch):
    def make(size: int, group: int = 0) -> tuple[Allreduce, ProcessSet]:
        fake = Allreduce(size)
        monkeypatch.setattr(horovod, "hvd", fake)
        the_set = fake.global_process_set
        if group:  # an async job: the window's collectives run over the workers' set
            the_set = ProcessSet(group)
            monkeypatch.setattr(horovod, "_group", the_set)
        return fake, the_set

    return make


def windows_of(the_set: ProcessSet, steps: dict[int, list[tuple[float, int, float, float]]], stop_at=()) -> list:
    """Every rank's window over its `steps` (loss sum, samples, work s, wait s), closed at step 10 and read."""
    started = []
    for rank, rank_steps in steps.items():
        the_set.place = rank
        w = ReportWindow(every=10)
        for loss, samples, work, wait in rank_steps:
            w.add(loss, samples, work, wait)
        w.start(10, 0, stop_vote=rank in stop_at)
        started.append(w)
    return [w.read() for w in started]


def test_every_rank_reads_every_ranks_seconds_per_step_and_the_same_sums(ranks):
    _, the_set = ranks(3)
    steps = {
        0: [(2.0, 4, 0.010, 0.004), (1.0, 4, 0.012, 0.002)],
        1: [(3.0, 4, 0.030, 0.000), (3.0, 4, 0.030, 0.002)],
        2: [(0.5, 2, 0.011, 0.005), (0.5, 2, 0.009, 0.003)],
    }
    reports = windows_of(the_set, steps, stop_at={2})
    first = reports[0]
    same = [dataclasses.replace(r, samples_per_s=0.0) for r in reports]  # (the rate: each rank's own clock)
    assert all(r == same[0] for r in same)  # every rank read the same sums
    assert isinstance(first, WindowReport) and first.step == 10 and first.stop is True
    assert first.loss == pytest.approx(10.0 / 20)  # the loss and samples math of three numbers, unchanged
    assert first.rank_compute_s == pytest.approx((0.011, 0.030, 0.010))
    assert first.rank_wait_s == pytest.approx((0.003, 0.001, 0.004))


def test_the_slots_are_the_windows_set_not_the_jobs_ranks(ranks):
    """An async job of 3 ranks, 2 workers and a server: the window sums over the workers' set, its slots are the
    workers' places."""
    fake, the_set = ranks(3, group=2)
    reports = windows_of(the_set, {0: [(1.0, 2, 0.004, 0.001)], 1: [(1.0, 2, 0.008, 0.002)]})
    assert all(s is the_set for s in fake.sets)
    assert reports[0].rank_compute_s == pytest.approx((0.004, 0.008)) and reports[0].rank_wait_s == pytest.approx(
        (0.001, 0.002)
    )
    assert [t.numel() for t in fake.handed["hvdtrain.window"]] == [3 + 2 * 2] * 2


def test_one_rank_alone_needs_no_collective(ranks):
    fake, the_set = ranks(1)
    (report,) = windows_of(the_set, {0: [(4.0, 8, 0.002, 0.0), (4.0, 8, 0.004, 0.001)]})
    assert not fake.handed
    assert report.loss == 0.5 and report.rank_compute_s == pytest.approx((0.003,))
    assert report.rank_wait_s == pytest.approx((0.0005,))


def test_a_window_is_the_steps_since_the_last_one(ranks):
    _, the_set = ranks(1)
    w = ReportWindow(every=2)
    for work in (0.5, 0.5):
        w.add(1.0, 1, work, 0.0)
    w.start(2, 0, False)
    w.read()
    w.add(1.0, 1, 0.25, 0.125)
    w.start(3, 0, False)
    report = w.read()
    assert (report.rank_compute_s, report.rank_wait_s) == ((0.25,), (0.125,))


@pytest.fixture
def outside_hvdtrain(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_FD_ENV, raising=False)
    monkeypatch.setattr(progress, "_publisher", None)
    monkeypatch.setattr(progress, "_opened", False)


def test_outside_hvdtrain_the_calls_are_no_ops_until_the_trainer_makes_a_publisher(outside_hvdtrain):
    progress.set_phase("forward")
    assert progress.publisher() is None
    timer = progress.publisher(create=True)
    assert timer is not None and progress.publisher() is timer and progress.publisher(create=True) is timer
    progress.step(1, phase="hook")
    time.sleep(0.02)  # this rank's own work (a hook)
    progress.set_phase("allreduce")
    time.sleep(0.01)  # a wait on the others
    work, wait = timer.spent()  # the allreduce still running counts
    assert 0.02 <= work < 0.2 and 0.01 <= wait < 0.2
    with progress.phase("report"):
        pass
    assert timer.current == "allreduce"
    beat = progress.unpack(timer._buf)
    assert beat.step == 1 and beat.phase == "allreduce" and beat.work_s == pytest.approx(timer.work_s)
