"""``verify`` catches every way of tampering with the stored ledger and names the first
bad entry; an honest ledger, bodies deleted or not, verifies."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.exchange import Retention
from distillguard.ledger import entry, merkle
from distillguard.ledger.checkpoint import Checkpoint, SignerKey
from distillguard.ledger.core import Ledger
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.verifier import (
    VerificationFailed,
    verify_consistency_bundle,
    verify_inclusion_bundle,
)
from distillguard.ledger.verify import Report, verify_ledger
from tests.factories import forge_leaf, make_exchange, make_ledger, read_leaf

N = 40


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    lg = make_ledger(tmp_path / "l", N, checkpoint_every=10)
    yield lg
    lg.close()


def _db(lg: Ledger) -> sqlite3.Connection:
    return sqlite3.connect(lg.config.url[len("sqlite:///"):], isolation_level=None)


def _verify(lg: Ledger) -> Report:
    return verify_ledger(lg.store, lg.verifier)


def _problem(report: Report) -> tuple[str, int | None]:
    doc = report.to_json()
    assert not report.ok
    first = doc["first_bad_problem"]
    return first["kind"], doc["first_bad"]


def test_honest_ledger_verifies_with_and_without_bodies(ledger: Ledger) -> None:
    report = _verify(ledger)
    assert report.ok, report.to_json()
    assert report.entries == N and report.checkpoints == 4
    assert report.checkpoints_matched == 4 and report.covered == N
    n = ledger.store.redact("2100-01-01T00:00:00.000Z")
    assert n == N - len([i for i in range(N) if i % 7 == 3])
    report = _verify(ledger)
    assert report.ok, report.to_json()
    assert report.redacted_bodies == 2 * n


def test_modified_entry(ledger: Ledger) -> None:
    db = _db(ledger)
    leaf = read_leaf(db, 12)
    leaf["account_id"] = "someone_else"
    forge_leaf(db, 12, leaf, rehash=False)
    assert _problem(_verify(ledger)) == ("modified", 12)


def test_modified_entry_with_its_hash_recomputed(ledger: Ledger) -> None:
    """Rewriting the stored hash too only moves the evidence to the checkpoints."""
    db = _db(ledger)
    leaf = read_leaf(db, 25)
    leaf["status"] = 403
    forge_leaf(db, 25, leaf)
    report = _verify(ledger)
    kind, first = _problem(report)
    assert kind == "checkpoint-mismatch" and first == 20  # between checkpoints 20 and 30
    assert "between index 20 and 29" in report.to_json()["first_bad_problem"]["message"]


def test_modified_body(ledger: Ledger) -> None:
    db = _db(ledger)
    db.execute("UPDATE ledger_entries SET response = ? WHERE idx = 8",
               (b'{"choices":[{"message":{"content":"edited"}}]}',))
    assert _problem(_verify(ledger)) == ("modified", 8)


def test_modified_lookup_column(ledger: Ledger) -> None:
    db = _db(ledger)
    db.execute("UPDATE ledger_entries SET account_id = 'x' WHERE idx = 16")
    assert _problem(_verify(ledger)) == ("modified", 16)


def test_deleted_entry(ledger: Ledger) -> None:
    _db(ledger).execute("DELETE FROM ledger_entries WHERE idx = 7")
    assert _problem(_verify(ledger)) == ("deleted", 7)


def test_deleted_entry_with_later_ones_renumbered(ledger: Ledger) -> None:
    db = _db(ledger)
    db.execute("DELETE FROM ledger_entries WHERE idx = 7")
    db.execute("UPDATE ledger_entries SET idx = idx - 1 WHERE idx > 7")
    assert _problem(_verify(ledger)) == ("deleted", 7)


def test_deleted_entries_at_the_end(ledger: Ledger) -> None:
    _db(ledger).execute("DELETE FROM ledger_entries WHERE idx >= 35")
    kind, first = _problem(_verify(ledger))
    assert (kind, first) == ("deleted", 35)


def test_reordered_entries(ledger: Ledger) -> None:
    db = _db(ledger)
    db.execute("UPDATE ledger_entries SET idx = -1 WHERE idx = 4")
    db.execute("UPDATE ledger_entries SET idx = 4 WHERE idx = 13")
    db.execute("UPDATE ledger_entries SET idx = 13 WHERE idx = -1")
    assert _problem(_verify(ledger)) == ("reordered", 4)


def test_inserted_entry(ledger: Ledger) -> None:
    db = _db(ledger)
    for idx in range(N - 1, 8, -1):
        db.execute("UPDATE ledger_entries SET idx = idx + 1 WHERE idx = ?", (idx,))
    forged = entry.from_exchange(make_exchange("forged", account_id="a1"), Retention.FULL)
    row = forged.to_row(9)  # a well-formed entry claiming index 9, with a correct hash
    db.execute("INSERT INTO ledger_entries VALUES (?,?,?,?,?,?,?,?,?)", row.as_tuple())
    assert _problem(_verify(ledger)) == ("inserted", 9)


def test_bad_checkpoint_signature(ledger: Ledger) -> None:
    db = _db(ledger)
    (note,) = db.execute("SELECT note FROM ledger_checkpoints WHERE tree_size = 20").fetchone()
    origin, size, root, rest = note.split("\n", 3)
    forged = f"{origin}\n{size}\n{merkle.EMPTY_ROOT.hex()[:43]}=\n{rest}"
    db.execute("UPDATE ledger_checkpoints SET note = ? WHERE tree_size = 20", (forged,))
    report = _verify(ledger)
    assert not report.ok
    assert [p.kind for p in report.problems] == ["checkpoint-signature"]
    # a checkpoint signed by another key does not count either: it cannot be checked
    other = SignerKey.generate("distillguard/ledger")
    fake = Checkpoint("distillguard/ledger", 20, ledger.root(20)).sign(other)
    db.execute("UPDATE ledger_checkpoints SET note = ? WHERE tree_size = 20", (fake,))
    report = _verify(ledger)
    assert [p.kind for p in report.problems] == ["checkpoint-unknown-key"]
    assert report.verdict == "unverified" and report.checkpoints_matched == 3


def test_checkpoint_not_matching(ledger: Ledger) -> None:
    """A validly signed checkpoint of another history (a fork) is reported."""
    assert ledger.key is not None
    fork = Checkpoint("distillguard/ledger", 30, merkle.leaf_hash(b"another history"))
    ledger.store.add_checkpoint(30, fork.root_hash, "2026-01-01T00:00:00.000Z",
                                fork.sign(ledger.key))
    report = _verify(ledger)
    assert _problem(report) == ("checkpoint-mismatch", 20)


def test_cli_verify_names_the_first_bad_entry(ledger: Ledger, tmp_path: Path) -> None:
    config = tmp_path / "dg.yaml"
    config.write_text(f"ledger:\n  path: {tmp_path / 'l'}\n")
    saved = tmp_path / "saved-checkpoint.txt"
    latest = ledger.store.latest_checkpoint()
    assert latest is not None
    saved.write_text(latest.note)
    runner = CliRunner()
    ok = runner.invoke(main, ["-c", str(config), "ledger", "verify",
                              "--checkpoint", str(saved)])
    assert ok.exit_code == 0 and "ok" in ok.output, ok.output
    # an attacker who also drops the stored checkpoints is caught by the one kept apart
    db = _db(ledger)
    leaf = read_leaf(db, 31)
    leaf["client_ip"] = "198.51.100.1"
    forge_leaf(db, 31, leaf)
    db.execute("DELETE FROM ledger_checkpoints")
    bad = runner.invoke(main, ["-c", str(config), "ledger", "verify",
                               "--checkpoint", str(saved), "--json"])
    assert bad.exit_code == 1
    doc = orjson.loads(bad.output)
    assert doc["first_bad_problem"]["kind"] == "checkpoint-mismatch"
    assert doc["first_bad"] == 0


def test_parallel_verification_finds_the_same(ledger: Ledger,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Large ledgers are checked by worker processes, one range each; the result is the
    same as in one process, across range boundaries."""
    from distillguard.ledger import verify

    monkeypatch.setattr(verify, "RANGE", 7)
    monkeypatch.setattr(verify, "PARALLEL_MIN", 0)
    assert verify_ledger(ledger.store, ledger.verifier, workers=2).ok
    db = _db(ledger)
    db.execute("UPDATE ledger_entries SET idx = -1 WHERE idx = 6")  # across a boundary
    db.execute("UPDATE ledger_entries SET idx = 6 WHERE idx = 15")
    db.execute("UPDATE ledger_entries SET idx = 15 WHERE idx = -1")
    db.execute("DELETE FROM ledger_entries WHERE idx BETWEEN 21 AND 27")  # a whole range
    report = verify_ledger(ledger.store, ledger.verifier, workers=2)
    assert _problem(report) == ("reordered", 6)
    kinds = {(p.kind, p.index) for p in report.problems}
    assert ("deleted", 21) in kinds and ("reordered", 15) not in kinds
    single = verify_ledger(ledger.store, ledger.verifier, workers=1)
    assert [p.to_json() for p in single.problems] == [p.to_json() for p in report.problems]


