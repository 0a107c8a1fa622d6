"""The hang watchdog: run_job's thread that ends a job no rank of which has made progress for --hang-timeout
seconds, or one rank of which has not, and says where each rank was.

It needs nothing of Horovod (either controller, any launcher, any host): each rank's wrapper connects to it and
reports its rank's progress record every second (launching.ranklink). A rank is past the bound when its record
(its step, its phase) has not changed for that long once it has reported at all (a script that never calls
hvdtrain.progress is not judged by its progress), or when its wrapper has not been heard from for that long (a host
that froze, or whose link went down without closing its connections). Then the watchdog asks every rank for its
stacks (written to LOG_DIR/rank.R.stacks), tells every wrapper to end its rank, and calls `on_hang`, which ends the
launcher; the report (hangs.describe) names the ranks that held the job up and what the others were doing.

The bound is --hang-timeout SECONDS, or (auto) the longer of HANG_FLOOR_S and HANG_STEPS times the slowest step a
rank has reported: the start-up, a checkpoint or an evaluation get the floor.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import selectors
import socket
import threading
import time
from typing import Callable, Optional, Sequence

from hvdtrain.errors import HvdtrainError
from hvdtrain.files import write_text_atomic
from hvdtrain.launching.hangs import Hang, RankView
from hvdtrain.launching.ranklink import BEAT_S, WATCHDOG_ENV, format_watchdog
from hvdtrain.rundir import RankLogs

HANG_FLOOR_S = 300.0  # --hang-timeout auto: never less than this ...
HANG_STEPS = 10  # ... nor than this many times the slowest step a rank has reported
CHECK_S = 0.25  # how often the bound is checked
QUIET_S = 3 * BEAT_S  # a wrapper not heard from for this long has gone quiet
STACKS_WAIT_S = 8.0  # how long the ranks' stacks are waited for
HANG_STATUS = 124  # a job the watchdog ended exits with this status (as timeout(1) does)


@dataclasses.dataclass
class _Rank:
    rank: int
    host: str
    conn: socket.socket
    heard: float  # monotonic time of its last message
    changed: float  # ... of the last change of its record
    step: Optional[int] = None
    phase: Optional[str] = None
    beats: int = 0
    step_s: float = 0.0
    state: Optional[str] = None
    exited: Optional[int] = None
    stacks: Optional[str] = None
    gone: bool = False  # its connection closed


class Watchdog:
    """Listens on `address` (127.0.0.1 for a job on this machine alone, else every interface) for the ranks'
    wrappers; `addresses` are what the wrappers try, in order, to reach it."""

    def __init__(self, timeout: Optional[float], log_dir: str, addresses: Sequence[str], local_only: bool):
        self.timeout, self.log_dir, self.addresses = timeout, log_dir, list(addresses)
        self.token = secrets.token_hex(16)
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1" if local_only else "0.0.0.0", 0))
        self._server.listen(256)
        self._server.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._wake, self._waker = socket.socketpair()  # close() wakes the loop at once: a job's end waits for nothing
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._pending: dict[socket.socket, bytes] = {}  # each connection's unfinished line
        self._owner: dict[socket.socket, _Rank] = {}  # each connection's rank, once it said hello
        self.ranks: dict[int, _Rank] = {}
        self.hang: Optional[Hang] = None
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def env(self) -> dict[str, str]:
        """What every rank's wrapper needs to find the watchdog."""
        return {WATCHDOG_ENV: format_watchdog(self._server.getsockname()[1], self.token, self.addresses)}

    def start(self, on_hang: Callable[[Hang], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(on_hang,), name="hvdtrain-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._waker.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(STACKS_WAIT_S + 5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()
        self._waker.close()

    # ------------------------------------------------------------------------------------------------ the loop
    def _run(self, on_hang: Callable[[Hang], None]) -> None:
        while not self._closed.is_set():
            self._poll(CHECK_S)
            hang = self.check(time.monotonic())
            if hang is not None:
                self._gather_stacks()
                self._tell_all({"do": "end"})
                self.hang = hang
                self._fill(hang)
                on_hang(hang)
                return

    def _poll(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._wake:
                return
            if key.fileobj is self._server:
                self._accept()
            else:
                self._read(key.fileobj)

    def _accept(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        conn.setblocking(False)
        self._pending[conn] = b""
        self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buffer = self._pending.get(conn, b"") + data
        *lines, rest = buffer.split(b"\n")
        self._pending[conn] = rest
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                self._message(conn, message)

    def _drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        self._pending.pop(conn, None)
        conn.close()
        r = self._owner.pop(conn, None)
        if r is not None:
            r.gone = True

    def _message(self, conn: socket.socket, message: dict) -> None:
        now = time.monotonic()
        if "hello" in message:
            if message["hello"] != self.token or not isinstance(message.get("rank"), int):
                self._drop(conn)
                return
            rank = message["rank"]
            self.ranks[rank] = self._owner[conn] = _Rank(rank, str(message.get("host", "?")), conn, now, now)
            return
        r = self._owner.get(conn)
        if r is None:
            return
        r.heard = now
        if "exit" in message:
            r.exited = message["exit"]
        elif "stacks" in message:
            r.stacks, r.state = str(message["stacks"]), message.get("state")
        else:
            r.state = message.get("state")
            record = (message.get("beats", 0), message.get("step"), message.get("phase"))
            if record != (r.beats, r.step, r.phase):
                r.changed = now
                r.beats, r.step, r.phase = record
                r.step_s = max(r.step_s, float(message.get("step_s") or 0.0))
            if message.get("age") is not None and r.beats:  # its phase began before the wrapper's report said so
                r.changed = min(r.changed, now - float(message["age"]))

    # ------------------------------------------------------------------------------------------- the bound
    def bound(self) -> float:
        if self.timeout is not None:
            return self.timeout
        slowest = max((r.step_s for r in self.ranks.values()), default=0.0)
        return max(HANG_FLOOR_S, HANG_STEPS * slowest)

    def check(self, now: float) -> Optional[Hang]:
        """The hang, once a rank is past the bound; None while none is."""
        bound = self.bound()
        live = [r for r in self.ranks.values() if not r.gone and r.exited is None]
        # Silent: not heard for a few reports; past the bound that is a hang, and then the others gone quiet too
        # are named with it (those of a host whose link went down are a report behind).
        silent = {r.rank: now - r.heard for r in live if now - r.heard >= QUIET_S}
        if not any(silent.get(r.rank, 0.0) >= bound or (r.beats and now - r.changed >= bound) for r in live):
            return None
        stuck = sorted({*silent, *(r.rank for r in live if r.beats and now - r.changed >= bound)})
        views = [
            RankView(r.rank, r.host, r.step, r.phase, silent.get(r.rank), r.state, r.exited)
            for r in sorted(self.ranks.values(), key=lambda r: r.rank)
        ]  # fmt: skip
        return Hang(bound, self.timeout is None, views, stuck)

    # ----------------------------------------------------------------------------------------- the stacks
    def _tell_all(self, message: dict, quiet_too: bool = True) -> list[_Rank]:
        """Send `message` to every rank still there (not to those gone quiet unless `quiet_too`); the ranks told.
        A line this small goes whole into the socket's buffer or not at all: no send waits (a host whose link is
        down would hold the others' message up)."""
        line, now, told = json.dumps(message).encode() + b"\n", time.monotonic(), []
        for r in self.ranks.values():
            if r.gone or r.exited is not None or (not quiet_too and now - r.heard >= QUIET_S):
                continue
            try:
                if r.conn.send(line) == len(line):
                    told.append(r)
            except OSError:
                pass
        return told

    def _gather_stacks(self) -> None:
        """Every rank that can answer dumps its stacks; they are waited for (STACKS_WAIT_S at most) and written."""
        asked = self._tell_all({"do": "stacks"}, quiet_too=False)
        deadline = time.monotonic() + STACKS_WAIT_S
        while time.monotonic() < deadline and any(r.stacks is None and not r.gone for r in asked):
            if self._closed.is_set():
                return
            self._poll(0.1)
        logs = RankLogs(self.log_dir)
        for r in self.ranks.values():
            if r.stacks:
                try:
                    write_text_atomic(logs.stacks(r.rank), r.stacks)
                except (OSError, HvdtrainError):
                    pass  # the report still has what the watchdog read

    def _fill(self, hang: Hang) -> None:
        for view in hang.ranks:
            r = self.ranks[view.rank]
            view.stacks, view.state = r.stacks, r.state or view.state


def for_spec(spec, log_dir: str) -> Optional[Watchdog]:
    """The watchdog of a job (a LaunchSpec), None when it has none (--hang-timeout 0, an elastic job)."""
    if not spec.watched:
        return None
    from hvdtrain.env import SlurmEnv, expand_hostlist
    from hvdtrain.launching.hosts import interface_addresses, is_local_host

    names = [h.name for h in spec.hosts]
    if spec.launcher == "srun":  # Slurm places the ranks: on the allocation's hosts
        nodelist = SlurmEnv.read().nodelist
        names = expand_hostlist(nodelist, "SLURM_JOB_NODELIST") if nodelist else []
    remote = [name for name in names if not is_local_host(name)]
    if names and not remote:
        return Watchdog(spec.hang_timeout, log_dir, ["127.0.0.1"], local_only=True)
    nics = interface_addresses()
    mine = [a for nic in spec.nics for a in sorted(nics.get(nic, ()))]
    return Watchdog(spec.hang_timeout, log_dir, addresses_for(remote, mine), local_only=False)


def addresses_for(remote_hosts: Sequence[str], nic_addresses: Sequence[str]) -> list[str]:
    """What a rank's wrapper tries to reach this machine at: the addresses of the job's interfaces, then the one
    this machine would send from to each other host, then this host's name's, then loopback."""
    found = [*nic_addresses]
    for host in remote_hosts:
        try:
            target = socket.gethostbyname(host)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))  # no packet is sent: this asks the routing table
                found.append(s.getsockname()[0])
        except OSError:
            continue
    try:
        found.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    found.append("127.0.0.1")
    return list(dict.fromkeys(found))
