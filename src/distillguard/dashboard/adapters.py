"""Adapters from the dashboard to the components it shows: detection, policy, ledger.

Each ``open_*`` returns an object with the small interface the pages use, or a fallback:

* verdicts: :class:`~distillguard.dashboard.sqlverdicts.SQLVerdicts` reads detection's
  ``campaigns`` and ``account_verdicts`` tables in the state store; with
  ``dashboard.verdicts_path`` set, :class:`FileVerdicts` reads that verdicts document (the
  public format written by batch detection) instead;
* policy: :class:`distillguard.policy.dashboard.DashboardPolicy` (the whole ladder, the
  review queue, audit events); with the policy component switched off,
  :class:`LocalPolicy` offers only ``suspend`` and ``reinstate`` (the state store's
  account status) and keeps its audit trail in ``dashboard_audit``;
* ledger: :class:`~distillguard.ledger.source.LedgerView`, or ``None`` when the ledger
  component is switched off (pages say so).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.config import Settings
from distillguard.exchange import format_ts, parse_ts
from distillguard.verdicts import CampaignVerdict, Verdicts

log = logging.getLogger("distillguard.dashboard")


class VerdictsSource(Protocol):
    """What the pages need from detection."""

    @property
    def available(self) -> bool: ...

    async def campaigns(self, *, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Rows ``{campaign_id, risk, size, first_seen, status, evidence}``, highest risk
        first, after the campaign ``after`` (keyset)."""
        ...

    async def campaign(self, campaign_id: str) -> CampaignVerdict | None: ...

    async def account_history(self, account_id: str) -> list[dict[str, Any]]:
        """The account's verdicts (verdicts format objects), newest first."""
        ...

    async def flagged(self, ids: set[str]) -> set[str]: ...

    async def campaign_intervals(self) -> list[tuple[datetime, datetime | None]]:
        """(detected, closed or None) per campaign, for "active campaigns over time"."""
        ...

    async def campaigns_of(self, account_id: str) -> list[str]: ...


class PolicySource(Protocol):
    """What the pages need from policy: the ladder, actions, the review queue, audit."""

    ladder: list[str]
    review_available: bool

    async def apply(self, kind: str, target: str, action: str, reason: str, actor: str,
                    accounts: list[str]) -> str:
        """Apply ``action`` to an account or campaign; returns a message for the analyst;
        raises ValueError for an action it refuses, LookupError for an account the state
        store does not know. Must record an audit event."""
        ...

    async def audit(self, subject: str | None = None,
                    limit: int = 50) -> list[dict[str, Any]]:
        """Events ``{ts, name, subject, actor, reason, detail}``, newest first."""
        ...

    async def actions(self, subject: str) -> list[dict[str, Any]]: ...

    async def review_items(self, *, status: str, after: str | None,
                           limit: int) -> list[dict[str, Any]]:
        """Items ``{item_id, kind, subject, risk, status, opened_at, action, evidence}``."""
        ...

    async def review_intervals(self) -> list[tuple[datetime, datetime | None]]: ...

    async def decide(self, item_id: str, decision: str, reason: str, actor: str) -> str: ...


class LedgerSource(Protocol):
    """What the pages need from the ledger."""

    async def checkpoint(self) -> dict[str, Any] | None:
        """The latest checkpoint as display fields (tree size, root hash, time, the key
        that signed it, signature status, the current key)."""
        ...

    async def verify(self) -> dict[str, Any]:
        """Verify the whole ledger: ``{ok, checked_at, entries, first_bad?, ...}``."""
        ...

    async def proof(self, exchange_id: str) -> dict[str, Any]:
        """``{leaf_index, tree_size, root_hash, leaf_hash, path: [hex...], valid}``;
        raises LookupError for an unknown exchange."""
        ...

    async def exchange(self, exchange_id: str) -> dict[str, Any] | None:
        """The stored entry in the trace format (bodies if retained, else their hashes)."""
        ...


def _now() -> str:
    """RFC 3339 UTC with microseconds, so events sort in the order they happened."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FileVerdicts:
    """Campaigns and account verdicts from one verdicts document, reloaded when it changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime = -1.0
        self._doc = Verdicts()

    def _load(self) -> Verdicts:
        if self.path is None or not self.path.exists():
            return self._doc
        mtime = self.path.stat().st_mtime
        if mtime != self._mtime:
            try:
                self._doc = Verdicts.read(self.path)
                self._mtime = mtime
            except (OSError, ValueError) as exc:
                log.warning("dashboard: cannot read verdicts %s: %s", self.path, exc)
        return self._doc

    @property
    def available(self) -> bool:
        return self.path is not None

    async def campaigns(self, *, after: str | None, limit: int) -> list[dict[str, Any]]:
        rows = sorted(self._load().campaigns, key=lambda c: (-c.risk, c.campaign_id))
        out = [_campaign_row(c) for c in rows]
        if after:
            ids = [r["campaign_id"] for r in out]
            out = out[ids.index(after) + 1:] if after in ids else []
        return out[:limit]

    async def campaign(self, campaign_id: str) -> CampaignVerdict | None:
        return next((c for c in self._load().campaigns if c.campaign_id == campaign_id), None)

    async def account_history(self, account_id: str) -> list[dict[str, Any]]:
        return [a.to_json() for a in self._load().accounts if a.account_id == account_id]

    async def flagged(self, ids: set[str]) -> set[str]:
        return {a.account_id for a in self._load().accounts
                if a.flagged and a.account_id in ids}

    async def campaign_intervals(self) -> list[tuple[datetime, datetime | None]]:
        return [(c.detected_at, None) for c in self._load().campaigns if c.detected_at]

    async def campaigns_of(self, account_id: str) -> list[str]:
        return [c.campaign_id for c in self._load().campaigns if account_id in c.accounts]


