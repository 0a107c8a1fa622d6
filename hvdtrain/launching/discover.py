"""An elastic job's --hosts-file as horovodrun's host discovery script.

``python -m hvdtrain.launching.discover FILE [--slots-per-host N]`` prints one ``host:slots`` line per host of FILE (read
with the hostfile parser of hvdtrain.launching.hosts: ``host:slots``, ``host slots=N`` or a bare ``host`` a line, ``#``
comments, blank lines); an empty file prints nothing (the job waits for hosts). horovodrun runs it every second,
so editing FILE adds or removes hosts while the job runs. A file that does not parse (a user mid-edit) gives one
line on stderr and exit status 1: after its first run horovodrun takes a failing discovery as transient, keeps
the hosts it had and tries again a second later.
"""

from __future__ import annotations

import sys

from hvdtrain.errors import UsageError
from hvdtrain.launching.hosts import Host, parse_hosts_file

USAGE = "usage: python -m hvdtrain.launching.discover FILE [--slots-per-host N]"


def discovery_lines(hosts: list[Host]) -> str:
    """What horovodrun reads: one host:slots line per host, in the file's order."""
    return "".join(f"{h.name}:{h.slots}\n" for h in hosts)


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
        hosts = parse_hosts_file(argv[0], int(slots))
    except UsageError as e:
        print(f"hvdtrain.launching.discover: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(discovery_lines(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
