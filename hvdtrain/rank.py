"""The per-rank wrapper: ``python -m hvdtrain.rank --log-dir DIR -- COMMAND...``.

Every launcher starts the user's command through this wrapper on each rank. It runs the command, copies
its output both to the wrapper's own stdout (which the launcher shows, prefixed by rank) and to
DIR/rank.R.log, passes on the signals a scheduler sends, and finally writes DIR/rank.R.exit with the exit
status, so that the launching side can say which rank failed and show its last lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from hvdtrain.env import rank_info
from hvdtrain.files import write_text_atomic
from hvdtrain.rundir import RankLogs

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--log-dir" or argv[2] != "--":
        print("usage: python -m hvdtrain.rank --log-dir DIR -- COMMAND...", file=sys.stderr)
        return 2
    log_dir, command = Path(argv[1]), argv[3:]
    logs = RankLogs(log_dir)
    rank = rank_info().rank
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HVDTRAIN_LOG_DIR": str(log_dir), "PYTHONUNBUFFERED": "1"}
    with open(logs.log(rank), "ab", buffering=0) as log:
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        except OSError as e:
            msg = f"hvdtrain: rank {rank}: cannot start {command[0]!r}: {e.strerror}\n".encode()
            log.write(msg)
            sys.stderr.buffer.write(msg)
            status = 127
        else:
            for s in _FORWARDED:
                signal.signal(s, lambda signum, _frame: proc.send_signal(signum))
            out = sys.stdout.buffer
            for chunk in iter(lambda: proc.stdout.readline(), b""):
                log.write(chunk)
                try:
                    out.write(chunk)
                    out.flush()
                except (BrokenPipeError, OSError):
                    pass  # the launcher went away; keep the log complete
            status = proc.wait()
            if status < 0:
                status = 128 - status
    write_text_atomic(logs.exit(rank), f"{status}\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
