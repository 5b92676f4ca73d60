"""Campaigns and account verdicts read from detection's tables in the state store.

Detection keeps its verdicts in the state store's database, in tables ``campaigns`` and
``account_verdicts``. This adapter reads them with plain SQL, matching columns by the
names of the public verdicts format (``docs/formats.md``):

* ``campaigns``: ``campaign_id``, ``risk``, ``detected_at``, ``evidence`` (JSON list),
  ``accounts`` (JSON list; if absent, members come from ``account_verdicts``), ``status``;
* ``account_verdicts``: ``account_id``, ``risk``, ``flagged``, ``campaign_id``,
  ``first_flagged_at``, ``exchanges_before_flag``, ``reasons`` (JSON list), and an
  optional time column (``updated_at``, ``created_at`` or ``ts``) for the history.

A column holding the whole verdict as one JSON document (``document``, ``data``, ``doc``
or ``verdict``) is read with the verdicts format's own parser instead. Other columns are
kept in the verdict's ``extra``. The tables are only read, never written.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.exchange import format_ts, parse_ts
from distillguard.store.sql import in_chunks
from distillguard.verdicts import AccountVerdict, CampaignVerdict

DOC_COLUMNS = ("document", "data", "doc", "verdict")
TIME_COLUMNS = ("updated_at", "created_at", "ts")
CLOSED = ("closed", "dismissed", "resolved", "false_positive")


def _json(value: Any) -> Any:
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _record(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    for name in DOC_COLUMNS:
        if name in columns and row.get(name):
            doc = _json(row[name])
            if isinstance(doc, dict):
                return {**{k: v for k, v in row.items() if k not in DOC_COLUMNS}, **doc}
    return {k: _json(v) if k in ("evidence", "accounts", "reasons", "edges") else v
            for k, v in row.items()}


async def tables(engine: AsyncEngine) -> dict[str, list[str]]:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: {
            t: [col["name"] for col in inspect(c).get_columns(t)]
            for t in inspect(c).get_table_names() if t in ("campaigns", "account_verdicts")})


class SQLVerdicts:
    available = True

    def __init__(self, engine: AsyncEngine, columns: dict[str, list[str]]) -> None:
        self.engine = engine
        self.campaign_cols = columns.get("campaigns", [])
        self.account_cols = columns.get("account_verdicts", [])

    async def _rows(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(text(sql), params)]

    async def _members(self, campaign_id: str) -> list[str]:
        if "campaign_id" not in self.account_cols:
            return []
        rows = await self._rows("SELECT DISTINCT account_id FROM account_verdicts"
                                " WHERE campaign_id = :c ORDER BY account_id", {"c": campaign_id})
        return [r["account_id"] for r in rows]

    async def _campaign(self, row: dict[str, Any]) -> CampaignVerdict:
        data = _record(row, self.campaign_cols)
        for key in ("detected_at", "first_seen"):
            if isinstance(data.get(key), datetime):
                data[key] = format_ts(data[key])
        data.setdefault("detected_at", data.get("first_seen"))
        if not isinstance(data.get("accounts"), list):
            data["accounts"] = await self._members(str(data["campaign_id"]))
        return CampaignVerdict.from_json(data)

    async def campaigns(self, *, after: str | None, limit: int) -> list[dict[str, Any]]:
        rows = await self._rows("SELECT * FROM campaigns ORDER BY campaign_id", {})
        found = sorted([await self._campaign(r) for r in rows],
                       key=lambda c: (-c.risk, c.campaign_id))
        out = [{"campaign_id": c.campaign_id, "risk": c.risk, "size": len(c.accounts),
                "first_seen": format_ts(c.detected_at) if c.detected_at else None,
                "status": str(c.extra.get("status") or "open"), "evidence": c.evidence}
               for c in found]
        if after:
            ids = [r["campaign_id"] for r in out]
            out = out[ids.index(after) + 1:] if after in ids else []
        return out[:limit]

    async def campaign(self, campaign_id: str) -> CampaignVerdict | None:
        rows = await self._rows("SELECT * FROM campaigns WHERE campaign_id = :c",
                                {"c": campaign_id})
        return await self._campaign(rows[0]) if rows else None

    def _order(self) -> str:
        col = next((c for c in TIME_COLUMNS if c in self.account_cols), None)
        return f" ORDER BY {col} DESC" if col else ""

    async def account_history(self, account_id: str) -> list[dict[str, Any]]:
        rows = await self._rows("SELECT * FROM account_verdicts WHERE account_id = :a"
                                + self._order(), {"a": account_id})
        out = []
        for row in rows:
            data = _record(row, self.account_cols)
            if isinstance(data.get("first_flagged_at"), datetime):
                data["first_flagged_at"] = format_ts(data["first_flagged_at"])
            if isinstance(data.get("flagged"), int):     # a 0/1 column
                data["flagged"] = bool(data["flagged"])
            out.append(AccountVerdict.from_json(data).to_json())
        return out

    async def flagged(self, ids: set[str]) -> set[str]:
        if "flagged" not in self.account_cols:
            return set()
        out: set[str] = set()
        for marks, params in in_chunks(sorted(ids)):
            rows = await self._rows(
                f"SELECT DISTINCT account_id FROM account_verdicts WHERE account_id IN ({marks})"
                f" AND flagged = :t", {**params, "t": True})
            out.update(r["account_id"] for r in rows)
        return out

    async def campaign_intervals(self) -> list[tuple[datetime, datetime | None]]:
        out = []
        for row in await self._rows("SELECT * FROM campaigns", {}):
            data = _record(row, self.campaign_cols)
            start = data.get("detected_at") or data.get("first_seen")
            if not start:
                continue
            end = data.get("closed_at") or data.get("resolved_at")
            if end is None and str(data.get("status") or "") in CLOSED:
                end = data.get("updated_at") or start
            out.append((parse_ts(start), parse_ts(end) if end else None))
        return out

    async def campaigns_of(self, account_id: str) -> list[str]:
        if "campaign_id" in self.account_cols:
            rows = await self._rows("SELECT DISTINCT campaign_id FROM account_verdicts WHERE"
                                    " account_id = :a AND campaign_id IS NOT NULL",
                                    {"a": account_id})
            return sorted(str(r["campaign_id"]) for r in rows)
        return [c["campaign_id"] for c in await self.campaigns(after=None, limit=10_000)
                if account_id in ((await self.campaign(c["campaign_id"])) or
                                  CampaignVerdict("")).accounts]
