"""A job's hosts as the user names them: -H, a hostfile, an elastic job's --hosts-file or what its discovery
script prints, parsed into `Host`s (pure; UsageError naming the problem and the fix), how ranks fill their slots,
and which names are this machine.

Nothing heavy is imported at module import time (the CLI imports the launching side): psutil only inside
`interface_addresses`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path
from typing import Sequence

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    slots: int


_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+$")

IPV6_HOSTS = (
    "IPv6 addresses cannot be passed on: horovodrun and mpirun split host lists at ':'; give the host a name "
    "(in /etc/hosts or ~/.ssh/config) or use its IPv4 address"
)


def _is_ipv6(token: str) -> bool:
    """An IPv6 address, bracketed or not, with or without a :slots suffix."""
    import ipaddress

    token = token.strip()
    for candidate in (token, token.rpartition(":")[0]):
        try:
            ipaddress.IPv6Address(candidate.removeprefix("[").removesuffix("]"))
            return True
        except ValueError:
            pass
    return "[" in token


def _parse_host(token: str, where: str) -> Host:
    if _is_ipv6(token):
        raise UsageError(f"{where}: bad host '{token.strip()}': {IPV6_HOSTS}")
    name, sep, slots_text = token.strip().rpartition(":")
    if not sep:
        name, slots_text = token.strip(), "1"
    if not name or not _HOST_RE.match(name):
        raise UsageError(f"{where}: bad host '{token}': expected host:slots, e.g. node1:4")
    try:
        slots = int(slots_text)
    except ValueError:
        raise UsageError(f"{where}: bad slot count in '{token}': expected host:slots, e.g. node1:4") from None
    return _host(name, slots, where)


def _host(name: str, slots: int, where: str) -> Host:
    """A Host of -H or a hostfile line (`where`), which must have at least one slot."""
    if slots <= 0:
        raise UsageError(f"{where}: host '{name}' has {slots} slots; slots must be at least 1")
    return Host(name, slots)


def _check_duplicates(hosts: Sequence[Host], where: str) -> None:
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise UsageError(f"{where}: host '{h.name}' is listed twice; give each host once with its total slots")
        seen.add(h.name)


def parse_hosts(text: str) -> list[Host]:
    """Parse ``-H host1:4,host2:4`` (a missing `:slots` means 1 slot, as in horovodrun)."""
    tokens = text.split(",")
    if not text.strip() or any(not t.strip() for t in tokens):
        raise UsageError(f"-H: bad host list '{text}': expected host:slots[,host:slots...], e.g. localhost:2")
    hosts = [_parse_host(t, "-H") for t in tokens]
    _check_duplicates(hosts, "-H")
    return hosts


def parse_hostfile(path: str) -> list[Host]:
    """Parse a hostfile of ``host slots=N`` lines (also ``host:N`` or a bare host); `#` starts a comment."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--hostfile: no such file '{path}'; give the path of a file of 'host slots=N' lines")
    hosts = parse_hostfile_text(p.read_text(), path)
    if not hosts:
        raise UsageError(f"{path}: the hostfile lists no hosts; add lines like 'localhost slots=2'")
    return hosts


def parse_hostfile_text(text: str, path: str, slots_per_host: int = 1) -> list[Host]:
    """The hosts of a hostfile's text (`path` names it in errors): ``host slots=N``, ``host:N`` or a bare
    ``host`` (`slots_per_host` slots) a line, `#` comments, blank lines; each host once."""
    hosts = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        fields = line.split()
        if _is_ipv6(fields[0]):
            raise UsageError(f"{where}: bad host '{fields[0]}': {IPV6_HOSTS}")
        if len(fields) == 1:
            host = _parse_host(fields[0], where)
            hosts.append(host if ":" in fields[0] else _host(host.name, slots_per_host, where))
            continue
        m = re.fullmatch(r"(?:max_)?slots=(-?\d+)", fields[1]) if len(fields) == 2 else None
        if not m or not _HOST_RE.match(fields[0]) or ":" in fields[0]:
            raise UsageError(f"{where}: cannot parse '{raw.strip()}': expected 'host slots=N'")
        hosts.append(_host(fields[0], int(m.group(1)), where))
    _check_duplicates(hosts, path)
    return hosts


def parse_hosts_file(path: str, slots_per_host: int = 1) -> list[Host]:
    """An elastic job's --hosts-file, as `parse_hostfile` reads a hostfile, but it may be empty (the job waits for
    hosts) and a host name cannot hold ':' (horovodrun splits each discovered line at ':')."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(
            f"--hosts-file: no such file '{path}'; give the path of a file of 'host:slots' or 'host slots=N' lines"
        ) from None
    except OSError as e:
        raise UsageError(f"--hosts-file: cannot read '{path}': {e.strerror}") from None
    hosts = parse_hostfile_text(text, path, slots_per_host)
    for h in hosts:
        if ":" in h.name:
            raise UsageError(f"{path}: bad host '{h.name}': horovodrun reads 'host:slots', so a name cannot hold ':'")
    return hosts


def parse_discovered(text: str, where: str, slots_per_host: int = 1) -> list[Host]:
    """The hosts a discovery script printed: one ``host`` or ``host:slots`` line per host (blank lines skipped),
    as horovodrun reads them. `where` names the script in errors."""
    hosts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)(?::(\d+))?", line)
        if not m:
            raise UsageError(
                f"{where} printed '{line.strip()}': expected one 'host' or 'host:slots' line per host, e.g. node1:4"
            )
        hosts.append(_host(m.group(1), int(m.group(2)) if m.group(2) else slots_per_host, where))
    _check_duplicates(hosts, where)
    return hosts


def allocation_hosts(slurm: SlurmEnv) -> list[Host]:
    """The hosts of the Slurm allocation this process runs in, each with the tasks Slurm gave it; [] outside one."""
    return [Host(name, slots) for name, slots in slurm.hosts()]


def ranks_per_host(np: int, hosts: Sequence[Host]) -> list[int]:
    """How many ranks land on each host when slots are filled in order (horovodrun's and mpirun's -H)."""
    left, out = np, []
    for h in hosts:
        n = min(left, h.slots)
        out.append(n)
        left -= n
    return out


def _own_names() -> set[str]:
    name = socket.gethostname()
    names = {"localhost", "127.0.0.1", name, name.split(".")[0]}
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    return names


def interface_addresses() -> dict[str, set[str]]:
    """This machine's interfaces and their IPv4 addresses (psutil, imported here: the CLI imports this module)."""
    import psutil

    return {
        name: {a.address for a in addrs if a.family == socket.AF_INET} for name, addrs in psutil.net_if_addrs().items()
    }


def is_local_host(name: str, by_name: bool = True) -> bool:
    """Whether `name` is this machine: localhost, 127.0.0.1, this host's name (short or full) when `by_name`,
    or a name that resolves to an IPv4 address of one of this machine's interfaces. horovodrun decides by the
    address alone (network.filter_local_addresses), so pass by_name=False to agree with it."""
    if name in ("localhost", "127.0.0.1") or (by_name and name in _own_names()):
        return True
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return False
    return any(address in addresses for addresses in interface_addresses().values())


def local_interfaces() -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir("/sys/class/net")))
    except OSError:
        return ()
