"""After a failed launch: what the per-rank records say, and the report that names the cause.

The rank wrapper leaves rank.R.host (first), rank.R.log and rank.R.exit (last) in the log directory
(rundir.RankLogs); from them `diagnose` names, whichever launcher ran the job, Horovod's stall shutdown,
then lost hosts, then the ranks that failed, with the last lines of the log that shows it best (a traceback of
Horovod's shutdown there as one line, a user's traceback whole: launching.tracebacks). An elastic job
(horovodrun's elastic driver) ends with a traceback of its own: launching.elastic_failures names the cause from
horovodrun's lines instead. Pure but for reading the log directory; nothing heavy imported.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
from pathlib import Path
from typing import Collection, Mapping, Optional, Sequence

from hvdtrain.launching.tracebacks import folded_line, last_lines
from hvdtrain.render import ranks_words
from hvdtrain.rundir import RankLogs

# A rank whose log ends with one of these failed because another rank did: Horovod shuts down everywhere, or
# Gloo's transport lost a peer ("terminate called after throwing an instance of 'gloo::IoException'",
# "Connection reset by peer": the rank aborts, 134, when another rank or its host went away).
_CONSEQUENCES = ("Horovod has been shut down", "HorovodInternalError", "HorovodShutdownError", "gloo::IoException")
# Exit statuses of a rank the launcher (or a scheduler) ended with a signal after something else went wrong.
# SIGKILL is not here: a wrapper that records 137 saw its command killed alone, typically by the OOM killer.
KILLED = {128 + int(signal.SIGTERM), 128 + int(signal.SIGINT), 128 + int(signal.SIGHUP)}
# Horovod 0.28.1's stall report (stall_inspector.cc), logged by the coordinator, rank 0:
#   [<time>: E .../stall_inspector.cc:105] One or more tensors were submitted ... for more than W seconds. ...
#   Missing ranks:
#   1!: [allreduce.grad.3, allreduce.grad.4 ...]     (rank, "!" when past the shutdown time, <= 6 names + " ...")
#   One or more rank (marked by "!") is stalled for longer than T seconds. Will shutdown.
_STALL_SHUTDOWN_RE = re.compile(r"is stalled for longer than (\d+) seconds\. Will shutdown\.")
_STALL_RANK_RE = re.compile(r"^(\d+)(!?): \[(.*)\]\s*$")
_LOG_TAIL_BYTES = 64 * 1024
_ONE_LINE = "hvdtrain: error: "  # how a rank (its wrapper, the worker) says a usage error in one line


@dataclasses.dataclass(frozen=True)
class RankRecord:
    """What the rank wrapper left for one rank: the host it started on, and its exit status."""

    rank: int
    host: Optional[str] = None  # rank.R.host; None: no record here (not started, or logs on another host)
    status: Optional[int] = None  # rank.R.exit; None: the wrapper never finished (killed, or its host is gone)
    when: int = 0  # the exit record's mtime, ns
    consequence: bool = False  # it failed because another rank did, or was killed by the launcher


@dataclasses.dataclass(frozen=True)
class Stall:
    """Horovod's stall shutdown, as rank 0 logged it."""

    shutdown_s: int  # T: the stall lasted longer than this
    missing: dict[int, tuple[str, ...]]  # every rank listed -> the tensors it had not submitted ("..." when cut)
    stalled: tuple[int, ...]  # the ranks marked "!": past the shutdown time, the cause of the shutdown


def _read_tail(path: Path, start: int = 0, limit: int = _LOG_TAIL_BYTES) -> str:
    """The end of a log, at most `limit` bytes and nothing before byte `start` (where this job's part begins:
    the wrapper appends, so a log kept in --output-dir or a run directory also holds earlier jobs)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def tail(path: Path, n: int = 15, start: int = 0) -> list[str]:
    return _read_tail(path, start).splitlines()[-n:]


def shown_lines(path: Path, n: int = 15, start: int = 0) -> list[str]:
    """The last lines of a log as a report shows them: a traceback of Horovod's shutdown (not the cause: another
    rank failed) folded into one line, a user's traceback from its start (tracebacks.last_lines)."""
    return last_lines(_read_tail(path, start).splitlines(), n, folded_line(f"{path.name} (not shown)"))


