"""Output paths (hvdtrain.files): the one check before work starts. The read-only and full file systems are
real: a small tmpfs in a private mount namespace (tests/fullfs.py), each snippet run in a child there that prints
what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import fullfs
import pytest

from hvdtrain.errors import UsageError
from hvdtrain.files import check_output_path, size_text


def in_full_fs(tmp_path, body: str, leave: int = 0, size: str = "512k") -> dict:
    """Run `body` (Python; MNT is the mount, as a Path; it sets `out`, a dict) with a tmpfs on MNT that is full
    but for about `leave` bytes, and return `out`."""
    code = "import json, os, sys\nfrom pathlib import Path\nMNT = Path(sys.argv[1])\nout = {}\n"
    code += textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    mnt = tmp_path / "mnt"
    proc = fullfs.run([sys.executable, "-c", code, str(mnt)], mnt, size=size, leave=leave)
    assert proc.returncode == 0, proc.stderr
    assert not mnt.exists() or not os.listdir(mnt), "the tmpfs should be gone with its namespace"
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "target,directory,needle",
    [
        ("a-file", True, "--x a-file: exists and is not a directory; choose another path"),
        ("a-dir", False, "--x a-dir: is a directory; give the path of a file (e.g. a-dir/NAME)"),
        ("new/", False, "--x new/: is a directory; give the path of a file (e.g. new/NAME)"),
        ("a-file/x.png", False, "a-file is a file, not a directory; choose another path"),
        ("a-file/deeper/run", True, "a-file is a file, not a directory; choose another path"),
    ],
)
def test_the_wrong_kind_of_path_is_one_line(tmp_path, monkeypatch, target, directory, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir").mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UsageError) as e:
        check_output_path(target, "--x", directory=directory)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before


def test_paths_that_can_be_written_pass_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.png").write_text("x")
    assert check_output_path("runs/a/b", "--run-dir") == tmp_path / "runs" / "a" / "b"
    assert check_output_path("old.png", "--plot", directory=False) == tmp_path / "old.png"
    assert check_output_path("new/sub/p.png", "--plot", directory=False) == tmp_path / "new" / "sub" / "p.png"
    assert sorted(os.listdir(tmp_path)) == ["old.png"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a directory whatever its permissions")
def test_a_directory_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(UsageError, match=f"--plot {locked}/p.png: cannot create files in {locked} "):
            check_output_path(locked / "p.png", "--plot", directory=False)
    finally:
        locked.chmod(0o700)


def test_a_read_only_or_full_file_system_is_refused_before_work(tmp_path):
    """Root's permissions pass everywhere: only trying tells a read-only file system; the free space is read."""
    out = in_full_fs(
        tmp_path,
        """
        from hvdtrain.errors import UsageError
        from hvdtrain.files import check_output_path
        for name, args in {"dir": (MNT / "run", "--run-dir"), "file": (MNT / "p.png", "--plot", False)}.items():
            try:
                check_output_path(*args)
            except UsageError as e:
                out[name] = str(e)
        os.system(f"mount -o remount,ro {MNT}")
        try:
            check_output_path(MNT / "p.png", "--plot", False)
        except UsageError as e:
            out["ro"] = str(e)
        out["left"] = sorted(os.listdir(MNT))
        """,
        leave=8192,
    )
    mnt = tmp_path / "mnt"
    assert out["dir"].startswith(f"--run-dir {mnt}/run: only ")
    assert f"free on {mnt} (at least 1 MiB needed); free some space or choose another path" in out["dir"]
    assert out["file"].startswith(f"--plot {mnt}/p.png: only ") and "KiB free on" in out["file"]
    assert out["ro"] == f"--plot {mnt}/p.png: cannot create files in {mnt} (Read-only file system); choose another path"
    assert out["left"] == [fullfs.FILLER]


def test_size_text():
    assert [size_text(b) for b in (0, 1023, 12 * 1024, 3 * 1024**2 + 5, 1.25 * 1024**3)] == [
        "0 B", "1023 B", "12 KiB", "3 MiB", "1.25 GiB"
    ]  # fmt: skip
