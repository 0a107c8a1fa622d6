"""What the ranks say of each test, and the one result pytest shows for it (pure: no pytest objects here).

Each rank of a launch appends to its own file, `rank-R.jsonl`, one JSON line per event, flushed as it happens (a
rank that dies leaves everything up to its death): `start` and `finish` of each test, each phase's `report` (pytest's
own serialised report), a `collect-error` (what importing a test module raised), `end` once its session is over. The launching pytest reads them back (`read`) and folds
each phase's per-rank reports into one (`combine`): a failure on any rank fails the test, its line naming the rank
("rank 1: assert 3 == 4"); an expected failure anywhere is one; a skip anywhere skips; otherwise it passed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from hvdtrain.render import ranks_words

RANK_FILE = "rank-{rank}.jsonl"


class Writer:
    """A rank's results file, each line written whole and flushed to the kernel at once."""

    def __init__(self, directory: str, rank: int):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._fd = os.open(os.path.join(directory, RANK_FILE.format(rank=rank)), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def write(self, event: str, **fields) -> None:
        os.write(self._fd, (json.dumps({"event": event, **fields}) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


@dataclasses.dataclass
class RankLog:
    """One rank's file read back: the tests it started and finished, in order, each phase's report, and whether
    its session ended."""

    started: list[str] = dataclasses.field(default_factory=list)
    finished: set[str] = dataclasses.field(default_factory=set)
    reports: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    ended: bool = False
    errors: list[str] = dataclasses.field(default_factory=list)  # what its collection of the tests raised


def read(directory: str) -> dict[int, RankLog]:
    """Every rank's file in `directory` (a line cut short by a kill is left out)."""
    logs: dict[int, RankLog] = {}
    for path in sorted(Path(directory).glob(RANK_FILE.format(rank="*"))):
        rank = int(path.stem.split("-")[1])
        log = logs[rank] = RankLog()
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            event, nodeid = record.get("event"), record.get("nodeid", "")
            if event == "start":
                log.started.append(nodeid)
            elif event == "finish":
                log.finished.add(nodeid)
            elif event == "report":
                log.reports.setdefault(nodeid, []).append(record["report"])
            elif event == "end":
                log.ended = True
            elif event == "collect-error":
                log.errors.append(f"{nodeid}: {record.get('text', '')}")
    return logs


@dataclasses.dataclass(frozen=True)
class RankReport:
    """One rank's report of one phase of a test. `message`: a failure's line, or a skip's reason; `text`: the
    failure's whole report; `wasxfail`: the xfail reason when the test was expected to fail."""

    rank: int
    outcome: str  # passed, failed, skipped
    message: str = ""
    text: str = ""
    wasxfail: Optional[str] = None
    sections: tuple[tuple[str, str], ...] = ()
    duration: float = 0.0


@dataclasses.dataclass(frozen=True)
class Combined:
    """The one report of a phase: `message` the one line, `parts` the long report as (title, text) per rank."""

    outcome: str
    message: str = ""
    parts: tuple[tuple[str, str], ...] = ()
    wasxfail: Optional[str] = None
    sections: tuple[tuple[str, str], ...] = ()
    duration: float = 0.0


def labelled(messages: Sequence[tuple[int, str]]) -> str:
    """ "rank 1: assert 3 == 4", with the ranks that said the same thing together ("ranks 0, 2: ...")."""
    by_message: dict[str, list[int]] = {}
    for rank, message in sorted(messages):
        by_message.setdefault(message, []).append(rank)
    return "; ".join(f"{ranks_words(ranks)}: {message}" for message, ranks in by_message.items())


def combine(reports: Sequence[RankReport]) -> Combined:
    """One phase's reports from every rank as one (see the module's rules)."""
    reports = sorted(reports, key=lambda r: r.rank)
    sections = tuple((f"{title} (rank {r.rank})", text) for r in reports for title, text in r.sections)
    duration = max((r.duration for r in reports), default=0.0)
    failed = [r for r in reports if r.outcome == "failed"]
    xfailed = [r for r in reports if r.outcome == "skipped" and r.wasxfail is not None]
    xpassed = [r for r in reports if r.outcome == "passed" and r.wasxfail is not None]
    skipped = [r for r in reports if r.outcome == "skipped" and r.wasxfail is None]
    if failed:
        if len(failed) == len(reports) > 1 and len({r.message for r in failed}) == 1:
            # every rank failed alike (assert_all, a check of a collective's result): said once
            parts = ((f"every rank ({ranks_words([r.rank for r in failed])})", failed[0].text or failed[0].message),)
            return Combined("failed", f"every rank: {failed[0].message}", parts, None, sections, duration)
        parts = tuple((f"rank {r.rank}", r.text or r.message) for r in failed)
        return Combined("failed", labelled([(r.rank, r.message) for r in failed]), parts, None, sections, duration)
    if xfailed:
        reason = xfailed[0].wasxfail
        parts = tuple((f"rank {r.rank}", r.text) for r in xfailed)
        return Combined("skipped", reason, parts, reason, sections, duration)
    if xpassed:
        return Combined("passed", "", (), xpassed[0].wasxfail, sections, duration)
    if skipped:
        same = len(skipped) == len(reports) and len({r.message for r in skipped}) == 1
        message = skipped[0].message if same else labelled([(r.rank, r.message) for r in skipped])
        return Combined("skipped", message, (), None, sections, duration)
    return Combined("passed", "", (), None, sections, duration)
