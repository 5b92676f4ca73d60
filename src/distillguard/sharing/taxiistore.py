"""Collections of the TAXII server in the state store (``taxii_objects``, ``taxii_status``).

Every object version added to a collection is one row, stamped with the time it was added
(``date_added``, microseconds, strictly increasing per server process). Pages are
keyset-ordered by ``(date_added, object_id, version)``; the ``next`` token encodes the
last row of the previous page, so it stays valid while objects are added.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from distillguard.exchange import parse_ts
from distillguard.sharing.store import ts

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS taxii_objects (
        collection_id TEXT NOT NULL, object_id TEXT NOT NULL, version TEXT NOT NULL,
        date_added TEXT NOT NULL, type TEXT NOT NULL, spec_version TEXT NOT NULL,
        added_by TEXT NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (collection_id, object_id, version))""",
    "CREATE INDEX IF NOT EXISTS taxii_objects_added ON taxii_objects"
    " (collection_id, date_added)",
    """CREATE TABLE IF NOT EXISTS taxii_status (
        status_id TEXT PRIMARY KEY, partner TEXT NOT NULL, created_at TEXT NOT NULL,
        body TEXT NOT NULL)""",
]
MEDIA_STIX = "application/stix+json;version=2.1"

_clock_lock = threading.Lock()
_last = datetime(1970, 1, 1, tzinfo=UTC)


def added_now() -> datetime:
    """Now, but strictly after the previous call (so date_added orders additions)."""
    global _last
    with _clock_lock:
        now = datetime.now(UTC)
        if now <= _last:
            now = _last + timedelta(microseconds=1)
        _last = now
        return now


def version_of(obj: dict[str, Any], added: datetime) -> str:
    for key in ("modified", "created"):
        if isinstance(obj.get(key), str):
            return ts(parse_ts(obj[key]))
    return ts(added)


def encode_next(row: tuple[str, str, str]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(row))).decode().rstrip("=")


def decode_next(token: str) -> tuple[str, str, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        a, b, c = orjson.loads(raw)
        return str(a), str(b), str(c)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise ValueError("the next token is not one this server issued") from None


@dataclass(slots=True)
class Page:
    rows: list[dict[str, Any]]
    more: bool
    next: str | None


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(72707381)"))
        for statement in SCHEMA:
            await conn.execute(text(statement))


async def add_objects(conn: AsyncConnection, collection_id: str,
                      objects: list[dict[str, Any]], added_by: str
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Insert object versions; returns (successes, failures) as TAXII status details."""
    ok: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for obj in objects:
        added = added_now()
        version = version_of(obj, added)
        exists = (await conn.execute(text(
            "SELECT 1 FROM taxii_objects WHERE collection_id = :c AND object_id = :o"
            " AND version = :v"), {"c": collection_id, "o": obj["id"], "v": version})).first()
        if exists:
            failed.append({"id": obj["id"], "version": version,
                           "message": "this version of the object is already present"})
            continue
        await conn.execute(text(
            "INSERT INTO taxii_objects VALUES (:c, :o, :v, :d, :t, :s, :by, :body)"),
            {"c": collection_id, "o": obj["id"], "v": version, "d": ts(added),
             "t": obj["type"], "s": obj.get("spec_version", "2.1"), "by": added_by,
             "body": orjson.dumps(obj).decode()})
        ok.append({"id": obj["id"], "version": version})
    return ok, failed


async def query(engine: AsyncEngine, collection_id: str, *, added_after: str | None = None,
                ids: list[str] | None = None, types: list[str] | None = None,
                versions: list[str] | None = None, spec_versions: list[str] | None = None,
                limit: int, after: str | None = None, bodies: bool = True) -> Page:
    sql = ("SELECT object_id, version, date_added, spec_version FROM taxii_objects"
           " WHERE collection_id = :c")
    params: dict[str, Any] = {"c": collection_id}
    binds: list[Any] = []
    if added_after:
        sql += " AND date_added > :aa"
        params["aa"] = ts(parse_ts(added_after))
    for column, values in (("object_id", ids), ("type", types),
                           ("spec_version", spec_versions)):
        if values:
            sql += f" AND {column} IN :{column}"
            params[column] = values
            binds.append(bindparam(column, expanding=True))
    statement = text(sql + " ORDER BY date_added, object_id, version").bindparams(*binds)
    async with engine.connect() as conn:
        rows = [tuple(r) for r in await conn.execute(statement, params)]
    rows = _versions(rows, versions or ["last"])
    if after:
        cursor = decode_next(after)
        rows = [r for r in rows if (r[2], r[0], r[1]) > cursor]
    page, more = rows[:limit], len(rows) > limit
    out = [{"id": r[0], "version": r[1], "date_added": r[2], "spec_version": r[3]}
           for r in page]
    if bodies and out:
        async with engine.connect() as conn:
            found = await conn.execute(text(
                "SELECT object_id, version, body FROM taxii_objects WHERE collection_id = :c"
                " AND object_id IN :ids").bindparams(bindparam("ids", expanding=True)),
                {"c": collection_id, "ids": sorted({r["id"] for r in out})})
            by_key = {(a, b): body for a, b, body in found}
        for r in out:
            r["body"] = orjson.loads(by_key[(r["id"], r["version"])])
    token = encode_next((page[-1][2], page[-1][0], page[-1][1])) if more and page else None
    return Page(rows=out, more=more, next=token)


def _versions(rows: list[tuple[Any, ...]], wanted: list[str]) -> list[tuple[Any, ...]]:
    if "all" in wanted:
        return rows
    by_id: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_id.setdefault(row[0], []).append(row)
    keep: set[tuple[str, str]] = set()
    stamps = {ts(parse_ts(w)) for w in wanted if w not in ("first", "last")}
    for object_id, versions in by_id.items():
        ordered = sorted(v[1] for v in versions)
        if "last" in wanted:
            keep.add((object_id, ordered[-1]))
        if "first" in wanted:
            keep.add((object_id, ordered[0]))
        keep.update((object_id, v) for v in ordered if v in stamps)
    return [r for r in rows if (r[0], r[1]) in keep]


async def save_status(conn: AsyncConnection, status: dict[str, Any], partner: str) -> None:
    await conn.execute(text("INSERT INTO taxii_status VALUES (:i, :p, :t, :b)"),
                       {"i": status["id"], "p": partner, "t": status["request_timestamp"],
                        "b": orjson.dumps(status).decode()})


async def get_status(engine: AsyncEngine, status_id: str) -> tuple[str, dict[str, Any]] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT partner, body FROM taxii_status WHERE status_id = :i"),
            {"i": status_id})).first()
    return None if row is None else (row[0], orjson.loads(row[1]))