def test_an_export_names_an_entry_rewritten_with_its_hash(ledger: Ledger,
                                                          tmp_path: Path) -> None:
    """With the rows of an export kept elsewhere (checked against their signed
    checkpoint), an entry rewritten together with its stored hash is named exactly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillguard.ledger.export import export_parquet
    from distillguard.ledger.verifier import verified_rows

    export = tmp_path / "kept.parquet"
    export_parquet(ledger, export, start=10, end=40)
    db = _db(ledger)
    leaf = read_leaf(db, 25)
    leaf["status"] = 403
    forge_leaf(db, 25, leaf)
    assert ledger.verifier is not None
    reference = dict(verified_rows(export, ledger.verifier))
    assert sorted(reference) == list(range(10, 40))
    report = verify_ledger(ledger.store, ledger.verifier, reference=reference)
    assert _problem(report) == ("modified", 25)
    kinds = {(p.kind, p.index) for p in report.problems}
    assert ("checkpoint-mismatch", 25) in kinds  # the mismatch is explained by the entry
    assert {p.index for p in report.problems if p.kind == "modified"} == {25}
    # the CLI takes the export as it is; an export that does not check is refused
    config = tmp_path / "dg.yaml"
    config.write_text(f"ledger:\n  path: {tmp_path / 'l'}\n")
    runner = CliRunner()
    bad = runner.invoke(main, ["-c", str(config), "ledger", "verify", "--export",
                               str(export), "--json"])
    assert bad.exit_code == 1
    doc = orjson.loads(bad.output)
    assert doc["first_bad"] == 25 and doc["first_bad_problem"]["kind"] == "modified"
    forged = tmp_path / "forged.parquet"
    table = pq.read_table(export)
    hashes = table.column("leaf_hash").to_pylist()
    hashes[3] = bytes(32)
    column = table.schema.get_field_index("leaf_hash")
    forged_table = table.set_column(column, table.schema.field(column),
                                    pa.array(hashes, type=table.schema.field(column).type))
    pq.write_table(forged_table.replace_schema_metadata(table.schema.metadata), forged)
    refused = runner.invoke(main, ["-c", str(config), "ledger", "verify", "--export",
                                   str(forged)])
    assert refused.exit_code != 0
    assert "does not verify: row 13: leaf hash does not match" in refused.output


def test_a_column_rewritten_as_text_is_reported_not_a_crash(ledger: Ledger) -> None:
    """SQLite keeps the type an UPDATE gives: replace() on a BLOB stores TEXT, and
    verify raised TypeError ("Strings must be encoded before hashing") with a traceback
    instead of naming the entry."""
    db = _db(ledger)
    db.execute("UPDATE ledger_entries SET request = replace(request, 'prompt', 'PROMPT')"
               " WHERE idx = 5")
    db.execute("UPDATE ledger_entries SET response = CAST(response AS TEXT) WHERE idx = 8")
    db.execute("UPDATE ledger_entries SET leaf = CAST(leaf AS TEXT) WHERE idx = 12")
    report = _verify(ledger)
    found = {(p.index, p.message) for p in report.problems}
    assert (5, "entry 5: request is stored as str, not bytes") in found
    assert (5, "entry 5: the stored request body does not match the hash its leaf "
               "commits to") in found
    # The same bytes as text still hash alike; the type alone is reported.
    assert {m for i, m in found if i == 8} == {"entry 8: response is stored as str, "
                                               "not bytes"}
    assert {m for i, m in found if i == 12} == {"entry 12: leaf is stored as str, not bytes"}
    assert report.first_bad == 5 and report.checkpoints_matched == 4


def test_a_checkpoint_row_rewritten_beside_its_signed_note(ledger: Ledger,
                                                            tmp_path: Path) -> None:
    """Only the note is trusted; its size and root columns were not compared with it, so
    a rewrite of them verified as ok."""
    db = _db(ledger)
    db.execute("UPDATE ledger_checkpoints SET root_hash = X'00' WHERE tree_size = 20")
    report = _verify(ledger)
    assert [(p.kind, p.message) for p in report.problems] == [
        ("checkpoint-signature", "checkpoint #2: its stored size or root differ from its "
                                 "signed note")]
    config = tmp_path / "dg.yaml"
    config.write_text(f"ledger:\n  path: {tmp_path / 'l'}\n")
    bad = CliRunner().invoke(main, ["-c", str(config), "ledger", "verify"])
    assert bad.exit_code == 1
    assert bad.output.splitlines()[-1] == "TAMPERED: the checkpoints (no entry named)"


@pytest.mark.parametrize(("change", "says"), [
    ({"path": 5}, "the proof's 'path' must be a list of hex strings"),
    ({"path": ["zz"]}, "the proof's 'path' holds a value that is not hex"),
    ({"path": None}, "the proof's 'path' must be a list of hex strings"),
    ({"tree_size": "40"}, "the proof's 'tree_size' must be a whole number, not '40'"),
    ({"leaf_index": 3.0}, "the proof's 'leaf_index' must be a whole number, not 3.0"),
    ({"leaf": "!!"}, "the proof's 'leaf' is not base64"),
    ({"leaf_hash": 5}, "the proof's 'leaf_hash' must be a hex string, not 5"),
])
def test_a_malformed_proof_is_invalid_not_a_traceback(ledger: Ledger, tmp_path: Path,
                                                     change: dict[str, object],
                                                     says: str) -> None:
    """verify-proof checks proofs that come from elsewhere: a path that was a number was
    a TypeError traceback, a missing one "INVALID: 'path'", a size of "40" accepted."""
    proof = ledger.inclusion(3, sign_if_needed=True)
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps({**proof, **change}))
    pub = tmp_path / "l" / "ledger.key.pub"
    result = CliRunner().invoke(main, ["ledger", "verify-proof", str(bad), "--key", str(pub)])
    assert result.exit_code == 1 and result.output == f"INVALID: {says}\n", result.output
    good = tmp_path / "good.json"
    good.write_bytes(orjson.dumps(proof))
    assert CliRunner().invoke(main, ["ledger", "verify-proof", str(good), "--key",
                                     str(pub)]).output.startswith("ok ")


@pytest.mark.parametrize("moved_to", [10**9, 2**62 - 1])
def test_an_entry_moved_to_a_huge_index_is_reported_not_a_memory_error(
        ledger: Ledger, moved_to: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify planned one range of 100,000 indices for every range up to the largest
    stored index: one entry moved to index 2^62 - 1 made it build a list of 4.6e13 ranges
    and end in MemoryError; at 10^9 it read 10,000 empty ranges. The work is now bounded
    by the rows stored."""
    db = _db(ledger)
    db.execute("UPDATE ledger_entries SET idx = ? WHERE idx = 39", (moved_to,))
    reads = 0
    iter_tuples = ledger.store.iter_tuples

    def counted(lo: int, hi: int, batch: int = 20_000) -> Iterator[tuple[object, ...]]:
        nonlocal reads
        reads += 1
        assert reads <= 10, "verification reads more ranges than the rows can fill"
        return iter_tuples(lo, hi, batch)

    monkeypatch.setattr(ledger.store, "iter_tuples", counted)
    report = verify_ledger(ledger.store, ledger.verifier, workers=1)
    assert report.entries == N
    kinds = {(p.kind, p.index) for p in report.problems}
    assert ("deleted", 39) in kinds
    assert report.first_bad == 39


