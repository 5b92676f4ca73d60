"""The PostgreSQL ledger store (``ledger.url: postgresql://...``), on psycopg 3.

Appends run in one transaction under a transaction-scoped advisory lock, so several
gateway replicas can share one ledger; rows go in with binary ``COPY``.
``durability="fsync"`` commits with ``synchronous_commit = on`` (the server flushes its
WAL, and waits for synchronous standbys, before answering); ``"process"`` uses
``synchronous_commit = local`` (the primary's own flush only). Neither uses ``off``,
which would lose acknowledged entries if the server crashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from distillguard.ledger.store import (
    COLUMNS,
    Durability,
    MakeRows,
    Row,
    SQLStore,
    StoredCheckpoint,
)

LOCK_KEY = 0x6C656467  # "ledg"
# libpq connection parameters the ledger sets unless its URL does (seconds)
CONNECT_DEFAULTS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10,
                    "keepalives_interval": 5, "keepalives_count": 3}
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


class PostgresStore(SQLStore):
    placeholder = "%s"
    null_blob = "NULL::bytea"

    def __init__(self, url: str, *, durability: Durability = "fsync") -> None:
        self.url = url.replace("postgres://", "postgresql://", 1)
        super().__init__(self.url, durability)

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        # A store behind a network that drops packets (rather than refusing) must not
        # hold the writer for minutes: bounded connect, and keepalives on the socket,
        # unless the URL sets them. The entries meanwhile go to the spool.
        given = conninfo_to_dict(self.url)
        options = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        conn = psycopg.connect(make_conninfo(self.url, **options), autocommit=True)
        sync = "on" if self.durability == "fsync" else "local"
        conn.execute(f"SET synchronous_commit = {sync}")
        return conn

    def _closed(self, conn: Any) -> bool:
        return bool(conn.closed)

    def _conn(self) -> psycopg.Connection[tuple[object, ...]]:
        return super()._conn()  # type: ignore[no-any-return]

    @staticmethod
    def _value(v: Any) -> Any:
        return bytes(v) if isinstance(v, memoryview) else v

    @staticmethod
    def _bytes(v: Any) -> bytes:
        return bytes(v)

    @staticmethod
    def _checkpoint(r: Sequence[Any]) -> StoredCheckpoint:
        return StoredCheckpoint(int(r[0]), int(r[1]), bytes(r[2]), str(r[3]), str(r[4]))

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
