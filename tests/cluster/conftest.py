"""A simulated cluster for this tier: hosts node1..nodeN in network namespaces with sshd and a multi-node Slurm
(scripts/cluster-local.sh). The session brings it up (or reuses one that is up) and, when it brought it up, takes
it down at the end and checks that nothing it made is left: namespaces, /etc/netns entries, daemons, ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from slurmjobs import Slurm, launch_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "cluster-local.sh"
STATE = os.environ.get("HVDTRAIN_CLUSTER_DIR", "/tmp/hvdtrain-cluster")
HOSTS = 2


def _why_no_namespaces() -> str | None:
    """Why this machine cannot make the cluster (None when it can): only a machine that truly cannot create
    network namespaces skips the tier; a missing package is a failure (the set-up installs them)."""
    if os.geteuid() != 0:
        return "network namespaces need root; run the tests as root"
    probe = f"hvdtrain-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this machine cannot create network namespaces ({made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _script(*args, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HVDTRAIN_CLUSTER_DIR": STATE}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _leftovers() -> list[str]:
    """What the cluster could leave behind: its namespaces, /etc/netns entries, daemons and processes run there."""
    found = []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    found += [f"namespace {n}" for n in names if n.startswith("hvdtrain-")]
    found += [f"file {p}" for p in Path("/etc/netns").glob("hvdtrain-*")] if Path("/etc/netns").is_dir() else []
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if STATE in cmd or (p.info["name"] in ("slurmd", "slurmstepd", "orted") and "hvdtrain-cluster" in cmd):
            found.append(f"process {p.pid}: {cmd[:120]}")
    return found


class Cluster:
    """The hosts of the simulated cluster, and how to run things on them (every call has a timeout)."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.nodes = [f"node{k}" for k in range(1, HOSTS + 1)]
        self.ssh_config = env["HVDTRAIN_SSH_CONFIG"]

    def on(self, node: str) -> list[str]:
        """The argv prefix that runs a command on `node` (its network, hostname and /etc/hosts)."""
        return ["bash", str(SCRIPT), "exec", node, "--"]

    def run(self, node, argv, cwd=None, timeout=180, extra_env=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.on(node), *map(str, argv)], cwd=cwd, env={**self.env, **(extra_env or {})}, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip

    def hvdtrain(self, *args, node="node1", cwd=None, timeout=240, extra_env=None) -> subprocess.CompletedProcess:
        return self.run(node, [sys.executable, "-m", "hvdtrain", *args], cwd, timeout, extra_env)

    def popen(self, node, argv, cwd, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(
                [*self.on(node), *map(str, argv)], cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def fault(self, *args) -> None:
        proc = _script(*args, timeout=60)
        assert proc.returncode == 0, proc.stderr

    def restart(self) -> None:
        """Bring every host back (after a fault test): `up` takes down what is left and makes it anew."""
        proc = _script("up", str(HOSTS), timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    why = _why_no_namespaces()
    if why:
        pytest.skip(f"no simulated cluster: {why}")
    for tool in ("sshd", "slurmd"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), (
            f"{tool} is not installed: run scripts/setup.sh --slurm (make test does)"
        )
    proc = _script("up", str(HOSTS), timeout=240)
    assert proc.returncode == 0, f"scripts/cluster-local.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    started = proc.stdout.strip().splitlines()[-1] == "up"
    env = launch_env(
        tmp_path_factory, HVDTRAIN_SSH_CONFIG=f"{STATE}/ssh/ssh_config", SLURM_CONF=f"{STATE}/slurm/slurm.conf"
    )
    session = Cluster(env)
    session.slurm = Slurm(env, prefix=session.on("node1"))
    yield session
    for job in session.slurm.jobs:
        session.slurm.run(["scancel", job], check=False)
    if started:
        down = _script("down", timeout=180)
        assert down.returncode == 0, down.stderr
        left = _leftovers()
        assert not left, "the cluster left things behind:\n" + "\n".join(left)
