"""The sharing tables in the state store: imported bundles, indicators, matches.

Tables (created on first use, SQLite or PostgreSQL):

* ``sharing_bundles``: one row per accepted bundle or TAXII envelope: partner, bundle id,
  when, from where (file, TAXII collection, poll), SHA-256 and object counts;
* ``sharing_objects``: the latest version of every object a partner sent, with the
  bundle it came in (provenance);
* ``sharing_indicators``: matchable inputs (:mod:`distillguard.sharing.indicators`) with
  their expiry;
* ``sharing_matches``: which account matched which partner indicator, how often, and the
  review item opened for it; ``sharing_risk``: the risk matches added to an account.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from distillguard.exchange import parse_ts
from distillguard.sharing.indicators import IndicatorInput, indicator_inputs
from distillguard.store.sql import lock_for_change

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS sharing_bundles (
        partner TEXT NOT NULL, bundle_id TEXT NOT NULL, received_at TEXT NOT NULL,
        source TEXT NOT NULL, sha256 TEXT, objects INTEGER NOT NULL,
        indicators INTEGER NOT NULL, PRIMARY KEY (partner, bundle_id))""",
    """CREATE TABLE IF NOT EXISTS sharing_objects (
        partner TEXT NOT NULL, object_id TEXT NOT NULL, type TEXT NOT NULL,
        modified TEXT, bundle_id TEXT NOT NULL, received_at TEXT NOT NULL,
        body TEXT NOT NULL, PRIMARY KEY (partner, object_id))""",
    """CREATE TABLE IF NOT EXISTS sharing_indicators (
        partner TEXT NOT NULL, indicator_id TEXT NOT NULL, n INTEGER NOT NULL,
        kind TEXT NOT NULL, op TEXT NOT NULL, value TEXT NOT NULL, salt TEXT,
        name TEXT, confidence INTEGER, valid_from TEXT, expires_at TEXT NOT NULL,
        bundle_id TEXT NOT NULL, imported_at TEXT NOT NULL,
        PRIMARY KEY (partner, indicator_id, n))""",
    "CREATE INDEX IF NOT EXISTS sharing_indicators_expiry ON sharing_indicators (expires_at)",
    """CREATE TABLE IF NOT EXISTS sharing_matches (
        account_id TEXT NOT NULL, partner TEXT NOT NULL, indicator_id TEXT NOT NULL,
        kind TEXT NOT NULL, value TEXT NOT NULL, first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL, hits INTEGER NOT NULL, review_item TEXT,
        PRIMARY KEY (account_id, partner, indicator_id))""",
    """CREATE TABLE IF NOT EXISTS sharing_risk (
        account_id TEXT PRIMARY KEY, risk REAL NOT NULL, updated_at TEXT NOT NULL,
        indicators TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sharing_cursors (
        server TEXT NOT NULL, collection_id TEXT NOT NULL, added_after TEXT NOT NULL,
        PRIMARY KEY (server, collection_id))""",
]


def ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ImportSummary:
    partner: str
    bundle_id: str
    objects: int = 0
    new_or_updated: int = 0
    indicators: int = 0
    active: dict[str, int] = field(default_factory=dict)
    inactive: int = 0
    duplicate: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"partner": self.partner, "bundle_id": self.bundle_id,
                "objects": self.objects, "new_or_updated": self.new_or_updated,
                "indicators": self.indicators, "active": self.active,
                "inactive_indicators": self.inactive, "duplicate": self.duplicate}


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(72707380)"))
        for statement in SCHEMA:
            await conn.execute(text(statement))


def _newer(modified: str | None, stored: str | None) -> bool:
    if stored is None:
        return True
    if modified is None:
        return False
    return parse_ts(modified) > parse_ts(stored)


