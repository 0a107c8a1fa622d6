"""The hang watchdog's parts on their own: the progress record (hvdtrain.progress), the wrapper's records and
stack dumps of real processes (launching.ranklink), the watchdog's bound against wrappers that talk to it over a
real socket (launching.watchdog), and how a hang is told (launching.hangs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hvdtrain import progress
from hvdtrain.errors import UsageError
from hvdtrain.launching import hangs, ranklink, watchdog
from hvdtrain.launching.spec import parse_hang_timeout

# ------------------------------------------------------------------------------------------ the progress record


def test_a_record_reads_back_what_was_written():
    buf = bytearray(progress.SIZE)
    beat = progress.Beat(812, "allreduce", 123.5, 7, 0.25, 10.0, 2.5)
    progress.pack(buf, beat, 4)
    assert progress.unpack(buf) == beat


def test_a_record_half_written_is_not_read():
    """A writer stopped between its two sequence writes (SIGSTOP) leaves an odd sequence: no torn copy is read."""
    buf = bytearray(progress.SIZE)
    progress.pack(buf, progress.Beat(1, "forward", 1.0, 1, 0.0, 0.0, 0.0), 0)
    buf[0] |= 1
    assert progress.unpack(buf) is None


def test_the_publisher_counts_work_and_waiting_apart():
    buf = bytearray(progress.SIZE)
    p = progress.Publisher(buf)
    p.step(1, "forward")
    time.sleep(0.05)
    p.phase("allreduce")
    time.sleep(0.03)
    p.phase("optimizer")
    beat = progress.unpack(buf)
    assert (beat.step, beat.phase, beat.beats) == (1, "optimizer", 3)
    assert 0.04 <= p.work_s < 0.2 and 0.02 <= p.wait_s < 0.2
    p.step()
    assert progress.unpack(buf).step == 2 and progress.unpack(buf).step_s >= 0.08


def test_outside_hvdtrain_the_calls_do_nothing(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_FD_ENV, raising=False)
    monkeypatch.setattr(progress, "_opened", False)
    progress.step(3)
    with progress.phase("data"):
        progress.set_phase("x")
    assert progress.publisher() is None


@pytest.mark.parametrize("given, bound", [(None, None), ("auto", None), ("0", 0.0), ("off", 0.0), ("30", 30.0),
                                          ("2.5", 2.5)])  # fmt: skip
def test_hang_timeout_values(given, bound):
    assert parse_hang_timeout(given) == bound


@pytest.mark.parametrize("given", ["-1", "soon", "nan", "inf", ""])
def test_a_bad_hang_timeout_is_one_line(given):
    with pytest.raises(UsageError, match=r"--hang-timeout .*: give a number of seconds .*auto, or 0"):
        parse_hang_timeout(given)


# ------------------------------------------------------------------------------------------ the wrapper's side

_CHILD = """
import hvdtrain.progress as progress, sys, time
progress.step(41, phase="data")
print("ready", flush=True)
def deep_in_user_code():
    time.sleep(60)
