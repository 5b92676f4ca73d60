"""The state store on SQLAlchemy Core: SQLite (aiosqlite) or PostgreSQL (asyncpg).

One implementation serves both databases: the SQL is the portable subset, timestamps are
stored as RFC 3339 UTC text (which sorts in time order) and JSON as text.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from distillguard.errors import InvalidRecord, NotFound, StoreError
from distillguard.exchange import parse_ts
from distillguard.store.migrations import pending
from distillguard.store.models import (
    Account,
    AccountStatus,
    ApiKey,
    account_change,
    check_limits,
    hash_key,
    new_key_material,
    stored_text,
)

_ACCOUNT_COLUMNS = ("account_id", "created_at", "org", "email_domain", "payment_fingerprint",
                    "country", "tier", "status", "limits", "extra")
_UPDATABLE = {"org", "email_domain", "payment_fingerprint", "country", "tier", "status",
              "limits", "extra", "created_at"}


def async_url(url: str) -> str:
    """Map a ``state.url`` to the SQLAlchemy async driver URL."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://"):]
    raise StoreError(f"unsupported state store URL scheme in {url.split('://')[0]}://")


def _ts(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else parse_ts(value)


def in_chunks(values: Sequence[str], size: int = 500
              ) -> list[tuple[str, dict[str, Any]]]:
    """``values`` for ``... IN (<marks>)`` queries, ``size`` at a time: each chunk's
    placeholder list (``:a0, :a1, ...``) and its parameters (a statement with thousands of
    parameters is refused by SQLite and slow on PostgreSQL)."""
    out = []
    for start in range(0, len(values), size):
        chunk = values[start:start + size]
        out.append((", ".join(f":a{i}" for i in range(len(chunk))),
                    {f"a{i}": v for i, v in enumerate(chunk)}))
    return out


def containing(column: str, param: str) -> str:
    """SQL that is true when ``column`` holds the text of ``:param`` (given as
    :func:`like_pattern` makes it), ignoring case, alike on SQLite and PostgreSQL (whose
    LIKE is case-blind on one and not the other)."""
    return f"lower({column}) LIKE lower(:{param}) ESCAPE '\\'"


def like_pattern(text: str, *, prefix: bool = False) -> str:
    """``text`` as a LIKE pattern that matches it literally (its ``%``, ``_`` and ``\\``
    escaped, for ``ESCAPE '\\'``): anywhere in a value, or at its start (``prefix``).
    Unescaped, a search for ``a_b`` also found ``axb``, and one for ``%`` everything."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%" if prefix else f"%{escaped}%"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def lock_for_change(conn: AsyncConnection, key: str, *,
                          within: str | None = None) -> None:
    """Make the transaction on ``conn`` the only one changing ``key`` until it ends, for
    a change that reads first and writes what it read: on PostgreSQL an advisory lock on
    the key (across replicas), on SQLite the database's write lock. Call it before the
    transaction's reads: the SQLite driver begins a transaction only at the first write,
    so reads before it fall outside the transaction. On SQLite a transaction that has
    begun holds the write lock already, and a second call is a no-op.

    ``within`` names a wider key the change holds shared beside ``key``: a transaction
    that locks the wider key itself (``lock_for_change(conn, within)``, an import that
    changes many keys at once) waits for every change within it, and they for it. The
    holder of the wider key must lock no narrower one (the order of the two locks here
    then cannot deadlock)."""
    if conn.dialect.name == "postgresql":
        if within is None:
            await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})
        else:
            await conn.execute(text("SELECT pg_advisory_xact_lock_shared(hashtext(:w)),"
                                    " pg_advisory_xact_lock(hashtext(:k))"),
                               {"w": within, "k": key})
    elif conn.dialect.name == "sqlite":
        raw = await conn.get_raw_connection()
        if not raw.driver_connection.in_transaction:  # type: ignore[union-attr]
            await conn.exec_driver_sql("BEGIN IMMEDIATE")


def _account_column(name: str, value: Any) -> Any:
    """One field of an account as its column holds it."""
    if name == "created_at":
        return _ts(value)
    if name == "status":
        return str(value)
    if name in ("limits", "extra"):
        return _json(value)
    return value


def account_row(account: Account) -> dict[str, Any]:
    """An account as its row holds it."""
    return {c: _account_column(c, getattr(account, c)) for c in _ACCOUNT_COLUMNS}


async def upsert_accounts(conn: AsyncConnection, accounts: Iterable[Account], *,
                          keep_status: Collection[str] = ()) -> int:
    """Insert or replace ``accounts`` in the transaction on ``conn``; returns how many
    accounts that is (one given twice is stored once, as its last record says). Those of
    ``keep_status`` that exist keep their stored status (a new one takes its record's)."""
    rows = {a.account_id: account_row(a) for a in accounts}
    cols = ", ".join(_ACCOUNT_COLUMNS)
    params = ", ".join(":" + c for c in _ACCOUNT_COLUMNS)
    for keep in (False, True):
        batch = [row for account_id, row in rows.items()
                 if (account_id in keep_status) == keep]
        if not batch:
            continue
        updates = ", ".join(f"{c} = excluded.{c}" for c in _ACCOUNT_COLUMNS[1:]
                            if not (keep and c == "status"))
        await conn.execute(text(f"INSERT INTO accounts ({cols}) VALUES ({params}) "
                                f"ON CONFLICT (account_id) DO UPDATE SET {updates}"), batch)
    return len(rows)


async def insert_account(conn: AsyncConnection, account: Account, *,
                         replace: bool = False) -> None:
    """Insert ``account`` in the transaction on ``conn`` (``replace``: or replace the one
    stored); StoreError when it exists."""
    cols = ", ".join(_ACCOUNT_COLUMNS)
    params = ", ".join(":" + c for c in _ACCOUNT_COLUMNS)
    sql = f"INSERT INTO accounts ({cols}) VALUES ({params})"
    if replace:
        updates = ", ".join(f"{c} = excluded.{c}" for c in _ACCOUNT_COLUMNS[1:])
        sql += f" ON CONFLICT (account_id) DO UPDATE SET {updates}"
    try:
        await conn.execute(text(sql), account_row(account))
    except IntegrityError as exc:
        raise StoreError(f"account {account.account_id!r} already exists") from exc


def account_columns(changes: dict[str, Any]) -> dict[str, Any]:
    """An account update's fields as their columns hold them: StoreError naming a field
    that cannot be changed or a value the account cannot take."""
    unknown = sorted(set(changes) - _UPDATABLE)
    if unknown:
        raise InvalidRecord(f"cannot update account fields {unknown}; an account's "
                            f"fields that can change: {', '.join(sorted(_UPDATABLE))}",
                            unknown[0])
    return {name: _account_column(name, account_change(name, value))
            for name, value in sorted(changes.items())}


async def write_account(conn: AsyncConnection, account_id: str, values: dict[str, Any]
                        ) -> bool:
    """Write the columns ``values`` (:func:`account_columns`, not empty) of one account in the
    transaction on ``conn``; False when there is no such account. Only the fields changed:
    writing back a whole account read a moment before undid a change made in between (the
    detector suspending it as an analyst sets its tier)."""
    if "\x00" in account_id:   # never stored (stored_text); PostgreSQL would fail
        return False
    sets = ", ".join(f"{name} = :{name}" for name in values)
    changed = await conn.execute(text(f"UPDATE accounts SET {sets} WHERE account_id = :id"),
                                 {**values, "id": account_id})
    return bool(changed.rowcount)


def _create_private(path: Path) -> None:
    """Create the SQLite state file (and a missing folder) for its owner only, whatever
    the umask would give it: it holds the accounts, their payment fingerprints, API key
    hashes and verdicts. SQLite gives its -wal and -shm files the database file's mode.
    An existing file keeps the mode its owner gave it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SQLStateStore:
    """:class:`~distillguard.store.StateStore` on SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            path = url[len("sqlite:///"):]
            if path and path != ":memory:":
                _create_private(Path(path))
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(async_url(url), **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- migrations -------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now."""
        done: list[int] = []
        try:
            async with self.engine.begin() as conn:
                if self.is_sqlite:
                    # Take the write lock first. The driver would begin a transaction
                    # only at the first INSERT: each CREATE ran on its own, a second
                    # process starting at once saw no migration applied and failed on
                    # "table accounts already exists", and a failure midway left half a
                    # schema. Now a second process waits, then finds them applied.
                    await lock_for_change(conn, "migrations")
                await conn.execute(text(
                    "CREATE TABLE IF NOT EXISTS distillguard_migrations ("
                    " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                    " applied_at TEXT NOT NULL)"
                ))
                if not self.is_sqlite:
                    # Serialise concurrent start-ups of several replicas.
                    await conn.execute(text("SELECT pg_advisory_xact_lock(72707369)"))
                rows = await conn.execute(text("SELECT version FROM distillguard_migrations"))
                applied = {int(r[0]) for r in rows}
                for version, description, statements in pending(applied):
                    for statement in statements:
                        await conn.execute(text(statement))
                    await conn.execute(
                        text("INSERT INTO distillguard_migrations VALUES (:v, :d, :t)"),
                        {"v": version, "d": description, "t": _ts(datetime.now(UTC))},
                    )
                    done.append(version)
        except SQLAlchemyError as exc:
            raise StoreError(f"migration failed: {exc.__class__.__name__}: {exc}") from exc
        return done

    # -- accounts -----------------------------------------------------------------------

    @staticmethod
    def _account(row: Any) -> Account:
        m = row._mapping
        return Account(
            account_id=m["account_id"],
            created_at=parse_ts(m["created_at"]),
            org=m["org"],
            email_domain=m["email_domain"],
            payment_fingerprint=m["payment_fingerprint"],
            country=m["country"],
            tier=m["tier"],
            status=AccountStatus(m["status"]),
            limits=orjson.loads(m["limits"]),
            extra=orjson.loads(m["extra"]),
        )

    async def put_account(self, account: Account, *, replace: bool = False) -> Account:
        async with self.engine.begin() as conn:
            await insert_account(conn, account, replace=replace)
        return account

    async def import_accounts(self, accounts: Iterable[Account], *,
                              keep_status: Collection[str] = ()) -> int:
        """Insert or replace many accounts in one transaction (all or nothing); returns
        how many accounts that is (one given twice counts once). Those of ``keep_status``
        that exist keep their stored status."""
        accounts = list(accounts)
        if not accounts:
            return 0
        async with self.engine.begin() as conn:
            return await upsert_accounts(conn, accounts, keep_status=keep_status)

    async def get_account(self, account_id: str) -> Account:
        if "\x00" in account_id:   # never stored (stored_text); PostgreSQL would fail
            raise NotFound(f"no account {account_id!r}")
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                text("SELECT * FROM accounts WHERE account_id = :a"), {"a": account_id}
            )).first()
        if row is None:
            raise NotFound(f"no account {account_id!r}")
        return self._account(row)

    async def list_accounts(
        self, *, query: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Account]:
        sql = "SELECT * FROM accounts"
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if query and "\x00" in query:
            return []
        if query:
            sql += " WHERE " + " OR ".join(containing(column, "q") for column in (
                "account_id", "org", "email_domain", "payment_fingerprint"))
            params["q"] = like_pattern(query)
        sql += " ORDER BY account_id LIMIT :limit OFFSET :offset"
        async with self.engine.connect() as conn:
            rows = (await conn.execute(text(sql), params)).all()
        return [self._account(r) for r in rows]

    async def count_accounts(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(text("SELECT COUNT(*) FROM accounts"))).scalar_one())

    async def update_account(self, account_id: str, **changes: Any) -> Account:
        values = account_columns(changes)
        if values and "\x00" not in account_id:
            async with self.engine.begin() as conn:
                await write_account(conn, account_id, values)
        return await self.get_account(account_id)

    async def merge_limits(self, account_id: str, limits: dict[str, Any]) -> Account:
        """Set the named limits of the account, keeping the others, in one transaction
        that holds the account: two changes of different limits at once each wrote back
        the limits as read before the other's, and one was lost."""
        changes = check_limits(limits, "account")
        if "\x00" not in account_id:
            async with self.engine.begin() as conn:
                await lock_for_change(conn, "account:" + account_id)
                row = (await conn.execute(text(
                    "SELECT limits FROM accounts WHERE account_id = :id"),
                    {"id": account_id})).first()
                if row is not None:
                    merged = {**orjson.loads(row[0]), **changes}
                    await conn.execute(text(
                        "UPDATE accounts SET limits = :l WHERE account_id = :id"),
                        {"l": _json(merged), "id": account_id})
        return await self.get_account(account_id)

    # -- keys ---------------------------------------------------------------------------

    @staticmethod
    def _key(row: Any) -> ApiKey:
        m = row._mapping
        return ApiKey(
            key_id=m["key_id"],
            account_id=m["account_id"],
            key_hash=m["key_hash"],
            name=m["name"],
            created_at=parse_ts(m["created_at"]),
            expires_at=_dt(m["expires_at"]),
            revoked_at=_dt(m["revoked_at"]),
            limits=orjson.loads(m["limits"]),
        )

    async def create_key(
        self,
        account_id: str,
        *,
        name: str | None = None,
        expires_at: datetime | None = None,
        limits: dict[str, int | None] | None = None,
    ) -> tuple[ApiKey, str]:
        await self.get_account(account_id)
        key_id, secret = new_key_material()
        key = ApiKey(key_id=key_id, account_id=account_id, key_hash=hash_key(secret),
                     name=stored_text(name, "key 'name'", "name"), expires_at=expires_at,
                     limits=check_limits(limits or {}, "key"))
        async with self.engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO api_keys (key_id, account_id, key_hash, name, created_at,"
                     " expires_at, revoked_at, limits) VALUES (:k, :a, :h, :n, :c, :e, NULL, :l)"),
                {"k": key.key_id, "a": account_id, "h": key.key_hash, "n": name,
                 "c": _ts(key.created_at), "e": _ts(expires_at), "l": _json(key.limits)},
            )
        return key, secret

    async def get_key(self, key_id: str) -> ApiKey | None:
        if "\x00" in key_id:
            return None
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                text("SELECT * FROM api_keys WHERE key_id = :k"), {"k": key_id}
            )).first()
        return None if row is None else self._key(row)

    async def list_keys(self, account_id: str | None = None) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys"
        params: dict[str, Any] = {}
        if account_id is not None and "\x00" in account_id:
            return []
        if account_id is not None:
            sql += " WHERE account_id = :a"
            params["a"] = account_id
        sql += " ORDER BY created_at, key_id"
        async with self.engine.connect() as conn:
            rows = (await conn.execute(text(sql), params)).all()
        return [self._key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> ApiKey:
        key = await self.get_key(key_id)
        if key is None:
            raise NotFound(f"no key {key_id!r}")
        if key.revoked_at is None:
            key.revoked_at = datetime.now(UTC)
            async with self.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE api_keys SET revoked_at = :r WHERE key_id = :k"),
                    {"r": _ts(key.revoked_at), "k": key_id},
                )
        return key


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
