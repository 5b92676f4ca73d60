"""The dashboard's view of policy: :class:`distillguard.dashboard.adapters.PolicySource`
over this package (the ladder, actions with audit, the review queue)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.config import Settings
from distillguard.exchange import parse_ts
from distillguard.policy import audit
from distillguard.policy.audit import AuditEvent
from distillguard.policy.compiled import PolicyHolder, shared_holder
from distillguard.policy.document import LADDER
from distillguard.policy.ops import PolicyOps
from distillguard.policy.review import intervals, list_items
from distillguard.policy.schema import ensure_schema


class DashboardPolicy:
    ladder = [*LADDER, "reinstate"]
    review_available = True

    def __init__(self, engine: AsyncEngine, holder: PolicyHolder) -> None:
        self.engine = engine
        self.ops = PolicyOps(engine, lambda: holder.current)

    async def apply(self, kind: str, target: str, action: str, reason: str, actor: str,
                    accounts: list[str]) -> str:
        if action not in self.ladder:
            raise ValueError(f"unknown action {action!r}")
        if action == "reinstate":
            lifted = await self.ops.lift(accounts, actions=None, reason=reason, actor=actor,
                                         channel="dashboard")
            message = (f"reinstated {len(accounts)} account(s); lifted {len(lifted)} "
                       "action(s)")
        else:
            caused = f"campaign:{target}" if kind == "campaign" else f"analyst:{actor}"
            done = await self.ops.apply(accounts, action, reason=reason, actor=actor,
                                        channel="dashboard", caused_by=caused,
                                        unknown_ok=kind == "campaign")
            extended = sum(made.extended for made in done)
            skipped = len(set(accounts)) - len(done)
            message = f"{action} applied to {len(done) - extended} account(s)" + (
                f", extended on {extended}" if extended else "") + (
                f" ({skipped} already had it, for as long or longer)" if skipped else "")
        if kind == "campaign":
            await audit.record(self.engine, AuditEvent(
                name=f"dashboard:campaign:{action}", subject=f"campaign:{target}",
                actor=actor, reason=reason, detail={"accounts": len(accounts)}))
        return message

    async def audit(self, subject: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        rows = await audit.query(self.engine, subject, limit=limit)
        out = []
        for r in rows:
            detail = r.get("detail") or {}
            if r.get("count", 1) > 1:
                detail = {"count": r["count"], **detail}
            out.append({"ts": r["ts"], "name": r["name"], "subject": r["subject"],
                        "actor": r["actor"], "reason": r["reason"],
                        "detail": orjson.dumps(detail).decode() if detail else ""})
        return out

    async def actions(self, subject: str) -> list[dict[str, Any]]:
        return await self.audit(subject)

    async def review_items(self, *, status: str, after: str | None,
                           limit: int) -> list[dict[str, Any]]:
        items = await list_items(self.engine, status=status, after=after, limit=limit)
        return [{"item_id": i.item_id, "kind": i.kind, "subject": i.subject, "risk": i.risk,
                 "status": i.status, "opened_at": i.opened_at, "action": i.action,
                 "evidence": i.evidence, "source": i.source} for i in items]

    async def review_intervals(self) -> list[tuple[datetime, datetime | None]]:
        return [(parse_ts(lo), parse_ts(hi) if hi else None)
                for lo, hi in await intervals(self.engine)]

    async def decide(self, item_id: str, decision: str, reason: str, actor: str) -> str:
        try:
            item, applied = await self.ops.decide(item_id, decision, reason, actor,
                                                  channel="dashboard")
        except LookupError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        extra = f"; {applied[0].action.action} applied to {len(applied)} account(s)" \
            if applied else ""
        return f"{item.kind} {item.subject}: {item.status}{extra}"


async def open_dashboard_policy(settings: Settings, engine: AsyncEngine
                                ) -> DashboardPolicy | None:
    """The dashboard's PolicySource, or None when the policy component is switched off."""
    from distillguard.policy.component import parse_settings

    ps = parse_settings(settings.extensions.get("policy"))
    if not ps.enabled:
        return None
    await ensure_schema(engine)
    return DashboardPolicy(engine, shared_holder(ps.file))
