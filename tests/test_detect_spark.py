"""Batch detection on Spark (local mode) gives the same verdicts as the DuckDB path.

One local[2] Spark session is shared by the module. The trace is a simulated smoke world
written in shuffled line order, so both paths must sort it; Spark reads it in several
input splits, so its sort crosses partitions.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from distillguard.detect.batch import BatchResult, run_batch
from distillguard.detect.calibration import Calibration
from distillguard.simulate import simulate
from distillguard.traceio import FormatError

pyspark = pytest.importorskip("pyspark")

from distillguard.detect_spark.job import run_spark, session  # noqa: E402


def same_verdicts(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Every account and campaign verdict, byte for byte, and the detector's counts."""
    counts = ("exchanges", "evaluations", "tick_seconds")
    return (orjson.dumps(a["accounts"]) == orjson.dumps(b["accounts"])
            and orjson.dumps(a["campaigns"]) == orjson.dumps(b["campaigns"])
            and [a["detector"][k] for k in counts] == [b["detector"][k] for k in counts])


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    s = session("local[2]", app_name="distillguard-test", conf={
        "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4",
        "spark.driver.memory": "1g"})
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    trace, accounts, _ = simulate(tmp_path_factory.mktemp("spark"), preset="smoke", seed=7,
                                  days=0.5)
    lines = trace.read_bytes().splitlines()
    random.Random(7).shuffle(lines)
    shuffled = trace.with_name("shuffled.jsonl")
    shuffled.write_bytes(b"\n".join(lines) + b"\n\n")   # a trailing blank line is skipped
    return shuffled, accounts


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped calibration, read once, so every run of the module uses the same one."""
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    Calibration.read().write(path)
    return path


@pytest.fixture(scope="module")
def duck(world: tuple[Path, Path], calibration: Path) -> BatchResult:
    trace, accounts = world
    result, _ = run_batch(trace, Calibration.read(calibration), accounts=accounts)
    return result


def test_spark_and_duckdb_give_the_same_verdicts(spark: object, world: tuple[Path, Path],
                                                 duck: BatchResult, calibration: Path
                                                 ) -> None:
    trace, accounts = world
    sparked, _ = run_spark(spark, trace, Calibration.read(calibration),  # type: ignore[arg-type]
                           accounts=accounts, partitions=4)
    assert sparked.exchanges == duck.exchanges > 500
    assert sparked.evaluations == duck.evaluations
    flagged = [a.account_id for a in duck.verdicts.accounts if a.flagged]
    assert flagged and duck.verdicts.campaigns, "the smoke world has campaigns to find"
    assert same_verdicts(sparked.verdicts.to_json(), duck.verdicts.to_json())


def test_cli_writes_the_same_verdicts(spark: object, world: tuple[Path, Path],
                                      duck: BatchResult, calibration: Path,
                                      tmp_path: Path) -> None:
    from distillguard.cli import main

    trace, accounts = world
    out = tmp_path / "spark.json"
    result = CliRunner().invoke(main, ["spark", "detect", "--trace", str(trace), "--accounts",
                                       str(accounts), "--out", str(out), "--partitions", "3",
                                       "--calibration", str(calibration)])
    assert result.exit_code == 0, result.output
    assert same_verdicts(orjson.loads(out.read_bytes()), duck.verdicts.to_json())
    assert spark.sparkContext._jsc is not None  # type: ignore[attr-defined]  # still running


def test_a_bad_line_is_a_format_error(spark: object, world: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    trace, _ = world
    bad = tmp_path / "bad.jsonl"
    lines = trace.read_bytes().splitlines()[:50]
    bad.write_bytes(b"\n".join([*lines[:20], b'{"ts": "not a time"', *lines[20:]]) + b"\n")
    with pytest.raises(FormatError, match=f"^{bad}:21: "):
        run_spark(spark, bad, Calibration.read())  # type: ignore[arg-type]
    # The line is named in its file, not as "line 31 of input split 2": in a glob of
    # two files, each cut into several splits, with a blank line before it
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    late = folder / "b.jsonl"
    late.write_bytes(b"\n".join([*lines[:40], b"", b"{oops", *lines[40:]]) + b"\n")
    with pytest.raises(FormatError, match=f"^{late}:42: not valid JSON"):
        run_spark(spark, str(folder / "*.jsonl"), Calibration.read(),  # type: ignore[arg-type]
                  partitions=6)
    with pytest.raises(FormatError, match="cannot read trace"):
        run_spark(spark, tmp_path / "missing.jsonl", Calibration.read())  # type: ignore[arg-type]


def test_a_ledger_export_gives_the_duckdb_verdicts(spark: object, world: tuple[Path, Path],
                                                   calibration: Path, tmp_path: Path) -> None:
    """The trace replayed into a ledger and exported to Parquet (`ledger export`): Spark
    reads the export's exchange entries and gives the DuckDB path's verdicts on it."""
    from distillguard.cli import main

    config = tmp_path / "settings.yaml"
    config.write_text(orjson.dumps({
        "state": {"url": f"sqlite:///{tmp_path / 'state.sqlite'}"},
        "ledger": {"path": str(tmp_path / "ledger")},
        "detect": {"enabled": False}}).decode())
    export = tmp_path / "ledger.parquet"
    for args in (["traces", "import", str(world[0])], ["ledger", "export", "--out", str(export)]):
        result = CliRunner().invoke(main, ["-c", str(config), *args])
        assert result.exit_code == 0, result.output
    duck, _ = run_batch(export, Calibration.read(calibration), accounts=world[1])
    ours, _ = run_spark(spark, export, Calibration.read(calibration), accounts=world[1],
                        partitions=3)  # type: ignore[arg-type]
    assert ours.exchanges == duck.exchanges > 0
    assert same_verdicts(ours.verdicts.to_json(), duck.verdicts.to_json())
