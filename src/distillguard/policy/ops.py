"""What analysts and operators do, the same from the CLI, the admin API and the dashboard:
apply and lift actions, decide review items, screen accounts.

:class:`PolicyOps` needs only the state store's engine and the current compiled policy, so
it works inside the running gateway and in a one-off CLI process alike. The background
loop that enforces policy on live traffic is :mod:`distillguard.policy.runtime`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.policy import actions as ladder
from distillguard.policy import screening as matching
from distillguard.policy.compiled import CompiledPolicy
from distillguard.policy.document import LADDER, parse_duration
from distillguard.policy.review import (
    ReviewItem,
    decide_item,
    dismissed_evidence,
    get_item,
    open_item,
)
from distillguard.policy.schema import ensure_schema, now_ts
from distillguard.store.sql import in_chunks

log = logging.getLogger("distillguard.policy")


class PolicyOps:
    def __init__(self, engine: AsyncEngine, policy: Callable[[], CompiledPolicy]) -> None:
        self.engine = engine
        self._policy = policy

    @property
    def policy(self) -> CompiledPolicy:
        return self._policy()

    async def apply(self, account_ids: list[str], action: str, *, reason: str, actor: str,
                    channel: str, caused_by: str | None = None, expires_in: Any = "default",
                    detail: dict[str, Any] | None = None, source: str = "analyst",
                    unknown_ok: bool = False) -> list[ladder.Applied]:
        """Apply a ladder action to accounts by hand (``channel``: dashboard, admin, cli);
        returns what was applied or extended (:func:`~distillguard.policy.actions.apply_action`):
        an account missing from it already had the action, for as long or longer.

        ``expires_in`` is a duration (``24h``), ``never``/None, or ``default``. An account
        the state store does not know is a LookupError, before anything is applied (a
        mistyped id made an action for no one and said it was applied), unless
        ``unknown_ok`` (a campaign's members, as detection named them)."""
        if action not in LADDER:
            raise ValueError(f"unknown action {action!r}; the ladder is {', '.join(LADDER)}")
        if not unknown_ok:
            missing = await self.unknown_accounts(account_ids)
            if missing:
                raise LookupError(f"no account {missing[0]!r}" + (
                    f" (and {len(missing) - 1} more unknown)" if len(missing) > 1 else ""))
        expiry = (self.policy.default_expiry_s if expires_in == "default"
                  else parse_duration(expires_in))
        detail = dict(detail or {})
        if action == "throttle" and "limits" in detail:
            from distillguard.config import LimitSet

            try:
                detail["limits"] = LimitSet(**detail["limits"]).model_dump()
            except ValidationError as exc:     # its own message runs over lines, with a URL
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"]) or "limits"
                raise ValueError(f"throttle limits: {where}: {first['msg']}") from None
            except TypeError as exc:
                raise ValueError(f"throttle limits: {exc}") from None
        done = []
        for account_id in account_ids:
            made = await ladder.apply_action(
                self.engine, account_id=account_id, action=action, reason=reason,
                source=source, caused_by=caused_by or f"analyst:{actor}", actor=actor,
                expires_in_s=expiry, detail=detail, event_source=channel,
                set_status=self.policy.document.actions.suspend_sets_account_status)
            if made is not None:
                done.append(made)
        return done

    async def unknown_accounts(self, account_ids: list[str]) -> list[str]:
        """Those of ``account_ids`` the state store has no account for, in their order."""
        # an id holding NUL is no account (nor can PostgreSQL take it in a query)
        asked = sorted({a for a in account_ids if "\x00" not in a})
        known: set[str] = set()
        async with self.engine.connect() as conn:
            for marks, params in in_chunks(asked):
                rows = await conn.execute(text(
                    f"SELECT account_id FROM accounts WHERE account_id IN ({marks})"), params)
                known.update(r[0] for r in rows)
        return [a for a in dict.fromkeys(account_ids) if a not in known]

    async def lift(self, account_ids: list[str], *, actions: list[str] | None, reason: str,
                   actor: str, channel: str) -> list[ladder.Action]:
        """Revoke the named active actions (None: all of them, i.e. reinstate)."""
        if actions is not None and (not isinstance(actions, list) or not actions or any(
                a not in LADDER for a in actions)):
            # a string was matched as text ("actions": "l" lifted flag and throttle)
            raise ValueError(f"'actions' must be a list of actions of the ladder "
                             f"({', '.join(LADDER)}), not {actions!r}")
        out = []
        for account_id in account_ids:
            out += await ladder.revoke(
                self.engine, account_id, actions=actions, by=actor, reason=reason,
                event_source=channel,
                set_status=self.policy.document.actions.suspend_sets_account_status)
        return out

    async def decide(self, item_id: str, decision: str, reason: str, actor: str,
                     channel: str) -> tuple[ReviewItem, list[ladder.Applied]]:
        """Record a review decision; ``confirm`` applies the item's proposed action to the
        account (or to every account of a campaign item)."""
        item = await decide_item(self.engine, item_id, decision, reason, actor)
        applied: list[ladder.Applied] = []
        if decision == "confirm" and item.action:
            accounts = await self._accounts_of(item)
            applied = await self.apply(
                accounts, item.action, actor=actor, channel=channel, source="review",
                caused_by=f"review:{item.item_id}",
                reason=f"review {item.item_id} confirmed: {reason or item.source}")
        return item, applied

    async def _accounts_of(self, item: ReviewItem) -> list[str]:
        if item.kind == "account":
            return [item.subject]
        if item.kind == "campaign":
            async with self.engine.connect() as conn:
                row = (await conn.execute(text(
                    "SELECT accounts FROM campaigns WHERE campaign_id = :c"),
                    {"c": item.subject})).first()
            if row is not None and row[0]:
                return [str(a) for a in orjson.loads(row[0])]
        return []

    async def get_item(self, item_id: str) -> ReviewItem | None:
        return await get_item(self.engine, item_id)

    async def screen_accounts(self, *, force: bool = False, page: int = 1000) -> dict[str, int]:
        """Screen every account not yet screened against the current lists (or all, with
        ``force``); matches open review items. Returns counts."""
        await ensure_schema(self.engine)
        policy = self.policy
        lists = policy.screening
        cfg = policy.document.screening
        stats = {"screened": 0, "matches": 0, "items": 0}
        if not len(lists):
            return stats
        offset = 0
        while True:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(text(
                    "SELECT a.account_id, a.org, a.extra, s.digest FROM accounts a LEFT JOIN"
                    " policy_screened s ON s.account_id = a.account_id ORDER BY a.account_id"
                    " LIMIT :n OFFSET :o"), {"n": page, "o": offset})).all()
            if not rows:
                break
            offset += len(rows)
            done = []
            for account_id, org, extra_raw, old_digest in rows:
                extra = orjson.loads(extra_raw) if extra_raw else {}
                values = {"org": org, **{k: v for k, v in extra.items() if isinstance(v, str)}}
                names = [(f, str(values[f])) for f in cfg.fields if values.get(f)]
                digest = hashlib.sha256(orjson.dumps(
                    [lists.digest, cfg.threshold, names, matching.MATCHING_VERSION])
                ).hexdigest()[:24]
                if digest == old_digest and not force:
                    continue
                matches = []
                for field, value in names:
                    matches += lists.match(value, threshold=cfg.threshold, field=field)
                stats["screened"] += 1
                stats["matches"] += len(matches)
                if matches:
                    # A match dismissed before is not put to an analyst again each time
                    # the lists change; a new entry, name or score is.
                    seen = await dismissed_evidence(self.engine, kind="account",
                                                    subject=account_id, source="screening")
                    matches = [m for m in matches if m.evidence() not in seen]
                if matches:
                    await open_item(self.engine, kind="account", subject=account_id,
                                    risk=max(m.score for m in matches) / 100.0,
                                    evidence=[m.evidence() for m in matches],
                                    source="screening", action=cfg.propose)
                    stats["items"] += 1
                done.append({"a": account_id, "d": digest, "t": now_ts()})
            if done:
                async with self.engine.begin() as conn:
                    await conn.execute(text(
                        "INSERT INTO policy_screened (account_id, digest, screened_at)"
                        " VALUES (:a, :d, :t) ON CONFLICT (account_id) DO UPDATE SET"
                        " digest = excluded.digest, screened_at = excluded.screened_at"), done)
        return stats
