"""Ledger entries: the leaf encoding (entry format version 1) and the stored bodies."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from distillguard.exchange import Retention, canonical_json
from distillguard.ledger import entry, merkle
from distillguard.ledger.core import Ledger
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.store import COLUMNS, PAGE_SIZE, SQLITE_SCHEMA
from distillguard.ledger.verify import verify_ledger
from tests.factories import make_exchange


def reference_leaf(p: entry.Pending, idx: int) -> bytes:
    """Entry format version 1 as docs/ledger.md defines it: the canonical JSON of the
    fields with ``v``, ``idx`` and ``kind``."""
    obj: dict[str, Any] = dict(p.fields)
    obj["v"] = entry.ENTRY_VERSION
    obj["idx"] = idx
    obj["kind"] = p.kind
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


AWKWARD_KEYS = ["", "a", "i", "id", "idw", "idx ", "idx0", "idy", "ie", "IDX", "Idx", "idX",
                "é", "ü", "日本", "\U0001f600", "z", "~", "_", "0", "kind0", "v0", "u"]


def test_exchange_leaves_are_the_canonical_json_of_the_entry() -> None:
    for i, retention in enumerate([Retention.FULL, Retention.HASH] * 5):
        ex = make_exchange(f"prompt {i}", account_id=f"acct_{i}", status=200 + i)
        if i % 3 == 0:
            ex.usage = None
            ex.error_code = "rate_limited"
        p = entry.from_exchange(ex, retention)
        for idx in (0, 7, 10**12):
            row = p.to_row(idx)
            assert row.leaf == reference_leaf(p, idx)
            assert row.leaf_hash == merkle.leaf_hash(row.leaf)
            assert entry.decode_leaf(row.leaf)["idx"] == idx


def test_event_leaves_are_the_canonical_json_with_any_detail() -> None:
    rng = random.Random(7)
    for n in range(200):
        detail = {rng.choice(AWKWARD_KEYS): {rng.choice(AWKWARD_KEYS): rng.random()}
                  for _ in range(rng.randrange(5))}
        p = entry.from_event("policy:account:suspend", f"account:a{n}",
                             rng.choice([None, "ana", "é"]), None, detail)
        idx = rng.randrange(10**9)
        assert p.to_row(idx).leaf == reference_leaf(p, idx)


def test_any_field_names_split_around_idx() -> None:
    rng = random.Random(11)
    for _ in range(300):
        keys = rng.sample(AWKWARD_KEYS, rng.randrange(len(AWKWARD_KEYS)))
        fields = {k: rng.choice([None, 1, "x", [1, {"b": 2, "a": 1}], {"z": 1, "idx": 2}])
                  for k in keys}
        p = entry.Pending("event", "ev_1", "2026-03-01T12:00:00.000Z", None, fields)
        assert p.to_row(42).leaf == reference_leaf(p, 42), keys
        p2 = entry.Pending("event", "ev_1", "2026-03-01T12:00:00.000Z", None, fields).encode()
        assert p2.leaf(3) == reference_leaf(p2, 3)


def test_stored_bodies_are_the_bytes_behind_the_hashes() -> None:
    ex = make_exchange("hello")
    ex.seal_bodies()
    assert ex.request_json == canonical_json(ex.request)
    p = entry.from_exchange(ex, Retention.FULL)
    assert p.request is not None and p.response is not None
    leaf = entry.decode_leaf(p.to_row(0).leaf)
    assert hashlib.sha256(p.request).hexdigest() == leaf["request_sha256"]
    assert hashlib.sha256(p.response).hexdigest() == leaf["response_sha256"]
    unsealed = make_exchange("hello")  # hashed and serialised by the ledger itself
    q = entry.from_exchange(unsealed, Retention.FULL)
    assert q.request == p.request and q.response == p.response
    assert entry.from_exchange(make_exchange("x"), Retention.HASH).request is None


def test_a_ledger_written_before_the_split_encoding_still_verifies(tmp_path: Path) -> None:
    """Rows as the previous writer stored them (leaf encoded whole, 4 KiB pages, no index
    of leaf hashes) read, prove and verify the same, and new appends continue the tree."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in SQLITE_SCHEMA:
        if "ledger_entries_leaf_hash" not in statement:
            conn.execute(statement)
    assert "ledger_entries_leaf_hash" not in str(conn.execute("PRAGMA index_list("
                                                              "ledger_entries)").fetchall())
    old = [entry.from_exchange(make_exchange(f"old {i}"), Retention.FULL) for i in range(100)]
    rows = []
    for i, p in enumerate(old):
        leaf = reference_leaf(p, i)
        rows.append((i, p.kind, p.entry_id, p.ts, p.account_id, leaf, merkle.leaf_hash(leaf),
                     p.request, p.response))
    conn.executemany(f"INSERT INTO ledger_entries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                     rows)
    conn.close()
    lg = Ledger(LedgerConfig(url=f"sqlite:///{path}", key_path=tmp_path / "k"))
    try:
        conn = lg.store._conn()
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT leaf_hash FROM ledger_entries "
                            "WHERE idx >= 0 AND idx < 64 ORDER BY idx").fetchall()
        assert "COVERING INDEX ledger_entries_leaf_hash" in str(plan)  # added on open
        assert lg.root() == merkle.root_of([r[6] for r in rows])
        lg.checkpoint()
        lg.append([entry.from_exchange(make_exchange(f"new {i}"), Retention.FULL)
                   for i in range(50)])
        lg.checkpoint()
        report = verify_ledger(lg.store, lg.verifier, workers=1)
        assert report.ok, report.to_json()
        assert report.entries == 150 and report.checkpoints_matched == 2
    finally:
        lg.close()


def test_new_ledger_files_use_larger_pages(tmp_path: Path) -> None:
    lg = Ledger(LedgerConfig(url=f"sqlite:///{tmp_path / 'l.sqlite'}",
                             key_path=tmp_path / "k"))
    try:
        conn = lg.store._conn()
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        lg.close()
