"""The hosts themselves, before a job is launched: the ssh preflight (every other host answers a non-interactive
ssh, and every host has the interfaces of --network-interface; for an elastic job, the hosts its discovery lists
now), and the ssh shim that gives horovodrun's (and MPICH's mpiexec's) own ssh the --ssh-config (and, for elastic
jobs, keepalives).

`preflight` is the only place here that starts processes (ssh, in parallel, each bounded); `make_ssh_shim`
writes a temporary script for the supervisor.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from hvdtrain.errors import UsageError
from hvdtrain.launching.hosts import (
    Host,
    interface_addresses,
    is_local_host,
    local_interfaces,
    parse_discovered,
    parse_hosts_file,
)

if TYPE_CHECKING:  # annotations only
    from hvdtrain.launching.spec import LaunchSpec

# What the preflight runs on every other host: its name, and its network interfaces (one per line).
PROBE = "hostname; ls /sys/class/net"
SSH_CONNECT_TIMEOUT_S = 10
PREFLIGHT_TIMEOUT_S = 20.0

# What every ssh of an elastic job's horovodrun gets: a host whose link goes down stops answering the keepalives,
# its ssh session ends with 255 after about 3 x 5 s, and the elastic driver counts its workers as failed and drops
# the host (without them, a worker's ssh waits for TCP to give up, which takes many minutes).
ELASTIC_SSH_OPTIONS = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What the preflight learned of one host of -H/--hostfile."""

    name: str  # as given in -H/--hostfile
    local: bool  # this machine: checked here, not over ssh
    hostname: str  # what `hostname` says there
    interfaces: tuple[str, ...]  # /sys/class/net there


def ssh_command(host: str, ssh_config: Optional[str], ssh: str = "ssh") -> list[str]:
    """The preflight's probe of one host: non-interactive (a password prompt would hang), bounded connect."""
    config = ["-F", ssh_config] if ssh_config else []
    options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}"]
    return [ssh, *config, *options, host, PROBE]


def parse_probe(name: str, stdout: str) -> HostFacts:
    """HostFacts from the probe's output: the host name on the first line, then one interface per line."""
    lines = _lines(stdout)
    hostname = lines[0] if lines else name
    return HostFacts(name, False, hostname, tuple(sorted(lines[1:])))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def ssh_error_line(stderr: str, returncode: int) -> str:
    """ssh's own error: the last line of its stderr that is not a warning (e.g. 'Permanently added')."""
    lines = _lines(stderr)
    errors = [line for line in lines if not line.startswith("Warning:")] or lines
    return errors[-1] if errors else f"ssh exited with status {returncode} and said nothing"


