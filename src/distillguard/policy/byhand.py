"""Statuses set by hand, through the action ladder.

An analyst sets an account's status with ``PATCH /admin/v1/accounts/{id}`` or
``distillguard accounts update --status``, creates an account with one (``POST
/admin/v1/accounts``, ``distillguard accounts create --status``), and an import sets many
(``distillguard accounts import``, ``POST /admin/v1/accounts/import``). With the policy
component on, each goes through the ladder (:mod:`.actions`) in one transaction with the
status, so that no suspension of the ladder's, when it ends, undoes one made by hand:
``suspended`` records a suspension by hand without expiry, ``active`` lifts every active
suspension and audits a reinstatement. The core reaches these through
:func:`distillguard.components.create_account`, ``update_account`` and
``import_accounts``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from distillguard.errors import NotFound
from distillguard.policy.actions import (
    EVERY_ACCOUNT,
    Action,
    account_status,
    lock_account,
    record_actions,
)
from distillguard.policy.audit import AuditEvent, record_in
from distillguard.policy.schema import ensure_schema, new_id, now_ts
from distillguard.store.models import Account, AccountImport, AccountStatus, stored_text
from distillguard.store.sql import (
    account_columns,
    in_chunks,
    insert_account,
    lock_for_change,
    upsert_accounts,
    write_account,
)


async def create_account(engine: AsyncEngine, account: Account, *, by: str,
                         reason: str | None, event_source: str) -> list[Action]:
    """Create ``account`` (``POST /admin/v1/accounts``, ``distillguard accounts create``)
    in one transaction with what its status records on the ladder; returns the actions
    recorded.

    ``suspended`` records a suspension by hand without expiry, as :func:`update_account`
    does (none when such a suspension is on the ladder already: an action may name an id
    before its account exists), audited ``<event_source>:account:suspend``: the account's actions show it at once,
    and a suspension from verdicts or review that ends later does not reactivate the
    account. ``active`` records nothing. StoreError when the account exists, with nothing
    written."""
    reason = stored_text((reason or "").strip(), "'reason'", "reason", limit=1000) or \
        f"account created suspended by {by}"
    await ensure_schema(engine)
    now = now_ts()
    async with engine.begin() as conn:
        await lock_account(conn, account.account_id)
        await insert_account(conn, account)
        if account.status is not AccountStatus.SUSPENDED:
            return []
        active = (await _suspensions(conn, [account.account_id], now)).get(
            account.account_id, [])
        item = _suspension_by_hand(account.account_id, active, by=by, reason=reason,
                                   now=now)
        if item is None:
            return []
        await record_actions(conn, event_source, item)
        return [item]


async def update_account(engine: AsyncEngine, account_id: str, changes: dict[str, Any], *,
                         by: str, reason: str | None, event_source: str) -> list[Action]:
    """Apply an account update that sets its ``status`` by hand (``PATCH
    /admin/v1/accounts/{id}``, ``distillguard accounts update --status``), with the other
    fields of ``changes``, in one transaction with what it records on the ladder; returns
    the actions recorded or lifted.

    ``suspended`` records a suspension by hand without expiry (source ``analyst``, none
    when one is active already), so the end of a suspension from verdicts or review does
    not reactivate the account. ``active`` lifts every active suspension (other actions
    stay) and audits ``<event_source>:account:reinstate``. NotFound for an unknown account,
    with nothing written; InvalidRecord or StoreError for a field the account cannot
    take, before anything is written."""
    values = account_columns(changes)
    status = values.get("status")
    if status not in ("active", "suspended"):
        raise ValueError("update_account changes the status: give 'status'")
    if "\x00" in account_id:   # never stored; PostgreSQL would refuse it in a query
        raise NotFound(f"no account {account_id!r}")
    reason = stored_text((reason or "").strip(), "'reason'", "reason", limit=1000) or \
        f"status set to {status} by {by}"
    await ensure_schema(engine)
    now = now_ts()
    async with engine.begin() as conn:
        await lock_account(conn, account_id)
        before = await account_status(conn, account_id)
        if before is None:
            raise NotFound(f"no account {account_id!r}")
        await write_account(conn, account_id, values)
        active = (await _suspensions(conn, [account_id], now)).get(account_id, [])
        if status == "suspended":
            item = _suspension_by_hand(account_id, active, by=by, reason=reason, now=now)
            if item is None:
                return []
            await record_actions(conn, event_source, item)
            return [item]
        await _reinstate_by_hand(conn, {account_id: before}, {account_id: active}, by=by,
                                 reason=reason, event_source=event_source, now=now)
        return active


def _suspension_by_hand(account_id: str, active: list[Action], *, by: str, reason: str,
                        now: str) -> Action | None:
    """The suspension the status set ``suspended`` by hand records, beside the account's
    ``active`` suspensions: none when one by hand without expiry is among them."""
    if any(a.source == "analyst" and a.expires_at is None for a in active):
        return None
    return Action(action_id=new_id("act"), account_id=account_id, action="suspend",
                  reason=reason, source="analyst", caused_by=f"analyst:{by}", actor=by,
                  created_at=now, expires_at=None, updated_at=now)


async def _reinstate_by_hand(conn: AsyncConnection, before: dict[str, str],
                             active: dict[str, list[Action]], *, by: str, reason: str,
                             event_source: str, now: str) -> list[str]:
    """The status set ``active`` by hand on the accounts of ``before`` (each one's status
    before it was written), in the transaction on ``conn`` that holds them and wrote it:
    lifts their ``active`` suspensions (read under that hold, so no other change lifts
    them meanwhile) and, for each that had any or was suspended, audits a reinstatement.
    Returns the accounts reinstated."""
    lifted = [item for account_id in before for item in active.get(account_id, [])]
    if lifted:
        await conn.execute(text(
            "UPDATE policy_actions SET revoked_at = :t, revoked_by = :b, revoke_reason = :r,"
            " updated_at = :u WHERE action_id = :i AND revoked_at IS NULL"),
            [{"t": now, "b": by, "r": reason, "u": now_ts(), "i": item.action_id}
             for item in lifted])
        await record_in(conn, *(AuditEvent(
            name=f"{event_source}:account:revoke", subject=f"account:{item.account_id}",
            actor=by, reason=reason, detail={"action_id": item.action_id,
                                             "action": item.action,
                                             "caused_by": item.caused_by})
            for item in lifted))
    # after the revocations' statement: their events come first in time
    reinstated = [a for a, status in before.items() if active.get(a) or status != "active"]
    await record_in(conn, *(AuditEvent(
        name=f"{event_source}:account:reinstate", subject=f"account:{account_id}",
        actor=by, reason=reason,
        detail={"lifted": [a.action_id for a in active.get(account_id, [])],
                "status": "active"}) for account_id in reinstated))
    return reinstated


async def _suspensions(conn: AsyncConnection, account_ids: list[str], now: str
                       ) -> dict[str, list[Action]]:
    """The active suspensions of these accounts, by account."""
    out: dict[str, list[Action]] = {}
    for marks, params in in_chunks(account_ids):
        rows = (await conn.execute(text(
            f"SELECT * FROM policy_actions WHERE account_id IN ({marks})"
            " AND action = 'suspend' AND revoked_at IS NULL"), params)).all()
        for item in (Action.from_row(r) for r in rows):
            if item.active_at(now):
                out.setdefault(item.account_id, []).append(item)
    return out


async def import_accounts(engine: AsyncEngine, batch: AccountImport, *, by: str,
                          reason: str | None, event_source: str = "import"
                          ) -> dict[str, int]:
    """Insert or replace the accounts of an import (``accounts import``, ``POST
    /admin/v1/accounts/import``) in one transaction with what their status records on
    the ladder: all or nothing. Returns ``{"imported", "suspended", "reinstated"}``.

    An account whose line gives its status has it set as by hand (:func:`update_account`,
    audited ``<event_source>:account:...``): ``suspended`` records a suspension without
    expiry unless one is active, a new account's too; ``active`` lifts every active
    suspension of an existing account and, if there were any or the account was
    suspended, reinstates it. An existing account whose line gives no status
    (``batch.keep_status``) keeps its status and its suspensions. The transaction holds the ladder of every account (on PostgreSQL
    the key every ladder change holds shared; on SQLite the write lock), so no change of
    one falls between what the import read and what it wrote."""
    reason = stored_text((reason or "").strip(), "'reason'", "reason", limit=1000)
    await ensure_schema(engine)
    latest = {a.account_id: a for a in batch.accounts}
    given = {i: str(a.status) for i, a in latest.items() if i not in batch.keep_status}
    now = now_ts()
    async with engine.begin() as conn:
        await lock_for_change(conn, EVERY_ACCOUNT)
        if conn.dialect.name == "postgresql":
            # The reads below are alike statements of 500 parameters: past the fifth,
            # PostgreSQL planned them once for any values, a scan of policy_actions each
            # (a second for an import of 10,000 accounts).
            await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        stored: dict[str, str] = {}
        for marks, params in in_chunks(list(latest)):
            rows = await conn.execute(text(
                f"SELECT account_id, status FROM accounts WHERE account_id IN ({marks})"),
                params)
            stored.update((r[0], r[1]) for r in rows)
        active = await _suspensions(conn, list(given), now)
        await upsert_accounts(conn, latest.values(), keep_status=stored.keys())
        changed = [{"a": i, "s": status} for i, status in given.items()
                   if stored.get(i, status) != status]
        if changed:
            await conn.execute(text("UPDATE accounts SET status = :s WHERE account_id = :a"),
                               changed)
        suspensions = [item for item in (
            _suspension_by_hand(account_id, active.get(account_id, []), by=by,
                                reason=reason or f"status suspended in an import by {by}",
                                now=now)
            for account_id, status in given.items() if status == "suspended")
            if item is not None]
        await record_actions(conn, event_source, *suspensions)
        reinstated = await _reinstate_by_hand(   # a new account is created, not reinstated
            conn, {i: stored[i] for i, status in given.items()
                   if status == "active" and i in stored}, active, by=by,
            reason=reason or f"status active in an import by {by}",
            event_source=event_source, now=now)
    return {"imported": len(latest), "suspended": len(suspensions),
            "reinstated": len(reinstated)}
