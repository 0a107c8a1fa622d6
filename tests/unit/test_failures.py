"""Reading the rank records after a failed launch: failing ranks, Horovod's stall shutdown, lost hosts, the report."""

import os

from hvdtrain.launching import failures


def failure_report(*args, **kwargs) -> str:
    """The report's text (what run_job raises as LaunchError's message)."""
    return failures.diagnose(*args, **kwargs).message


def test_failure_report(tmp_path):
    (tmp_path / "rank.0.exit").write_text("0\n")
    (tmp_path / "rank.1.exit").write_text("1\n")
    (tmp_path / "rank.1.log").write_text("line\n" * 30 + "ValueError: boom\n")
    report = failure_report(str(tmp_path), 1)
    assert report.startswith("rank 1 failed with exit status 1")
    assert report.rstrip().endswith("ValueError: boom")
    assert report.count("\n") == 15
    assert "exit status 3" in failure_report(str(tmp_path / "none"), 3)


def test_a_rank_that_said_why_in_one_line_is_reported_in_one_line(tmp_path):
    """The rank wrapper's (or the worker's) one-line usage error is the report, on the report's line."""
    why = "srun started 2 tasks with --mpi=none and each MPI rank has no PMI to find the others by"
    for r in (0, 1):
        (tmp_path / f"rank.{r}.exit").write_text("2\n")
        (tmp_path / f"rank.{r}.log").write_text(f"hvdtrain: error: {why}\n")
    os.utime(tmp_path / "rank.0.exit", ns=(1_000_000_000, 1_000_000_000))
    assert failure_report(str(tmp_path), 2) == f"rank 0 failed with exit status 2 (then also ranks 1): {why}"
    (tmp_path / "rank.0.log").write_text(f"starting\nhvdtrain: error: {why}\n")  # more than that line: the last lines
    assert failure_report(str(tmp_path), 2).endswith(f"rank.0.log:\n  | starting\n  | hvdtrain: error: {why}")