def log_sizes(log_dir: str) -> dict[int, int]:
    """rank -> size of its log now: run_job takes it before launching, so that the report reads this job's part."""
    out = {}
    for rank, p in RankLogs(log_dir).log_files():
        try:
            out[rank] = p.stat().st_size
        except OSError:
            continue
    return out


def worker_log_sizes(log_dir: str) -> dict[tuple[str, int], int]:
    """(host, slot) -> size of that elastic worker's log now (`log_sizes` for worker.H.S.log)."""
    out = {}
    for worker, p in RankLogs(log_dir).worker_records("log"):
        try:
            out[worker] = p.stat().st_size
        except OSError:
            continue
    return out


def exit_statuses(log_dir: str) -> dict[int, tuple[int, int]]:
    """rank -> (exit status, the record's mtime in ns) of every readable exit record in `log_dir`."""
    exits: dict[int, tuple[int, int]] = {}
    for rank, p in RankLogs(log_dir).exit_records():
        try:
            exits[rank] = int(p.read_text().strip()), p.stat().st_mtime_ns
        except (ValueError, OSError):
            continue
    return exits


def read_records(log_dir: str, starts: Optional[Mapping[int, int]] = None) -> dict[int, RankRecord]:
    """Every rank with a host or exit record in `log_dir` (`starts`: where this job's part of each log begins)."""
    starts = starts or {}
    logs = RankLogs(log_dir)
    hosts = logs.hosts()
    exits = exit_statuses(log_dir)
    out = {}
    for rank in sorted(set(hosts) | set(exits)):
        status, when = exits.get(rank, (None, 0))
        consequence = False
        if status not in (None, 0):
            last = "\n".join(tail(logs.log(rank), 5, starts.get(rank, 0)))
            consequence = status in KILLED or any(marker in last for marker in _CONSEQUENCES)
        out[rank] = RankRecord(rank, hosts.get(rank), status, when, consequence)
    return out


def failed_ranks(log_dir: str, starts: Optional[Mapping[int, int]] = None) -> list[tuple[int, int]]:
    """(rank, exit status) of every rank whose wrapper recorded a non-zero exit, the likely cause first.

    When one rank raises, Horovod shuts down and the other ranks fail too ("Horovod has been shut down"), or the
    launcher ends them (SIGTERM: 143), sometimes before the first one has finished exiting: ranks whose last
    lines show only that consequence, or that were killed so, come after the others; then the order of the exit
    records, then the rank."""
    return [(r.rank, r.status) for r in _failed(read_records(log_dir, starts).values())]


def _failed(records: Collection[RankRecord]) -> list[RankRecord]:
    failed = [r for r in records if r.status not in (None, 0)]
    return sorted(failed, key=lambda r: (r.consequence, r.when, r.rank))


def parse_stall(text: str) -> Optional[Stall]:
    """The last stall shutdown Horovod reported in `text` (a rank's log), or None."""
    lines = text.splitlines()
    for end in range(len(lines) - 1, -1, -1):
        m = _STALL_SHUTDOWN_RE.search(lines[end])
        if not m:
            continue
        missing: dict[int, tuple[str, ...]] = {}
        stalled = []
        i = end - 1
        while i >= 0 and (row := _STALL_RANK_RE.match(lines[i].strip())):
            names = [n.strip() for n in row.group(3).split(", ")]
            if names and names[-1].endswith(" ..."):
                names[-1:] = [names[-1][: -len(" ...")], "..."]
            missing[int(row.group(1))] = tuple(names)
            if row.group(2):
                stalled.append(int(row.group(1)))
            i -= 1
        if i >= 0 and lines[i].rstrip().endswith("Missing ranks:") and stalled:
            return Stall(int(m.group(1)), missing, tuple(sorted(stalled)))
    return None


def find_stall(log_dir: str, ranks: Collection[int], starts: Optional[Mapping[int, int]] = None) -> Optional[Stall]:
    """Horovod's stall shutdown from this job's part of the rank logs: rank 0's (the coordinator logs it), then
    the others'."""
    starts = starts or {}
    for rank in sorted(set(ranks) | {0}):
        stall = parse_stall(_read_tail(RankLogs(log_dir).log(rank), starts.get(rank, 0)))
        if stall:
            return stall
    return None


