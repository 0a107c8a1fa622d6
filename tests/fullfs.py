"""A real, small file system for the tests of a full disk: a tmpfs mounted in a private mount namespace, seen only
by the command run there and gone with it (no mount is left behind, whatever happens to the test).

As root the namespace is `unshare --mount`; as an ordinary user `unshare --user --map-root-user --mount`, where the
kernel lets users make one. Where neither works, the tests that need it skip, saying why.

FillDisk is a Trainer hook (`hvdtrain train --hooks fullfs:FillDisk`, tests/ on PYTHONPATH): after the job's first
checkpoint, rank 0 fills the file system of the run directory, leaving $HVDTRAIN_TEST_LEAVE bytes (default 64 KiB):
the next checkpoint finds it full.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import pytest

from hvdtrain.train.hooks import Hook

FILLER = "filler"
# Mounts a tmpfs of size $1 on $2, fills it with $2/filler up to $3 bytes left ("none": no filler), runs the rest.
_SCRIPT = """
mount -t tmpfs -o "size=$1" hvdtrain-test "$2" || exit 99
if [ "$3" != none ]; then
    cat /dev/zero > "$2/filler" 2>/dev/null
    [ "$3" -gt 0 ] && truncate -s "-$3" "$2/filler"
fi
shift 3
exec "$@"
"""


@functools.cache
def _namespace() -> tuple[Optional[list[str]], str]:
    """(the unshare command that makes a private mount namespace here, None where there is none; why not)."""
    if shutil.which("unshare") is None:
        return None, "unshare (util-linux) is not installed"
    tries = [["unshare", "--user", "--map-root-user", "--mount"]]
    if os.geteuid() == 0:
        tries.insert(0, ["unshare", "--mount"])
    for prefix in tries:
        if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
            return prefix, ""
    return None, "this kernel lets no ordinary user make a mount namespace (unshare --user --map-root-user --mount)"


def namespace() -> list[str]:
    """The unshare prefix; skips the test where there is none."""
    prefix, why = _namespace()
    if prefix is None:
        pytest.skip(f"needs a private mount namespace for a small tmpfs: {why}")
    return prefix


def run(
    command: Sequence[str], mount: Path, size: str = "512k", leave: Optional[int] = None, timeout: float = 120, **kw
) -> subprocess.CompletedProcess:
    """Run `command` with a tmpfs of `size` (and the mount options after it: "64k,ro") mounted on `mount` (made when
    missing): first filled with mount/filler up to about `leave` bytes free (whole pages) unless None. Output
    captured as text."""
    mount.mkdir(parents=True, exist_ok=True)
    where = "none" if leave is None else str(leave)
    argv = [*namespace(), "sh", "-c", _SCRIPT, "sh", size, str(mount), where, *command]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode != 99, f"could not mount a tmpfs: {proc.stderr}"
    return proc


def fill(path: Path, leave: int) -> None:
    """Fill the file system of `path` with the file `path`, then give back `leave` bytes."""
    with open(path, "wb", buffering=0) as f:
        block = bytes(64 * 1024)
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        f.truncate(max(0, f.tell() - leave))


class FillDisk(Hook):
    def __init__(self):
        self.leave = int(os.environ.get("HVDTRAIN_TEST_LEAVE", 64 * 1024))
        self.done = False

    def on_checkpoint(self, trainer, path) -> None:
        if path is None or self.done:
            return
        self.done = True
        trainer.writes.wait()  # --async-checkpoint: the file is whole once its write is done
        size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size  # sharded
        assert size > self.leave, "the next checkpoint would fit: nothing would be tested"
        fill(trainer.run_dir.path / FILLER, self.leave)


def train_onto_a_full_disk(train: str, mnt: Path, out: Path, env: dict, cwd: Path) -> dict[str, str]:
    """Run the training command `train` (a shell command line, its --run-dir mnt/run) with the hook FillDisk on an
    8 MB tmpfs at `mnt`; then list its checkpoints, give the space back and run it again with --resume. Returns what
    was said and left: full.out, full.err, full.rc, left (`ls -a` of the checkpoints), resumed.out, resumed.err,
    resumed.rc, result.json (of the resumed run)."""
    run_dir = mnt / "run"
    out.mkdir()
    script = (
        f"{train} --hooks fullfs:FillDisk > {out}/full.out 2> {out}/full.err; echo $? > {out}/full.rc; "
        f"ls -a {run_dir}/checkpoints > {out}/left; rm {run_dir}/{FILLER}; "
        f"{train} --resume > {out}/resumed.out 2> {out}/resumed.err; echo $? > {out}/resumed.rc; "
        f"cp {run_dir}/result.json {out}/"
    )
    env = {**env, "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{Path(__file__).parent}"}
    proc = run(["sh", "-c", script], mnt, size="8m", env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {p.name: p.read_text() for p in out.iterdir()}