def test_a_ledger_whose_entries_were_removed_or_changed_is_not_signed(tmp_path: Path) -> None:
    """The signer signed whatever tree it built from the store: with entry 5 deleted
    the tree counted the last entry twice and signed that, and with entry 5 rewritten
    (its hash recomputed) it signed the new history. A ledger opened on such a store
    now refuses to sign and says why."""
    import sqlite3

    from distillguard.ledger.checkpoint import CheckpointError

    for change in ("DELETE FROM ledger_entries WHERE idx = 5",
                   "UPDATE ledger_entries SET leaf_hash = zeroblob(32) WHERE idx = 5",
                   "DELETE FROM ledger_entries WHERE idx >= 25"):
        folder = tmp_path / change.split()[0] / str(len(change))
        make_ledger(folder, 30).close()
        with sqlite3.connect(folder / "ledger.sqlite") as db:
            db.execute(change)
        reopened = Ledger(LedgerConfig(url=f"sqlite:///{folder / 'ledger.sqlite'}",
                                       key_path=folder / "ledger.key"))
        with pytest.raises(CheckpointError, match="not signing: .*(removed|changed)"):
            reopened.checkpoint()
        assert reopened.refusal is not None
        reopened.close()
    intact = make_ledger(tmp_path / "intact", 30)
    assert intact.refusal is None and intact.checkpoint() is not None
    intact.close()


