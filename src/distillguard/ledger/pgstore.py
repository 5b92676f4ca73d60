"""The PostgreSQL ledger store (``ledger.url: postgresql://...``), on psycopg 3.

Appends run in one transaction under a transaction-scoped advisory lock, so several
gateway replicas can share one ledger; rows go in with binary ``COPY``.
``durability="fsync"`` commits with ``synchronous_commit = on`` (the server flushes its
WAL, and waits for synchronous standbys, before answering); ``"process"`` uses
``synchronous_commit = local`` (the primary's own flush only). Neither uses ``off``,
which would lose acknowledged entries if the server crashed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg

from distillguard.ledger.store import (
    COLUMNS,
    Durability,
    MakeRows,
    Row,
    StoredCheckpoint,
)

LOCK_KEY = 0x6C656467  # "ledg"
COPY_TYPES = ["int8", "text", "text", "text", "text", "bytea", "bytea", "bytea", "bytea"]

PG_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS ledger_entries (
        idx BIGINT PRIMARY KEY, kind TEXT NOT NULL, entry_id TEXT NOT NULL,
        ts TEXT NOT NULL, account_id TEXT, leaf BYTEA NOT NULL, leaf_hash BYTEA NOT NULL,
        request BYTEA, response BYTEA)""",
    "CREATE INDEX IF NOT EXISTS ledger_entries_entry_id ON ledger_entries (entry_id)",
    """CREATE TABLE IF NOT EXISTS ledger_checkpoints (
        seq BIGSERIAL PRIMARY KEY, tree_size BIGINT NOT NULL, root_hash BYTEA NOT NULL,
        ts TEXT NOT NULL, note TEXT NOT NULL)""",
]


def _row(r: tuple[object, ...]) -> Row:
    values = [bytes(v) if isinstance(v, memoryview) else v for v in r]
    return Row(*values)  # type: ignore[arg-type]


class PostgresStore:
    def __init__(self, url: str, *, durability: Durability = "fsync") -> None:
        self.url = url.replace("postgres://", "postgresql://", 1)
        self.location = self.url
        self.durability = durability
        self._local = threading.local()
        self._conns: list[psycopg.Connection[tuple[object, ...]]] = []
        self._conns_lock = threading.Lock()

    def _conn(self) -> psycopg.Connection[tuple[object, ...]]:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, autocommit=True)
            sync = "on" if self.durability == "fsync" else "local"
            conn.execute(f"SET synchronous_commit = {sync}")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def migrate(self) -> None:
        conn = self._conn()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            for statement in PG_SCHEMA:
                conn.execute(statement)

    def append(self, make_rows: MakeRows) -> list[Row]:
        conn = self._conn()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            top = conn.execute("SELECT max(idx) FROM ledger_entries").fetchone()
            start = 0 if top is None or top[0] is None else int(top[0]) + 1  # type: ignore[call-overload]
            rows = list(make_rows(start))
            with conn.cursor().copy(
                    f"COPY ledger_entries ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(COPY_TYPES)
                for r in rows:
                    copy.write_row(r.as_tuple())
        return rows

    def size(self) -> int:
        top = self._conn().execute("SELECT max(idx) FROM ledger_entries").fetchone()
        return 0 if top is None or top[0] is None else int(top[0]) + 1  # type: ignore[call-overload]

    def leaf_hashes(self, lo: int, hi: int) -> list[bytes]:
        cur = self._conn().execute(
            "SELECT leaf_hash FROM ledger_entries WHERE idx >= %s AND idx < %s ORDER BY idx",
            (lo, hi))
        return [bytes(r[0]) for r in cur]  # type: ignore[call-overload]

    def iter_leaf_hashes(self, lo: int = 0, batch: int = 50_000) -> Iterator[bytes]:
        while True:
            got = self.leaf_hashes(lo, lo + batch)
            yield from got
            if len(got) < batch:
                return
            lo += batch

    def iter_rows(self, lo: int = 0, hi: int | None = None, *, bodies: bool = True,
                  batch: int = 20_000) -> Iterator[Row]:
        for r in self._select(lo, 2**62 if hi is None else hi, bodies, batch):
            yield _row(r)

    def iter_tuples(self, lo: int, hi: int, batch: int = 20_000
                    ) -> Iterator[tuple[Any, ...]]:
        for r in self._select(lo, hi, True, batch):
            yield tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)

    def _select(self, lo: int, hi: int, bodies: bool, batch: int
                ) -> Iterator[tuple[Any, ...]]:
        cols = COLUMNS if bodies else COLUMNS.replace("request, response",
                                                      "NULL::bytea, NULL::bytea")
        last = lo - 1
        conn = self._conn()
        while True:
            got = conn.execute(
                f"SELECT {cols} FROM ledger_entries WHERE idx > %s AND idx < %s "
                "ORDER BY idx LIMIT %s", (last, hi, batch)).fetchall()
            yield from got
            if len(got) < batch:
                return
            last = int(got[-1][0])  # type: ignore[call-overload]

    def find(self, entry_id: str) -> Row | None:
        r = self._conn().execute(f"SELECT {COLUMNS} FROM ledger_entries WHERE entry_id = %s "
                                 "ORDER BY idx LIMIT 1", (entry_id,)).fetchone()
        return None if r is None else _row(r)

    def add_checkpoint(self, tree_size: int, root_hash: bytes, ts: str, note: str) -> None:
        self._conn().execute(
            "INSERT INTO ledger_checkpoints (tree_size, root_hash, ts, note) "
            "VALUES (%s, %s, %s, %s)", (tree_size, root_hash, ts, note))

    def _checkpoints(self, sql: str) -> list[StoredCheckpoint]:
        return [StoredCheckpoint(int(r[0]), int(r[1]), bytes(r[2]), str(r[3]), str(r[4]))  # type: ignore[call-overload,arg-type]
                for r in self._conn().execute(sql)]

    def checkpoints(self) -> list[StoredCheckpoint]:
        return self._checkpoints("SELECT seq, tree_size, root_hash, ts, note "
                                 "FROM ledger_checkpoints ORDER BY seq")

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        got = self._checkpoints("SELECT seq, tree_size, root_hash, ts, note FROM "
                                "ledger_checkpoints ORDER BY seq DESC LIMIT 1")
        return got[0] if got else None

    def redact(self, before_ts: str, kind: str = "exchange") -> int:
        cur = self._conn().execute(
            "UPDATE ledger_entries SET request = NULL, response = NULL WHERE kind = %s AND "
            "ts < %s AND (request IS NOT NULL OR response IS NOT NULL)", (kind, before_ts))
        return cur.rowcount

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()
