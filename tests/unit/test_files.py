"""Output paths and the writes into them (hvdtrain.files): the one check before work starts, atomic writes, whole
appends, and a full file system said in one line with the space left. The full file systems are real: a small tmpfs
in a private mount namespace (tests/fullfs.py), each snippet run in a child there that prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import fullfs
import pytest

from hvdtrain.errors import UsageError
from hvdtrain.files import append_text, check_output_path, size_text, write_text_atomic


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


def test_writes_onto_a_full_file_system_keep_what_was_there(tmp_path):
    """An atomic write keeps the previous file and leaves no temporary file; an append keeps every earlier line
    whole (the refused part cut back off); a plot keeps the previous picture. Each is one line naming the path
    and the space left."""
    out = in_full_fs(
        tmp_path,
        """
        from hvdtrain.errors import DiskFullError
        from hvdtrain.files import append_text, write_json
        from hvdtrain.render import save_plot
        write_json(MNT / "result.json", {"old": True})
        append_text(MNT / "metrics.jsonl", '{"step": 1}\\n')
        save_plot(MNT / "report.png", lambda axes: axes[0].plot([1, 2]))
        plot_size = (MNT / "report.png").stat().st_size
        with open(MNT / "filler", "r+b", buffering=0) as f:  # now fill what is left
            f.seek(0, 2)
            try:
                while True:
                    f.write(bytes(65536))
            except OSError:
                pass
        for name, write in {
            "json": lambda: write_json(MNT / "result.json", {"new": "x" * 100_000}),
            "append": lambda: append_text(MNT / "metrics.jsonl", '{"step": 2, "pad": "' + "x" * 100_000 + '"}\\n'),
            "plot": lambda: save_plot(MNT / "report.png", lambda axes: axes[0].plot(range(1000))),
        }.items():
            try:
                write()
            except DiskFullError as e:
                out[name] = str(e)
        out["result"] = json.loads((MNT / "result.json").read_text())
        out["metrics"] = (MNT / "metrics.jsonl").read_text()
        out["plot_kept"] = (MNT / "report.png").stat().st_size == plot_size
        out["left"] = sorted(os.listdir(MNT))
        """,
        leave=200_000,
    )
    mnt = tmp_path / "mnt"
    for name, path in (("json", "result.json"), ("append", "metrics.jsonl"), ("plot", "report.png")):
        assert out[name].startswith(f"cannot write {mnt / path}: the file system is full (only "), out[name]
        assert out[name].endswith(f"free on {mnt}); free some space, or write elsewhere")
    assert out["result"] == {"old": True}
    assert out["metrics"] == '{"step": 1}\n'
    assert out["plot_kept"]
    assert out["left"] == sorted([fullfs.FILLER, "metrics.jsonl", "report.png", "result.json"])


def test_a_checkpoint_that_finds_the_disk_full_names_the_last_complete_one(tmp_path):
    out = in_full_fs(
        tmp_path,
        """
        import torch
        from hvdtrain.errors import DiskFullError
        from hvdtrain.train import checkpoint
        ckpt = MNT / "checkpoints"
        checkpoint.save({"w": torch.ones(1000)}, ckpt, 10)
        try:
            checkpoint.save({"w": torch.zeros(200_000)}, ckpt, 20)  # 800 KB: more than is left
        except DiskFullError as e:
            out["error"] = str(e)
        out["left"] = sorted(os.listdir(ckpt))
        out["w"] = checkpoint.load(ckpt / "step-00000010.pt")["w"].sum().item()
        """,
        leave=256 * 1024,
        size="1m",
    )
    ckpt = tmp_path / "mnt" / "checkpoints"
    assert out["error"].startswith(f"cannot write {ckpt}/step-00000020.pt: the file system is full (only ")
    assert out["error"].endswith(
        f"free on {tmp_path / 'mnt'}); the last complete checkpoint {ckpt}/step-00000010.pt is intact: free some "
        "space, then resume with --resume"
    )
    assert out["left"] == ["step-00000010.pt"] and out["w"] == 1000.0


def test_appends_and_atomic_writes(tmp_path):
    append_text(tmp_path / "m.jsonl", "a\n")
    append_text(tmp_path / "m.jsonl", "b\n")
    assert (tmp_path / "m.jsonl").read_text() == "a\nb\n"
    write_text_atomic(tmp_path / "d" / "x.txt", "one")
    write_text_atomic(tmp_path / "d" / "x.txt", "two", mode=0o600)
    written = tmp_path / "d" / "x.txt"
    assert written.read_text() == "two" and written.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path / "d") == ["x.txt"]


def test_size_text():
    assert [size_text(b) for b in (0, 1023, 12 * 1024, 3 * 1024**2 + 5, 1.25 * 1024**3)] == [
        "0 B", "1023 B", "12 KiB", "3 MiB", "1.25 GiB"
    ]  # fmt: skip


def test_a_rank_whose_output_finds_the_disk_full_ends_in_its_one_line(tmp_path):
    """A benchmark worker's (or the probe's) JSON onto a full file system: errors.rank_main ends the rank with the
    one line and exit status 1, which the launch report shows; no traceback."""
    mnt = tmp_path / "mnt"
    code = (
        "import sys\nfrom hvdtrain.errors import rank_main\nfrom hvdtrain.files import write_json\n"
        "sys.exit(rank_main(lambda argv: write_json(argv[0], {'rows': ['x' * 100_000]}), sys.argv[1:]))\n"
    )
    proc = fullfs.run([sys.executable, "-c", code, str(mnt / "parts" / "mpi.json")], mnt, size="256k", leave=16384)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith(f"hvdtrain: error: cannot write {mnt}/parts/mpi.json: the file system is full (only ")
    assert len(proc.stderr.splitlines()) == 1
