"""A rank's progress, published where its rank wrapper reads it without a collective: the hang watchdog's input.

In your own training loop (a script started by ``hvdtrain run``), one call a step is enough::

    import hvdtrain.progress as progress

    for step, batch in enumerate(loader):
        progress.step(step)            # this rank reached `step`
        ...
        with progress.phase("allreduce"):   # optional: what the rank is doing, named in a hang's report
            ...

Outside a job started by hvdtrain (no HVDTRAIN_PROGRESS_FD) every call is a no-op costing one attribute test, until
the Trainer asks for `publisher(create=True)`: it times its steps' work and wait with a Publisher of its own then
(over a private buffer nobody reads), and the calls account into that one.

The record is a small shared memory file (a memfd the rank wrapper made and handed down by number), written with
a sequence lock: the writer makes the sequence odd, writes the fields and makes it even again; a reader retries
while it is odd or changed under it. It holds the step, the phase and when that phase began (CLOCK_MONOTONIC,
the same clock for every process on the host), how many times the rank reported, and the last step's length.
A write is a struct.pack_into into the map, about a microsecond; the wrapper reads it once a second.

Phases a rank can be in (free text also works, cut to PHASE_BYTES): the trainer's are PHASES. COLLECTIVE_PHASES are
waits on the other ranks; the rest are this rank's own work, which is what a straggler report compares.

Ground floor: no torch, nothing of hvdtrain above it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from typing import Iterator, NamedTuple, Optional

PROGRESS_FD_ENV = "HVDTRAIN_PROGRESS_FD"  # the record's descriptor in every rank (set by the rank wrapper)
STACKS_FD_ENV = "HVDTRAIN_STACKS_FD"  # where a Python process of the rank dumps its stacks on DUMP_SIGNAL
PHASES = ("start", "init", "data", "forward", "backward", "allreduce", "optimizer", "hook", "checkpoint", "eval",
          "report", "serve", "step", "done")  # fmt: skip
COLLECTIVE_PHASES = frozenset({"allreduce", "report"})  # waiting on the other ranks
PHASE_BYTES = 24
# seq (odd while written), step, phase began (monotonic s), beats, last step's length (s), own work s, wait s, phase
_FORMAT = struct.Struct(f"<QqdQddd{PHASE_BYTES}s")
SIZE = _FORMAT.size
_READ_TRIES = 100


class Beat(NamedTuple):
    """A rank's record as read: `beats` counts its reports (0: it never reported; the wrapper's own start line)."""

    step: int
    phase: str
    since: float  # time.monotonic() when the phase began
    beats: int
    step_s: float  # how long its last step took (0 before the second step)
    work_s: float  # seconds spent in phases other than COLLECTIVE_PHASES since it started
    wait_s: float  # seconds spent in COLLECTIVE_PHASES


_SEQ = struct.Struct("<Q")
_NOT_COUNTED = frozenset({"start", "done"})  # neither work nor waiting


def _encoded(phase: str) -> bytes:
    return phase.encode(errors="replace")[:PHASE_BYTES]


def pack(buf, beat: Beat, seq: int) -> None:
    """Write `beat` into `buf` (a map of SIZE bytes) under the sequence lock (`seq` even: the last written)."""
    _write(buf, seq, beat.step, beat.since, beat.beats, beat.step_s, beat.work_s, beat.wait_s, _encoded(beat.phase))


def _write(buf, seq: int, *fields) -> None:
    _SEQ.pack_into(buf, 0, seq + 1)
    _FORMAT.pack_into(buf, 0, seq + 1, *fields)
    _SEQ.pack_into(buf, 0, seq + 2)


def unpack(buf) -> Optional[Beat]:
    """The record in `buf`, or None when no consistent copy could be read (a writer stopped mid-write: SIGSTOP)."""
    for _ in range(_READ_TRIES):
        fields = _FORMAT.unpack_from(buf, 0)
        if fields[0] % 2 == 0 and _SEQ.unpack_from(buf, 0)[0] == fields[0]:
            _seq, step, since, beats, step_s, work_s, wait_s, phase = fields
            return Beat(step, phase.rstrip(b"\0").decode(errors="replace"), since, beats, step_s, work_s, wait_s)
    return None


class Publisher:
    """This process's record: the rank's step and phase, and the time it spent working and waiting."""

    def __init__(self, buf):
        self._buf, self._seq = buf, 0
        self._step, self._phase, self._since, self._beats = -1, "start", time.monotonic(), 0
        self._step_at, self._step_s = None, 0.0
        self.work_s = self.wait_s = 0.0
        self._names: dict[str, bytes] = {}  # each phase's bytes, encoded once

    def _publish(self) -> None:
        self._beats += 1
        name = self._names.get(self._phase) or self._names.setdefault(self._phase, _encoded(self._phase))
        _write(self._buf, self._seq, self._step, self._since, self._beats, self._step_s, self.work_s, self.wait_s,
               name)  # fmt: skip
        self._seq += 2

    def _totals(self, now: float) -> tuple[float, float]:
        """(work_s, wait_s) up to `now`, the phase the rank is in counted too (as work, as waiting, or not)."""
        running = now - self._since
        if self._phase in COLLECTIVE_PHASES:
            return self.work_s, self.wait_s + running
        if self._phase in _NOT_COUNTED:
            return self.work_s, self.wait_s
        return self.work_s + running, self.wait_s

    def _enter(self, name: str, now: float) -> None:
        self.work_s, self.wait_s = self._totals(now)
        self._phase, self._since = name, now

    def step(self, n: Optional[int] = None, phase: str = "step") -> None:
        now = time.monotonic()
        if self._step_at is not None:
            self._step_s = now - self._step_at
        self._step_at = now
        self._step = self._step + 1 if n is None else n
        self._enter(phase, now)
        self._publish()

    def phase(self, name: str) -> None:
        self._enter(name, time.monotonic())
        self._publish()

    @property
    def current(self) -> str:
        return self._phase

    def spent(self) -> tuple[float, float]:
        """(work_s, wait_s) up to now, the phase the rank is in counted too."""
        return self._totals(time.monotonic())


def _open() -> Optional[Publisher]:
    """The record the rank wrapper handed this process, or None (not under hvdtrain, or the descriptor is gone)."""
    fd = os.environ.get(PROGRESS_FD_ENV, "")
    if not fd.isdigit():
        return None
    try:
        return Publisher(mmap.mmap(int(fd), SIZE))
    except (OSError, ValueError):
        return None


_publisher: Optional[Publisher] = None
_opened = False


def publisher(create: bool = False) -> Optional[Publisher]:
    """This process's Publisher (opened on first use), None outside a job started by hvdtrain. `create`: outside
    one, a Publisher over a private buffer, made once and from then on this process's (what the Trainer times its
    steps with: the calls below then account into it)."""
    global _publisher, _opened
    if not _opened:
        _publisher, _opened = _open(), True
    if _publisher is None and create:
        _publisher = Publisher(bytearray(SIZE))
    return _publisher


@contextlib.contextmanager
def using(replacement) -> Iterator[None]:
    """This process's calls go to `replacement` (a Publisher, or anything with its methods) for the block, then
    back to the process's own (a benchmark's arms: timing the calls, or leaving them out)."""
    global _publisher, _opened
    saved = publisher(), _opened
    _publisher, _opened = replacement, True
    try:
        yield
    finally:
        _publisher, _opened = saved


def step(n: Optional[int] = None, phase: str = "step") -> None:
    """This rank reached step `n` (the next one when not given), and is in `phase`: from its first report the
    watchdog watches the rank, and with ``--hang-timeout auto`` a step ten times longer than the slowest so far
    (at least 300 s) is a hang."""
    p = _publisher if _opened else publisher()
    if p is not None:
        p.step(n, phase)


def set_phase(name: str) -> None:
    """What this rank is doing now (until the next phase or step)."""
    p = _publisher if _opened else publisher()
    if p is not None:
        p.phase(name)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """``with phase("data"): ...``: the rank is in `name` for the block, then back in the phase it was in."""
    p = _publisher if _opened else publisher()
    if p is None:
        yield
        return
    before = p.current
    p.phase(name)
    try:
        yield
    finally:
        p.phase(before)
