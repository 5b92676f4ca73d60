"""The review queue: what was flagged, why, the evidence, and the analyst's decision.

Anything that should be looked at by a person rather than acted on automatically lands
here: denied-party screening matches, verdicts above the review threshold, imported
threat-intelligence indicator matches. Other components open items with
:func:`open_item`; analysts decide from ``distillguard review ...``, the admin API
(``/admin/v1/review``) or the dashboard.

Item life cycle::

    open ──confirm──▶ confirmed   (the proposed action, if any, is applied)
      │  ──dismiss──▶ dismissed   (a reason is required)
      └──escalate──▶ escalated ──confirm / dismiss──▶ ...

:func:`open_item` is a stable interface::

    from distillguard.policy.review import open_item
    item_id = await open_item(engine, kind="account", subject="acct_17", risk=0.8,
                              evidence=["matched indicator ..."], source="taxii:partner-a")

``engine`` is the state store's SQLAlchemy ``AsyncEngine`` (``store.engine``). The tables
are created if missing. While an item for the same ``(kind, subject, source)`` is still
open or escalated, a second call adds its evidence to that item (keeping the higher risk)
and returns the same id instead of opening a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.policy.audit import AuditEvent, record_in
from distillguard.policy.schema import ensure_schema, new_id, now_ts
from distillguard.store.sql import lock_for_change

DECISIONS = ("confirm", "dismiss", "escalate")
STATUSES = ("open", "escalated", "confirmed", "dismissed")
_AFTER = {"confirm": "confirmed", "dismiss": "dismissed", "escalate": "escalated"}
MAX_EVIDENCE = 50


@dataclass(frozen=True, slots=True)
class ReviewItem:
    item_id: str
    kind: str
    subject: str
    risk: float | None
    status: str
    source: str
    action: str | None
    evidence: list[str]
    opened_at: str
    updated_at: str
    decided_at: str | None = None
    decided_by: str | None = None
    decision: str | None = None
    decision_reason: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> ReviewItem:
        m = dict(row._mapping)
        m["evidence"] = orjson.loads(m["evidence"]) if m["evidence"] else []
        return cls(**m)

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}  # type: ignore[attr-defined]


async def open_item(engine: AsyncEngine, *, kind: str, subject: str, risk: float | None,
                    evidence: list[str], source: str, action: str | None = None) -> str:
    """Put ``subject`` on the review queue (or add to its open item); returns the item id.

    ``kind`` says what the subject is (``account``, ``campaign``, ``indicator``, ...);
    ``source`` who raised it (``screening``, ``verdicts``, ``taxii:<feed>``, ...);
    ``action`` the ladder action proposed if an analyst confirms (optional).
    """
    if not kind or not subject or not source:
        raise ValueError("open_item needs a kind, a subject and a source")
    await ensure_schema(engine)
    evidence = [str(e) for e in evidence][:MAX_EVIDENCE]
    now = now_ts()
    async with engine.begin() as conn:
        # One item per subject and source: two raised at once each found none open.
        await lock_for_change(conn, f"review:{kind}:{subject}:{source}")
        existing = (await conn.execute(text(
            "SELECT item_id, risk, evidence FROM policy_review WHERE kind = :k AND"
            " subject = :s AND source = :src AND status IN ('open', 'escalated')"
            " ORDER BY opened_at LIMIT 1"), {"k": kind, "s": subject, "src": source})).first()
        if existing is not None:
            item_id, old_risk, old_evidence = existing
            merged = list(orjson.loads(old_evidence or "[]"))
            merged += [e for e in evidence if e not in merged]
            new_risk = max((r for r in (old_risk, risk) if r is not None), default=None)
            await conn.execute(text(
                "UPDATE policy_review SET evidence = :e, risk = :r, updated_at = :u"
                " WHERE item_id = :i"),
                {"e": orjson.dumps(merged[:MAX_EVIDENCE]).decode(), "r": new_risk, "u": now,
                 "i": item_id})
            return str(item_id)
        item_id = new_id("rv")
        await conn.execute(text(
            "INSERT INTO policy_review (item_id, kind, subject, risk, status, source, action,"
            " evidence, opened_at, updated_at) VALUES (:i, :k, :s, :r, 'open', :src, :a, :e,"
            " :t, :t)"),
            {"i": item_id, "k": kind, "s": subject, "r": risk, "src": source, "a": action,
             "e": orjson.dumps(evidence).decode(), "t": now})
        await record_in(conn, AuditEvent(
            name="review:item:open", subject=f"{kind}:{subject}", actor=source,
            reason=evidence[0] if evidence else "opened for review",
            detail={"item_id": item_id, "risk": risk, "action": action,
                    "evidence": evidence[:5]}))
    return item_id


async def dismissed_evidence(engine: AsyncEngine, *, kind: str, subject: str,
                             source: str) -> set[str]:
    """Every piece of evidence of the dismissed items of ``(kind, subject, source)``: what
    an analyst has already looked at and found to be nothing."""
    await ensure_schema(engine)
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT evidence FROM policy_review WHERE kind = :k AND subject = :s AND"
            " source = :src AND status = 'dismissed'"),
            {"k": kind, "s": subject, "src": source})).all()
    return {str(e) for (raw,) in rows for e in orjson.loads(raw or "[]")}


async def get_item(engine: AsyncEngine, item_id: str) -> ReviewItem | None:
    await ensure_schema(engine)
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM policy_review WHERE item_id = :i"),
                                  {"i": item_id})).first()
    return None if row is None else ReviewItem.from_row(row)


async def list_items(engine: AsyncEngine, *, status: str = "open", after: str | None = None,
                     limit: int = 50, subject: str | None = None) -> list[ReviewItem]:
    """Items in ``status`` (or ``all``), oldest first, after the item id ``after``."""
    await ensure_schema(engine)
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if status != "all":
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)} or all")
        where.append("status = :st")
        params["st"] = status
    if after:
        where.append("item_id > :after")
        params["after"] = after
    if subject:
        where.append("subject = :sub")
        params["sub"] = subject
    sql = "SELECT * FROM policy_review"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY item_id LIMIT :limit"
    async with engine.connect() as conn:
        rows = (await conn.execute(text(sql), params)).all()
    return [ReviewItem.from_row(r) for r in rows]


async def intervals(engine: AsyncEngine) -> list[tuple[str, str | None]]:
    """(opened, decided or None) per item, for "open items over time"."""
    await ensure_schema(engine)
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT opened_at, CASE WHEN status IN ('confirmed', 'dismissed') THEN decided_at"
            " END FROM policy_review"))).all()
    return [(r[0], r[1]) for r in rows]


async def decide_item(engine: AsyncEngine, item_id: str, decision: str, reason: str,
                      actor: str) -> ReviewItem:
    """Record an analyst's decision; raises ValueError for a bad decision or a closed item.

    Applying the proposed action on ``confirm`` is the caller's job
    (:meth:`distillguard.policy.service.PolicyService.decide` does it).
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")
    reason = (reason or "").strip()
    if decision in ("dismiss", "escalate") and len(reason) < 3:
        raise ValueError(f"{decision} needs a reason (at least 3 characters)")
    await ensure_schema(engine)
    now = now_ts()
    async with engine.begin() as conn:
        # Two analysts deciding at once each found the item open, and both decisions
        # were recorded.
        await lock_for_change(conn, "review-item:" + item_id)
        row = (await conn.execute(text("SELECT * FROM policy_review WHERE item_id = :i"),
                                  {"i": item_id})).first()
        if row is None:
            raise LookupError(f"no review item {item_id!r}")
        item = ReviewItem.from_row(row)
        if item.status not in ("open", "escalated"):
            raise ValueError(f"review item {item_id} is already {item.status}")
        if decision == "escalate" and item.status == "escalated":
            raise ValueError(f"review item {item_id} is already escalated")
        status = _AFTER[decision]
        await conn.execute(text(
            "UPDATE policy_review SET status = :st, updated_at = :u, decided_at = :u,"
            " decided_by = :by, decision = :d, decision_reason = :r WHERE item_id = :i"),
            {"st": status, "u": now, "by": actor, "d": decision, "r": reason, "i": item_id})
        await record_in(conn, AuditEvent(
            name=f"review:item:{decision}", subject=f"{item.kind}:{item.subject}", actor=actor,
            reason=reason or decision,
            detail={"item_id": item_id, "source": item.source, "action": item.action,
                    "previous_status": item.status}))
    return (await get_item(engine, item_id)) or item