def test_an_entry_is_found_by_its_id_before_its_index(tmp_path: Path) -> None:
    """A trace may give an exchange the id ``42``: looking it up found the entry at
    index 42 instead, and its proof was handed out for the exchange."""
    lg = make_ledger(tmp_path, 10)
    numeric = make_exchange("numbered")
    numeric.id = "3"
    lg.append([entry.from_exchange(numeric, Retention.FULL)])
    found = lg.find("3")
    assert found is not None and found.idx == 10 and found.entry_id == "3"
    at_three = lg.find("index:3")
    assert at_three is not None and at_three.idx == 3 and at_three.entry_id != "3"
    # digits that are no entry's id still name an index; an int is always one
    five = lg.find("5")
    assert five is not None and five.idx == 5
    assert lg.find(3) == at_three
    assert lg.find("index:11") is None and lg.find("index:x") is None
    assert lg.find("99999999999999999999") is None
    lg.close()


@pytest.mark.parametrize(("field", "value"), [
    ("entry_id", "ex_someone_else"),
    ("origin", "another/ledger"),
    ("root_hash", "00" * 32),
])
def test_an_inclusion_proof_claims_only_what_it_proves(ledger: Ledger, tmp_path: Path,
                                                       field: str, value: str) -> None:
    """The bundle's entry_id, origin and root_hash were not compared with the leaf and
    checkpoint that verified: a proof of one entry relabelled with another exchange's id
    verified as ok, so it 'proved' an exchange the ledger may not hold."""
    proof = ledger.inclusion(3, sign_if_needed=True)
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps({**proof, field: value}))
    pub = tmp_path / "l" / "ledger.key.pub"
    result = CliRunner().invoke(main, ["ledger", "verify-proof", str(bad), "--key", str(pub)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"INVALID: the proof's {field!r} is {value!r}")
    good = tmp_path / "good.json"
    good.write_bytes(orjson.dumps({**proof, "root_hash": proof["root_hash"].upper()}))
    result = CliRunner().invoke(main, ["ledger", "verify-proof", str(good), "--key",
                                       str(pub)])
    assert result.exit_code == 0
    assert orjson.loads(result.output[3:])["entry_id"] == read_leaf(_db(ledger), 3)["id"]


def test_a_proof_of_an_entry_whose_id_column_was_rewritten_does_not_verify(
        ledger: Ledger) -> None:
    """``prove ID`` finds the entry by its entry_id column: with that column of another
    entry rewritten to ID, the proof handed out for ID carried that other entry's leaf,
    and verified."""
    db = _db(ledger)
    db.execute("UPDATE ledger_entries SET entry_id = 'ex_never_served' WHERE idx = 5")
    proof = ledger.inclusion("ex_never_served", sign_if_needed=True)
    assert proof["entry_id"] == "ex_never_served"
    with pytest.raises(VerificationFailed, match="'entry_id' is 'ex_never_served'"):
        verify_inclusion_bundle(proof, ledger.verifier)


@pytest.mark.parametrize("field", ["old_root", "new_root", "origin"])
def test_a_consistency_proof_claims_only_what_it_proves(ledger: Ledger,
                                                        field: str) -> None:
    proof = ledger.consistency(10, 40)
    proof["old_checkpoint"], proof["new_checkpoint"] = ledger.note_at(10), ledger.note_at(40)
    verify_consistency_bundle(proof, ledger.verifier)
    with pytest.raises(VerificationFailed, match=f"the proof's {field!r} is"):
        verify_consistency_bundle({**proof, field: "ab" * 32}, ledger.verifier)


@pytest.mark.parametrize("note", [
    "blob",
    "distillguard/ledger\n" + "1" * 5000 + "\n" + "A" * 43 + "=\n\n\u2014 distillguard/ledger "
    "AAAAAAAA\n",
], ids=["blob", "5000-digit-size"])
def test_a_hostile_checkpoint_row_is_reported_not_a_crash(ledger: Ledger, note: str) -> None:
    """Someone who can write the database can put anything in ledger_checkpoints: a note
    stored as a BLOB made verify end in TypeError, and a tree size of 5000 digits in
    ValueError (Python's limit on int()), instead of a report."""
    cp = ledger.store.latest_checkpoint()
    assert cp is not None
    stored: object = cp.note.encode() if note == "blob" else note
    _db(ledger).execute("INSERT INTO ledger_checkpoints (tree_size, root_hash, ts, note) "
                        "VALUES (?, ?, ?, ?)", (cp.tree_size, cp.root_hash, cp.ts, stored))
    report = _verify(ledger)
    assert [p.kind for p in report.problems] == ["checkpoint-signature"]
    assert report.checkpoints_matched == 4


def test_verify_proof_does_not_read_a_file_whole(ledger: Ledger, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """verify-proof read the whole file into memory to look at its first four bytes: a
    Parquet export of millions of entries (gigabytes) was held in memory before being
    streamed, and a file of any size handed over as a proof was read whole."""
    from distillguard.ledger.export import export_parquet
    from distillguard.ledger.verifier import verify_file

    export = tmp_path / "part.parquet"
    export_parquet(ledger, export)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:        # sparse: no disk is used
        fh.truncate(65 << 20)

    def whole(self: Path) -> bytes:
        raise MemoryError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)
    assert verify_file(export, ledger.verifier)["rows"] == N
    with pytest.raises(VerificationFailed, match="too large for a ledger proof"):
        verify_file(huge, ledger.verifier)
