"""The hosts before a launch: which are this machine, the ssh preflight against a fake ssh, the ssh shim."""

import socket
import subprocess
import time

import pytest
from fakessh import make_fake_ssh, set_machine
from launchspecs import spec_of

from hvdtrain.errors import UsageError
from hvdtrain.launching.hosts import is_local_host
from hvdtrain.launching.preflight import preflight, ssh_shim_script

NO_SLURM: dict = {}


def spec(command=("python", "-c", "pass"), environ=NO_SLURM, **kw):
    return spec_of(command, environ=environ, **kw)


def test_ssh_shim_runs_the_real_ssh_with_the_config(tmp_path):
    log = tmp_path / "calls"
    real = make_fake_ssh(tmp_path / "bin", log)
    shim = tmp_path / "shim" / "ssh"
    shim.parent.mkdir()
    shim.write_text(ssh_shim_script(str(real), ["-F", str(tmp_path / "my config")]))
    shim.chmod(0o755)
    out = subprocess.run([str(shim), "-o", "X=1", "node2", "echo a b"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["node2", "eth0", "lo"], out
    assert log.read_text() == f"-F {tmp_path / 'my config'} -o X=1 node2 echo a b\n"


def test_is_local_host():
    assert is_local_host("localhost") and is_local_host("127.0.0.1")
    assert is_local_host(socket.gethostname())
    assert not is_local_host("node2.invalid")  # .invalid never resolves (RFC 6761)


def test_preflight_of_local_hosts_runs_no_ssh(fake_ssh):
    facts = preflight(spec(np=2, hosts="localhost:2"))
    assert [(f.name, f.local) for f in facts] == [("localhost", True)]
    assert not fake_ssh.exists()
    assert preflight(spec(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})) == []


def test_preflight_asks_every_other_host_over_ssh(fake_ssh, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("")
    s = spec(np=3, hosts="localhost:1,node2.invalid:1,node3.invalid:1", ssh_config=str(config))
    facts = preflight(s)
    assert [(f.name, f.local, f.hostname, f.interfaces) for f in facts[1:]] == [
        ("node2.invalid", False, "node2", ("eth0", "lo")),
        ("node3.invalid", False, "node3", ("eth0", "lo")),
    ]
    calls = sorted(fake_ssh.read_text().splitlines())
    assert calls == [
        f"-F {config} -o BatchMode=yes -o ConnectTimeout=10 {host} hostname; ls /sys/class/net"
        for host in ("node2.invalid", "node3.invalid")
    ]


def test_preflight_names_every_unreachable_host_with_sshs_words(fake_ssh):
    with pytest.raises(UsageError) as e:
        preflight(spec(np=3, hosts="down2.invalid:1,ok.invalid:1,locked3.invalid:1"))
    assert str(e.value) == (
        "cannot reach hosts down2.invalid, locked3.invalid over ssh: down2.invalid: ssh: connect to host 192.0.2.9 "
        "port 22: Connection refused; locked3.invalid: root@locked: Permission denied (publickey).; check that they "
        "are up and that 'ssh HOST' works without a password for each (or give --ssh-config)"
    )
    with pytest.raises(UsageError) as one:
        preflight(spec(np=1, hosts="down2.invalid:1"))
    assert str(one.value) == (
        "cannot reach host down2.invalid over ssh: ssh: connect to host 192.0.2.9 port 22: Connection refused; "
        "check that down2.invalid is up and that 'ssh down2.invalid' works without a password (or give --ssh-config)"
    )
    with pytest.raises(UsageError, match="broken.invalid over ssh: 'hostname; ls /sys/class/net' failed there: ls:"):
        preflight(spec(np=1, hosts="broken.invalid:1"))


def test_preflight_is_bounded(fake_ssh):
    start = time.monotonic()
    with pytest.raises(UsageError, match="cannot reach host slow.invalid over ssh: no answer within 0.5 s"):
        preflight(spec(np=2, hosts="slow.invalid:1,ok.invalid:1"), timeout=0.5)
    assert time.monotonic() - start < 5


def test_preflight_checks_the_interface_on_every_host(fake_ssh):
    assert preflight(spec(np=2, hosts="localhost:1,node2.invalid:1", network_interface="eth0"))
    with pytest.raises(UsageError) as e:
        preflight(spec(np=2, hosts="localhost:1,node2.invalid:1", network_interface="wlan0"))
    assert str(e.value) == (
        "--network-interface wlan0: host node2.invalid has no interface wlan0 (it has eth0, lo); pick one every host "
        "has: eth0"
    )
    with pytest.raises(UsageError) as both:
        preflight(spec(np=2, hosts="localhost:1,node2.invalid:1", network_interface="eth9"))
    assert str(both.value) == (
        "--network-interface eth9: host localhost has no interface eth9 (it has eth0, lo, wlan0); host node2.invalid "
        "has no interface eth9 (it has eth0, lo); pick one every host has: eth0"
    )


def test_preflight_checks_the_launching_machine(fake_ssh, monkeypatch):
    """With no rank here, the ranks still connect back here (Gloo's rendezvous, Open MPI's daemons)."""
    remote_only = spec(np=2, hosts="node2.invalid:1,node3.invalid:1", network_interface="eth0")
    assert len(preflight(remote_only)) == 2
    set_machine(monkeypatch, ("br0", "lo"))
    with pytest.raises(UsageError, match=r"this machine \(.*\), where the launcher runs, has no interface eth0"):
        preflight(remote_only)
    set_machine(monkeypatch, ("eth0", "lo"), {"lo": {"127.0.0.1"}, "eth0": set(), "br0": {"10.1.1.1"}})
    with pytest.raises(
        UsageError, match=r"has no IPv4 address on eth0.*pick an interface with an address \(here: br0\)"
    ):
        preflight(remote_only)


def test_preflight_all_local_horovodrun_needs_the_loopback(fake_ssh):
    """horovodrun with every host here keeps only interfaces holding 127.0.0.1 (and fails without one)."""
    with pytest.raises(UsageError) as e:
        preflight(spec(np=2, network_interface="eth0", launcher="horovodrun"))
    assert str(e.value) == (
        "--network-interface eth0: every host is this machine, and then horovodrun only takes an interface holding "
        "127.0.0.1 (here: lo); give --network-interface lo, leave the option out, or use --launcher mpirun"
    )
    assert preflight(spec(np=2, network_interface="lo", launcher="horovodrun"))
    assert preflight(spec(np=2, network_interface="eth0"))  # the default here: mpirun
