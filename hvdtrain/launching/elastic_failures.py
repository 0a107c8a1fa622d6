"""After a failed elastic job (horovodrun's elastic driver): the cause, from horovodrun's own lines, and the failed
worker's log (worker.H.S.log). `diagnose_elastic` is to an elastic job what failures.diagnose is to the others, whose
Diagnosis, last-lines rule and killed statuses it shares. Pure but for reading the log directory.
"""

from __future__ import annotations

import dataclasses
import re
import signal
from typing import Mapping, Optional, Sequence

from hvdtrain.launching.failures import KILLED, Diagnosis, shown_lines
from hvdtrain.rundir import RankLogs, worker_name

# horovodrun 0.28.1's own lines when its elastic driver ends a job (runner/elastic/driver.py, registration.py,
# constants.py, gloo_run.py; the log lines come as "ERROR:root:..." through Python's logging):
#   TimeoutException: Timed out waiting for {activity}. Please check that you have enough resources to run at
#     least 2 Horovod processes. Timeout after 3 seconds.        ("{activity}" stays unformatted in 0.28.1)
#   ERROR:root:reset count 0 has exceeded limit 0 -> stop running
#   RuntimeError: Horovod was shutdown because number of resets during elastic job exceeded limit: 0
#   ERROR:root:blacklisted slots count == 2 -> stop running     (every host that had workers failed)
#   ERROR:root:failure count == 1 -> stop running               (every worker failed)
#   Process name: localhost[0]  /  Exit code: 1                  (the first worker that failed)
#   Failed to execute discovery script: ./d.sh. Exit code: 3     (a warning while it runs; at the first run the
#     job stops, and the line is often lost with the thread: "Job has been shutdown, see above error messages")
_MIN_SLOTS_RE = re.compile(r"enough resources to run at least (\d+) Horovod processes\..*?Timeout after (\d+) seconds")
_RESET_LIMIT_RE = re.compile(r"number of resets during elastic job exceeded limit: (\d+)")
_BLACKLISTED_RE = re.compile(r"blacklisted slots count == (\d+) -> stop running")
_ALL_FAILED_RE = re.compile(r"failure count == (\d+) -> stop running")
_PROCESS_RE = re.compile(r"^Process name: (.+)\[(\d+)\]\s*$")
_EXIT_CODE_RE = re.compile(r"^Exit code: (-?\d+)\s*$")
_DISCOVERY_RE = re.compile(r"Failed to execute discovery script: (.*)\. Exit code: (-?\d+)")
_SHUTDOWN = ("Job has been shutdown, see above error messages", "(_discover_hosts)")


@dataclasses.dataclass(frozen=True)
class WorkerFailure:
    """The first worker horovodrun saw fail ("Process name: HOST[SLOT]", "Exit code: C")."""

    host: str
    slot: int
    status: int


def parse_elastic_output(lines: Sequence[str]) -> dict[str, object]:
    """What horovodrun's elastic driver said about the end of a job: {"min_np": (slots, seconds),
    "reset_limit": N, "blacklisted": N, "all_failed": N, "worker": WorkerFailure, "discovery": line or "",
    "shutdown": True}, each key only when its line is there (the last one of its kind)."""
    found: dict[str, object] = {}
    for i, line in enumerate(lines):
        if m := _MIN_SLOTS_RE.search(line):
            found["min_np"] = (int(m.group(1)), int(m.group(2)))
        if m := _RESET_LIMIT_RE.search(line):
            found["reset_limit"] = int(m.group(1))
        if m := _BLACKLISTED_RE.search(line):
            found["blacklisted"] = int(m.group(1))
        if m := _ALL_FAILED_RE.search(line):
            found["all_failed"] = int(m.group(1))
        if (m := _PROCESS_RE.match(line)) and i + 1 < len(lines) and (code := _EXIT_CODE_RE.match(lines[i + 1])):
            found["worker"] = WorkerFailure(m.group(1), int(m.group(2)), int(code.group(1)))
        if m := _DISCOVERY_RE.search(line):
            found["discovery"] = f"{m.group(1)} failed with exit status {m.group(2)}"
        if any(marker in line for marker in _SHUTDOWN):
            found["shutdown"] = True
    return found


def _last_failed_worker(log_dir: str) -> Optional[WorkerFailure]:
    """The worker whose exit record came last among those that failed on their own (not killed by the launcher):
    what made the last reset, when horovodrun names no worker (it does not after --reset-limit)."""
    failed = []
    for (host, slot), p in RankLogs(log_dir).worker_records("exit"):
        try:
            code = int(p.read_text().strip())
            failed.append((p.stat().st_mtime_ns, WorkerFailure(host, slot, code)))
        except (ValueError, OSError):
            continue
    failed = [(when, w) for when, w in failed if w.status != 0 and w.status not in KILLED and w.status > 0]
    return max(failed, key=lambda item: item[0])[1] if failed else None