def test_failure_report_names_the_rank_that_failed_first(tmp_path):
    import os

    (tmp_path / "rank.0.exit").write_text("1\n")  # rank 0 died of Horovod's shutdown, after rank 1 raised
    (tmp_path / "rank.1.exit").write_text("1\n")
    os.utime(tmp_path / "rank.1.exit", ns=(1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "rank.0.exit", ns=(2_000_000_000, 2_000_000_000))
    assert failures.failed_ranks(str(tmp_path)) == [(1, 1), (0, 1)]
    assert failure_report(str(tmp_path), 1).startswith("rank 1 failed with exit status 1 (then also ranks 0)")


def test_failure_report_prefers_the_cause_over_horovod_shutdown(tmp_path):
    for r in (0, 1):
        (tmp_path / f"rank.{r}.exit").write_text("1\n")
    (tmp_path / "rank.0.log").write_text("HorovodInternalError: Horovod has been shut down. This was caused by...\n")
    (tmp_path / "rank.1.log").write_text("RuntimeError: boom\n")
    assert failures.failed_ranks(str(tmp_path))[0] == (1, 1)


# Rank 0's log after Horovod 0.28.1 shut a job down (`--stall-timeout 4`, rank 1 asleep before grad.3), as
# captured from a real run: a warning first, then the shutdown, then the consequence in rank 0 itself.
STALL_LOG = """\
[2026-11-23 16:57:09.757005: W /tmp/horovod-0.28.1/horovod/common/stall_inspector.cc:107] One or more tensors \
were submitted to be reduced, gathered or broadcasted by subset of ranks and are waiting for remainder of ranks for \
more than 2 seconds. This may indicate that different ranks are trying to submit different tensors or that only \
subset of ranks is submitting tensors, which will cause deadlock.\x20
Missing ranks:
1: [allreduce.grad.3]
[2026-11-23 16:57:11.757325: E /tmp/horovod-0.28.1/horovod/common/stall_inspector.cc:105] One or more tensors \
were submitted to be reduced, gathered or broadcasted by subset of ranks and are waiting for remainder of ranks for \
more than 2 seconds. This may indicate that different ranks are trying to submit different tensors or that only \
subset of ranks is submitting tensors, which will cause deadlock.\x20
Missing ranks:
1!: [allreduce.grad.3]
One or more rank (marked by "!") is stalled for longer than 4 seconds. Will shutdown.
Traceback (most recent call last):
  File "/tmp/stall/st.py", line 6, in <module>
    hvd.allreduce(torch.ones(4), name=f'grad.{step}')
horovod.common.exceptions.HorovodInternalError: Horovod has been shut down. This was caused by an exception on one \
of the ranks or an attempt to allreduce, allgather or broadcast a tensor after one of the ranks finished execution.
"""


def test_parse_stall():
    stall = failures.parse_stall(STALL_LOG)
    assert stall == failures.Stall(4, {1: ("allreduce.grad.3",)}, (1,))
    assert failures.parse_stall(STALL_LOG.split("One or more rank (marked")[0]) is None  # a warning is no shutdown
    many = (
        "Missing ranks:\n0: [b]\n2!: [a.1, a.2, a.3, a.4, a.5, a.6 ...]\n3!: [a.1, a.2, a.3, a.4, a.5, a.6 ...]\n"
        'One or more rank (marked by "!") is stalled for longer than 30 seconds. Will shutdown.\n'
    )
    stall = failures.parse_stall(many)
    assert stall.stalled == (2, 3) and stall.missing[2][-2:] == ("a.6", "...")
    assert failures.describe_stall(stall, range(5)) == (
        "ranks 2, 3 stalled: ranks 0, 1, 4 waited more than 30 s for them to submit a.1, a.2, a.3, a.4, a.5, a.6 ... "
        "(Horovod's stall shutdown, --stall-timeout 30)"
    )


def _records(tmp_path, ranks):
    """Rank records as the wrapper leaves them: rank -> (host or None, exit status or None, log text)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for rank, (host, status, log) in ranks.items():
        if host is not None:
            (tmp_path / f"rank.{rank}.host").write_text(f"{host}\n")
        if status is not None:
            (tmp_path / f"rank.{rank}.exit").write_text(f"{status}\n")
        (tmp_path / f"rank.{rank}.log").write_text(log)
    return str(tmp_path)


def test_failure_report_names_the_stalled_rank_first(tmp_path):
    """The stalled rank never fails by itself: the launcher kills it (143, or no record at all), after rank 0
    has failed with Horovod's shutdown; the report still starts with it."""
    for rank1 in [("vm", 143, ""), ("vm", None, "step 2\n")]:
        log_dir = _records(tmp_path, {0: ("vm", 1, STALL_LOG), 1: rank1})
        report = failure_report(log_dir, 1, np=2, placement={0: "vm", 1: "vm"}, this_machine={"vm"})
        first = report.splitlines()[0]
        expected = (
            "rank 1 stalled: rank 0 waited more than 4 s for it to submit allreduce.grad.3 (Horovod's stall "
            "shutdown, --stall-timeout 4); then rank 0 failed (exit status 1); "
        )
        assert first.startswith(expected), first
        # The stalled rank's own last lines when it has any, else (said so) the first failing rank's.
        rest = first[len(expected) :]
        assert rest == (f"last lines of {tmp_path}/rank.1.log:" if rank1[2] else
                        f"rank.1.log is empty; last lines of {tmp_path}/rank.0.log:"), rest  # fmt: skip
        (tmp_path / "rank.1.exit").unlink(missing_ok=True)


def test_failure_report_names_a_lost_host_and_its_ranks(tmp_path):
    log_dir = _records(
        tmp_path,
        {
            0: ("node1", 143, "started\n"),
            1: ("node1", 143, "started\n"),
            2: ("node2", None, "started\n"),
            3: ("node2", None, "started\n"),
        },
    )
    where = {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
    report = failure_report(log_dir, 1, np=4, placement=where, this_machine={"node1"})
    assert report == (
        "host node2 was lost: ranks 2, 3 ran there and left no exit status (killed, or the host went down); then "
        f"ranks 0, 1 failed (exit statuses 143, 143); last lines of {tmp_path}/rank.0.log:\n  | started"
    )
    # The host is named as in -H (placement), whatever its ranks recorded (e.g. namespaces sharing a hostname).
    shared = failure_report(log_dir, 1, np=4, placement={0: "a", 1: "a", 2: "b", 3: "b"}, this_machine={"a"})
    assert shared.startswith("host b was lost: ranks 2, 3 ran there")
    # Without placement (srun), by the host records.
    assert failure_report(log_dir, 1, np=4, this_machine={"node1"}).startswith("host node2 was lost")


def test_a_rank_failing_by_itself_is_no_lost_host(tmp_path):
    """One rank per host: rank 1 raises on node2, the launcher SIGKILLs rank 0 on node1 (no exit record). Node1
    looks exactly like a lost host, but rank 1's own failure is the cause."""
    log_dir = _records(tmp_path, {0: ("node1", None, "step 7\n"), 1: ("node2", 1, "ValueError: boom\n")})
    report = failure_report(log_dir, 1, np=2, placement={0: "node1", 1: "node2"}, this_machine={"node0"})
    assert report.startswith("rank 1 failed with exit status 1; last lines of") and "lost" not in report
    assert report.endswith("  | ValueError: boom")


def test_lost_hosts_rule():
    rec = failures.RankRecord
    node2_gone = {0: rec(0, "n1", 143, consequence=True), 1: rec(1, "n2"), 2: rec(2, "n2")}
    assert failures.lost_hosts(node2_gone) == [("n2", [1, 2])]
    # A host with one rank that left an exit record was not lost (its others were killed).
    assert failures.lost_hosts({**node2_gone, 2: rec(2, "n2", 143, consequence=True)}) == []
    # Nothing recorded an exit anywhere: every host but this machine.
    nothing = {0: rec(0, "n1"), 1: rec(1, "n2")}
    assert failures.lost_hosts(nothing, this_machine={"n1"}) == [("n2", [1])]
    # A rank without a host record (not started, or its records are on its own host) counts for nothing.
    assert failures.lost_hosts({0: rec(0, "n1", 143, consequence=True), 1: rec(1)}) == []
    # Ranks explained otherwise (stalled) do not make their host lost.
    assert failures.lost_hosts(node2_gone, explained={1, 2}) == []


def test_failure_report_reads_only_this_jobs_part_of_the_logs(tmp_path):
    """Logs are appended to (a run directory's logs hold every attempt): an old stall is not this job's."""
    old = STALL_LOG
    log_dir = _records(tmp_path, {0: ("vm", 1, old + "ValueError: new failure\n"), 1: ("vm", 0, "")})
    starts = {0: len(old.encode())}
    report = failure_report(log_dir, 1, np=2, this_machine={"vm"}, starts=starts)
    assert report.startswith("rank 0 failed with exit status 1; last lines of"), report
    assert report.splitlines()[1:] == ["  | ValueError: new failure"]
    assert failure_report(log_dir, 1, np=2, this_machine={"vm"}).startswith("rank 1 stalled")


def test_failure_report_when_the_log_is_elsewhere(tmp_path):
    (tmp_path / "rank.3.exit").write_text("2\n")
    report = failure_report(str(tmp_path), 2)
    assert report == f"rank 3 failed with exit status 2; {tmp_path}/rank.3.log is not on this machine " + (
        "(each host keeps its ranks' logs unless the log directory is shared)"
    )


def test_killed_ranks_come_after_the_cause(tmp_path):
    for r, status in ((0, 143), (1, 137), (2, 143)):
        (tmp_path / f"rank.{r}.exit").write_text(f"{status}\n")
    os.utime(tmp_path / "rank.1.exit", ns=(3_000_000_000, 3_000_000_000))  # recorded last, still the cause
    assert failures.failed_ranks(str(tmp_path))[0] == (1, 137)  # SIGKILLed alone: the OOM killer, say


def test_gloo_losing_a_peer_is_a_consequence(tmp_path):
    """Under Gloo the ranks that lose a peer abort (134) with gloo::IoException: the lost host is the cause."""
    io_error = (
        "terminate called after throwing an instance of 'gloo::IoException'\n"
        "  what():  [gloo/transport/tcp/pair.cc:589] Read error [192.0.2.2]:59022: Connection reset by peer\n"
    )
    log_dir = _records(tmp_path, {0: ("node1", 134, io_error), 1: ("node2", None, "started\n")})
    report = failure_report(log_dir, 1, np=2, placement={0: "node1", 1: "node2"}, this_machine={"node1"})
    assert report.startswith(
        "host node2 was lost: rank 1 ran there and left no exit status (killed, or the host went down); then rank 0 "
        "failed (exit status 134); last lines of"
    ), report


def test_a_stopped_job_is_said_to_be_stopped(tmp_path):
    """hvdtrain got SIGTERM (scancel, timeout) and passed it on: no host is called lost for the ranks it killed."""
    log_dir = _records(tmp_path, {0: ("node1", 143, "step 9\n"), 1: ("node2", None, "step 9\n")})
    where = {0: "node1", 1: "node2"}
    report = failure_report(log_dir, 143, np=2, placement=where, this_machine={"node1"}, stopped_by="SIGTERM")
    assert report.splitlines()[0] == (
        f"the job was stopped by SIGTERM; then rank 0 failed (exit status 143); last lines of {tmp_path}/rank.0.log:"
    )
    (tmp_path / "rank.0.exit").unlink()
    nothing = failure_report(log_dir, 143, np=2, placement=where, this_machine={"node1"}, stopped_by="SIGTERM")
    assert nothing == f"the job was stopped by SIGTERM; per-rank logs are in {tmp_path}"
    assert "host node2 was lost" in failure_report(log_dir, 143, np=2, placement=where, this_machine={"node1"})


def test_the_report_says_whose_lines_it_shows(tmp_path):
    """Rank 2 died silently (a segfault before its first line): its empty log is named, then rank 1's lines."""
    peer_gone = "terminate called after throwing an instance of 'gloo::IoException'\n"
    log_dir = _records(tmp_path, {1: ("a", 134, peer_gone), 2: ("b", 139, "")})
    report = failure_report(log_dir, 1, np=3, this_machine={"a"})
    assert report.splitlines()[0] == (
        f"rank 2 failed with exit status 139 (then also ranks 1); rank.2.log is empty; last lines of "
        f"{tmp_path}/rank.1.log:"
    )


def test_diagnose_says_what_came_first(tmp_path):
    """The cause a requeue decision reads: a stall or a lost host (a job can get over them), a stop, a failure."""
    where = {0: "node1", 1: "node2"}
    stall = _records(tmp_path / "s", {0: ("node1", 1, STALL_LOG), 1: ("node2", 143, "")})
    lost = _records(tmp_path / "l", {0: ("node1", 143, "step 9\n"), 1: ("node2", None, "step 9\n")})
    failed = _records(tmp_path / "f", {0: ("node1", None, "step 7\n"), 1: ("node2", 1, "ValueError: boom\n")})
    empty = _records(tmp_path / "e", {})

    def cause(log_dir, **kw):
        return failures.diagnose(log_dir, 1, np=2, placement=where, this_machine={"node1"}, **kw).cause

    assert cause(stall) == "stall"
    assert cause(lost) == "lost_host"
    assert cause(lost, stopped_by="SIGTERM") == "stopped"
    assert cause(failed) == "failed"
    assert cause(empty) is None
    elastic = {"min_np", "reset_limit", "blacklisted", "discovery"}  # diagnose_elastic's own
    watchdog = {"hang"}  # run_job's own, from the hang watchdog (launching.watchdog)
    assert set(failures.CAUSES) == {"stall", "lost_host", "stopped", "failed"} | elastic | watchdog