def probe_host(name: str, ssh_config: Optional[str], ssh: str, timeout: float) -> HostFacts | str:
    """Run the probe on `name` over ssh: its HostFacts, or the line that says why it failed."""
    try:
        proc = subprocess.run(
            ssh_command(name, ssh_config, ssh), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return f"cannot run {ssh}: {e.strerror}"
    if proc.returncode == 255:  # ssh's own failure (connection, authentication, host key)
        return ssh_error_line(proc.stderr, proc.returncode)
    if proc.returncode != 0:
        return f"'{PROBE}' failed there: {ssh_error_line(proc.stderr, proc.returncode)}"
    return parse_probe(name, proc.stdout)


def unreachable_message(failures: Mapping[str, str], ssh_config: Optional[str]) -> str:
    """One line for the hosts ssh could not reach (in the order given): each with ssh's own words, then the fix."""
    names = list(failures)
    ssh = f"ssh -F {ssh_config}" if ssh_config else "ssh"
    hint = "" if ssh_config else " (or give --ssh-config)"
    if len(names) == 1:
        host = names[0]
        return (
            f"cannot reach host {host} over ssh: {failures[host]}; check that {host} is up and that "
            f"'{ssh} {host}' works without a password{hint}"
        )
    detail = "; ".join(f"{host}: {failures[host]}" for host in names)
    return (
        f"cannot reach hosts {', '.join(names)} over ssh: {detail}; check that they are up and that "
        f"'{ssh} HOST' works without a password for each{hint}"
    )


def check_interfaces(nics: Sequence[str], facts: Sequence[HostFacts], here: Optional[HostFacts] = None) -> None:
    """Every host (and `here`, this machine when it runs no rank: the ranks reach the launcher through the same
    interface) has every interface of --network-interface; raises UsageError naming each host that lacks one."""
    if not nics:
        return
    checked = [*facts, *([here] if here else [])]
    problems = []
    for f in checked:
        missing = [n for n in nics if n not in f.interfaces]
        if missing:
            who = f"host {f.name}" if f is not here else f"this machine ({f.hostname}), where the launcher runs,"
            has = ", ".join(f.interfaces) or "none in /sys/class/net"
            problems.append(f"{who} has no interface {', '.join(missing)} (it has {has})")
    if not problems:
        return
    common = set.intersection(*(set(f.interfaces) for f in checked))
    if any(not f.local for f in checked):
        common.discard("lo")  # the loopback reaches no other host
    fix = f"pick one every host has: {', '.join(sorted(common))}" if common else "no interface is on every host"
    raise UsageError(f"--network-interface {','.join(nics)}: {'; '.join(problems)}; {fix}")


def preflight(spec: LaunchSpec, timeout: float = PREFLIGHT_TIMEOUT_S) -> list[HostFacts]:
    """Check the hosts before anything is launched: every host of -H/--hostfile that is not this machine answers
    a non-interactive ssh (in parallel, each bounded by `timeout`), and every host has the interfaces of
    --network-interface (this machine's from /sys/class/net, the others' from the same ssh). For an elastic job
    the hosts are those its discovery lists now (`discover`, run once). Raises UsageError naming every host that
    fails; returns what was learned, in host order. Nothing to do for srun."""
    if spec.launcher == "srun":
        return []
    if spec.elastic is not None:
        return check_hosts(spec, discover(spec, timeout), timeout)
    if not spec.hosts:
        return []
    return check_hosts(spec, spec.hosts, timeout)


def discover(spec: LaunchSpec, timeout: float = PREFLIGHT_TIMEOUT_S) -> list[Host]:
    """The hosts an elastic job's discovery lists now: the --hosts-file parsed, or the output of the
    --host-discovery-script (run once, bounded by `timeout`, without a shell) parsed as horovodrun reads it.
    UsageError when the script fails, hangs, or prints anything but 'host[:slots]' lines."""
    elastic = spec.elastic
    if elastic.hosts_file is not None:
        return parse_hosts_file(elastic.hosts_file, elastic.slots_per_host)
    argv = shlex.split(elastic.discovery)
    where = f"--host-discovery-script {argv[0]}"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{where} gave no answer within {timeout:g} s; horovodrun runs it every second") from None
    except OSError as e:
        raise UsageError(f"{where}: cannot run it: {e.strerror}") from None
    if proc.returncode != 0:
        said = _lines(proc.stderr) or _lines(proc.stdout)
        detail = f": {said[-1]}" if said else ""
        raise UsageError(
            f"{where} failed with exit status {proc.returncode}{detail}; horovodrun stops the job when its first "
            "run fails: fix the script"
        )
    return parse_discovered(proc.stdout, where, elastic.slots_per_host)


def check_hosts(spec: LaunchSpec, hosts: Sequence[Host], timeout: float = PREFLIGHT_TIMEOUT_S) -> list[HostFacts]:
    """The preflight of `hosts`: ssh to each that is not this machine, then the interfaces."""
    by_name = spec.launcher != "horovodrun"
    names = list(dict.fromkeys(h.name for h in hosts))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(32, len(names)))) as pool:
        local = dict(zip(names, pool.map(lambda name: is_local_host(name, by_name), names)))
        remote = [name for name, is_here in local.items() if not is_here]
        ssh = shutil.which("ssh") if remote else None
        if remote and ssh is None:
            raise UsageError(
                f"ssh is not installed here, and hosts {', '.join(remote)} are reached with it; install the "
                "OpenSSH client"
            )
        answers = dict(zip(remote, pool.map(lambda name: probe_host(name, spec.ssh_config, ssh, timeout), remote)))
    failures = {name: answer for name, answer in answers.items() if isinstance(answer, str)}
    if failures:
        raise UsageError(unreachable_message(failures, spec.ssh_config))
    this = HostFacts("localhost", True, socket.gethostname(), local_interfaces() if spec.nics else ())
    facts = [dataclasses.replace(this, name=name) if local[name] else answers[name] for name in names]
    check_interfaces(spec.nics, facts, None if any(local.values()) else this)
    if spec.nics and spec.launcher in ("horovodrun", "mpirun"):
        _check_launcher_addresses(spec, bool(local) and all(local.values()))
    return facts