def _ended(status: int) -> str:
    """How a worker ended, from horovodrun's exit code (negative: killed by that signal)."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"failed with exit status {status}"


def _worker_lines(log_dir: str, worker: WorkerFailure, starts: Mapping[tuple[str, int], int]) -> str:
    """`last lines of DIR/worker.H.S.log:` and the lines of this job's part of it, or why there are none."""
    log = RankLogs(log_dir).worker_log(worker.host, worker.slot)
    lines = shown_lines(log, start=starts.get((worker_name(worker.host), worker.slot), 0))
    if not lines:
        if log.exists():
            return f"{log} is empty"
        return f"{log} is not on this machine (each host keeps its workers' logs unless the log directory is shared)"
    body = "\n".join(f"  | {line}" for line in lines)
    return f"last lines of {log}:\n{body}"


def _driver_causes(
    said: Mapping[str, object], log_dir: str, worker: Optional[WorkerFailure]
) -> tuple[list[tuple[str, str]], Optional[WorkerFailure]]:
    """The causes horovodrun's elastic driver stopped for (--reset-limit reached, too few slots for
    --elastic-timeout, every host blacklisted), and the worker to show (after a reset limit: the last that failed)."""
    causes: list[tuple[str, str]] = []
    if "reset_limit" in said:
        limit = said["reset_limit"]
        causes.append(
            (
                "reset_limit",
                f"the job needed more resets than --reset-limit {limit} allows (a reset follows every failed worker "
                "and every change of hosts)",
            )
        )
        worker = worker or _last_failed_worker(log_dir)
        if worker:
            causes.append(("failed", f"the last failure: worker {worker.host}[{worker.slot}] {_ended(worker.status)}"))
    if "min_np" in said:
        slots, waited = said["min_np"]
        causes.append(
            (
                "min_np",
                f"fewer than {slots} slots were available for {waited} s (--elastic-timeout): horovodrun stopped "
                "waiting for hosts; list more hosts or slots, lower -np or --min-np, or raise --elastic-timeout",
            )
        )
    if "blacklisted" in said:
        causes.append(("blacklisted", "every host of the job failed: horovodrun blacklisted them all and stopped"))
    return causes, worker


def diagnose_elastic(
    log_dir: str,
    status: int,
    output: Sequence[str],
    starts: Optional[Mapping[tuple[str, int], int]] = None,
    stopped_by: Optional[str] = None,
    discovery: Optional[str] = None,
) -> Diagnosis:
    """The report of a failed elastic job, the cause first, from horovodrun's own lines (`output`: the last lines
    of its output, `parse_elastic_output`), then the worker that failed with the last lines of its log (this
    job's part: `starts`, `worker_log_sizes` before the launch). Causes, in this order: the signal hvdtrain got
    and passed on ("stopped"); --reset-limit reached ("reset_limit"); fewer slots than needed for
    --elastic-timeout ("min_np"); every host failed ("blacklisted"); every worker failed, or one did ("failed");
    the host discovery ("discovery": `discovery` is its command, to run by hand). horovodrun's traceback is not
    repeated (it is above, in its output)."""
    said = parse_elastic_output(output)
    worker = said.get("worker")
    if not isinstance(worker, WorkerFailure) or (stopped_by and (worker.status in KILLED or worker.status < 0)):
        worker = None  # no worker named, or one the stop ended
    causes: list[tuple[str, str]] = []  # (cause, words), the first is the cause
    if stopped_by:
        causes.append(("stopped", f"the job was stopped by {stopped_by}"))
    more, worker = _driver_causes(said, log_dir, worker)
    causes += more
    if "all_failed" in said and not stopped_by and (said["all_failed"] > 1 or not worker):
        n = said["all_failed"]
        causes.append(("failed", f"every worker failed ({n} of {n})" if n > 1 else "the only worker failed"))
    if worker and "reset_limit" not in said:
        first = "the first: " if len(causes) > 0 and causes[-1][1].startswith("every worker") else ""
        causes.append(("failed", f"{first}worker {worker.host}[{worker.slot}] {_ended(worker.status)}"))
    if "discovery" in said or "shutdown" in said:
        if not causes:
            detail = said.get("discovery") or "failed at its first run, and horovodrun stopped the job"
            run = f"; run it by hand to see why: {discovery}" if discovery else ""
            causes.append(("discovery", f"the host discovery {detail}{run}"))
        elif "discovery" in said and causes[0][0] == "min_np":  # what may have kept the hosts away
            causes.append(("discovery", f"meanwhile the host discovery {said['discovery']}"))
    if not causes:
        return Diagnosis(
            None,
            f"horovodrun failed with exit status {status} (its last lines are above); per-worker logs are in {log_dir}",
        )
    message = "; ".join(words for _, words in causes)
    tail_part = _worker_lines(log_dir, worker, starts or {}) if worker else f"per-worker logs are in {log_dir}"
    return Diagnosis(causes[0][0], f"{message}; {tail_part}")