deep_in_user_code()
"""


@pytest.fixture
def rank_process(tmp_path):
    """A real Python process started as the rank wrapper starts one: its records, the sitecustomize on its path."""
    records = ranklink.RankRecords()
    env = {**os.environ, **records.env(os.environ)}
    script = tmp_path / "user_script.py"
    script.write_text(_CHILD)
    proc = subprocess.Popen([sys.executable, str(script)], env=env, pass_fds=records.fds, stdout=subprocess.PIPE,
                            process_group=0)  # fmt: skip
    assert proc.stdout.readline() == b"ready\n"
    yield records, proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_the_wrapper_reads_its_ranks_record_and_stacks(rank_process):
    records, proc = rank_process
    beat = records.beat()
    assert (beat.step, beat.phase, beat.beats) == (41, "data", 1)
    assert ranklink.catches(proc.pid, ranklink.DUMP_SIGNAL)
    text = records.stacks(proc.pid)
    processes = hangs.parse_stacks(text)
    assert processes[0].pid == proc.pid and "user_script.py" in processes[0].command
    frame = hangs.place(hangs.main_thread(processes))
    assert (frame.function, frame.line) == ("deep_in_user_code", 6)
    assert proc.poll() is None  # dumping does not end the rank
    assert records.stacks(proc.pid).count("=== pid") == 1  # each round's text alone


def test_a_stopped_rank_is_named_not_waited_for(rank_process):
    records, proc = rank_process
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while ranklink.process_state(proc.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        began = time.monotonic()
        text = records.stacks(proc.pid)
        assert time.monotonic() - began < 1.0
        assert "not dumped: stopped (SIGSTOP)" in text
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_a_process_that_does_not_catch_the_signal_is_left_alone(tmp_path):
    records = ranklink.RankRecords()
    proc = subprocess.Popen(["sleep", "30"], process_group=0)
    try:
        assert not ranklink.catches(proc.pid, ranklink.DUMP_SIGNAL)
        assert records.stacks(proc.pid) == ""
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_the_sitecustomize_runs_the_one_it_hides(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.HIDDEN_SITE_RAN = True\n")
    records = ranklink.RankRecords()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.update(records.env(env))
    out = subprocess.run([sys.executable, "-c", "import builtins; print(getattr(builtins, 'HIDDEN_SITE_RAN', 0))"],
                         env=env, pass_fds=records.fds, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "True", out.stderr


# ------------------------------------------------------------------------------------------ the watchdog


class FakeWrapper:
    """A wrapper's side of the conversation, over a real socket: says hello, reports, answers stacks requests."""

    def __init__(self, dog: watchdog.Watchdog, rank: int, stacks: str = "", state: str = "S"):
        port, token, addresses = ranklink.parse_watchdog(dog.env()[ranklink.WATCHDOG_ENV])
        self.sock = socket.create_connection((addresses[0], port), timeout=5)
        self.rank, self.stacks, self.state, self.told = rank, stacks, state, []
        self.send({"hello": token, "rank": rank, "host": f"node{rank}"})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def send(self, message):
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def beat(self, step, phase, beats):
        self.send({"step": step, "phase": phase, "age": 0.0, "beats": beats, "step_s": 0.01, "state": self.state})

    def _read(self):
        try:
            for line in self.sock.makefile():
                do = json.loads(line)["do"]
                self.told.append(do)
                if do == "stacks":
                    self.send({"stacks": self.stacks, "state": self.state})
        except OSError:
            pass  # the watchdog closed the connection


_DUMP = """=== pid {pid}: python train.py ===
Current thread 0x00007f0000000001 (most recent call first):
  File "{file}", line {line} in {func}
  File "/home/u/train.py", line 90 in <module>
"""


def test_the_watchdog_ends_a_job_when_one_rank_stops_progressing(tmp_path):
    dog = watchdog.Watchdog(1.5, str(tmp_path), ["127.0.0.1"], local_only=True)
    hung = []
    dog.start(hung.append)
    try:
        wait = _DUMP.format(pid=10, file="/venv/lib/python3.11/site-packages/horovod/torch/mpi_ops.py", line=1200,
                            func="synchronize")  # fmt: skip
        slow = _DUMP.format(pid=11, file="/home/u/my_data.py", line=42, func="__getitem__")
        ranks = [FakeWrapper(dog, 0, wait), FakeWrapper(dog, 1, slow), FakeWrapper(dog, 2, wait)]
        began = time.monotonic()
        for i in range(1, 200):
            for w in ranks:
                w.beat(5 if w.rank == 1 else min(i, 6), "step", 5 if w.rank == 1 else i)
            if hung:
                break
            time.sleep(0.05)
        assert hung, "the watchdog never called the hang"
        assert 1.5 <= time.monotonic() - began < 4.0
        hang = hung[0]
        assert hang.stuck == [1] and hang.culprits() == [1]
        time.sleep(0.2)
        assert all(w.told == ["stacks", "end"] for w in ranks)
        assert (tmp_path / "rank.1.stacks").read_text() == slow
        text = hangs.describe(hang)
        assert text.startswith("hang: rank 1 (node1) is in __getitem__ (my_data.py:42) at step 5; ranks 0, 2 ")
        assert "(no progress for 1.5 s: --hang-timeout 1.5)" in text
    finally:
        dog.close()


def test_a_silent_host_is_a_hang_too(tmp_path):
    """A wrapper that stops talking (its host froze, or the link went down without closing the connection)."""
    dog = watchdog.Watchdog(3.0, str(tmp_path), ["127.0.0.1"], local_only=True)
    hung = []
    dog.start(hung.append)
    try:
        a, b = FakeWrapper(dog, 0), FakeWrapper(dog, 1)
        deadline = time.monotonic() + 10
        while not hung and time.monotonic() < deadline:
            a.beat(1, "allreduce", 1)  # rank 0 keeps talking (it waits in a collective: no progress either)
            time.sleep(0.2)
        assert hung and hung[0].culprits() == [1]
        assert "rank 1 (node1): no word from its host for 3 s" in hangs.describe(hung[0])
        b.sock.close()
    finally:
        dog.close()


def test_a_script_that_never_reports_is_not_judged(tmp_path):
    dog = watchdog.Watchdog(0.5, str(tmp_path), ["127.0.0.1"], local_only=True)
    try:
        w = FakeWrapper(dog, 0)
        for _ in range(10):
            w.send({"state": "S"})  # the wrapper's report of a rank whose record is empty
            time.sleep(0.1)
        assert dog.check(time.monotonic()) is None
    finally:
        dog.close()


