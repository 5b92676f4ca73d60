"""The verdict feed: cursor, bursts larger than a pass, late commits, rule matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.policy.compiled import compile_policy
from distillguard.policy.document import parse_document
from distillguard.policy.schema import ensure_schema
from distillguard.policy.verdictfeed import VerdictActions, VerdictFeed
from distillguard.store import open_state_store


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = open_state_store(f"sqlite:///{tmp_path / 'v.sqlite'}")
    await store.migrate()
    await ensure_schema(store.engine)  # type: ignore[attr-defined]
    yield store.engine  # type: ignore[attr-defined]
    await store.close()


class Seen(VerdictActions):
    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, compile_policy(parse_document({})))
        self.accounts: list[tuple[str, float]] = []
        self.campaigns: list[str] = []

    async def on_verdict(self, v: Any) -> None:
        self.accounts.append((v.account_id, v.risk))

    async def on_campaign(self, c: Any) -> None:
        self.campaigns.append(c.campaign_id)


async def insert(engine: AsyncEngine, rows: list[tuple[str, float, str]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO account_verdicts VALUES (:a, :r, 1, NULL, NULL, 1, '[]', :t)"),
            [{"a": a, "r": r, "t": t} for a, r, t in rows])


async def test_a_burst_with_one_timestamp_is_worked_through(engine) -> None:  # type: ignore[no-untyped-def]
    at = "2026-03-01T12:00:00.000Z"
    await insert(engine, [(f"acct_{i:02d}", 0.5, at) for i in range(12)])
    feed, seen = VerdictFeed(engine), Seen(engine)
    counts = [await feed.poll(seen, limit=5) for _ in range(4)]
    assert counts == [5, 5, 2, 0]
    assert sorted(a for a, _ in seen.accounts) == [f"acct_{i:02d}" for i in range(12)]
    # The latest row of an account is its current verdict; older history is not re-read.
    await insert(engine, [("acct_03", 0.97, "2026-03-01T12:00:05.000Z")])
    assert await feed.poll(seen, limit=5) == 1 and seen.accounts[-1] == ("acct_03", 0.97)
    # A row committed late, with a time a little before the cursor, is still seen once.
    await insert(engine, [("acct_late", 0.8, "2026-03-01T12:00:04.000Z")])
    assert await feed.poll(seen, limit=5) == 1 and seen.accounts[-1] == ("acct_late", 0.8)
    assert await feed.poll(seen, limit=5) == 0
    # A new feed (a restarted gateway) resumes from the stored cursor.
    again = Seen(engine)
    assert await VerdictFeed(engine).poll(again) == 0


async def test_campaign_rows_and_rules(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO campaigns VALUES ('c-1', 0.99, NULL, '[\"same card\"]',"
            " '[\"a1\", \"a2\"]', 'confirmed', '2026-03-01T12:00:00.000Z')"))
    policy = compile_policy(parse_document({"verdicts": {"rules": [
        {"name": "confirmed", "when": {"campaign_status": ["confirmed"]}, "action": "suspend",
         "expires_in": "never"},
        {"name": "risky", "when": {"risk_at_least": 0.9, "in_campaign": False},
         "action": "throttle"}]}}))
    applier = VerdictActions(engine, policy)
    assert await VerdictFeed(engine).poll(applier) == 1
    assert applier.applied == 2
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT account_id, action, caused_by, expires_at FROM policy_actions"
            " ORDER BY account_id"))).all()
    assert [tuple(r) for r in rows] == [("a1", "suspend", "campaign:c-1", None),
                                       ("a2", "suspend", "campaign:c-1", None)]


async def test_actions_at_once_on_one_account_apply_one_at_a_time(engine) -> None:  # type: ignore[no-untyped-def]
    """On SQLite the reads of a ladder change ran outside its transaction: changes at
    once each found no active action and each inserted one, and a reinstatement could
    set the status active beside a suspension it had not seen."""
    import asyncio

    from distillguard.policy.actions import apply_action, list_actions, revoke

    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO accounts (account_id, created_at, tier, status, limits, extra)"
            " VALUES ('acct_x', '2026-03-01T00:00:00+00:00', 'standard', 'active',"
            " '{}', '{}')"))

    def suspend() -> Any:
        return apply_action(engine, account_id="acct_x", action="suspend", reason="burst",
                            source="detector", caused_by="verdict", actor="detector",
                            expires_in_s=None)
    made = await asyncio.gather(*(suspend() for _ in range(12)))
    assert sum(a is not None for a in made) == 1
    assert len(await list_actions(engine, "acct_x", active_only=True)) == 1
    for _ in range(5):
        await asyncio.gather(*(revoke(engine, "acct_x", actions=None, by="analyst",
                                      reason="checked") if i % 3 == 0 else suspend()
                               for i in range(9)))
        active = await list_actions(engine, "acct_x", active_only=True)
        async with engine.connect() as conn:
            status = (await conn.execute(text(
                "SELECT status FROM accounts WHERE account_id = 'acct_x'"))).scalar_one()
        assert len(active) <= 1 and status == ("suspended" if active else "active")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def replicas(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two replicas' engines on one state store."""
    url = (f"sqlite:///{tmp_path / 'v.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    stores = [open_state_store(url) for _ in range(2)]
    await stores[0].migrate()
    for store in stores:
        await ensure_schema(store.engine)  # type: ignore[attr-defined]
    yield [store.engine for store in stores]  # type: ignore[attr-defined]
    for store in stores:
        await store.close()


async def test_replicas_expiring_the_same_actions_lift_each_once(replicas) -> None:  # type: ignore[no-untyped-def]
    """Every replica's policy pass expires the actions whose time ran out: each replica
    lifted them, audited "policy:account:expire" (and sent it to the ledger) and reported
    them lifted, so ten expiring actions gave nineteen events."""
    import asyncio

    from distillguard.policy.actions import apply_action, expire_due

    engine = replicas[0]
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO accounts (account_id, created_at, tier, status, limits, extra)"
            " VALUES (:a, '2026-03-01T00:00:00+00:00', 'standard', 'active', '{}', '{}')"),
            [{"a": f"acct_{i}"} for i in range(10)])
    made = [await apply_action(engine, account_id=f"acct_{i}",
                               action="suspend" if i % 2 else "throttle", reason="burst",
                               source="analyst", caused_by="t", actor="analyst",
                               expires_in_s=0.001) for i in range(10)]
    await asyncio.sleep(0.05)
    lifted = await asyncio.gather(*(expire_due(e) for e in replicas))
    reported = [a.action_id for done in lifted for a in done]
    async with engine.connect() as conn:
        events = (await conn.execute(text(
            "SELECT COUNT(*) FROM policy_audit WHERE name = 'policy:account:expire'"
        ))).scalar_one()
        statuses = {r[0] for r in await conn.execute(text("SELECT status FROM accounts"))}
    assert (events, len(reported)) == (10, 10)
    assert sorted(reported) == sorted(a.action.action_id for a in made if a is not None)
    assert statuses == {"active"}
