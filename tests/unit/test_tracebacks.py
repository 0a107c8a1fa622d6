"""Tracebacks in a rank's output: Horovod's shutdown folded into one line (the rank wrapper's copy to the terminal,
the report's last lines), a user's kept whole; the wrapper run for real on a process that raises Horovod's own
HorovodInternalError and on one that raises the user's error."""

import sys

import pytest

from hvdtrain.launching import failures, tracebacks
from hvdtrain.rundir import RankLogs

# Rank 0 of a user's script under horovodrun --gloo after rank 1 was SIGKILLed (Horovod 0.28.1, recorded in the
# fault reproduction; paths shortened): Horovod's C++ line, then a chain of two tracebacks of its shutdown.
SHUTDOWN_CHAIN = """\
epoch 3 loss 0.31
[2026-12-07 12:07:55.396896: E horovod/common/operations.cc:724] [0]: Horovod background loop uncaught exception: \
[gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:21400
Traceback (most recent call last):
  File "/venv/site-packages/horovod/torch/mpi_ops.py", line 1285, in synchronize
    mpi_lib.horovod_torch_wait_and_clear(handle)
RuntimeError: Horovod has been shut down. This was caused by an exception on one of the ranks or an attempt to \
allreduce, allgather or broadcast a tensor after one of the ranks finished execution.

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/work/examples/02_data_parallel.py", line 37, in <module>
    optimizer.step()
  File "/venv/site-packages/horovod/torch/optimizer.py", line 469, in step
    self.synchronize()
  File "/venv/site-packages/horovod/torch/mpi_ops.py", line 1290, in synchronize
    raise HorovodInternalError(e)
horovod.common.exceptions.HorovodInternalError: Horovod has been shut down. This was caused by an exception on one \
of the ranks or an attempt to allreduce, allgather or broadcast a tensor after one of the ranks finished execution.
""".splitlines()
# The Trainer used as a library (examples/05), Gloo: Horovod's C++ line cut in two by the first traceback's header,
# and that traceback's RuntimeError is Gloo's lost peer.
INTERLEAVED = """\
epoch 10: test accuracy 0.9300
[Traceback (most recent call last):
2026-12-07 12:13:53. 20805: E horovod/common/operations.cc:724] [0]: Horovod background loop uncaught exception: \
[gloo/transport/tcp/pair.cc:589] Read error [127.0.0.1]:54152: Connection reset by peer
  File "/venv/site-packages/horovod/torch/mpi_ops.py", line 1285, in synchronize
    mpi_lib.horovod_torch_wait_and_clear(handle)
RuntimeError: [gloo/transport/tcp/pair.cc:589] Read error [127.0.0.1]:54152: Connection reset by peer

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/work/examples/05_own_model_and_data.py", line 35, in <module>
    result = Trainer(cfg, model=model, dataset=data).fit()  # prints test accuracy on rank 0
             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/site-packages/horovod/torch/mpi_ops.py", line 1290, in synchronize
    raise HorovodInternalError(e)
horovod.common.exceptions.HorovodInternalError: [gloo/transport/tcp/pair.cc:589] Read error [127.0.0.1]:54152: \
Connection reset by peer""".splitlines()
USER = """\
Traceback (most recent call last):
  File "/work/train.py", line 9, in <module>
    main()
  File "/work/train.py", line 7, in main
    raise ValueError("bad batch")
ValueError: bad batch""".splitlines()


def test_a_chain_of_horovods_shutdown_is_one_line():
    assert tracebacks.fold(SHUTDOWN_CHAIN, "F") == SHUTDOWN_CHAIN[:2] + ["F"]
    assert tracebacks.fold([*SHUTDOWN_CHAIN, "after"], "F") == [*SHUTDOWN_CHAIN[:2], "F", "after"]


def test_horovods_log_line_within_the_traceback_does_not_end_it():
    assert tracebacks.fold(INTERLEAVED, "F") == [INTERLEAVED[0], "F"]


def test_a_users_traceback_passes_whole():
    lines = ["before", *USER, "after"]
    assert tracebacks.fold(lines, "F") == lines
    # after a folded one (the user caught the shutdown and raised their own): theirs, without the chain's words
    chained = [*SHUTDOWN_CHAIN, "", "The above exception was the direct cause of the following exception:", "", *USER]
    assert tracebacks.fold(chained, "F") == [*SHUTDOWN_CHAIN[:2], "F", *USER]