def _check_launcher_addresses(spec: LaunchSpec, all_local: bool) -> None:
    """What the launcher needs of --network-interface on this machine. All hosts here: horovodrun then keeps
    only interfaces holding 127.0.0.1 (driver_service.get_local_interfaces) and fails without one. Otherwise
    the ranks connect back to this machine through the interface (Gloo's rendezvous server, Open MPI's
    out-of-band channel), so it needs an IPv4 address here."""
    addresses = interface_addresses()
    nics = ",".join(spec.nics)
    if all_local:
        # An elastic job's horovodrun (hvdtrain.launching.horovodrun) takes the interface as given.
        fixed = spec.elastic is not None
        if (
            spec.launcher == "horovodrun"
            and not fixed
            and not any("127.0.0.1" in addresses.get(n, ()) for n in spec.nics)
        ):
            loopback = sorted(n for n, a in addresses.items() if "127.0.0.1" in a) or ["lo"]
            raise UsageError(
                f"--network-interface {nics}: every host is this machine, and then horovodrun only takes an "
                f"interface holding 127.0.0.1 (here: {', '.join(loopback)}); give --network-interface "
                f"{loopback[0]}, leave the option out, or use --launcher mpirun"
            )
        return
    # Not the loopback (127.x): other hosts cannot reach this machine through it.
    bare = [n for n in spec.nics if not any(not a.startswith("127.") for a in addresses.get(n, ()))]
    if bare:
        usable = sorted(n for n, a in addresses.items() if a and "127.0.0.1" not in a)
        raise UsageError(
            f"--network-interface {nics}: this machine ({socket.gethostname()}) has no IPv4 address on "
            f"{', '.join(bare)} that other hosts can reach, and the ranks connect back to the launcher through it; "
            f"pick an interface with an address{' (here: ' + ', '.join(usable) + ')' if usable else ''}"
        )


def ssh_shim_args(spec: LaunchSpec) -> list[str]:
    """What the ssh shim adds to every ssh horovodrun (or MPICH's mpiexec, whose proxies it starts with `ssh`
    from PATH) runs: the elastic keepalives, then -F <--ssh-config>; [] when no shim is needed (no config and not
    elastic, or another launcher)."""
    if spec.launcher != "horovodrun" and not spec.hydra:
        return []
    args = list(ELASTIC_SSH_OPTIONS) if spec.elastic is not None else []
    return args + (["-F", spec.ssh_config] if spec.ssh_config else [])


def ssh_shim_script(real_ssh: str, args: Sequence[str]) -> str:
    """The `ssh` that run_job puts first on horovodrun's PATH (--ssh-config, or an elastic job): the real one with
    `args` (ssh_shim_args) first; horovodrun (its checks, Gloo's rank launches) and the mpirun it starts run plain
    `ssh` from PATH and take no ssh config."""
    return f'#!/bin/sh\nexec {shlex.join([real_ssh, *args])} "$@"\n'


def make_ssh_shim(spec: LaunchSpec, path: str) -> Optional[str]:
    """A temporary directory holding an executable `ssh` that runs the real one with `ssh_shim_args`; None when
    there is nothing to add, or no ssh to wrap (then nothing is reached over ssh anyway)."""
    args = ssh_shim_args(spec)
    real_ssh = shutil.which("ssh", path=path) if args else None
    if real_ssh is None:
        return None
    shim = tempfile.mkdtemp(prefix="hvdtrain-ssh-")
    script = Path(shim) / "ssh"
    script.write_text(ssh_shim_script(real_ssh, args))
    script.chmod(0o755)
    return shim
