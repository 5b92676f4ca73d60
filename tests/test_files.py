"""Output files: checked before a command's work, written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.files import output_problem, write_atomically
from distillguard.verdicts import AccountVerdict, Verdicts


def test_output_problem_names_what_is_wrong(tmp_path: Path) -> None:
    assert output_problem(tmp_path / "v.json") is None
    assert output_problem(tmp_path / "missing" / "v.json") == (
        f"directory {tmp_path / 'missing'} does not exist")
    assert output_problem(tmp_path) == f"{tmp_path} is a directory"


def test_a_failed_write_leaves_the_old_file_and_no_part_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "verdicts.json"
    Verdicts(accounts=[AccountVerdict("acct_old", risk=0.1, flagged=False)]).write(target)
    before = target.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        Verdicts(accounts=[AccountVerdict("acct_new", risk=0.9, flagged=True)]).write(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["verdicts.json"]


def test_a_written_file_is_whole_and_has_the_usual_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    write_atomically(target, b"x" * 100_000)
    assert target.read_bytes() == b"x" * 100_000
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("args", [
    ["detect", "--out"],
    ["detect", "calibrate", "--labels", "{trace}", "--out"],
    ["bench", "detect", "--accounts", "{trace}", "--labels", "{trace}", "--verdicts", "{trace}",
     "--json"],
])
def test_an_output_in_a_missing_directory_is_refused_before_the_work(
        tmp_path: Path, args: list[str]) -> None:
    """A usage error up front, not a traceback after the whole run."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("")
    out = tmp_path / "no such dir" / "out.json"
    argv = [a.format(trace=trace) for a in args] + [str(out), "--trace", str(trace)]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output and "Traceback" not in result.output
    assert not out.parent.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_problem_tries_a_file_where_permissions_do_not_tell() -> None:
    """Permission bits pass a read-only file system, /proc, and every directory for
    root: ``detect --out /proc/v.json`` ran the whole detection and then failed with a
    traceback. The check now makes (and removes) a file where the output would go."""
    assert output_problem("/proc/v.json") == (
        "cannot create a file in /proc: No such file or directory")


def test_an_output_directory_is_made_and_checked_before_the_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["simulate", "--out", str(blocker / "sim"),
                                       "--preset", "smoke", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "cannot create directory" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["simulate", "--out", str(tmp_path / "new" / "sim"),
                                       "--preset", "smoke", "--quiet", "--days", "0.05"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "sim" / "trace.jsonl").is_file()


def test_a_file_error_inside_a_command_is_one_clear_line(tmp_path: Path) -> None:
    """A file or directory a command cannot use, found past its options' checks (here
    the ledger's folder under a regular file), is an error line, not a traceback."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    cfg = tmp_path / "dg.yaml"
    cfg.write_text(f"state: {{url: 'sqlite:///{tmp_path / 's.sqlite'}'}}\n"
                   f"ledger: {{path: '{blocker / 'ledger'}'}}\n")
    result = CliRunner().invoke(main, ["-c", str(cfg), "ledger", "checkpoint"])
    assert result.exit_code == 2, result.output
    assert "Not a directory" in result.stderr and "Traceback" not in result.output
    assert not isinstance(result.exception, OSError)