class SharingStore:
    def __init__(self, engine: AsyncEngine, *, ttl: timedelta) -> None:
        self.engine = engine
        self.ttl = ttl

    async def start(self) -> None:
        await create_schema(self.engine)

    async def import_objects(self, conn: AsyncConnection, *, partner: str, bundle_id: str,
                             objects: list[dict[str, Any]], source: str,
                             sha256: str | None, now: datetime | None = None
                             ) -> ImportSummary:
        """Store a validated bundle's objects and indicators, inside the caller's
        transaction (all or nothing). One import per partner at a time: two at once each
        read an object's stored version before either wrote, and an older copy could
        replace a newer one (a revoked indicator active again), or the same bundle
        twice failed on its id instead of being a duplicate."""
        await lock_for_change(conn, "sharing-import:" + partner)
        now = now or datetime.now(UTC)
        summary = ImportSummary(partner=partner, bundle_id=bundle_id, objects=len(objects))
        seen = (await conn.execute(text(
            "SELECT sha256, received_at FROM sharing_bundles WHERE partner = :p"
            " AND bundle_id = :b"), {"p": partner, "b": bundle_id})).first()
        if seen is not None:
            # The same bundle again is a duplicate; another bundle under an id already
            # used would have its objects dropped without a word.
            if sha256 is not None and seen[0] is not None and seen[0] != sha256:
                from distillguard.sharing.validate import BundleError  # STIX parsing

                raise BundleError(
                    f"bundle {bundle_id} was imported from {partner} at {seen[1]} with "
                    f"other contents (SHA-256 {seen[0][:16]}...); a changed bundle needs an "
                    "id of its own", status=409)
            summary.duplicate = True
            return summary
        for obj in objects:
            oid, modified = obj["id"], obj.get("modified")
            stored = (await conn.execute(text(
                "SELECT modified FROM sharing_objects WHERE partner = :p AND object_id = :o"),
                {"p": partner, "o": oid})).first()
            if stored is not None and not _newer(modified, stored[0]):
                continue
            summary.new_or_updated += 1
            row = {"p": partner, "o": oid, "t": obj["type"], "m": modified, "b": bundle_id,
                   "r": ts(now), "body": orjson.dumps(obj).decode()}
            await conn.execute(text(
                "INSERT INTO sharing_objects VALUES (:p, :o, :t, :m, :b, :r, :body)"
                " ON CONFLICT (partner, object_id) DO UPDATE SET type = excluded.type,"
                " modified = excluded.modified, bundle_id = excluded.bundle_id,"
                " received_at = excluded.received_at, body = excluded.body"), row)
            if obj["type"] != "indicator":
                continue
            summary.indicators += 1
            await conn.execute(text(
                "DELETE FROM sharing_indicators WHERE partner = :p AND indicator_id = :o"),
                {"p": partner, "o": oid})
            inputs = indicator_inputs(obj, now=now, ttl=self.ttl)
            if not inputs:
                summary.inactive += 1
            for item in inputs:
                await conn.execute(text(
                    "INSERT INTO sharing_indicators VALUES (:p, :i, :n, :k, :op, :v, :s,"
                    " :name, :c, :vf, :exp, :b, :at)"),
                    {"p": partner, "i": item.indicator_id, "n": item.n, "k": item.kind,
                     "op": item.op, "v": item.value, "s": item.salt, "name": item.name,
                     "c": item.confidence,
                     "vf": ts(item.valid_from) if item.valid_from else None,
                     "exp": ts(item.expires_at), "b": bundle_id, "at": ts(now)})
                summary.active[item.kind] = summary.active.get(item.kind, 0) + 1
        await conn.execute(text(
            "INSERT INTO sharing_bundles VALUES (:p, :b, :r, :s, :h, :o, :i)"),
            {"p": partner, "b": bundle_id, "r": ts(now), "s": source, "h": sha256,
             "o": len(objects), "i": summary.indicators})
        return summary

    async def import_bundle(self, *, partner: str, bundle_id: str,
                            objects: list[dict[str, Any]], source: str,
                            sha256: str | None) -> ImportSummary:
        async with self.engine.begin() as conn:
            return await self.import_objects(conn, partner=partner, bundle_id=bundle_id,
                                             objects=objects, source=source, sha256=sha256)

    async def active_indicators(self, now: datetime | None = None) -> list[dict[str, Any]]:
        now = now or datetime.now(UTC)
        async with self.engine.connect() as conn:
            rows = await conn.execute(text(
                "SELECT partner, indicator_id, kind, op, value, salt, name, expires_at,"
                " bundle_id FROM sharing_indicators WHERE expires_at > :now"
                " AND (valid_from IS NULL OR valid_from <= :now)"), {"now": ts(now)})
            return [dict(r._mapping) for r in rows]

    async def bundles(self, partner: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM sharing_bundles"
        params: dict[str, Any] = {}
        if partner:
            sql += " WHERE partner = :p"
            params["p"] = partner
        async with self.engine.connect() as conn:
            rows = await conn.execute(text(sql + " ORDER BY received_at"), params)
            return [dict(r._mapping) for r in rows]

    async def purge_expired(self, now: datetime | None = None) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(text(
                "DELETE FROM sharing_indicators WHERE expires_at <= :now"),
                {"now": ts(now or datetime.now(UTC))})
            return int(result.rowcount or 0)

    async def record_match(self, *, account_id: str, partner: str, indicator_id: str,
                           kind: str, value: str, when: datetime, risk: float,
                           hits: int = 1) -> bool:
        """Count ``hits`` requests (0: a match found without traffic, such as a payment
        fingerprint); True when this account matched this indicator for the first time
        (its risk was then raised by ``risk``)."""
        async with self.engine.begin() as conn:
            # Matches of one account at once (its requests on several replicas) each
            # found no match row, and each read the account's risk and wrote its own sum.
            await lock_for_change(conn, "sharing-match:" + account_id)
            updated = await conn.execute(text(
                "UPDATE sharing_matches SET hits = hits + :n, last_seen = CASE WHEN :n > 0"
                " THEN :t ELSE last_seen END"
                " WHERE account_id = :a AND partner = :p AND indicator_id = :i"),
                {"n": hits, "t": ts(when), "a": account_id, "p": partner, "i": indicator_id})
            if updated.rowcount:
                return False
            await conn.execute(text(
                "INSERT INTO sharing_matches VALUES (:a, :p, :i, :k, :v, :t, :t, :n, NULL)"
                " ON CONFLICT DO NOTHING"),
                {"a": account_id, "p": partner, "i": indicator_id, "k": kind, "v": value,
                 "t": ts(when), "n": hits})
            row = (await conn.execute(text(
                "SELECT risk, indicators FROM sharing_risk WHERE account_id = :a"),
                {"a": account_id})).first()
            ids = orjson.loads(row[1]) if row else []
            ids.append(f"{partner}:{indicator_id}")
            new = min(1.0, (row[0] if row else 0.0) + risk)
            await conn.execute(text(
                "INSERT INTO sharing_risk VALUES (:a, :r, :t, :ids) ON CONFLICT (account_id)"
                " DO UPDATE SET risk = excluded.risk, updated_at = excluded.updated_at,"
                " indicators = excluded.indicators"),
                {"a": account_id, "r": new, "t": ts(when), "ids": orjson.dumps(ids).decode()})
            return True

    async def set_review_item(self, account_id: str, partner: str, indicator_id: str,
                              item_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text(
                "UPDATE sharing_matches SET review_item = :r WHERE account_id = :a"
                " AND partner = :p AND indicator_id = :i"),
                {"r": item_id, "a": account_id, "p": partner, "i": indicator_id})

    async def cursor(self, server: str, collection_id: str) -> str | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(text(
                "SELECT added_after FROM sharing_cursors WHERE server = :s"
                " AND collection_id = :c"), {"s": server, "c": collection_id})).first()
            return None if row is None else str(row[0])

    async def set_cursor(self, conn: AsyncConnection, server: str, collection_id: str,
                         added_after: str) -> None:
        await conn.execute(text(
            "INSERT INTO sharing_cursors VALUES (:s, :c, :a) ON CONFLICT (server,"
            " collection_id) DO UPDATE SET added_after = excluded.added_after"),
            {"s": server, "c": collection_id, "a": added_after})

    async def risk(self) -> dict[str, float]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(text("SELECT account_id, risk FROM sharing_risk"))
            return {r[0]: float(r[1]) for r in rows}

    async def matches(self, account_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM sharing_matches"
        params: dict[str, Any] = {}
        if account_id:
            sql += " WHERE account_id = :a"
            params["a"] = account_id
        async with self.engine.connect() as conn:
            rows = await conn.execute(text(sql + " ORDER BY first_seen"), params)
            return [dict(r._mapping) for r in rows]


__all__ = ["ImportSummary", "IndicatorInput", "SharingStore", "create_schema", "ts"]