def test_what_only_looks_like_a_traceback_is_not_held_for_ever():
    shown = []
    folder = tracebacks.Folder(shown.append, "F")
    for line in ["Traceback (most recent call last):", *["  indented"] * tracebacks.MAX_HELD]:
        folder.feed(line)
    assert len(shown) == tracebacks.MAX_HELD + 1


def test_a_traceback_cut_short_passes_as_it_is():
    assert tracebacks.fold(["a", *USER[:3]], "F") == ["a", *USER[:3]]
    assert tracebacks.fold(SHUTDOWN_CHAIN[:5], "F") == SHUTDOWN_CHAIN[:5]  # not yet known to be Horovod's


@pytest.mark.parametrize(
    "line,shutdown",
    [
        ("horovod.common.exceptions.HorovodInternalError: Horovod has been shut down.", True),
        ("HorovodShutdownError: Horovod has been shut down", True),
        ("RuntimeError: Horovod has been shut down. This was caused by", True),
        ("RuntimeError: CUDA out of memory", False),
        ("ValueError: my HorovodInternalError-like message", False),
        ("RuntimeError: [gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:21400", True),
        # Horovod turns every RuntimeError of a collective into HorovodInternalError, the user's mistakes too
        ("horovod.common.exceptions.HorovodInternalError: Mismatched allreduce tensor shapes: One rank sent", False),
    ],
)
def test_what_counts_as_horovods_shutdown(line, shutdown):
    assert tracebacks.is_shutdown(line) is shutdown


def test_the_report_shows_a_users_long_traceback_from_its_start():
    frames = [f'  File "/work/train.py", line {i}, in f{i}\n    f{i + 1}()' for i in range(12)]
    long = ["Traceback (most recent call last):", *"\n".join(frames).splitlines(), "ValueError: deep"]
    lines = [f"step {i}" for i in range(30)] + long
    assert tracebacks.last_lines(lines, 15, "F") == long  # 26 lines: all of it
    assert tracebacks.last_lines([*lines, *[f"after {i}" for i in range(15)]], 15, "F")[0] == "after 0"
    assert tracebacks.last_lines(lines[:30], 15, "F") == lines[15:30]


def test_the_failure_report_folds_horovods_shutdown(tmp_path):
    """Rank 1 killed; rank 0, a user's script, printed the traceback of Horovod's shutdown: the report names rank 1
    and shows rank 0's last lines with that traceback as one line."""
    logs = RankLogs(tmp_path)
    logs.log(0).write_text("\n".join(SHUTDOWN_CHAIN) + "\n")
    logs.exit(0).write_text("143\n")
    logs.log(1).write_text("")
    logs.exit(1).write_text("137\n")
    found = failures.diagnose(str(tmp_path), 1, np=2, this_machine=[])
    assert found.message.startswith("rank 1 failed with exit status 137 (then also ranks 0); rank.1.log is empty; ")
    assert "Traceback" not in found.message
    assert found.message.endswith(
        "  | hvdtrain: Horovod shut down under this rank (another rank failed or left the job); its traceback is in "
        "rank.0.log (not shown)"
    )


def run_wrapper(tmp_path, code):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_COMM_WORLD_", "PMIX_", "PMI_"))}
    return subprocess.run(
        [sys.executable, "-m", "hvdtrain.launching.rank", "--log-dir", str(tmp_path), "--", sys.executable, "-c", code],
        env={**env, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_the_wrapper_shows_horovods_shutdown_in_one_line_and_logs_it_whole(tmp_path):
    """A real process raising Horovod's own HorovodInternalError, chained as Horovod 0.28.1 raises it."""
    code = (
        "from horovod.common.exceptions import HorovodInternalError\n"
        "print('training', flush=True)\n"
        "try:\n    raise RuntimeError('Horovod has been shut down. This was caused by an exception')\n"
        "except RuntimeError as e:\n    raise HorovodInternalError(e)\n"
    )
    proc = run_wrapper(tmp_path, code)
    assert proc.returncode == 1
    log = RankLogs(tmp_path).log(0)
    assert proc.stdout.splitlines() == [
        "training",
        "hvdtrain: Horovod shut down under this rank (another rank failed or left the job); its traceback is in "
        f"{log}",
    ]  # fmt: skip
    text = log.read_text()
    assert text.count("Traceback (most recent call last):") == 2 and "HorovodInternalError" in text


def test_the_wrapper_passes_a_users_traceback_whole(tmp_path):
    proc = run_wrapper(tmp_path, "print('training', flush=True)\nraise ValueError('bad batch')\n")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == "training" and "Traceback (most recent call last):" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "ValueError: bad batch"
    assert RankLogs(tmp_path).log(0).read_text() == proc.stdout
