"""The action ladder and an account's status: a suspension made outside the ladder (the
admin API's PATCH, ``accounts update --status``, an import) is not undone when the
ladder lifts its own suspensions, and a person's reinstatement still reactivates. An
action applied again for longer extends the active one."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.policy.actions import apply_action, expire_due, list_actions, revoke
from distillguard.serve import StackThread
from distillguard.store import open_state_store
from tests.factories import ADMIN_TOKEN, make_account, make_settings, start_stack

# The verdict feed suspends a risky account for EXPIRES_S, as a detector's verdict would.
EXPIRES_S = 3
POLICY = {
    "version": 1,
    "verdicts": {"poll_interval_s": 0.1, "rules": [
        {"name": "risky", "when": {"risk_at_least": 0.9}, "action": "suspend",
         "expires_in": f"{EXPIRES_S}s"}]},
    "refresh_s": 0.1,
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return (f"sqlite:///{tmp_path / 'state.sqlite'}" if request.param == "sqlite"
            else str(request.getfixturevalue("pg_url")))


def write_policy(folder: Path, **changes: Any) -> str:
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump({**POLICY, **changes}))
    return str(path)


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


def until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


# -- the admin API, with the verdict feed of a running gateway ------------------------------


@pytest.fixture
def admin(state_url: str, tmp_path: Path) -> Iterator[tuple[StackThread, httpx.Client]]:
    settings = make_settings(tmp_path, policy={"file": write_policy(tmp_path)},
                             state={"url": state_url})
    stack = start_stack(settings)
    client = httpx.Client(base_url=stack.stack.admin_url,
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}",
                                   "x-distillguard-actor": "ana"})
    try:
        yield stack, client
    finally:
        client.close()
        stack.stop()


def verdict(url: str, account_id: str) -> None:
    from sqlalchemy import text

    from distillguard.policy.schema import now_ts

    async def insert(store: Any) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO account_verdicts VALUES (:a, 0.97, 1, NULL, NULL, 3, '[]', :t)"),
                {"a": account_id, "t": now_ts()})

    on_store(url, insert)


def actions(client: httpx.Client, account_id: str) -> list[dict[str, Any]]:
    reply = client.get("/admin/v1/policy/actions", params={"account": account_id})
    return list(reply.raise_for_status().json()["data"])


def from_verdicts(client: httpx.Client, account_id: str) -> dict[str, Any] | None:
    return next((a for a in actions(client, account_id) if a["source"] == "verdicts"), None)


def status(client: httpx.Client, account_id: str) -> str:
    return str(client.get(f"/admin/v1/accounts/{account_id}").raise_for_status()
               .json()["status"])


def test_a_patched_suspension_outlives_the_verdict_suspension_beside_it(
        admin: tuple[StackThread, httpx.Client], state_url: str) -> None:
    """Suspended by PATCH before or while the verdict feed suspended the account for a
    while: when that suspension expired, the account was set active again."""
    _, client = admin
    first, then = "acct_" + uuid.uuid4().hex[:8], "acct_" + uuid.uuid4().hex[:8]
    for account_id in (first, then):
        client.post("/admin/v1/accounts", json={"account_id": account_id}).raise_for_status()
    # first: the analyst suspends, then the verdict feed does for EXPIRES_S
    r = client.patch(f"/admin/v1/accounts/{first}", json={"status": "suspended"})
    assert r.status_code == 200 and r.json()["status"] == "suspended", r.text
    verdict(state_url, first)
    # then: the verdict feed suspends, then the analyst (the column is suspended already)
    verdict(state_url, then)
    until(lambda: from_verdicts(client, then) is not None)
    client.patch(f"/admin/v1/accounts/{then}", json={"status": "suspended"}).raise_for_status()
    patched = time.time()
    for account_id in (first, then):
        until(lambda a=account_id: (from_verdicts(client, a) or {}).get("revoked_by")
              == "expiry", EXPIRES_S + 15)
    timed = from_verdicts(client, then)
    assert timed is not None and timed["revoked_at"] > _ts(patched), \
        "the verdict's suspension ran out before the PATCH: the order was not tested"
    assert status(client, first) == status(client, then) == "suspended"
    for account_id in (first, then):
        by_hand = [a for a in actions(client, account_id) if a["source"] == "analyst"]
        assert [(a["actor"], a["reason"], a["expires_at"], a["revoked_at"])
                for a in by_hand] == [("ana", "status set to suspended by ana", None, None)]

    # The analyst's reinstatement reactivates: by PATCH, or by the ladder's revoke.
    r = client.patch(f"/admin/v1/accounts/{first}",
                     json={"status": "active", "reason": "appeal upheld"})
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    r = client.post("/admin/v1/policy/actions/revoke",
                    json={"account_id": then, "reason": "appeal upheld"})
    assert [a["action"] for a in r.raise_for_status().json()["data"]] == ["suspend"]
    assert status(client, first) == status(client, then) == "active"
    assert not [a for a in actions(client, first) + actions(client, then)
                if a["revoked_at"] is None]
    events = client.get("/admin/v1/policy/audit",
                        params={"subject": f"account:{first}"}).json()["data"]
    assert [(e["name"], e["actor"]) for e in events[:2]] == [
        ("admin:account:reinstate", "ana"), ("admin:account:revoke", "ana")]
    assert "admin:account:suspend" in [e["name"] for e in events]
    assert {a["revoke_reason"] for a in actions(client, first)
            if a["source"] == "analyst"} == {"appeal upheld"}
    # Other fields change beside the status, in the same write; errors change nothing.
    r = client.patch(f"/admin/v1/accounts/{first}", json={
        "status": "suspended", "country": "FR", "reason": "chargeback ring"})
    assert (r.json()["status"], r.json()["country"]) == ("suspended", "FR"), r.text
    assert [a["reason"] for a in actions(client, first) if a["revoked_at"] is None] == [
        "chargeback ring"]
    r = client.patch(f"/admin/v1/accounts/{first}", json={"status": "active",
                                                          "country": "France"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "country", r.text
    assert status(client, first) == "suspended"
    r = client.patch(f"/admin/v1/accounts/{first}", json={"reason": "no status"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "reason", r.text
    r = client.patch("/admin/v1/accounts/acct_nobody", json={"status": "suspended"})
    assert r.status_code == 404, r.text
    assert actions(client, "acct_nobody") == []


def test_an_account_created_suspended_is_suspended_by_hand_at_once(
        admin: tuple[StackThread, httpx.Client], state_url: str) -> None:
    """``POST /admin/v1/accounts`` with ``status: suspended`` wrote the column alone: the
    account's actions were empty, no one was audited as suspending it, and the ladder
    recorded the suspension (as by ``unknown``) only when it applied one of its own."""
    _, client = admin
    account = "acct_" + uuid.uuid4().hex[:8]
    r = client.post("/admin/v1/accounts", json={"account_id": account, "status": "suspended"})
    assert r.status_code == 201 and r.json()["status"] == "suspended", r.text
    assert status(client, account) == "suspended"
    by_hand = [(a["action"], a["source"], a["caused_by"], a["actor"], a["reason"],
                a["expires_at"], a["revoked_at"]) for a in actions(client, account)]
    assert by_hand == [("suspend", "analyst", "analyst:ana", "ana",
                        "account created suspended by ana", None, None)]
    events = client.get("/admin/v1/policy/audit",
                        params={"subject": f"account:{account}"}).json()["data"]
    assert [(e["name"], e["actor"]) for e in events] == [("admin:account:suspend", "ana")]
    # Created again, it is refused, and nothing more is recorded.
    r = client.post("/admin/v1/accounts", json={"account_id": account, "status": "suspended"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "conflict", r.text
    assert len(actions(client, account)) == 1
    # A suspension of the verdict feed's beside it ends: the account stays suspended, and
    # the ladder finds nothing outside it to record.
    verdict(state_url, account)
    until(lambda: (from_verdicts(client, account) or {}).get("revoked_by") == "expiry",
          EXPIRES_S + 15)
    assert status(client, account) == "suspended"
    assert [(a["source"], a["caused_by"]) for a in actions(client, account)
            if a["revoked_at"] is None] == [("analyst", "analyst:ana")]
    # Created active, nothing is recorded.
    other = "acct_" + uuid.uuid4().hex[:8]
    client.post("/admin/v1/accounts", json={"account_id": other}).raise_for_status()
    assert actions(client, other) == []


def test_an_account_created_suspended_is_one_transaction_with_its_suspension(
        state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distillguard.components import create_account
    from distillguard.policy import byhand

    settings = make_settings(tmp_path, policy={"file": write_policy(tmp_path)},
                             state={"url": state_url})

    async def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database went away")

    async def work(store: Any) -> None:
        monkeypatch.setattr(byhand, "record_actions", fail)
        with pytest.raises(RuntimeError):
            await create_account(settings, store, make_account("acct_c", status="suspended"),
                                 actor="ana", reason="chargebacks", channel="cli")
        assert await store.list_accounts(query="acct_c") == []
        assert await list_actions(store.engine) == []

    on_store(state_url, work)


def _ts(epoch: float) -> str:
    from datetime import UTC, datetime

    from distillguard.policy.schema import now_ts

    return now_ts(datetime.fromtimestamp(epoch, UTC))


# -- the command line, and suspensions the ladder finds in the status ----------------------


def run(cfg: str, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, ["-c", cfg, *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def suspend_for_a_moment(url: str, account_id: str) -> None:
    """A suspension by the verdict feed that expires at once, and the expiry pass."""
    async def work(store: Any) -> None:
        made = await apply_action(store.engine, account_id=account_id, action="suspend",
                                  reason="risky", source="verdicts",
                                  caused_by=f"verdict:{account_id}", actor="policy",
                                  expires_in_s=0.05)
        assert made is not None
        await asyncio.sleep(0.1)
        assert made.action.action_id in [a.action_id for a in await expire_due(store.engine)]

    on_store(url, work)


def test_a_suspension_by_the_command_line_outlives_the_ladders(state_url: str,
                                                                tmp_path: Path) -> None:
    cfg = tmp_path / "dg.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"url": state_url},
                                   "policy": {"file": write_policy(tmp_path)}}))

    def show(account_id: str) -> str:
        return str(orjson.loads(run(str(cfg), "accounts", "show", account_id))["status"])

    run(str(cfg), "accounts", "create", "acct_a")
    run(str(cfg), "accounts", "update", "acct_a", "--status", "suspended")
    suspend_for_a_moment(state_url, "acct_a")
    assert show("acct_a") == "suspended"
    run(str(cfg), "accounts", "update", "acct_a", "--status", "active", "--reason",
        "appeal upheld", "--actor", "ana")
    assert show("acct_a") == "active"
    suspend_for_a_moment(state_url, "acct_a")
    assert show("acct_a") == "active"
    by_hand = [a for a in orjson.loads(run(str(cfg), "policy", "actions", "--account",
                                           "acct_a")) if a["source"] == "analyst"]
    assert len(by_hand) == 1 and by_hand[0]["revoked_by"] == "ana"
    assert by_hand[0]["revoke_reason"] == "appeal upheld"
    out = run(str(cfg), "accounts", "update", "acct_a", "--reason", "why", code=2)
    assert "--reason and --actor go with --status" in out


def test_an_account_created_suspended_by_the_command_line_is_on_the_ladder(
        state_url: str, tmp_path: Path) -> None:
    """``accounts create`` made only active accounts: one meant to start suspended was
    suspended afterwards, or imported, and there was no way to create it suspended."""
    cfg = config(tmp_path, state_url)
    out = run(cfg, "accounts", "create", "acct_cs", "--status", "suspended", "--reason",
              "chargebacks", "--actor", "ana")
    assert orjson.loads(out)["status"] == "suspended"
    by_hand = orjson.loads(run(cfg, "policy", "actions", "--account", "acct_cs"))
    assert [(a["action"], a["source"], a["actor"], a["reason"], a["expires_at"])
            for a in by_hand] == [("suspend", "analyst", "ana", "chargebacks", None)]
    assert [(e["name"], e["actor"]) for e in events(state_url, "acct_cs")] == [
        ("cli:account:suspend", "ana")]
    suspend_for_a_moment(state_url, "acct_cs")
    assert orjson.loads(run(cfg, "accounts", "show", "acct_cs"))["status"] == "suspended"
    out = run(cfg, "accounts", "create", "acct_ca", "--reason", "why", code=2)
    assert "--reason and --actor go with --status suspended" in out
    assert orjson.loads(run(cfg, "accounts", "create", "acct_ca"))["status"] == "active"
    assert orjson.loads(run(cfg, "policy", "actions", "--account", "acct_ca")) == []


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


def test_a_suspension_that_ran_out_before_the_expiry_pass_is_not_taken_for_one_by_hand(
        state_url: str) -> None:
    """The verdict feed suspends again an account whose earlier suspension ran out before
    the expiry pass lifted it: the status still says suspended, but the ladder set it.
    Taking it for a suspension by hand recorded one without expiry, and the account
    stayed suspended for good after the new one ended."""
    async def work(store: Any) -> str:
        await store.import_accounts([make_account("acct_k", status="active")])
        engine = store.engine

        async def suspend(seconds: float) -> Any:
            made = await apply_action(engine, account_id="acct_k", action="suspend",
                                      reason="risky", source="verdicts",
                                      caused_by="verdict:acct_k", actor="policy",
                                      expires_in_s=seconds)
            assert made is not None
            return made.action

        first = await suspend(0.05)
        wait_past(first.expires_at)         # ran out; no expiry pass has lifted it
        assert str((await store.get_account("acct_k")).status) == "suspended"
        second = await suspend(0.05)
        assert [a.source for a in await list_actions(engine, "acct_k", active_only=True)
                ] == ["verdicts"]
        wait_past(second.expires_at)
        await expire_due(engine)
        return str((await store.get_account("acct_k")).status)

    assert on_store(state_url, work) == "active"


async def test_without_the_ladder_keeping_it_a_status_is_only_written(tmp_path: Path) -> None:
    """With the policy component off, or its suspensions leaving the status alone, a
    status by hand is the column alone, as before, and so is one an account is created
    with."""
    from distillguard.components import create_account, update_account

    path = write_policy(tmp_path, actions={"suspend_sets_account_status": False})
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    store = open_state_store(url)
    await store.migrate()
    try:
        for account_id, policy in (("acct_off", {"enabled": False}),
                                   ("acct_apart", {"file": path})):
            await store.put_account(make_account(account_id))
            settings = make_settings(tmp_path, policy=policy, state={"url": url})
            account = await update_account(settings, store, account_id,
                                           {"status": "suspended"}, actor="ana",
                                           reason=None, channel="admin")
            assert str(account.status) == "suspended"
            assert not await list_actions(store.engine, account_id)  # type: ignore[attr-defined]
            created = await create_account(settings, store,
                                           make_account(account_id + "_new",
                                                        status="suspended"),
                                           actor="ana", reason=None, channel="admin")
            assert str((await store.get_account(created.account_id)).status) == "suspended"
            assert not await list_actions(store.engine,  # type: ignore[attr-defined]
                                          created.account_id)
    finally:
        await store.close()


# -- an action applied again for longer extends the active one -----------------------------


def config(folder: Path, state_url: str) -> str:
    cfg = folder / "dg.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"url": state_url},
                                   "policy": {"file": write_policy(folder)}}))
    return str(cfg)


def wait_past(ts: str) -> None:
    """Until the clock is past ``ts`` (an action's expiry)."""
    from distillguard.policy.schema import now_ts

    until(lambda: now_ts() > ts, 60)


def events(url: str, account_id: str) -> list[dict[str, Any]]:
    from distillguard.policy import audit

    return list(on_store(url, lambda store: audit.query(store.engine, f"account:{account_id}")))


def test_a_longer_suspension_extends_the_shorter_one(state_url: str, tmp_path: Path) -> None:
    """``policy apply A --action suspend --expires 1d``, then ``--expires 7d``: the second
    found the first active, changed nothing, and the account was active again after a
    day."""
    from distillguard.policy.schema import now_ts

    cfg = config(tmp_path, state_url)
    account = ""

    def apply(expires: str, reason: str = "ring confirmed") -> str:
        return run(cfg, "policy", "apply", account, "--action", "suspend", "--reason",
                   reason, "--expires", expires, "--actor", "ana")

    def show() -> str:
        return str(orjson.loads(run(cfg, "accounts", "show", account))["status"])

    for short in (1, 5, 30):     # longer only on a machine too slow for the shorter
        account = f"acct_l{short}"
        run(cfg, "accounts", "create", account)
        short_id, _, _, _, short_end = apply(f"{short}s", "burst").split()
        out = apply("10m")
        if now_ts() < short_end:     # the first was active when the second came
            break
    else:
        raise AssertionError("every first suspension ended before the second was applied")
    assert out.split()[:4] == [short_id, "suspend", account, "until"], out
    assert f"(extended from {short_end})" in out
    long_end = out.split()[4]
    assert long_end > short_end
    wait_past(short_end)
    expired = on_store(state_url, lambda store: expire_due(store.engine))
    assert [a.account_id for a in expired] == []
    assert show() == "suspended"
    active = orjson.loads(run(cfg, "policy", "actions", "--account", account, "--active"))
    assert [(a["action_id"], a["expires_at"], a["reason"]) for a in active] == [
        (short_id, long_end, "burst")]
    extend = [e for e in events(state_url, account) if e["name"] == "cli:account:extend"]
    assert [(e["actor"], e["reason"], e["detail"]["from"], e["detail"]["to"])
            for e in extend] == [("ana", "ring confirmed", short_end, long_end)]

    # As long or shorter again: nothing changes, nothing is audited.
    before = events(state_url, account)
    for expires in ("10m", "5m", "1s"):
        out = apply(expires)
        assert "1 account(s) already had it, for as long or longer" in out, out
        assert short_id not in out
    assert events(state_url, account) == before
    # Without expiry: extended until revoked, once.
    assert f"until revoked (extended from {long_end})" in apply("never")
    assert "already had it" in apply("never")
    assert [e["name"] for e in events(state_url, account)] == [
        "cli:account:extend", "cli:account:extend", "cli:account:suspend"]
    active = orjson.loads(run(cfg, "policy", "actions", "--account", account, "--active"))
    assert [(a["action_id"], a["expires_at"]) for a in active] == [(short_id, None)]


def test_a_repeated_verdict_neither_moves_nor_audits_its_action(state_url: str) -> None:
    """The verdict feed applies its rules to every verdict detection writes, every few
    seconds for an account it keeps flagging: only a rule with a longer expiry extends
    the action, once; the in-memory mirror of every replica reads the extension."""
    from distillguard.policy import audit
    from distillguard.policy.actions import ActiveActions
    from distillguard.policy.schema import now_ts

    async def work(store: Any) -> None:
        engine = store.engine
        await store.put_account(make_account("acct_r"))

        def again(expires_in_s: float) -> Any:
            return apply_action(engine, account_id="acct_r", action="throttle",
                                reason="verdict rule risky", source="verdicts",
                                caused_by="verdict:acct_r", actor="detection",
                                expires_in_s=expires_in_s)

        first = await again(600)
        assert first is not None and not first.extended
        mirror = ActiveActions()
        await mirror.refresh(engine)
        assert [await again(s) for s in (600, 600, 300)] == [None, None, None]
        longer = await again(3600)
        assert longer is not None and longer.extended
        assert (longer.action.action_id, longer.extended_from) == (
            first.action.action_id, first.action.expires_at)
        assert longer.action.expires_at > first.action.expires_at
        assert [await again(s) for s in (3600, 600)] == [None, None]
        rows = await list_actions(engine, "acct_r")
        assert [(a.action_id, a.expires_at, a.updated_at) for a in rows] == [
            (first.action.action_id, longer.action.expires_at, longer.action.updated_at)]
        assert [e["name"] for e in await audit.query(engine, "account:acct_r")] == [
            "policy:account:extend", "policy:account:throttle"]
        await mirror.refresh(engine)
        assert [a.expires_at for a in mirror.for_account("acct_r", now_ts())] == [
            longer.action.expires_at]

    on_store(state_url, work)


def test_a_throttle_with_other_limits_is_an_action_of_its_own(state_url: str) -> None:
    """Applied again with other limits, a throttle extended the active one, which kept
    its limits, or (for as long or shorter) changed nothing: the new limits and the new
    reason were dropped. The same limits, however given, and a verdict's own detail (its
    risk) still make it the same throttle."""
    from distillguard.policy import audit

    async def work(store: Any) -> None:
        engine = store.engine
        await store.put_account(make_account("acct_t"))

        def throttle(limits: dict[str, Any] | None, expires_in_s: float, reason: str,
                     source: str = "analyst", **detail: Any) -> Any:
            if limits is not None:
                detail["limits"] = limits
            return apply_action(engine, account_id="acct_t", action="throttle",
                                reason=reason, source=source, caused_by=f"{source}:ana",
                                actor="ana", expires_in_s=expires_in_s, detail=detail,
                                event_source="cli")

        first = await throttle({"requests_per_minute": 60}, 600, "bursty")
        longer = await throttle({"requests_per_minute": 5}, 3600, "ring confirmed")
        shorter = await throttle({"tokens_per_day": 1000}, 60, "token harvest")
        default = await throttle(None, 600, "the policy's limits")
        made = [first, longer, shorter, default]
        assert all(m is not None and not m.extended for m in made), made
        assert len({m.action.action_id for m in made}) == 4
        # The same limits, with those not given as None: the same throttle.
        assert await throttle({"requests_per_minute": 5, "tokens_per_day": None}, 3600,
                              "again") is None
        extended = await throttle({"requests_per_minute": 60}, 7200, "still bursty")
        assert extended is not None and extended.action.action_id == first.action.action_id
        # A verdict's detail tells why; it repeats with another risk, as the same throttle.
        verdict = await throttle(None, 600, "verdict", source="verdicts", risk=0.91)
        assert verdict is not None
        assert await throttle(None, 600, "verdict", source="verdicts", risk=0.95) is None

        active = await list_actions(engine, "acct_t", active_only=True)
        assert sorted((a.source, str(a.detail.get("limits")), a.reason) for a in active) == [
            ("analyst", "None", "the policy's limits"),
            ("analyst", "{'requests_per_minute': 5}", "ring confirmed"),
            ("analyst", "{'requests_per_minute': 60}", "bursty"),
            ("analyst", "{'tokens_per_day': 1000}", "token harvest"),
            ("verdicts", "None", "verdict")]
        assert [(e["name"], e["reason"]) for e in await audit.query(engine, "account:acct_t")
                ] == [("cli:account:throttle", "verdict"),
                      ("cli:account:extend", "still bursty"),
                      ("cli:account:throttle", "the policy's limits"),
                      ("cli:account:throttle", "token harvest"),
                      ("cli:account:throttle", "ring confirmed"),
                      ("cli:account:throttle", "bursty")]

    on_store(state_url, work)


def test_the_admin_api_says_what_it_extended_and_what_it_left(
        admin: tuple[StackThread, httpx.Client]) -> None:
    """``POST /admin/v1/policy/actions`` answered an empty list both when nothing changed
    and when a longer suspension was ignored; the gateway's expiry pass then reactivated
    the account when the shorter one ended."""
    from distillguard.policy.schema import now_ts

    _, client = admin

    def create() -> str:
        account_id = "acct_" + uuid.uuid4().hex[:8]
        client.post("/admin/v1/accounts", json={"account_id": account_id}).raise_for_status()
        return account_id

    def apply(account_id: str, expires_in: str | None) -> dict[str, Any]:
        r = client.post("/admin/v1/policy/actions", json={
            "account_ids": [account_id], "action": "suspend", "reason": "ring confirmed",
            "expires_in": expires_in})
        assert r.status_code == 201, r.text
        return dict(r.json())

    for seconds in (1, 5, 30):      # longer only on a machine too slow for the shorter
        account, marker = create(), create()
        short = apply(account, f"{seconds}s")["data"][0]
        longer = apply(account, "10m")
        if now_ts() < short["expires_at"]:   # the first was active when the second came
            break
    else:
        raise AssertionError("every first suspension ended before the second was applied")
    assert short["extended_from"] is None
    assert longer["unchanged"] == []
    assert [(a["action_id"], a["extended_from"]) for a in longer["data"]] == [
        (short["action_id"], short["expires_at"])]
    assert longer["data"][0]["expires_at"] > short["expires_at"]
    again = apply(account, "10m")
    assert (again["data"], again["unchanged"]) == ([], [account])
    # A suspension of another account that ends after the first one would have: once the
    # gateway's expiry pass lifted it, it has been past the first one's end.
    marked = apply(marker, f"{seconds}s")["data"][0]
    assert marked["expires_at"] >= short["expires_at"]
    until(lambda: actions(client, marker)[0]["revoked_by"] == "expiry", 60)
    assert status(client, marker) == "active"
    assert status(client, account) == "suspended"
    assert [(a["action_id"], a["revoked_at"]) for a in actions(client, account)] == [
        (short["action_id"], None)]


# -- an import sets statuses as by hand ----------------------------------------------------


def suspend_for(url: str, account_ids: list[str], seconds: float) -> str:
    """Suspensions by the verdict feed for ``seconds``; returns when the first one ends."""
    async def work(store: Any) -> str:
        ends = []
        for account_id in account_ids:
            made = await apply_action(store.engine, account_id=account_id, action="suspend",
                                      reason="risky", source="verdicts",
                                      caused_by=f"verdict:{account_id}", actor="policy",
                                      expires_in_s=seconds)
            assert made is not None and made.action.expires_at is not None
            ends.append(made.action.expires_at)
            assert str((await store.get_account(account_id)).status) == "suspended"
        return min(ends)

    return str(on_store(url, work))


def test_an_import_sets_statuses_as_by_hand(state_url: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``accounts import`` wrote the status column alone: an account imported suspended
    beside a suspension of the ladder was active again when that one ended, and one
    imported active stayed refused by the ladder with its status active."""
    cfg = config(tmp_path, state_url)
    monkeypatch.setenv("LOGNAME", "ana")     # who imports, without --actor

    def show(account_id: str) -> str:
        return str(orjson.loads(run(cfg, "accounts", "show", account_id))["status"])

    def active(account_id: str) -> list[tuple[str, str]]:
        return [(a["source"], a["caused_by"]) for a in orjson.loads(run(
            cfg, "policy", "actions", "--account", account_id, "--active"))]

    from distillguard.policy.schema import now_ts

    for account_id in ("acct_s", "acct_a", "acct_k"):
        run(cfg, "accounts", "create", account_id)
    lines = [{"account_id": "acct_s", "status": "suspended", "org": "S"},
             {"account_id": "acct_a", "status": "active", "org": "A"},
             {"account_id": "acct_k", "org": "K"},                 # no status: kept
             {"account_id": "acct_n", "status": "suspended"},      # new
             {"account_id": "acct_m"}]                             # new, active
    path = tmp_path / "accounts.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines))
    ends = suspend_for(state_url, ["acct_s", "acct_a", "acct_k"], 4)
    out = run(cfg, "accounts", "import", str(path))
    assert now_ts() < ends, \
        "the ladder's suspensions ended before the import: too slow a machine for 4 s"
    imported = events(state_url, "acct_a")

    assert [show(a) for a in ("acct_s", "acct_a", "acct_k", "acct_n", "acct_m")] == [
        "suspended", "active", "suspended", "suspended", "active"]
    assert orjson.loads(run(cfg, "accounts", "show", "acct_k"))["org"] == "K"
    assert sorted(active("acct_s")) == [("analyst", "analyst:ana"),
                                        ("verdicts", "verdict:acct_s")]
    assert active("acct_a") == [] and active("acct_m") == []
    assert active("acct_k") == [("verdicts", "verdict:acct_k")]
    assert active("acct_n") == [("analyst", "analyst:ana")]
    assert "imported 5 accounts (2 suspended, 1 reinstated)" in out, out
    assert [(e["name"], e["actor"], e["reason"]) for e in imported[:2]] == [
        ("import:account:reinstate", "ana", "status active in an import by ana"),
        ("import:account:revoke", "ana", "status active in an import by ana")]
    assert [e["name"] for e in events(state_url, "acct_s")][0] == "import:account:suspend"

    # The ladder's suspensions end: only the one whose line gave no status is active.
    wait_past(max(a["expires_at"] for account_id in ("acct_s", "acct_k") for a in orjson.loads(
        run(cfg, "policy", "actions", "--account", account_id)) if a["source"] == "verdicts"))
    on_store(state_url, lambda store: expire_due(store.engine))
    assert [show(a) for a in ("acct_s", "acct_a", "acct_k", "acct_n")] == [
        "suspended", "active", "active", "suspended"]
    # The same file again changes no status and records nothing.
    before = [events(state_url, a) for a in ("acct_s", "acct_a", "acct_n")]
    out = run(cfg, "accounts", "import", str(path))
    assert "imported 5 accounts (0 suspended, 0 reinstated)" in out, out
    assert [events(state_url, a) for a in ("acct_s", "acct_a", "acct_n")] == before
    # Imported active, an account suspended by hand is reinstated.
    path.write_bytes(orjson.dumps({"account_id": "acct_s", "status": "active"}))
    out = run(cfg, "accounts", "import", str(path), "--actor", "bo", "--reason", "appeal")
    assert "(0 suspended, 1 reinstated)" in out, out
    assert show("acct_s") == "active" and active("acct_s") == []
    assert [(e["name"], e["actor"], e["reason"]) for e in events(state_url, "acct_s")[:2]
            ] == [("import:account:reinstate", "bo", "appeal"),
                  ("import:account:revoke", "bo", "appeal")]


def test_an_import_is_all_or_nothing_with_its_ladder(state_url: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The accounts, their statuses and what they record on the ladder are one
    transaction: a failure in the last step leaves nothing of the import."""
    from distillguard.components import import_accounts
    from distillguard.policy import byhand
    from distillguard.store.models import AccountImport

    settings = make_settings(tmp_path, policy={"file": write_policy(tmp_path)},
                             state={"url": state_url})

    async def fail(*args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("the database went away")

    async def work(store: Any) -> None:
        await store.put_account(make_account("acct_x", org="before"))
        batch = AccountImport.of(AccountImport.line(line) for line in (
            {"account_id": "acct_x", "status": "suspended", "org": "after"},
            {"account_id": "acct_y", "status": "suspended"}))
        monkeypatch.setattr(byhand, "_reinstate_by_hand", fail)
        with pytest.raises(RuntimeError):
            await import_accounts(settings, store, batch, actor="ana", reason=None)
        account = await store.get_account("acct_x")
        assert (account.org, str(account.status)) == ("before", "active")
        assert await store.list_accounts(query="acct_y") == []
        assert await list_actions(store.engine) == []

    on_store(state_url, work)


def test_the_admin_api_imports_statuses_through_the_ladder(
        admin: tuple[StackThread, httpx.Client]) -> None:
    _, client = admin
    kept, lifted = "acct_" + uuid.uuid4().hex[:8], "acct_" + uuid.uuid4().hex[:8]
    for account_id in (kept, lifted):
        client.post("/admin/v1/accounts", json={"account_id": account_id}).raise_for_status()
        client.patch(f"/admin/v1/accounts/{account_id}",
                     json={"status": "suspended"}).raise_for_status()
    r = client.post("/admin/v1/accounts/import", content=b"\n".join([
        orjson.dumps({"account_id": kept, "org": "Kept Ltd"}),
        orjson.dumps({"account_id": lifted, "status": "active"})]))
    assert (status(client, kept), status(client, lifted)) == ("suspended", "active")
    assert [a["revoked_by"] for a in actions(client, lifted)] == ["ana"]
    assert [a["revoked_at"] for a in actions(client, kept)] == [None]
    assert r.json() == {"imported": 2, "suspended": 0, "reinstated": 1}, r.text
    events = client.get("/admin/v1/policy/audit",
                        params={"subject": f"account:{lifted}"}).json()["data"]
    assert [(e["name"], e["reason"]) for e in events[:2]] == [
        ("import:account:reinstate", "status active in an import by ana"),
        ("import:account:revoke", "status active in an import by ana")]


async def test_without_the_ladder_an_import_keeps_a_status_its_line_does_not_give(
        tmp_path: Path) -> None:
    """With the policy component off the status is only written, and a line that does not
    give one does not reactivate a suspended account."""
    from distillguard.components import import_accounts
    from distillguard.store.models import AccountImport

    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    settings = make_settings(tmp_path, policy={"enabled": False}, state={"url": url})
    store = open_state_store(url)
    await store.migrate()
    try:
        async def load(*lines: dict[str, Any]) -> dict[str, int]:
            batch = AccountImport.of(AccountImport.line(line) for line in lines)
            return await import_accounts(settings, store, batch, actor="ana", reason=None)

        assert await load({"account_id": "acct_o", "status": "suspended"}) == {"imported": 1}
        assert await load({"account_id": "acct_o", "org": "O"}) == {"imported": 1}
        account = await store.get_account("acct_o")
        assert (account.org, str(account.status)) == ("O", "suspended")
        await load({"account_id": "acct_o", "status": "active"})
        assert str((await store.get_account("acct_o")).status) == "active"
        assert not await list_actions(store.engine, "acct_o")  # type: ignore[attr-defined]
    finally:
        await store.close()
