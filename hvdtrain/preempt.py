"""The preemption flag: a signal handler that only records that the scheduler asked us to stop.

Installed as early as possible (the worker does it before importing torch), so that a warning signal
arriving during start-up is not fatal (the default action of USR1/USR2 is to terminate). The Trainer reads
the flag at every step and agrees on it with the other ranks.
"""

from __future__ import annotations

import signal

_requested = False
_installed: dict[int, object] = {}


def signal_number(name: str) -> int:
    return int(getattr(signal, "SIG" + name.upper().removeprefix("SIG")))


def _handler(signum, _frame) -> None:
    global _requested
    _requested = True


def install(name: str) -> None:
    """Record `name` (USR1, USR2, TERM, INT) as a preemption request instead of dying of it. Idempotent."""
    if not name:
        return
    num = signal_number(name)
    if num not in _installed:
        _installed[num] = signal.signal(num, _handler)


def uninstall() -> None:
    for num, previous in _installed.items():
        signal.signal(num, previous)
    _installed.clear()


def requested() -> bool:
    return _requested


def reset() -> None:
    global _requested
    _requested = False
