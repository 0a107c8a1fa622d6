"""A stand-in for ssh, and this machine's interfaces as the launching side sees them, for the preflight's tests
(imported by conftest.py and the test modules)."""

import sys

from hvdtrain.launching import hosts, preflight


def make_fake_ssh(bin_dir, log):
    """An `ssh` that records its arguments and answers like the real one: hosts named down* refuse, locked*
    deny the key, slow* never answer, broken* run the probe and fail, others print their name and interfaces."""
    bin_dir.mkdir(exist_ok=True)
    ssh = bin_dir / "ssh"
    ssh.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "host = sys.argv[-2]\n"
        "if host.startswith('down'):\n"
        "    sys.exit(print('ssh: connect to host 192.0.2.9 port 22: Connection refused', file=sys.stderr) or 255)\n"
        "if host.startswith('locked'):\n"
        "    print(\"Warning: Permanently added 'locked' (ED25519) to the list of known hosts.\", file=sys.stderr)\n"
        "    sys.exit(print('root@locked: Permission denied (publickey).', file=sys.stderr) or 255)\n"
        "if host.startswith('slow'):\n"
        "    time.sleep(30)\n"
        "if host.startswith('broken'):\n"
        "    sys.exit(print('ls: cannot access /sys/class/net: No such file', file=sys.stderr) or 2)\n"
        "print(host.split('.')[0]); print('eth0'); print('lo')\n"
    )
    ssh.chmod(0o755)
    return ssh


def set_machine(monkeypatch, interfaces=None, addresses=None):
    """This machine's interfaces (/sys/class/net) and their addresses, as the launching side sees them."""
    for module in (hosts, preflight):
        if interfaces is not None:
            monkeypatch.setattr(module, "local_interfaces", lambda: interfaces)
        if addresses is not None:
            monkeypatch.setattr(module, "interface_addresses", lambda: addresses)