def _campaign_row(c: CampaignVerdict) -> dict[str, Any]:
    return {"campaign_id": c.campaign_id, "risk": c.risk, "size": len(c.accounts),
            "first_seen": format_ts(c.detected_at) if c.detected_at else None,
            "status": str(c.extra.get("status") or "open"),
            "evidence": list(c.evidence)}


LOCAL_AUDIT = """CREATE TABLE IF NOT EXISTS dashboard_audit (
    ts TEXT NOT NULL, name TEXT NOT NULL, subject TEXT NOT NULL, actor TEXT,
    reason TEXT, detail TEXT)"""


class LocalPolicy:
    """Suspend / reinstate through the state store; audit events in ``dashboard_audit``."""

    ladder = ["suspend", "reinstate"]
    review_available = False

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def start(self) -> None:
        async with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(72707370)"))
            await conn.execute(text(LOCAL_AUDIT))
            await conn.execute(text("CREATE INDEX IF NOT EXISTS dashboard_audit_subject"
                                    " ON dashboard_audit (subject, ts)"))

    async def apply(self, kind: str, target: str, action: str, reason: str, actor: str,
                    accounts: list[str]) -> str:
        status = {"suspend": "suspended", "reinstate": "active"}.get(action)
        if status is None:
            raise ValueError(f"action {action!r} needs the policy component")
        async with self.engine.begin() as conn:
            for account_id in accounts:
                await conn.execute(text("UPDATE accounts SET status = :s WHERE account_id = :a"),
                                   {"s": status, "a": account_id})
            await conn.execute(text(
                "INSERT INTO dashboard_audit VALUES (:ts, :n, :s, :actor, :r, :d)"),
                {"ts": _now(), "n": f"dashboard:{kind}:{action}", "s": f"{kind}:{target}",
                 "actor": actor, "r": reason, "d": f"{len(accounts)} account(s)"})
        return f"{action} applied to {len(accounts)} account(s)"

    async def audit(self, subject: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT * FROM dashboard_audit"
        params: dict[str, Any] = {"limit": limit}
        if subject:
            sql += " WHERE subject = :s"
            params["s"] = subject
        sql += " ORDER BY ts DESC LIMIT :limit"
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(text(sql), params)]

    async def actions(self, subject: str) -> list[dict[str, Any]]:
        return await self.audit(subject)

    async def review_items(self, *, status: str, after: str | None,
                           limit: int) -> list[dict[str, Any]]:
        return []

    async def review_intervals(self) -> list[tuple[datetime, datetime | None]]:
        return []

    async def decide(self, item_id: str, decision: str, reason: str, actor: str) -> str:
        raise ValueError("the review queue needs the policy component")


async def open_verdicts(settings: Settings, engine: AsyncEngine) -> VerdictsSource:
    """Detection's tables when they exist in the state store, else the verdicts file."""
    raw = (settings.extensions.get("dashboard") or {}).get("verdicts_path")
    if raw:
        return FileVerdicts(Path(raw))
    from distillguard.dashboard.sqlverdicts import SQLVerdicts, tables

    found = await tables(engine)
    if "campaign_id" in found.get("campaigns", []):
        return SQLVerdicts(engine, found)
    return FileVerdicts(None)


async def open_policy(settings: Settings, engine: AsyncEngine) -> PolicySource:
    """The policy component's source (:mod:`distillguard.policy.dashboard`) unless it is
    switched off (``policy.enabled: false``); then :class:`LocalPolicy`."""
    from distillguard.policy.dashboard import open_dashboard_policy

    policy = await open_dashboard_policy(settings, engine)
    if policy is not None:
        return policy
    local = LocalPolicy(engine)
    await local.start()
    return local


async def open_ledger(settings: Settings) -> LedgerSource | None:
    """The ledger component's read side; None when ``ledger.enabled`` is false."""
    from distillguard.ledger.source import open_source

    return open_source(settings)


def parse_when(value: str | None) -> datetime | None:
    return parse_ts(value) if value else None
