"""Audit events: every policy decision and every action, typed ``source:subject:action``.

Events are written first to the ``policy_audit`` table in the state store (so the CLI,
the admin API, the dashboard and every replica record them the same way) and then
forwarded to the access ledger by :class:`LedgerForwarder` when the ledger component is
installed (``distillguard.ledger.writer_for``): rows whose ``ledger_seq`` is NULL are
claimed, appended, and marked with the ledger's sequence number. An event therefore
reaches the ledger even if it was recorded while no ledger was reachable.

Names (``source`` is who decided, ``subject`` what it is about)::

    policy:request:deny          requests refused by a rule (aggregated, see below)
    policy:account:<action>      an action applied by the policy engine (verdict rules)
    policy:account:revoke        an action lifted; policy:account:expire when it ran out
    dashboard:account:<action>   ... by an analyst in the dashboard
    admin:account:<action>       ... through the admin API
    cli:account:<action>         ... from the command line
    <source>:account:extend      an action applied again for longer extended the active one
    review:item:<decision>       open, confirm, dismiss, escalate on the review queue
    policy:file:reload           a new policy file took effect (or was refused)

Request denials can come thousands a second from one abusive client, so they are not one
row each: :class:`DenialAggregator` counts them in memory per (account, rule, code) and
writes one ``policy:request:deny`` event per group every ``audit.flush_interval_s``
(default 5 s) with ``count``, the first and last time, and up to five models and client
addresses seen. Nothing is dropped: counts are exact; only the per-request detail is
summarised.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from distillguard.policy.schema import ensure_schema, new_id, now_ts
from distillguard.store.sql import like_pattern

log = logging.getLogger("distillguard.policy")

_INSERT = text("INSERT INTO policy_audit (event_id, ts, name, subject, actor, reason, detail,"
               " count, ledger_seq) VALUES (:id, :ts, :name, :subject, :actor, :reason,"
               " :detail, :count, NULL)")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    name: str
    subject: str
    actor: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)
    count: int = 1


def _row(event: AuditEvent) -> dict[str, Any]:
    return {"id": new_id("ev"), "ts": now_ts(), "name": event.name, "subject": event.subject,
            "actor": event.actor, "reason": event.reason,
            "detail": orjson.dumps(event.detail, default=str).decode(), "count": event.count}


async def record_in(conn: AsyncConnection, *events: AuditEvent) -> None:
    """Record ``events`` inside the caller's transaction (so they commit with the change),
    in one statement."""
    if events:
        await conn.execute(_INSERT, [_row(e) for e in events])


async def record(engine: AsyncEngine, *events: AuditEvent) -> None:
    if not events:
        return
    await ensure_schema(engine)
    async with engine.begin() as conn:
        await conn.execute(_INSERT, [_row(e) for e in events])


async def query(engine: AsyncEngine, subject: str | None = None, *, limit: int = 50,
                name_prefix: str | None = None) -> list[dict[str, Any]]:
    """Events ``{ts, name, subject, actor, reason, detail, count}``, newest first."""
    await ensure_schema(engine)
    sql = "SELECT * FROM policy_audit"
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if subject:
        where.append("subject = :s")
        params["s"] = subject
    if name_prefix:
        where.append("name LIKE :n ESCAPE '\\'")
        params["n"] = like_pattern(name_prefix, prefix=True)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts DESC, event_id DESC LIMIT :limit"
    async with engine.connect() as conn:
        rows = (await conn.execute(text(sql), params)).all()
    out = []
    for r in rows:
        m = dict(r._mapping)
        m["detail"] = orjson.loads(m["detail"]) if m["detail"] else {}
        out.append(m)
    return out


class DenialAggregator:
    """Counts request denials in memory; :meth:`drain` yields one event per group."""

    def __init__(self, max_groups: int = 10_000) -> None:
        self.max_groups = max_groups
        self._groups: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.overflow = 0

    def note(self, *, account_id: str | None, rule: str, code: str, reason: str,
             model: str | None, client_ip: str | None) -> None:
        key = (account_id or "-", rule, code)
        group = self._groups.get(key)
        ts = now_ts()
        if group is None:
            if len(self._groups) >= self.max_groups:
                key = ("-", "overflow", "many")
                self.overflow += 1
                group = self._groups.get(key)
            if group is None:
                group = {"count": 0, "first": ts, "reason": reason, "models": [], "ips": []}
                self._groups[key] = group
        group["count"] += 1
        group["last"] = ts
        for name, value in (("models", model), ("ips", client_ip)):
            if value and value not in group[name] and len(group[name]) < 5:
                group[name].append(value)

    def __len__(self) -> int:
        return len(self._groups)

    def drain(self) -> list[AuditEvent]:
        groups, self._groups = self._groups, {}
        events = []
        for (account_id, rule, code), g in groups.items():
            events.append(AuditEvent(
                name="policy:request:deny", subject=f"account:{account_id}", actor="policy",
                reason=g["reason"], count=g["count"],
                detail={"rule": rule, "code": code, "count": g["count"], "first": g["first"],
                        "last": g["last"], "models": g["models"], "client_ips": g["ips"]}))
        return events


class LedgerWriter(Protocol):
    async def append_event(self, name: str, subject: str, actor: str, reason: str,
                           detail: dict[str, Any]) -> int: ...


def ledger_writer(settings: Any) -> LedgerWriter | None:
    """The ledger's event writer when the ledger component is installed, else None."""
    if importlib.util.find_spec("distillguard.ledger") is None:
        return None
    try:
        from distillguard import ledger
    except ImportError as exc:
        log.warning("policy: the ledger package failed to import: %s", exc)
        return None
    factory = getattr(ledger, "writer_for", None)
    if factory is None:
        return None
    writer: LedgerWriter | None = factory(settings)
    if getattr(getattr(writer, "config", None), "enabled", True) is False:
        return None
    return writer


class LedgerForwarder:
    """Appends audit rows not yet in the ledger, oldest first, each exactly once."""

    def __init__(self, engine: AsyncEngine, writer: LedgerWriter, batch: int = 500) -> None:
        self.engine = engine
        self.writer = writer
        self.batch = batch
        self.forwarded = 0

    async def forward(self) -> int:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT * FROM policy_audit WHERE ledger_seq IS NULL ORDER BY ts, event_id"
                " LIMIT :n"), {"n": self.batch})).all()
        done = 0
        for r in rows:
            m = r._mapping
            async with self.engine.begin() as conn:   # claim it: another replica may race
                claimed = await conn.execute(text(
                    "UPDATE policy_audit SET ledger_seq = -1 WHERE event_id = :id"
                    " AND ledger_seq IS NULL"), {"id": m["event_id"]})
            if claimed.rowcount != 1:
                continue
            detail = orjson.loads(m["detail"]) if m["detail"] else {}
            detail = {**detail, "audit_event_id": m["event_id"], "ts": m["ts"],
                      "count": m["count"]}
            try:
                seq = await self.writer.append_event(m["name"], m["subject"], m["actor"] or "",
                                                     m["reason"] or "", detail)
            except Exception:
                async with self.engine.begin() as conn:  # release the claim, retry later
                    await conn.execute(text("UPDATE policy_audit SET ledger_seq = NULL"
                                            " WHERE event_id = :id"), {"id": m["event_id"]})
                raise
            async with self.engine.begin() as conn:
                await conn.execute(text("UPDATE policy_audit SET ledger_seq = :s"
                                        " WHERE event_id = :id"),
                                   {"s": int(seq), "id": m["event_id"]})
            done += 1
        self.forwarded += done
        return done