def describe_stall(stall: Stall, all_ranks: Collection[int]) -> str:
    """`rank 1 stalled: rank 0 waited more than 30 s for it to submit allreduce.grad.3 (Horovod's stall
    shutdown, --stall-timeout 30)`; stalled ranks that missed the same tensors are named together."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for rank in stall.stalled:
        groups.setdefault(stall.missing[rank], []).append(rank)
    parts = []
    for tensors, stalled in groups.items():
        named = {t for t in tensors if t != "..."}
        waiting = sorted(r for r in all_ranks if not named & set(stall.missing.get(r, ())))
        it = "it" if len(stalled) == 1 else "them"
        what = ", ".join(tensors).replace(", ...", " ...")
        if waiting:
            parts.append(
                f"{ranks_words(stalled)} stalled: {ranks_words(waiting)} waited more than {stall.shutdown_s} s for {it} to "
                f"submit {what}"
            )
        else:
            parts.append(f"{ranks_words(stalled)} stalled: {what} waited more than {stall.shutdown_s} s")
    return "; ".join(parts) + f" (Horovod's stall shutdown, --stall-timeout {stall.shutdown_s})"


def lost_hosts(
    records: Mapping[int, RankRecord],
    placement: Optional[Mapping[int, str]] = None,
    this_machine: Collection[str] = (),
    explained: Collection[int] = (),
) -> list[tuple[str, list[int]]]:
    """The hosts that were lost, each with its ranks: (host, ranks), in host order of their first rank.

    A rank counts when it has a host record (it started, and its records are visible here) and is not
    `explained` otherwise (a stalled rank, killed by the launcher after Horovod's stall shutdown). It runs on
    the host `placement` gives (the -H name; the records' host names where there is none, as with srun). A host
    is lost when
      * every counted rank there lacks an exit record: the wrappers never finished, which only SIGKILL or the
        host going away does, and
      * no rank anywhere failed on its own account (a non-zero exit that is neither Horovod's shutdown nor a
        SIGTERM/SIGINT/SIGHUP from the launcher): when one rank fails by itself the launcher ends the others,
        and a wrapper it SIGKILLs leaves no exit record either; with one rank per host that looks exactly like
        a lost host, and the rank's own failure is the better explanation, so no host is called lost, and
      * the host is not this machine (hvdtrain runs here: ranks here without a record were killed, not lost).
    With no exit record anywhere (everything killed or gone), every other host with ranks is lost."""
    placement = placement or {}
    counted = [r for r in records.values() if r.host is not None and r.rank not in explained]
    if any(r.status not in (None, 0) and not r.consequence for r in records.values() if r.rank not in explained):
        return []
    by_host: dict[str, list[RankRecord]] = {}
    for r in sorted(counted, key=lambda r: r.rank):
        by_host.setdefault(placement.get(r.rank) or r.host, []).append(r)
    return [
        (host, [r.rank for r in ranks])
        for host, ranks in by_host.items()
        if host not in this_machine and all(r.status is None for r in ranks)
    ]


# What came first in a failed job, as `diagnose` (and, for elastic jobs, `diagnose_elastic`) tells it
# (LaunchError.cause); "hang": the hang watchdog ended the job (launching.watchdog, said by run_job). Elastic only: "min_np" (fewer than the needed slots for --elastic-timeout), "reset_limit"
# (--reset-limit reached), "blacklisted" (every host of the job failed), "discovery" (the host discovery failed).
CAUSES = ("stall", "hang", "stopped", "lost_host", "failed", "min_np", "reset_limit", "blacklisted", "discovery")


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    cause: Optional[str]  # one of CAUSES, None when no record says
    message: str


def diagnose(
    log_dir: str,
    status: int,
    np: Optional[int] = None,
    placement: Optional[Mapping[int, str]] = None,
    this_machine: Optional[Collection[str]] = None,
    starts: Optional[Mapping[int, int]] = None,
    stopped_by: Optional[str] = None,
    roles: Sequence[str] = (),
) -> Diagnosis:
    """What went wrong first (`cause`), and a message naming it from the wrappers' records, with the last lines of
    the log that shows it best. In order: Horovod's stall shutdown (the stalled ranks first: they never exit by themselves and
    are killed by the launcher, so their own records say little); lost hosts (`lost_hosts`); then the ranks
    that failed (`failed_ranks` order). A lone failure reads as before:
    `rank 1 failed with exit status 1 (then also ranks 0); last lines of DIR/rank.1.log:` and the lines.
    `np`: the job's ranks; `placement`: rank -> host name (`argv.placement`); `this_machine`: names of this host;
    `starts`: where this job's part of each log begins (`log_sizes` before the launch); `stopped_by`: the signal
    hvdtrain got and passed on (then that is the cause, and no host is called lost: the stop killed its ranks);
    `roles`: what each rank is in the job (a pipeline's "stage 1 of replica 0"), said beside the rank that failed."""
    starts = starts or {}
    records = read_records(log_dir, starts)
    all_ranks = set(range(np)) if np else set(records)
    stall = find_stall(log_dir, all_ranks | set(records), starts)
    explained = set(stall.stalled) if stall else set()
    here = {socket.gethostname()} if this_machine is None else set(this_machine)
    lost = [] if stopped_by else lost_hosts(records, placement, here, explained)
    failed = [r for r in _failed(records.values()) if r.rank not in explained]
    causes = [describe_stall(stall, all_ranks | set(stall.missing))] if stall else []
    if stopped_by:
        causes.append(f"the job was stopped by {stopped_by}")
    causes += [
        f"host {host} was lost: {ranks_words(ranks)} ran there and left no exit status (killed, or the host went down)"
        for host, ranks in lost
    ]
    if failed:
        causes.append(_failed_words(failed, after=bool(causes), roles=roles))
    first_cause = (
        "stall" if stall else "stopped" if stopped_by else "lost_host" if lost else "failed" if failed else None
    )
    if not causes:
        return Diagnosis(None, f"the job failed with exit status {status}; per-rank logs are in {log_dir}")
    shown = [
        *(stall.stalled if stall else ()),
        *(r.rank for r in failed),
        *(rank for _, ranks in lost for rank in ranks),
    ]
    if not shown:  # stopped, and no rank recorded a failure
        return Diagnosis(first_cause, f"{'; '.join(causes)}; per-rank logs are in {log_dir}")
    return _with_last_lines(first_cause, causes, log_dir, shown, starts)


def _failed_words(failed: Sequence[RankRecord], after: bool, roles: Sequence[str]) -> str:
    """The ranks that failed, as a cause of their own or (`after` another cause) as what followed it."""
    if after:
        statuses = ", ".join(str(r.status) for r in failed)
        exit_words = f"exit status {statuses}" if len(failed) == 1 else f"exit statuses {statuses}"
        return f"then {ranks_words([r.rank for r in failed])} failed ({exit_words})"
    first, others = failed[0], ", ".join(str(r.rank) for r in failed[1:])
    role = f" ({roles[first.rank]})" if first.rank < len(roles) else ""
    return f"rank {first.rank}{role} failed with exit status {first.status}" + (
        f" (then also ranks {others})" if others else ""
    )


def _with_last_lines(
    first_cause: Optional[str], causes: list[str], log_dir: str, shown: Sequence[int], starts: Mapping[int, int]
) -> Diagnosis:
    """The diagnosis: the causes and the last lines of this job's part of the first log of the `shown` ranks that
    has any (said when the first one is empty or not on this machine)."""
    logs = RankLogs(log_dir)
    rank = next((r for r in shown if tail(logs.log(r), 1, starts.get(r, 0))), shown[0])
    log, lines = logs.log(rank), shown_lines(logs.log(rank), start=starts.get(rank, 0))
    first = logs.log(shown[0])
    missing = (
        "is empty"
        if first.exists()
        else "is not on this machine (each host keeps its ranks' logs unless the log directory is shared)"
    )
    if not lines:
        return Diagnosis(first_cause, f"{'; '.join(causes)}; {first} {missing}")
    if len(lines) == 1 and lines[0].startswith(_ONE_LINE):  # the rank said why in one line (a usage error): say it
        return Diagnosis(first_cause, f"{'; '.join(causes)}: {lines[0].removeprefix(_ONE_LINE)}")
    if rank != shown[0]:
        causes.append(f"{first.name} {missing}")
    body = "\n".join(f"  | {line}" for line in lines)
    return Diagnosis(first_cause, f"{'; '.join(causes)}; last lines of {log}:\n{body}")
