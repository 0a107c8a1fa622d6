"""An elastic job's --hosts-file (or its Slurm allocation) as horovodrun's host discovery script.

``python -m hvdtrain.launching.discover --slurm-allocation`` prints the hosts of the allocation it runs in
(SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE). ``python -m hvdtrain.launching.discover FILE [--slots-per-host N]``
prints one ``host:slots`` line per host of FILE (read
with the hostfile parser of hvdtrain.launching.hosts: ``host:slots``, ``host slots=N`` or a bare ``host`` a line, ``#``
comments, blank lines); an empty file prints nothing (the job waits for hosts). horovodrun runs it every second,
so editing FILE adds or removes hosts while the job runs. A file that does not parse (a user mid-edit) gives one
line on stderr and exit status 1: after its first run horovodrun takes a failing discovery as transient, keeps
the hosts it had and tries again a second later.
"""

from __future__ import annotations

import sys

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError
from hvdtrain.launching.elastic import ALLOCATION
from hvdtrain.launching.hosts import Host, allocation_hosts, parse_hosts_file

USAGE = f"usage: python -m hvdtrain.launching.discover FILE [--slots-per-host N] | {ALLOCATION}"


def discovery_lines(hosts: list[Host]) -> str:
    """What horovodrun reads: one host:slots line per host, in the file's order."""
    return "".join(f"{h.name}:{h.slots}\n" for h in hosts)


def _hosts(source: str, slots: int) -> list[Host]:
    """The hosts to print: the allocation's (`source` ALLOCATION), or the file's; UsageError when they do not parse."""
    if source == ALLOCATION:
        return allocation_hosts(SlurmEnv.read())
    return parse_hosts_file(source, slots)


def main(argv: list[str]) -> int:
    slots = "1"
    if len(argv) == 3 and argv[1] == "--slots-per-host":
        slots = argv[2]
    elif len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    if not slots.isdigit() or int(slots) < 1:
        print(f"hvdtrain.launching.discover: --slots-per-host {slots}: must be at least 1", file=sys.stderr)
        return 2
    try:
        hosts = _hosts(argv[0], int(slots))
    except UsageError as e:
        print(f"hvdtrain.launching.discover: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(discovery_lines(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
