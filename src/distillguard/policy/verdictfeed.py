"""Detection verdicts become ladder actions, within seconds.

:class:`VerdictFeed` polls detection's tables in the state store (``account_verdicts``,
history rows of which the latest per account is current, and ``campaigns``) every
``verdicts.poll_interval_s`` (default 1 s) from a cursor on ``updated_at``, and applies
the policy file's ``verdicts.rules`` to each new row. ``distillguard policy
apply-verdicts FILE`` applies the same rules to a verdicts document (the public format of
:mod:`distillguard.verdicts`).

A rule whose condition names ``campaign_status`` or ``campaign_risk_at_least`` is a
campaign rule: it runs on campaign rows and acts on every account the campaign lists
(``caused_by`` = ``campaign:<id>``). The others run on account verdicts (``caused_by`` =
``verdict:<account>@<updated_at>``). ``action: review`` opens a review item proposing
``propose`` instead of acting. An automatic action is not re-applied while the same
action from verdicts is active on the account (a rule with a longer expiry extends it),
nor after an analyst lifted it later than the verdict was written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from distillguard.exchange import parse_ts
from distillguard.policy.actions import apply_action
from distillguard.policy.compiled import CompiledPolicy
from distillguard.policy.document import VerdictRule
from distillguard.policy.review import open_item
from distillguard.policy.schema import ensure_schema, reading
from distillguard.verdicts import Verdicts

log = logging.getLogger("distillguard.policy")
OVERLAP_S = 5.0


@dataclass(frozen=True, slots=True)
class VerdictRow:
    account_id: str
    risk: float
    flagged: bool
    campaign_id: str | None
    reasons: list[str]
    updated_at: str


@dataclass(frozen=True, slots=True)
class CampaignRow:
    campaign_id: str
    risk: float
    status: str
    accounts: list[str]
    evidence: list[str]
    updated_at: str


def _is_campaign_rule(rule: VerdictRule) -> bool:
    return rule.when.campaign_status is not None or rule.when.campaign_risk_at_least is not None


def account_rule_matches(rule: VerdictRule, v: VerdictRow) -> bool:
    w = rule.when
    if _is_campaign_rule(rule):
        return False
    if w.risk_at_least is not None and v.risk < w.risk_at_least:
        return False
    if w.flagged is not None and v.flagged != w.flagged:
        return False
    return w.in_campaign is None or bool(v.campaign_id) == w.in_campaign


def campaign_rule_matches(rule: VerdictRule, c: CampaignRow) -> bool:
    w = rule.when
    if not _is_campaign_rule(rule):
        return False
    if w.campaign_status is not None and c.status not in w.campaign_status:
        return False
    return w.campaign_risk_at_least is None or c.risk >= w.campaign_risk_at_least


def _loads(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if not value:
        return []
    try:
        loaded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return [str(value)]
    if isinstance(loaded, list):
        return [str(v) for v in loaded]
    return [str(loaded)]


class VerdictActions:
    """Applies verdict rules; shared by the feed and ``apply-verdicts``."""

    def __init__(self, engine: AsyncEngine, policy: CompiledPolicy) -> None:
        self.engine = engine
        self.policy = policy
        self.applied = 0
        self.extended = 0
        self.reviews = 0

    @property
    def changed(self) -> int:
        """Actions applied or extended: what the in-memory mirror has to read again."""
        return self.applied + self.extended

    async def _act(self, rule: VerdictRule, account_id: str, *, risk: float, evidence: list[str],
                   caused_by: str, since: str | None, kind: str = "account",
                   subject: str | None = None) -> None:
        if rule.action == "review":
            await open_item(self.engine, kind=kind, subject=subject or account_id, risk=risk,
                            evidence=evidence or [f"verdict rule {rule.name}"],
                            source="verdicts", action=rule.propose)
            self.reviews += 1
            return
        detail: dict[str, Any] = {"rule": rule.name, "risk": risk}
        if evidence:
            detail["evidence"] = evidence[:5]
        reason = f"verdict rule {rule.name}: risk {risk:.2f}" + (
            f"; {evidence[0]}" if evidence else "")
        made = await apply_action(
            self.engine, account_id=account_id, action=rule.action, reason=reason[:500],
            source="verdicts", caused_by=caused_by, actor="detection",
            expires_in_s=self.policy.expiry_for(rule.expires_in), detail=detail,
            set_status=self.policy.document.actions.suspend_sets_account_status,
            unless_revoked_after=since)
        if made is not None and made.extended:
            self.extended += 1
        elif made is not None:
            self.applied += 1

    async def on_verdict(self, v: VerdictRow) -> None:
        for rule in self.policy.document.verdicts.rules:
            if account_rule_matches(rule, v):
                await self._act(rule, v.account_id, risk=v.risk, evidence=v.reasons,
                                caused_by=f"verdict:{v.account_id}" + (
                                    f"@{v.updated_at}" if v.updated_at else ""),
                                since=v.updated_at or None)

    async def on_campaign(self, c: CampaignRow) -> None:
        for rule in self.policy.document.verdicts.rules:
            if not campaign_rule_matches(rule, c):
                continue
            if rule.action == "review":
                await self._act(rule, c.campaign_id, risk=c.risk, evidence=c.evidence,
                                caused_by=f"campaign:{c.campaign_id}", since=None,
                                kind="campaign", subject=c.campaign_id)
                continue
            for account_id in c.accounts:
                await self._act(rule, account_id, risk=c.risk, evidence=c.evidence,
                                caused_by=f"campaign:{c.campaign_id}",
                                since=c.updated_at or None)

    async def apply_document(self, doc: Verdicts) -> None:
        for a in doc.accounts:
            await self.on_verdict(VerdictRow(a.account_id, a.risk, a.flagged, a.campaign_id,
                                             a.reasons, ""))
        for c in doc.campaigns:
            await self.on_campaign(CampaignRow(
                c.campaign_id, c.risk, str(c.extra.get("status") or "detected"),
                c.accounts, c.evidence, ""))


def _window_floor(cursor: str) -> str:
    """A prefix that sorts before every timestamp within OVERLAP_S before ``cursor``."""
    try:
        back = parse_ts(cursor) - timedelta(seconds=OVERLAP_S)
    except ValueError:
        return cursor
    return back.strftime("%Y-%m-%dT%H:%M:%S")


_FEEDS = {
    "account_verdicts": ("account_id", "account_id, risk, flagged, campaign_id, reasons,"
                                       " updated_at"),
    "campaigns": ("campaign_id", "campaign_id, risk, status, accounts, evidence, updated_at"),
}


class VerdictFeed:
    """Polls ``account_verdicts`` and ``campaigns``; see the module docstring.

    Each table is read in ``(updated_at, id)`` order from a keyset cursor, ``limit`` rows a
    pass, so a burst of any size (one detection pass writes all its rows with the same
    time) is worked through in order. For OVERLAP_S seconds after the cursor moved, rows
    up to OVERLAP_S older than it are read again too (a writer that committed late), and
    the ones already handled are skipped; an idle pass reads nothing old.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.cursors = {feed: ("", "") for feed in _FEEDS}
        self._seen: dict[str, set[tuple[str, str]]] = {feed: set() for feed in _FEEDS}
        self._moved_at = dict.fromkeys(_FEEDS, 0.0)
        self.loaded = False

    def _recent(self, feed: str) -> bool:
        return time.monotonic() - self._moved_at[feed] < OVERLAP_S

    async def _load_cursors(self) -> None:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT feed, position FROM policy_cursor"))).all()
        for feed, position in rows:
            if feed in self.cursors:
                ts, _, key = str(position).partition("\t")
                if (ts, key) > self.cursors[feed]:
                    self.cursors[feed] = (ts, key)
        self.loaded = True

    async def _save(self, feed: str) -> None:
        ts, key = self.cursors[feed]
        async with self.engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO policy_cursor (feed, position) VALUES (:f, :p) ON CONFLICT (feed)"
                " DO UPDATE SET position = excluded.position"
                " WHERE policy_cursor.position < excluded.position"),
                {"f": feed, "p": f"{ts}\t{key}"})

    async def _fetch(self, conn: AsyncConnection, feed: str, limit: int) -> list[Any]:
        key_col, cols = _FEEDS[feed]
        ts, key = self.cursors[feed]
        rows = list((await conn.execute(text(
            f"SELECT {cols} FROM {feed} WHERE updated_at > :t OR (updated_at = :t AND"
            f" {key_col} > :k) ORDER BY updated_at, {key_col} LIMIT :n"),
            {"t": ts, "k": key, "n": limit})).all())
        late: list[Any] = []
        if ts and self._recent(feed):
            late = list((await conn.execute(text(
                f"SELECT {cols} FROM {feed} WHERE updated_at >= :f AND updated_at < :t"
                f" ORDER BY updated_at, {key_col} LIMIT :n"),
                {"f": _window_floor(ts), "t": ts, "n": limit * 4})).all())
        if rows:
            last = rows[-1]
            self.cursors[feed] = (last.updated_at, getattr(last, key_col))
            self._moved_at[feed] = time.monotonic()
        fresh = []
        seen = self._seen[feed]
        for r in [*late, *rows]:
            ident = (getattr(r, key_col), r.updated_at)
            if r.updated_at and ident not in seen:
                seen.add(ident)
                fresh.append(r)
        floor = _window_floor(self.cursors[feed][0])
        self._seen[feed] = {k for k in seen if k[1] >= floor}
        return fresh

    async def poll(self, actions: VerdictActions, limit: int = 5000,
                   conn: AsyncConnection | None = None) -> int:
        """One pass over both tables; returns the number of new rows handled. ``conn``
        is a connection to read with (the background pass shares one)."""
        await ensure_schema(self.engine)
        if not self.loaded:
            await self._load_cursors()
        handled = 0
        before = dict(self.cursors)
        async with reading(conn or self.engine) as rconn:
            vrows = await self._fetch(rconn, "account_verdicts", limit)
            crows = await self._fetch(rconn, "campaigns", limit)
        latest: dict[str, VerdictRow] = {}
        for r in sorted(vrows, key=lambda r: r.updated_at):
            latest[r.account_id] = VerdictRow(r.account_id, float(r.risk or 0.0),
                                              bool(r.flagged), r.campaign_id,
                                              _loads(r.reasons), r.updated_at)
        for v in latest.values():
            await actions.on_verdict(v)
            handled += 1
        for r in crows:
            await actions.on_campaign(CampaignRow(
                r.campaign_id, float(r.risk or 0.0), str(r.status or "detected"),
                _loads(r.accounts), _loads(r.evidence), r.updated_at))
            handled += 1
        for feed in self.cursors:
            if self.cursors[feed] != before[feed]:
                await self._save(feed)
        return handled
