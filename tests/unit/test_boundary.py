"""The command line's one error boundary (clickopts.OneLineErrors): whatever a command raises ends as one line and an
exit status; a failure hvdtrain did not foresee keeps its traceback in a file the line names (the run's logs/ once
the command has one), and shows it on the terminal only when asked (`hvdtrain --debug`, HVDTRAIN_DEBUG=1)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from hvdtrain import errors
from hvdtrain.clickopts import OneLineErrors
from hvdtrain.errors import LaunchError, UsageError
from hvdtrain.rundir import TRACEBACK_LOG


@click.group(cls=OneLineErrors)
@click.option("--debug", is_flag=True, expose_value=False)
def group():
    pass


@group.command()
@click.argument("what")
def fail(what):
    if what == "bug":
        {}["missing"]  # noqa: B018 - a bug: a KeyError nobody foresaw
    if what == "full":
        with open("/dev/full", "w") as f:  # a real full device: ENOSPC on the write, which names no file
            f.write("x" * 100_000)
            f.flush()
    if what == "full-file":  # as hvdtrain's own writes raise it (files.write_text_atomic): the file named
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/dev/shm/x")
    if what == "usage":
        raise UsageError("--x 'a\nb\x1b[31m': not a number; give a number")
    if what == "job":
        raise LaunchError("rank 1 failed with exit status 1; last lines of logs/rank.1.log:\n  | boom", exit_code=7)
    if what == "interrupt":
        raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def no_run_dir():
    errors.keep_tracebacks_in(None)
    yield
    errors.keep_tracebacks_in(None)


def invoke(*args, env=None):
    return CliRunner().invoke(group, list(args), env=env, catch_exceptions=False)


def test_a_bug_is_one_line_exit_1_with_its_traceback_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path))
    result = invoke("fail", "bug")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(
        "hvdtrain: error: internal error (a bug in hvdtrain): KeyError: 'missing'; the traceback is in "
    )
    (kept,) = (tmp_path / "tracebacks").iterdir()
    assert str(kept) in line
    text = kept.read_text()
    assert "hvdtrain fail bug" in text and "Traceback (most recent call last)" in text and "KeyError" in text


def test_the_traceback_goes_to_the_runs_logs_once_it_has_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))
    errors.keep_tracebacks_in(tmp_path / "logs")
    result = invoke("fail", "bug")
    log = tmp_path / "logs" / TRACEBACK_LOG
    assert str(log) in result.stderr and "KeyError" in log.read_text()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_on_the_terminal(how, tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path))
    result = invoke("--debug", "fail", "bug") if how == "flag" else invoke("fail", "bug", env={"HVDTRAIN_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr and 'in fail\n    {}["missing"]' in result.stderr
    assert result.stderr.splitlines()[-1].startswith("hvdtrain: error: internal error")


def test_a_full_device_is_one_line_naming_the_file_and_the_space_left(tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path))
    result = invoke("fail", "full")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("hvdtrain: error: a write failed: the file system is full; free some space, or write")
    assert "the traceback is in" in line
    (line,) = invoke("fail", "full-file").stderr.splitlines()
    assert line.startswith("hvdtrain: error: cannot write /dev/shm/x: the file system is full (only "), line
    assert "; free some space, or write elsewhere (the traceback is in " in line


def test_a_usage_error_is_one_line_whatever_it_quotes():
    result = invoke("fail", "usage")
    assert result.exit_code == 2
    assert result.stderr == "hvdtrain: error: --x 'a\\nb\\x1b[31m': not a number; give a number\n"


def test_a_failed_jobs_report_keeps_its_lines_and_status():
    result = invoke("fail", "job")
    assert result.exit_code == 7
    assert result.stderr.splitlines() == [
        "hvdtrain: error: rank 1 failed with exit status 1; last lines of logs/rank.1.log:",
        "  | boom",
    ]


def test_ctrl_c_is_one_line_exit_130():
    result = invoke("fail", "interrupt")
    assert (result.exit_code, result.stderr.strip()) == (130, "hvdtrain: interrupted")  # after click's newline


def test_the_real_cli_takes_debug_before_the_command(tmp_path):
    """`hvdtrain --debug report FILE`: a usage error's traceback shown, the line last; without it, the line alone."""
    (tmp_path / "afile").write_text("")
    argv = [sys.executable, "-m", "hvdtrain"]
    plain = subprocess.run([*argv, "report", "afile"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    debug = subprocess.run(
        [*argv, "--debug", "report", "afile"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == debug.returncode == 2
    assert plain.stderr.startswith("hvdtrain: error: afile is not a directory") and plain.stderr.count("\n") == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`hvdtrain ... | head -1`: the pipe closes under the command's output; exit 1 (click's), nothing said."""
    script = (
        "import click\nfrom hvdtrain.clickopts import OneLineErrors\n"
        "@click.group(cls=OneLineErrors)\ndef g(): pass\n"
        "@g.command()\ndef flood():\n    for i in range(200_000): click.echo(f'line {i}')\n"
        "g(['flood'])\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout.readline() == b"line 0\n"
    writer.stdout.close()  # the reader goes away, as head does after its line
    assert writer.wait(timeout=60) == 1
    assert writer.stderr.read() == b""
