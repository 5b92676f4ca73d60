"""Where ledger entries and checkpoints live: a small interface and its SQLite store.

A store is synchronous and used from the ledger's writer thread (appends) and from worker
threads (reads). :meth:`LedgerStore.append` runs one transaction under the store's write
lock: it asks the caller for the rows given the next free index (so several writer
processes can share one ledger) and returns once the transaction is committed with the
configured durability. :mod:`distillguard.ledger.pgstore` is the PostgreSQL store.

Tables (both stores)::

    ledger_entries(idx PK, kind, entry_id, ts, account_id, leaf, leaf_hash,
                   request, response)       -- request/response: retained bodies or NULL
    ledger_checkpoints(seq PK, tree_size, root_hash, ts, note)

indexed by ``entry_id``; SQLite also keeps a covering index of ``(idx, leaf_hash)``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

Durability = Literal["fsync", "process"]
PAGE_SIZE = 16384


@dataclass(slots=True)
class Row:
    idx: int
    kind: str
    entry_id: str
    ts: str
    account_id: str | None
    leaf: bytes
    leaf_hash: bytes
    request: bytes | None = None
    response: bytes | None = None

    def as_tuple(self) -> tuple[object, ...]:
        return (self.idx, self.kind, self.entry_id, self.ts, self.account_id, self.leaf,
                self.leaf_hash, self.request, self.response)


@dataclass(slots=True)
class StoredCheckpoint:
    seq: int
    tree_size: int
    root_hash: bytes
    ts: str
    note: str


COLUMNS = "idx, kind, entry_id, ts, account_id, leaf, leaf_hash, request, response"
MakeRows = Callable[[int], Sequence[Row]]


class LedgerStore(Protocol):
    location: str

    def migrate(self) -> None: ...

    def append(self, make_rows: MakeRows) -> list[Row]:
        """In one transaction: lock, ``make_rows(next index)``, insert, commit durably."""
        ...

    def size(self) -> int:
        """One past the largest stored index (the ledger's size when nothing was
        removed or moved)."""
        ...

    def count(self) -> int:
        """How many entries are stored."""
        ...

    def leaf_hashes(self, lo: int, hi: int) -> list[bytes]: ...

    def iter_leaf_hashes(self, lo: int = 0, batch: int = 50_000) -> Iterator[bytes]: ...

    def iter_rows(self, lo: int = 0, hi: int | None = None, *, bodies: bool = True,
                  batch: int = 20_000) -> Iterator[Row]:
        """Rows in stored order (by idx) as they are, gaps and all."""
        ...

    def iter_tuples(self, lo: int, hi: int, batch: int = 20_000
                    ) -> Iterator[tuple[Any, ...]]:
        """Raw rows (``COLUMNS`` order, bytes for blobs) with ``lo <= idx < hi``."""
        ...

    def find(self, entry_id: str) -> Row | None: ...

    def add_checkpoint(self, tree_size: int, root_hash: bytes, ts: str, note: str) -> None: ...

    def checkpoints(self) -> list[StoredCheckpoint]: ...

    def latest_checkpoint(self) -> StoredCheckpoint | None: ...

    def redact(self, before_ts: str, kind: str = "exchange") -> int:
        """Delete retained bodies of entries older than ``before_ts``; entries stay."""
        ...

    def close(self) -> None: ...


SQLITE_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS ledger_entries (
        idx INTEGER PRIMARY KEY, kind TEXT NOT NULL, entry_id TEXT NOT NULL,
        ts TEXT NOT NULL, account_id TEXT, leaf BLOB NOT NULL, leaf_hash BLOB NOT NULL,
        request BLOB, response BLOB)""",
    "CREATE INDEX IF NOT EXISTS ledger_entries_entry_id ON ledger_entries (entry_id)",
    # Covering index of the leaf hashes: a proof's 64 hashes and the whole tree at start-up
    # are read from it instead of from the rows with their bodies. A file written before
    # it existed gets it on its next start (about 2 s per million entries).
    "CREATE INDEX IF NOT EXISTS ledger_entries_leaf_hash ON ledger_entries (idx, leaf_hash)",
    """CREATE TABLE IF NOT EXISTS ledger_checkpoints (
        seq INTEGER PRIMARY KEY, tree_size INTEGER NOT NULL, root_hash BLOB NOT NULL,
        ts TEXT NOT NULL, note TEXT NOT NULL)""",
]


class _Conn(Protocol):
    def execute(self, sql: str, params: Any = ..., /) -> Any: ...

    def close(self) -> None: ...


