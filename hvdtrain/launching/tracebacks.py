"""Python tracebacks in a rank's output: Horovod's shutdown folded into one line, a user's kept whole.

When one rank dies, Horovod shuts down under every other rank, and a rank whose program does not catch it (a user's
script under `hvdtrain run`, the Trainer used as a library) prints a traceback ending in HorovodInternalError (with
Gloo, often chained to a RuntimeError of the same words). That traceback is Horovod's, not the user's, and says
nothing the report does not say better (which rank failed first): on the terminal it becomes one line, `folded`;
the rank's log keeps it whole. A traceback ending in any other exception is the user's and passes untouched.

`Folder` does it on a stream of lines (the rank wrapper's copy to the terminal), `fold` on a list (the report's
last lines of a log); `last_lines` is the end of a log as the report shows it, a user's traceback from its start.
Pure.
"""

from __future__ import annotations

import re
from typing import Callable, Generic, Sequence, TypeVar, Union

HEADER = "Traceback (most recent call last):"
# Python's words between the tracebacks of a chain ("raise ... from", an exception while handling another).
CHAIN = ("During handling of the above exception, another exception occurred:",
         "The above exception was the direct cause of the following exception:")  # fmt: skip
# What Horovod 0.28.1 raises on a rank when another rank died or Horovod shut down: HorovodInternalError (its
# synchronize turns every RuntimeError of a collective into one), chained to the RuntimeError it came from, and
# HorovodShutdownError; Horovod's own words, or Gloo's transport losing the peer, say it is the shutdown (a
# RuntimeError of a collective that the user caused, e.g. mismatched shapes, says otherwise and is shown).
SHUTDOWN_ERRORS = ("HorovodInternalError", "HorovodShutdownError", "RuntimeError")
SHUTDOWN_WORDS = ("Horovod has been shut down", "Connection reset by peer", "Connection closed by peer",
                  "Broken pipe")  # fmt: skip
# Horovod's C++ log lines ("[2026-12-07 12:13:53.020805: E .../operations.cc:724] ..."): the background thread
# writes them into the same stream, sometimes between the lines of a traceback (or cut by its header).
LOG_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\s*\d+: [A-Z] ")
MAX_SHOWN = 100  # the most lines `last_lines` reaches back for the start of a user's traceback
MAX_HELD = 2000  # the most lines a Folder holds back waiting for a traceback's end


def folded_line(where: str) -> str:
    """What stands for a traceback of Horovod's shutdown (`where`: the log that keeps it)."""
    return f"hvdtrain: Horovod shut down under this rank (another rank failed or left the job); its traceback is in {where}"


Line = TypeVar("Line", bound=Union[str, bytes])


def _text(line: Union[str, bytes]) -> str:
    return (line.decode(errors="replace") if isinstance(line, bytes) else line).rstrip("\r\n")


def is_shutdown(exception_line: str) -> bool:
    """Whether the last line of a traceback is Horovod's shutdown (or its cause, Gloo losing a peer)."""
    name, _, message = exception_line.partition(":")
    if name.rsplit(".", 1)[-1] == "HorovodShutdownError":
        return True
    return name.rsplit(".", 1)[-1] in SHUTDOWN_ERRORS and any(words in message for words in SHUTDOWN_WORDS)


def _header(text: str) -> bool:
    return HEADER in text  # (a C++ log line's first character may stand before it)


class Folder(Generic[Line]):
    """Passes lines on to `emit`, but a traceback of Horovod's shutdown (a chain of them) as the one line
    `folded`. A traceback is held from its header to its exception's line (frames are indented; the first line
    that is not ends it), then folded or passed on whole; the blank and chain lines after a folded one are held
    until the next line tells whether the chain goes on. close() passes on what is still held."""

    def __init__(self, emit: Callable[[Line], None], folded: Line):
        self._emit, self._folded = emit, folded
        self._held: list[Line] = []  # a traceback being read, or the lines after a folded one
        self._in_traceback = False
        self._after_fold = False  # the last traceback was folded: its chain's lines are held

    def feed(self, line: Line) -> None:
        text = _text(line)
        if self._in_traceback:
            self._held.append(line)
            if text and not text[0].isspace() and not _header(text) and not LOG_LINE.match(text):
                self._in_traceback = False
                self._end_traceback(is_shutdown(text))
            elif len(self._held) > MAX_HELD:  # no traceback is this long: indented output of the program's own
                self._in_traceback = self._after_fold = False
                self._release()
            return
        if _header(text):
            if not self._after_fold:
                self._release()
            self._in_traceback = True
            self._held.append(line)
            return
        if self._after_fold and (not text.strip() or text in CHAIN):
            self._held.append(line)
            return
        self._after_fold = False
        self._release()
        self._emit(line)

    def _end_traceback(self, shutdown: bool) -> None:
        if shutdown:
            if not self._after_fold:
                self._emit(self._folded)
            self._held, self._after_fold = [], True
            return
        held = self._held
        if self._after_fold:  # a user's traceback chained to a folded one: it alone, without the chain's words
            held = held[max(i for i, line in enumerate(held) if _header(_text(line))) :]
        self._held, self._after_fold = [], False
        for line in held:
            self._emit(line)

    def _release(self) -> None:
        held, self._held = self._held, []
        if not self._after_fold:
            for line in held:
                self._emit(line)

    def close(self) -> None:
        """The end of the stream: a traceback cut short (the rank was killed while printing it) passes as it is."""
        self._in_traceback = False
        self._release()
        self._after_fold = False


def fold(lines: Sequence[Line], folded: Line) -> list[Line]:
    """`lines` with every traceback of Horovod's shutdown (a chain of them) as the one line `folded`."""
    out: list[Line] = []
    folder = Folder(out.append, folded)
    for line in lines:
        folder.feed(line)
    folder.close()
    return out


def last_lines(lines: Sequence[str], n: int, folded: str) -> list[str]:
    """The last `n` of `lines` once Horovod's shutdown is folded, reaching further back (to MAX_SHOWN lines) to
    the start of a traceback that they cut: a user's traceback is shown whole."""
    kept = fold(lines, folded)
    start = max(0, len(kept) - n)
    header = next((i for i in range(start - 1, max(-1, len(kept) - MAX_SHOWN - 1), -1) if _header(kept[i])), None)
    if header is not None and _cut_traceback(kept[header:start]):
        start = header
    return kept[start:]


def _cut_traceback(before: Sequence[str]) -> bool:
    """Whether `before` (from a traceback's header to the start of the window) ends inside that traceback: no
    line of its own after the header ends it (the exception's line, not indented)."""
    return not any(line and not line[0].isspace() and not LOG_LINE.match(line) for line in before[1:])
