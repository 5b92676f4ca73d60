"""The action ladder: flag, throttle, require_verification, degrade, suspend.

Every action is a row in ``policy_actions`` with its reason, where it came from
(``source``: ``verdicts``, ``review``, ``analyst``, ``screening``), what caused it
(``caused_by``: ``campaign:c-3``, ``verdict:acct_17@<time>``, ``review:rv_...``,
``analyst:<name>``), who applied it (``actor``), when it was created and when it expires.
An action is active while it is neither revoked nor expired. Applying and lifting write an
audit event in the same transaction. One source keeps one active action of a kind and
terms (:meth:`Action.enforces`: a throttle's limits) on an account: applying it again
changes nothing, unless for longer than the active one was applied for, which extends
that one (:func:`apply_action`); with other terms it is an action of its own beside it.
``suspend`` also sets the account's status to ``suspended``
(``actions.suspend_sets_account_status``), so authentication refuses the account on every
replica within ``state.key_cache_ttl_s``; lifting the last active suspension (revoke,
reinstate or expiry) sets it back to ``active``.

So that lifting never undoes a suspension made outside the ladder, every suspension is on
the ladder. A status set by hand (``PATCH /admin/v1/accounts/{id}``, ``distillguard
accounts update --status``, an account created with it, an import) goes through
:mod:`.byhand`: ``suspended`` records a suspension by hand without expiry, ``active``
lifts every suspension. A suspension the ladder finds already in the status with no
active suspend action (written with the component off, a version before this one) is
recorded by :func:`apply_action` as one by hand (``caused_by`` ``account-status``, no
expiry) when it applies a ``suspend``. Either stays until a person lifts it: ``revoke``
of ``suspend`` or of everything, or the status set ``active``.

The request check never reads this table: :class:`ActiveActions` mirrors the active rows
in memory and is refreshed in the background from the ``updated_at`` cursor.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from distillguard.exchange import parse_ts
from distillguard.policy.audit import AuditEvent, record_in
from distillguard.policy.document import LADDER
from distillguard.policy.schema import ensure_schema, new_id, now_ts, reading
from distillguard.store.sql import (
    lock_for_change,
)

# ``caused_by`` of a suspension the ladder found set outside it (:func:`apply_action`).
OUTSIDE_LADDER = "account-status"


@dataclass(frozen=True, slots=True)
class Action:
    action_id: str
    account_id: str
    action: str
    reason: str
    source: str
    caused_by: str
    actor: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    updated_at: str = ""

    @classmethod
    def from_row(cls, row: Any) -> Action:
        m = dict(row._mapping)
        m["detail"] = orjson.loads(m["detail"]) if m["detail"] else {}
        return cls(**m)

    def active_at(self, now: str) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}  # type: ignore[attr-defined]

    def enforces(self, action: str, detail: dict[str, Any]) -> bool:
        """Whether this action enforces what ``action`` applied now with ``detail`` would:
        the same kind and, for a throttle, the same limits (a limit given as None is one not
        given; none at all follows the policy file's ``actions.throttle.limits``). The rest of
        a detail, such as a verdict rule's name and risk, says why, not what is enforced."""
        if self.action != action:
            return False
        return action != "throttle" or \
            _limits_given(self.detail) == _limits_given(detail)

    def outlasts(self, expires_in_s: float | None) -> bool:
        """Whether this action, active, covers the same action applied now for
        ``expires_in_s`` (None: without expiry): it has no expiry, or it was applied for as
        long or longer (from when it was applied to when it ends). So a repeat of the same
        expiry (a verdict written again every few seconds) is no longer than it, and one
        that is longer also ends later."""
        if self.expires_at is None:
            return True
        if expires_in_s is None:
            return False
        return parse_ts(self.expires_at) - parse_ts(self.created_at) >= \
            timedelta(seconds=expires_in_s)


def _limits_given(detail: dict[str, Any]) -> dict[str, Any] | None:
    """A throttle's own limits in its ``detail``, those given as None left out."""
    limits = detail.get("limits")
    if not isinstance(limits, dict):
        return None
    return {name: value for name, value in limits.items() if value is not None}


@dataclass(frozen=True, slots=True)
class Applied:
    """What :func:`apply_action` did: applied ``action`` now, or, when ``extended_from`` is
    set, extended the active ``action`` from that expiry to ``action.expires_at``."""

    action: Action
    extended_from: str | None = None

    @property
    def extended(self) -> bool:
        return self.extended_from is not None

    def to_json(self) -> dict[str, Any]:
        return {**self.action.to_json(), "extended_from": self.extended_from}


# The key every ladder change holds shared beside its account's, and an import, which
# sets the status of many accounts at once, holds alone (lock_for_change's ``within``).
EVERY_ACCOUNT = "policy"


async def lock_account(conn: AsyncConnection, account_id: str) -> None:
    """Serialise ladder changes to one account (on PostgreSQL across replicas), and
    with imports. Without it on SQLite, changes at once each found no active action and
    each inserted one, and a reinstatement could set the status active beside a
    suspension it had not read."""
    await lock_for_change(conn, "policy:" + account_id, within=EVERY_ACCOUNT)


async def _set_status(conn: AsyncConnection, account_id: str, status: str) -> None:
    await conn.execute(text("UPDATE accounts SET status = :s WHERE account_id = :a"),
                       {"s": status, "a": account_id})


async def apply_action(engine: AsyncEngine, *, account_id: str, action: str, reason: str,
                       source: str, caused_by: str, actor: str,
                       expires_in_s: float | None, detail: dict[str, Any] | None = None,
                       event_source: str = "policy", set_status: bool = True,
                       unless_revoked_after: str | None = None) -> Applied | None:
    """Apply ``action`` to an account; returns what was done, or None when nothing changed.

    Nothing changes when the same action from the same ``source``, enforcing the same
    (:meth:`Action.enforces`), is active for as long or longer (:meth:`Action.outlasts`: a
    verdict repeated every few seconds does not pile up rows, nor move the expiry), or
    (for automatic actions) when ``unless_revoked_after`` is given and an analyst lifted
    this action on this account after that time: a decision by a person is not overridden
    by the verdict that preceded it. When the active one is shorter (a suspension for a
    day, then for a week or without expiry), it is extended to the new expiry, audited as
    ``<event_source>:account:extend`` with the new reason; the row keeps its own. A
    throttle with other limits than the active one's is applied as a throttle of its own,
    whatever its expiry: under both, each limit is the lower of theirs
    (:func:`distillguard.policy.limits.tightest`), and neither application's limits are
    dropped.

    A ``suspend`` that finds the account's status ``suspended`` with no suspend action
    that is not lifted yet (set outside the ladder) records that suspension too, as one by hand without
    expiry (``caused_by`` :data:`OUTSIDE_LADDER`), so lifting this one does not reactivate
    the account.
    """
    if action not in LADDER:
        raise ValueError(f"unknown action {action!r}; the ladder is {', '.join(LADDER)}")
    if not reason or not reason.strip():
        raise ValueError("an action needs a reason")
    await ensure_schema(engine)
    now_dt = datetime.now(UTC)
    now = now_ts(now_dt)
    expires_in_s = expires_in_s or None
    expires = now_ts(now_dt + timedelta(seconds=expires_in_s)) if expires_in_s else None
    async with engine.begin() as conn:
        await lock_account(conn, account_id)
        rows = (await conn.execute(text(
            "SELECT * FROM policy_actions WHERE account_id = :a AND action = :x"),
            {"a": account_id, "x": action})).all()
        existing = [Action.from_row(r) for r in rows]
        same = [a for a in existing if a.source == source and a.active_at(now)
                and a.enforces(action, detail or {})]
        if any(a.outlasts(expires_in_s) for a in same):
            return None
        if unless_revoked_after is not None and any(
                a.revoked_at and a.revoked_by != "expiry" and a.revoked_at > unless_revoked_after
                for a in existing):
            return None
        if same:
            longest = max(same, key=lambda a: a.expires_at or "")
            if action == "suspend" and set_status:
                await _set_status(conn, account_id, "suspended")
            return await _extend(conn, longest, to=expires, actor=actor, reason=reason.strip(),
                                 caused_by=caused_by, event_source=event_source)
        item = Action(action_id=new_id("act"), account_id=account_id, action=action,
                      reason=reason.strip(), source=source, caused_by=caused_by, actor=actor,
                      created_at=now, expires_at=expires, detail=dict(detail or {}),
                      updated_at=now)
        if action == "suspend" and set_status:
            # A suspension not lifted yet, even one that ran out before the expiry pass
            # came, set the status: only with none is it a suspension from outside.
            if not any(a.revoked_at is None for a in existing) and \
                    await account_status(conn, account_id) == "suspended":
                await record_actions(conn, event_source, _outside_suspension(item))
            await _set_status(conn, account_id, "suspended")
        await record_actions(conn, event_source, item)
    return Applied(item)


async def _extend(conn: AsyncConnection, item: Action, *, to: str | None, actor: str,
                  reason: str, caused_by: str, event_source: str) -> Applied:
    """Extend the active ``item`` to expire at ``to`` (None: never), audited as
    ``<event_source>:account:extend`` with who asked, why, and from when to when. The
    new ``updated_at`` brings the change to every replica's :class:`ActiveActions`."""
    updated = now_ts()
    await conn.execute(text(
        "UPDATE policy_actions SET expires_at = :e, updated_at = :u WHERE action_id = :i"),
        {"e": to, "u": updated, "i": item.action_id})
    await record_in(conn, AuditEvent(
        name=f"{event_source}:account:extend", subject=f"account:{item.account_id}",
        actor=actor, reason=reason,
        detail={"action_id": item.action_id, "action": item.action, "source": item.source,
                "caused_by": caused_by, "from": item.expires_at, "to": to}))
    return Applied(replace(item, expires_at=to, updated_at=updated),
                   extended_from=item.expires_at)


async def record_actions(conn: AsyncConnection, event_source: str, *items: Action) -> None:
    """Insert ``items`` and their audit events (``<event_source>:account:<action>``), a
    statement for each table (an import records thousands)."""
    if not items:
        return
    await conn.execute(text(
        "INSERT INTO policy_actions (action_id, account_id, action, reason, source,"
        " caused_by, actor, created_at, expires_at, revoked_at, revoked_by,"
        " revoke_reason, detail, updated_at) VALUES (:i, :a, :x, :r, :s, :c, :actor,"
        " :t, :e, NULL, NULL, NULL, :d, :t)"),
        [{"i": item.action_id, "a": item.account_id, "x": item.action, "r": item.reason,
          "s": item.source, "c": item.caused_by, "actor": item.actor, "t": item.created_at,
          "e": item.expires_at, "d": orjson.dumps(item.detail).decode()} for item in items])
    await record_in(conn, *(AuditEvent(
        name=f"{event_source}:account:{item.action}", subject=f"account:{item.account_id}",
        actor=item.actor, reason=item.reason,
        detail={"action_id": item.action_id, "source": item.source,
                "caused_by": item.caused_by, "expires_at": item.expires_at, **item.detail})
        for item in items))


async def account_status(conn: AsyncConnection, account_id: str) -> str | None:
    return (await conn.execute(text("SELECT status FROM accounts WHERE account_id = :a"),
                               {"a": account_id})).scalar()


def _outside_suspension(found_by: Action) -> Action:
    """The suspension ``found_by`` met: the account was ``suspended`` with no active
    suspend action, set outside the ladder (an import, an older version). Recorded as a
    suspension by hand without expiry, so lifting ``found_by`` does not reactivate the
    account: only a person lifting suspensions does."""
    return Action(action_id=new_id("act"), account_id=found_by.account_id, action="suspend",
                  reason="the account was suspended outside the action ladder",
                  source="analyst", caused_by=OUTSIDE_LADDER, actor="unknown",
                  created_at=found_by.created_at, expires_at=None,
                  detail={"found_by": found_by.action_id}, updated_at=found_by.updated_at)


async def _lift(conn: AsyncConnection, item: Action, *, by: str, reason: str, at: str,
                event: str, set_status: bool) -> bool:
    """Lift ``item``; False, with nothing changed or audited, when it was already lifted
    (another replica's expiry pass, read before this one's change)."""
    changed = await conn.execute(text(
        "UPDATE policy_actions SET revoked_at = :t, revoked_by = :b, revoke_reason = :r,"
        " updated_at = :u WHERE action_id = :i AND revoked_at IS NULL"),
        {"t": at, "b": by, "r": reason, "u": now_ts(), "i": item.action_id})
    if not changed.rowcount:
        return False
    if item.action == "suspend" and set_status:
        still = (await conn.execute(text(
            "SELECT COUNT(*) FROM policy_actions WHERE account_id = :a AND action = 'suspend'"
            " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > :n)"),
            {"a": item.account_id, "n": now_ts()})).scalar_one()
        if not still:
            await _set_status(conn, item.account_id, "active")
    await record_in(conn, AuditEvent(
        name=event, subject=f"account:{item.account_id}", actor=by, reason=reason,
        detail={"action_id": item.action_id, "action": item.action,
                "caused_by": item.caused_by}))
    return True


async def revoke(engine: AsyncEngine, account_id: str, *, actions: list[str] | None,
                 by: str, reason: str, event_source: str = "policy",
                 set_status: bool = True) -> list[Action]:
    """Lift the account's active actions (all, or those named); returns what was lifted.
    Reinstating an account is ``revoke(..., actions=None)`` and also clears a suspension
    set outside the ladder (the account's status)."""
    await ensure_schema(engine)
    now = now_ts()
    async with engine.begin() as conn:
        await lock_account(conn, account_id)
        rows = (await conn.execute(text(
            "SELECT * FROM policy_actions WHERE account_id = :a AND revoked_at IS NULL"),
            {"a": account_id})).all()
        lifted: list[Action] = []
        for item in (Action.from_row(r) for r in rows):
            if not item.active_at(now) or (actions is not None and item.action not in actions):
                continue
            if await _lift(conn, item, by=by, reason=reason, at=now,
                           event=f"{event_source}:account:revoke", set_status=set_status):
                lifted.append(item)
        if actions is None:
            if set_status:
                await _set_status(conn, account_id, "active")
            await record_in(conn, AuditEvent(
                name=f"{event_source}:account:reinstate", subject=f"account:{account_id}",
                actor=by, reason=reason,
                detail={"lifted": [a.action_id for a in lifted]}))
    return lifted


async def expire_due(engine: AsyncEngine, *, set_status: bool = True,
                     conn: AsyncConnection | None = None) -> list[Action]:
    """Mark actions whose time ran out (``policy:account:expire``); lifts suspensions.
    ``conn`` is a connection to read with (the background pass shares one)."""
    await ensure_schema(engine)
    now = now_ts()
    async with reading(conn or engine) as conn:
        rows = (await conn.execute(text(
            "SELECT * FROM policy_actions WHERE revoked_at IS NULL AND expires_at IS NOT NULL"
            " AND expires_at <= :n"), {"n": now})).all()
    done = []
    for item in (Action.from_row(r) for r in rows):
        async with engine.begin() as conn:
            await lock_account(conn, item.account_id)
            if await _lift(conn, item, by="expiry", reason=f"{item.action} expired",
                           at=item.expires_at or now, event="policy:account:expire",
                           set_status=set_status):
                done.append(item)
    return done


async def list_actions(engine: AsyncEngine, account_id: str | None = None, *,
                       active_only: bool = False, limit: int = 200) -> list[Action]:
    await ensure_schema(engine)
    sql = "SELECT * FROM policy_actions"
    params: dict[str, Any] = {"limit": limit}
    where = []
    if account_id is not None:
        where.append("account_id = :a")
        params["a"] = account_id
    if active_only:
        where.append("revoked_at IS NULL AND (expires_at IS NULL OR expires_at > :n)")
        params["n"] = now_ts()
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC LIMIT :limit"
    async with engine.connect() as conn:
        rows = (await conn.execute(text(sql), params)).all()
    return [Action.from_row(r) for r in rows]


class ActiveActions:
    """In-memory mirror of the active actions, per account, for the request check."""

    # For this long after the cursor moved, re-read a little before it: commits may land
    # out of order. After that only rows past the cursor are read, so an idle pass reads
    # nothing however many actions were written at once.
    OVERLAP_S = 5.0

    def __init__(self) -> None:
        self._by_account: dict[str, dict[str, Action]] = {}
        self.cursor = ""
        self.loaded = False
        self._moved_at = 0.0
        self._refreshing = asyncio.Lock()

    def for_account(self, account_id: str | None, now: str) -> list[Action]:
        if not account_id:
            return []
        found = self._by_account.get(account_id)
        if not found:
            return []
        return [a for a in found.values() if a.active_at(now)]

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_account.values())

    def apply(self, item: Action) -> None:
        bucket = self._by_account.setdefault(item.account_id, {})
        if item.revoked_at is not None:
            bucket.pop(item.action_id, None)
            if not bucket:
                self._by_account.pop(item.account_id, None)
        else:
            bucket[item.action_id] = item

    async def refresh(self, source: AsyncEngine | AsyncConnection) -> int:
        """Read rows changed since the cursor; returns how many were read.

        One refresh at a time: the background pass and an admin request both refresh, and
        rows read before a change, applied after the rows read since, brought back an
        action the change had lifted (until the next pass)."""
        async with self._refreshing:
            return await self._refresh(source)

    async def _refresh(self, source: AsyncEngine | AsyncConnection) -> int:
        if not self.loaded:
            sql = ("SELECT * FROM policy_actions WHERE revoked_at IS NULL AND"
                   " (expires_at IS NULL OR expires_at > :c)")
            params = {"c": now_ts()}
        else:
            since = self.cursor
            if time.monotonic() - self._moved_at < self.OVERLAP_S:
                since = now_ts(parse_ts(self.cursor) - timedelta(seconds=self.OVERLAP_S))
            sql = "SELECT * FROM policy_actions WHERE updated_at > :c"
            params = {"c": since}
        async with reading(source) as conn:
            rows = (await conn.execute(text(sql), params)).all()
        for item in (Action.from_row(r) for r in rows):
            self.apply(item)
            if item.updated_at > self.cursor:
                self.cursor = item.updated_at
                self._moved_at = time.monotonic()
        if not self.loaded:
            self.cursor = self.cursor or now_ts()
            self.loaded = True
        return len(rows)