def test_auto_bound_follows_the_slowest_step(tmp_path):
    dog = watchdog.Watchdog(None, str(tmp_path), ["127.0.0.1"], local_only=True)
    try:
        assert dog.bound() == watchdog.HANG_FLOOR_S
        w = FakeWrapper(dog, 0)
        w.send({"step": 3, "phase": "step", "age": 0, "beats": 3, "step_s": 45.0, "state": "R"})
        deadline = time.monotonic() + 5
        while dog.bound() == watchdog.HANG_FLOOR_S and time.monotonic() < deadline:
            dog._poll(0.1)
        assert dog.bound() == 450.0
    finally:
        dog.close()


def test_a_stranger_is_dropped(tmp_path):
    dog = watchdog.Watchdog(5, str(tmp_path), ["127.0.0.1"], local_only=True)
    try:
        port = int(dog.env()[ranklink.WATCHDOG_ENV].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b'{"hello": "wrong", "rank": 0}\n')
            dog._poll(0.5)
            dog._poll(0.5)
            assert dog.ranks == {}
            assert s.recv(10) == b""
    finally:
        dog.close()


# ------------------------------------------------------------------------------------------ the hang, told


def _view(rank, phase, dump=None, **kw):
    return hangs.RankView(rank, f"node{rank}", step=kw.pop("step", 812), phase=phase, stacks=dump, **kw)


def test_a_rank_busy_in_its_own_work_is_the_one_named():
    views = [_view(0, "allreduce"), _view(1, "hook", _DUMP.format(pid=1, file="/u/hooks.py", line=7, func="on_step_end")),
             _view(2, "allreduce"), _view(3, "allreduce")]  # fmt: skip
    hang = hangs.Hang(30, False, views, [0, 1, 2, 3])
    assert hang.culprits() == [1]
    assert hangs.describe(hang, "D/rank.R.stacks") == (
        "hang: rank 1 (node1) is in on_step_end (hooks.py:7) (hook at step 812); ranks 0, 2, 3 wait in allreduce at "
        "step 812 (no progress for 30 s: --hang-timeout 30); every rank's stacks: D/rank.R.stacks"
    )


def test_a_collective_called_by_one_rank_only_is_found_by_the_stacks():
    """Every rank waits in a collective; the odd one waits at another line."""
    collective = "/v/site-packages/horovod/torch/mpi_ops.py"
    odd = f"""=== pid 5: python s.py ===
Current thread 0x1 (most recent call first):
  File "{collective}", line 10 in synchronize
  File "/u/s.py", line 20 in only_rank_one
  File "/u/s.py", line 30 in <module>
"""
    usual = odd.replace("line 20 in only_rank_one", "line 25 in train_step")
    views = [_view(0, "step", usual), _view(1, "step", odd), _view(2, "step", usual)]
    hang = hangs.Hang(10, True, views, [0, 1, 2])
    assert hang.culprits() == [1]
    text = hangs.describe(hang)
    assert "rank 1 (node1) is in only_rank_one (s.py:20) at step 812" in text
    assert "ranks 0, 2 wait in train_step (s.py:25) at step 812" in text and "--hang-timeout 10 (auto)" in text


def test_a_rank_that_came_later_and_is_busy_holds_up_the_ones_already_past_the_bound():
    """Rank 0 reached the collective first and is past the bound first; rank 1, in its own loop since, is not yet:
    rank 1 is the one named."""
    views = [_view(0, "allreduce"), _view(1, "step", _DUMP.format(pid=1, file="/u/t.py", line=13, func="test_hang"))]
    hang = hangs.Hang(5, False, views, [0])
    assert hang.culprits() == [1]
    assert hangs.describe(hang).startswith("hang: rank 1 (node1) is in test_hang (t.py:13) at step 812; rank 0 waits")


def test_a_stopped_rank_comes_first():
    views = [_view(0, "allreduce"), _view(1, "forward", state="T", step=40)]
    hang = hangs.Hang(5, False, views, [0, 1])
    assert hang.culprits() == [1]
    assert hangs.describe(hang).startswith("hang: rank 1 (node1) is stopped (SIGSTOP), in forward at step 40; rank 0 "
                                           "waits in allreduce at step 812")  # fmt: skip


def test_library_frames_are_not_the_users():
    assert hangs.Frame(os.__file__, 1, "f").library
    assert hangs.Frame(hangs.__file__, 1, "f").library  # hvdtrain's own
    assert hangs.Frame("/x/site-packages/torch/nn/module.py", 1, "f").library
    assert not hangs.Frame("/home/u/my_data.py", 1, "f").library
