"""The action ladder and an account's status: a suspension made outside the ladder (an
import) is not undone when the ladder lifts its own suspensions, and a person's
reinstatement still reactivates."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from distillguard.policy.actions import apply_action, expire_due, list_actions, revoke
from distillguard.store import open_state_store
from tests.factories import make_account


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return (f"sqlite:///{tmp_path / 'state.sqlite'}" if request.param == "sqlite"
            else str(request.getfixturevalue("pg_url")))


def on_store(url: str, work: Any) -> Any:
    """``work(store)`` on a store of its own (the detector's, another replica's)."""
    async def go() -> Any:
        store = open_state_store(url)
        try:
            await store.migrate()
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def test_a_suspension_found_in_the_status_is_kept(state_url: str) -> None:
    """An account imported suspended (or suspended by an older version) has no suspend
    action: the ladder's own suspension, lifted, set it active."""
    async def work(store: Any) -> str:
        await store.import_accounts([make_account("acct_i", status="suspended"),
                                     make_account("acct_j", status="active")])
        engine = store.engine
        for account_id in ("acct_i", "acct_j"):
            await apply_action(engine, account_id=account_id, action="suspend",
                               reason="risky", source="verdicts", caused_by="verdict:x",
                               actor="policy", expires_in_s=0.05)
        await asyncio.sleep(0.1)
        await expire_due(engine)
        assert [str((await store.get_account(a)).status) for a in ("acct_i", "acct_j")] == [
            "suspended", "active"]
        kept = await list_actions(engine, "acct_i", active_only=True)
        assert [(a.source, a.caused_by, a.expires_at) for a in kept] == [
            ("analyst", "account-status", None)]
        assert not await list_actions(engine, "acct_j", active_only=True)
        # A person lifting the suspensions reactivates it.
        await revoke(engine, "acct_i", actions=["suspend"], by="ana", reason="cleared")
        return str((await store.get_account("acct_i")).status)

    assert on_store(state_url, work) == "active"
