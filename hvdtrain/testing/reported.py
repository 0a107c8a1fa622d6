"""A launched test shown as one pytest result: each phase's per-rank reports (serialised by the ranks, read back
by `launches`) folded into one (`results.combine`) and logged through pytest's own hooks, so the terminal, -r
summaries and junit XML see an ordinary test. A launch that failed while the test ran fails the phase it was in,
with the launch's line and every rank's stack (a hang)."""

from __future__ import annotations

import time
from typing import Optional

from _pytest._code.code import ReprFileLocation, TerminalRepr
from _pytest.reports import TestReport

from hvdtrain.testing import results
from hvdtrain.testing.launches import TestRun

PHASES = ("setup", "call", "teardown")


class RanksRepr(TerminalRepr):
    """A failure's long report: a section per rank (its own report), then what the launch said. `reprcrash` carries
    the one line (the short summary's and junit's message)."""

    def __init__(self, parts, message: str, path: str, lineno: int):
        self.parts = list(parts)
        self.reprcrash = ReprFileLocation(path, lineno, message)

    def toterminal(self, tw) -> None:
        for title, text in self.parts:
            tw.sep("-", title)
            tw.line(text)


def rank_report(config, rank: int, data: dict) -> results.RankReport:
    rep = config.hook.pytest_report_from_serializable(config=config, data=data)
    message, text = "", ""
    if rep.outcome == "skipped" and isinstance(rep.longrepr, (tuple, list)):
        message = str(rep.longrepr[2]).removeprefix("Skipped: ")
    elif rep.longrepr is not None:
        text = rep.longreprtext
        crash = getattr(rep.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else (text.strip().splitlines() or [""])[-1]
    return results.RankReport(
        rank, rep.outcome, message, text, getattr(rep, "wasxfail", None), tuple(rep.sections), rep.duration
    )


def _phase_reports(config, run: TestRun, when: str) -> list[results.RankReport]:
    return [
        rank_report(config, rank, data) for rank, datas in sorted(run.reports.items()) for data in datas
        if data.get("when") == when
    ]  # fmt: skip


def trimmed(stacks: str) -> str:
    """A rank's dump without the frames of pytest's own machinery (below the test in each thread's stack)."""
    out, skipping = [], False
    for line in stacks.splitlines():
        is_frame = line.startswith("  File ")
        if is_frame and any(part in line for part in _MACHINERY):
            skipping = True
        elif not is_frame:
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


_MACHINERY = ("/_pytest/", "/pluggy/", "/pytest/__main__.py", '"<frozen runpy>"')


def _failing(combined: results.Combined, failure: str, stacks: dict[int, str]) -> results.Combined:
    """The phase the launch failed in: failed, the launch's line after the ranks' own, every rank's stack."""
    line = failure.splitlines()[0] if failure else "the launch failed"
    message = f"{combined.message}; {line}" if combined.outcome == "failed" and combined.message else line
    parts = combined.parts if combined.outcome == "failed" else ()
    parts = (*parts, ("the launch", failure), *((f"rank {r}'s stacks", trimmed(s)) for r, s in sorted(stacks.items())))
    return results.Combined("failed", message, parts, None, combined.sections, combined.duration)


def _report(item, when: str, combined: results.Combined) -> TestReport:
    path, line = str(item.path), (item.location[1] or 0) + 1
    longrepr: Optional[object] = None
    if combined.outcome == "failed" or (combined.wasxfail is not None and combined.parts):
        longrepr = RanksRepr(combined.parts, combined.message, path, line)
    elif combined.outcome == "skipped" and combined.wasxfail is None:
        longrepr = (path, line, f"Skipped: {combined.message}")
    now = time.time()
    report = TestReport(
        item.nodeid, item.location, {k: 1 for k in item.keywords}, combined.outcome, longrepr, when,
        combined.sections, combined.duration, now - combined.duration, now, item.user_properties,
    )  # fmt: skip
    if combined.wasxfail is not None:
        report.wasxfail = combined.wasxfail
    return report


def emit(item, run: TestRun, size: int) -> None:
    """Log `item`'s phases as pytest does for a test it runs itself."""
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    setup_ran = True  # a setup that failed or skipped on a rank: no call on any (pytest's rule on each rank)
    for when in PHASES:
        if when == "call" and not setup_ran:
            continue
        reports = _phase_reports(item.config, run, when)
        if run.during is not None and len({r.rank for r in reports}) < size:
            combined = _failing(results.combine(reports), run.during, run.stacks)
            ihook.pytest_runtest_logreport(report=_report(item, when, combined))
            break
        if not reports:
            continue
        combined = results.combine(reports)
        if when == "teardown" and run.after is not None:
            combined = _failing(combined, f"after this test, the ranks' session failed: {run.after}", run.stacks)
        ihook.pytest_runtest_logreport(report=_report(item, when, combined))
        if when == "setup":
            setup_ran = all(r.outcome == "passed" for r in reports)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