class SQLStore:
    """What the SQLite and PostgreSQL stores share: per-thread connections and every
    query but the schema and the append.

    A subclass sets the parameter placeholder (written ``?`` here), the SQL for a NULL
    blob column, opens connections (``_connect``) and says how fetched values become
    plain Python values (``_value``, ``_bytes``, ``_checkpoint``).
    """

    placeholder = "?"
    null_blob = "NULL"

    def __init__(self, location: str, durability: Durability) -> None:
        self.location = location
        self.durability = durability
        self._local = threading.local()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()

    def _connect(self) -> _Conn:
        raise NotImplementedError

    def _closed(self, conn: Any) -> bool:
        return False

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._closed(conn):
            conn = self._connect()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        return self._conn().execute(sql, params)

    @staticmethod
    def _value(v: Any) -> Any:
        return v

    @staticmethod
    def _bytes(v: Any) -> bytes:
        return v  # type: ignore[no-any-return]

    @staticmethod
    def _checkpoint(r: Sequence[Any]) -> StoredCheckpoint:
        return StoredCheckpoint(*r)

    def _row(self, r: Sequence[Any]) -> Row:
        return Row(*(self._value(v) for v in r))

    def size(self) -> int:
        top = self._execute("SELECT max(idx) FROM ledger_entries").fetchone()
        return 0 if top is None or top[0] is None else int(top[0]) + 1

    def count(self) -> int:
        return int(self._execute("SELECT count(*) FROM ledger_entries").fetchone()[0])

    def leaf_hashes(self, lo: int, hi: int) -> list[bytes]:
        cur = self._execute(
            "SELECT leaf_hash FROM ledger_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
            (lo, hi))
        return [self._bytes(r[0]) for r in cur]

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
            yield self._row(r)

    def iter_tuples(self, lo: int, hi: int, batch: int = 20_000
                    ) -> Iterator[tuple[Any, ...]]:
        for r in self._select(lo, hi, True, batch):
            yield tuple(self._value(v) for v in r)

    def _select(self, lo: int, hi: int, bodies: bool, batch: int
                ) -> Iterator[tuple[Any, ...]]:
        cols = COLUMNS if bodies else COLUMNS.replace(
            "request, response", f"{self.null_blob}, {self.null_blob}")
        last = lo - 1
        while True:
            got = self._execute(
                f"SELECT {cols} FROM ledger_entries WHERE idx > ? AND idx < ? "
                "ORDER BY idx LIMIT ?", (last, hi, batch)).fetchall()
            yield from got
            if len(got) < batch:
                return
            last = int(got[-1][0])

    def find(self, entry_id: str) -> Row | None:
        r = self._execute(f"SELECT {COLUMNS} FROM ledger_entries WHERE entry_id = ? "
                          "ORDER BY idx LIMIT 1", (entry_id,)).fetchone()
        return None if r is None else self._row(r)

    def add_checkpoint(self, tree_size: int, root_hash: bytes, ts: str, note: str) -> None:
        self._execute(
            "INSERT INTO ledger_checkpoints (tree_size, root_hash, ts, note) "
            "VALUES (?,?,?,?)", (tree_size, root_hash, ts, note))

    def checkpoints(self) -> list[StoredCheckpoint]:
        cur = self._execute("SELECT seq, tree_size, root_hash, ts, note "
                            "FROM ledger_checkpoints ORDER BY seq")
        return [self._checkpoint(r) for r in cur]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        r = self._execute("SELECT seq, tree_size, root_hash, ts, note FROM "
                          "ledger_checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        return None if r is None else self._checkpoint(r)

    def redact(self, before_ts: str, kind: str = "exchange") -> int:
        cur = self._execute(
            "UPDATE ledger_entries SET request = NULL, response = NULL WHERE kind = ? AND "
            "ts < ? AND (request IS NOT NULL OR response IS NOT NULL)", (kind, before_ts))
        return int(cur.rowcount)

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()


class SQLiteStore(SQLStore):
    """The default store: one SQLite file in WAL mode.

    ``durability="fsync"`` (``synchronous=FULL``) makes every commit survive power loss;
    ``"process"`` (``synchronous=NORMAL``) survives the death of the process, not of the
    machine.
    """

    def __init__(self, path: str | Path, *, durability: Durability = "fsync") -> None:
        self.path = Path(path)
        super().__init__(f"sqlite:///{self.path}", durability)
        # The entries hold prompts and answers in full (retention "full"): a folder made
        # here is the owner's only, whatever the umask would give it.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=30.0)
        # A new file gets 16 KiB pages (an entry with its bodies takes about 2 KiB, which a
        # 4 KiB page holds once); an existing file keeps its own, and WAL fixes it from here.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        sync = "FULL" if self.durability == "fsync" else "NORMAL"
        conn.execute(f"PRAGMA synchronous={sync}")
        return conn

    def _conn(self) -> sqlite3.Connection:
        return super()._conn()  # type: ignore[no-any-return]

    def _row(self, r: Sequence[Any]) -> Row:
        return Row(*r)

    def iter_tuples(self, lo: int, hi: int, batch: int = 20_000
                    ) -> Iterator[tuple[Any, ...]]:
        """One streaming cursor; SQLite already returns plain tuples with bytes blobs."""
        cur = self._conn().execute(
            f"SELECT {COLUMNS} FROM ledger_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
            (lo, hi))
        try:
            while rows := cur.fetchmany(batch):
                yield from rows
        finally:
            cur.close()

    def migrate(self) -> None:
        conn = self._conn()
        for statement in SQLITE_SCHEMA:
            conn.execute(statement)

    def append(self, make_rows: MakeRows) -> list[Row]:
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (top,) = conn.execute("SELECT max(idx) FROM ledger_entries").fetchone()
                rows = list(make_rows(0 if top is None else top + 1))
                conn.executemany(
                    f"INSERT INTO ledger_entries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                    [r.as_tuple() for r in rows])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return rows


def open_store(url: str, *, durability: Durability = "fsync") -> LedgerStore:
    """``sqlite:///path`` or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):], durability=durability)
    if url.startswith(("postgresql://", "postgres://")):
        from distillguard.ledger.pgstore import PostgresStore

        return PostgresStore(url, durability=durability)
    raise ValueError(f"ledger store URL {url!r} must start with sqlite:/// or postgresql://")
