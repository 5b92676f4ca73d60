"""A Parquet export checked with ``verify-proof FILE.parquet --key`` vouches for every
column of every row, and for the whole range its header declares; readers of an export
take what its leaves say."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.ledger.core import Ledger
from distillguard.ledger.export import export_parquet
from tests.factories import make_ledger

N = 30

Rows = list[dict[str, Any]]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    lg = make_ledger(tmp_path / "l", N)
    yield lg
    lg.close()


@pytest.fixture
def export(ledger: Ledger, tmp_path: Path) -> Path:
    out = tmp_path / "part.parquet"
    export_parquet(ledger, out, start=5, end=N)
    return out


def _rewrite(export: Path, out: Path, change: Callable[[Rows], Rows],
             schema: pa.Schema | None = None) -> Path:
    table = pq.read_table(export)
    rows = change(table.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or table.schema), out)
    return out


def _verify_proof(path: Path, tmp_path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["ledger", "verify-proof", str(path), "--key",
                                       str(tmp_path / "l" / "ledger.key.pub")])
    return result.exit_code, result.output


def _set(i: int, **values: Any) -> Callable[[Rows], Rows]:
    def change(rows: Rows) -> Rows:
        rows[i].update(values)
        return rows
    return change


FORGED_REQUEST = '{"messages":[{"content":"FORGED prompt","role":"user"}],"model":"x"}'

TAMPERING: list[tuple[str, Callable[[Rows], Rows], str]] = [
    ("request body", _set(0, request=FORGED_REQUEST),
     "row 5: its request does not match the hash its leaf commits to"),
    ("response body", _set(1, response='{"choices":[]}'),
     "row 6: its response does not match the hash its leaf commits to"),
    ("model", _set(2, model="forged-model"), "row 7: its model is 'forged-model', its leaf "
                                              "says 'demo-chat-1'"),
    ("account", _set(0, account_id="acct_someone_else"), "row 5: its account_id is "
                                                         "'acct_someone_else', its leaf says"),
    ("time", _set(0, ts="1999-01-01T00:00:00.000Z"), "row 5: its ts is "
                                                      "'1999-01-01T00:00:00.000Z'"),
    ("kind", _set(0, kind="event"), "row 5: its kind is 'event', its leaf says 'exchange'"),
    ("entry id", _set(0, entry_id="ex_other"), "row 5: its entry_id is 'ex_other'"),
    ("status removed", _set(0, status=None), "row 5: its status is None, its leaf says 200"),
    ("body on an event", _set(5, request='{"x":1}'),
     "row 10: its request is set, but an event has no bodies"),
    ("rows dropped from the middle", lambda rows: rows[:5] + rows[10:],
     "row 15: rows 10 to 14 of the export's range [5, 30) are missing"),
    ("a row duplicated", lambda rows: rows[:3] + [rows[2]] + rows[3:],
     "row 7: a second row for entry 7"),
    ("rows reordered", lambda rows: [rows[1], rows[0], *rows[2:]],
     "row 6: out of order (row 5 expected)"),
    ("rows cut off the end", lambda rows: rows[:-4],
     "rows 26 to 29 of the export's range [5, 30) are missing"),
]


def test_an_honest_export_verifies(export: Path, tmp_path: Path) -> None:
    code, out = _verify_proof(export, tmp_path)
    assert code == 0 and '"rows":25' in out, out


@pytest.mark.parametrize(("what", "change", "says"), TAMPERING,
                         ids=[t[0] for t in TAMPERING])
def test_an_export_with_forged_columns_or_rows_is_invalid(
        export: Path, tmp_path: Path, what: str, change: Callable[[Rows], Rows],
        says: str) -> None:
    """verify-proof checked only each row's leaf, leaf hash and inclusion path: an export
    whose bodies, model, account, time or kind were rewritten, with rows dropped from the
    middle or one duplicated, still printed ok, and DuckDB, Spark and detect --trace read
    the forged columns."""
    bad = _rewrite(export, tmp_path / "bad.parquet", change)
    code, out = _verify_proof(bad, tmp_path)
    assert code == 1 and out.startswith("INVALID: ") and says in out, (what, out)


def test_an_export_with_a_column_added_is_invalid(export: Path, tmp_path: Path) -> None:
    """A column the export format does not have is data no leaf vouches for."""
    table = pq.read_table(export)
    meta = table.schema.metadata
    added = table.append_column("note", pa.array(["x"] * table.num_rows))
    pq.write_table(added.replace_schema_metadata(meta), tmp_path / "bad.parquet")
    code, out = _verify_proof(tmp_path / "bad.parquet", tmp_path)
    assert code == 1 and "column 'note' is not part of the export format" in out, out


def test_detect_reads_an_export_by_its_leaves(export: Path, tmp_path: Path) -> None:
    """detect --trace FILE.parquet filtered on the kind column and sorted on the ts
    column and took the bodies as they were: an exchange relabelled as an event was
    left out, and a forged prompt was read as the account's. It now takes kind and time
    from the leaf and refuses a body that does not match its leaf's hash."""
    from distillguard.detect.reader import FormatError, iter_sorted_lines

    relabelled = _rewrite(export, tmp_path / "relabelled.parquet",
                          _set(0, kind="event", ts="1999-01-01T00:00:00.000Z"))
    lines = [orjson.loads(line) for block in iter_sorted_lines(relabelled)
             for line in block]
    assert [line["ledger_index"] for line in lines] == [
        i for i in range(5, N) if i % 7 != 3]
    forged = _rewrite(export, tmp_path / "forged.parquet", _set(2, request=FORGED_REQUEST))
    with pytest.raises(FormatError, match="ledger entry 7: its request does not match the "
                                          "hash its leaf commits to"):
        list(iter_sorted_lines(forged))


