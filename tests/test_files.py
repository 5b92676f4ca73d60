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