def test_verify_with_an_export_catches_entries_cut_off_the_end(ledger: Ledger,
                                                               tmp_path: Path) -> None:
    """ledger verify --export used the export's signed checkpoint only to check the
    export's rows: with the last 5 of 30 entries deleted, and the stored checkpoint that
    covered them, it printed ok, although the export kept elsewhere proved 30 entries."""
    import sqlite3

    kept = tmp_path / "kept.parquet"
    export_parquet(ledger, kept, start=0, end=10)   # its checkpoint covers all 30
    whole = tmp_path / "whole.parquet"
    export_parquet(ledger, whole)
    db = sqlite3.connect(ledger.config.url[len("sqlite:///"):], isolation_level=None)
    db.execute("DELETE FROM ledger_entries WHERE idx >= 25")
    db.execute("DELETE FROM ledger_checkpoints")
    db.close()
    config = tmp_path / "dg.yaml"
    config.write_text(f"ledger:\n  path: {tmp_path / 'l'}\n")
    for export in (kept, whole):
        result = CliRunner().invoke(main, ["-c", str(config), "ledger", "verify",
                                           "--export", str(export), "--json"])
        assert result.exit_code == 1, result.output
        doc = orjson.loads(result.output)
        assert doc["first_bad"] == 25
        assert doc["first_bad_problem"]["kind"] == "deleted"
        assert f"the checkpoint of {export}" in doc["first_bad_problem"]["message"]


NULLS: list[tuple[str, Callable[[Rows], Rows], str]] = [
    ("inclusion_path", _set(2, inclusion_path=None), "INVALID: row 7: its inclusion_path "
                                                     "is null"),
    ("leaf", _set(2, leaf=None), "INVALID: row 7: its leaf is null"),
    ("leaf_hash", _set(2, leaf_hash=None), "INVALID: row 7: its leaf_hash is null"),
    ("idx", _set(2, idx=None), "INVALID: row 3 of the file (after entry 6): its idx is None, "
                               "not a whole number"),
]


@pytest.mark.parametrize(("column", "change", "says"), NULLS, ids=[t[0] for t in NULLS])
def test_a_null_column_is_invalid_not_a_traceback(export: Path, tmp_path: Path,
                                                  column: str, change: Callable[[Rows], Rows],
                                                  says: str) -> None:
    """A row with a null inclusion_path made verify-proof end in a TypeError traceback
    (object of type 'NoneType' has no len()) instead of saying which row is bad."""
    bad = _rewrite(export, tmp_path / "bad.parquet", change)
    code, out = _verify_proof(bad, tmp_path)
    assert (code, out) == (1, says + "\n"), out


def test_a_missing_column_is_invalid_not_a_traceback(export: Path, tmp_path: Path) -> None:
    table = pq.read_table(export)
    meta = table.schema.metadata
    pq.write_table(table.drop_columns(["inclusion_path"]).replace_schema_metadata(meta),
                   tmp_path / "bad.parquet")
    code, out = _verify_proof(tmp_path / "bad.parquet", tmp_path)
    assert code == 1 and "column 'inclusion_path' is missing" in out, out


def test_detect_verifies_an_export_first_when_given_the_key(export: Path,
                                                            tmp_path: Path) -> None:
    """detect --trace FILE.parquet checked that bodies have the hashes their leaves
    commit to, but not the signed checkpoint nor whether rows were missing: an export
    with an entry cut out was detected as if whole. With --key it is verified first."""
    key = str(tmp_path / "l" / "ledger.key.pub")
    runner = CliRunner()

    def detect(trace: Path, *extra: str) -> Any:
        out = tmp_path / f"{trace.stem}-verdicts.json"
        result = runner.invoke(main, ["detect", "--trace", str(trace), "--out", str(out),
                                      *extra])
        return result, out

    result, out = detect(export, "--key", key)
    assert result.exit_code == 0 and out.exists(), result.output
    assert f"{export}: verified, 25 entries" in result.output
    result, out = detect(export)
    assert result.exit_code == 0 and "was not verified" in result.output
    gap = _rewrite(export, tmp_path / "gap.parquet", lambda rows: rows[:3] + rows[4:])
    result, out = detect(gap, "--key", key)
    assert result.exit_code == 1 and not out.exists(), result.output
    assert "does not verify" in result.output and "nothing was detected" in result.output
    trace = tmp_path / "trace.jsonl"
    trace.write_text("")
    result, _ = detect(trace, "--key", key)
    assert result.exit_code == 2 and "--key verifies a ledger export" in result.output
