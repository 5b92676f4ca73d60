"""Partner indicators acting on live traffic: flag, block, account risk, review queue."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from distillguard.geoip import default_geoip
from distillguard.sharing.export import BundleBuilder
from distillguard.sharing.inputs import collect_from_files
from distillguard.sharing.settings import parse_sharing_settings
from distillguard.sharing.store import SharingStore, create_schema
from distillguard.store import open_state_store
from distillguard.store.models import Account
from tests import sharingworld as world
from tests.factories import start_recorded_stack


def _partner_bundle(tmp_path: Path) -> dict[str, Any]:
    """What a partner ("acme" exported to us, "globex") would send."""
    folder = tmp_path / "partner"
    folder.mkdir()
    paths = world.write_world(folder)
    options = parse_sharing_settings(world.sharing_section())
    evidence = collect_from_files(paths["verdicts"], paths["trace"], paths["accounts"],
                                  campaigns=None, min_risk=0.9, geoip=default_geoip())
    bundle, _ = BundleBuilder(options, "globex").build(evidence)
    return dict(json.loads(bundle.serialize()))


async def _prepare(url: str, bundle: dict[str, Any]) -> dict[str, str]:
    """Accounts (ours: one shares the partner's card), keys, and the imported bundle."""
    store = open_state_store(url)
    await store.migrate()
    ours = [Account.from_public({"account_id": "acct_mule", "payment_fingerprint":
                                 world.CAMPAIGN_PF, "country": "DE"}),
            Account.from_public({"account_id": "acct_fine", "payment_fingerprint": "pf_x",
                                 "country": "GB"})]
    await store.import_accounts(ours)
    keys = {a.account_id: (await store.create_key(a.account_id))[1] for a in ours}
    engine = store.engine  # type: ignore[attr-defined]
    await create_schema(engine)
    await SharingStore(engine, ttl=timedelta(days=30)).import_bundle(
        partner="acme", bundle_id=bundle["id"], objects=bundle["objects"], source="test",
        sha256=None)
    await store.close()
    return keys


def _chat(base: str, key: str, *, ip: str = "81.2.69.9", ua: str = world.COMMON_UA,
          prompt: str = "What is the capital of France?") -> httpx.Response:
    return httpx.post(f"{base}/chat/completions", timeout=30, headers={
        "authorization": f"Bearer {key}", "x-forwarded-for": ip, "user-agent": ua},
        json={"model": "demo-chat-1", "messages": [{"role": "user", "content": prompt}]})


def _wait(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def _tables(url: str) -> dict[str, Any]:
    from distillguard.policy.review import list_items

    store = open_state_store(url)
    engine = store.engine  # type: ignore[attr-defined]
    try:
        async with engine.connect() as conn:
            matches = [dict(r._mapping) for r in await conn.execute(text(
                "SELECT account_id, kind, hits, review_item FROM sharing_matches"))]
            risk = {r[0]: r[1] for r in await conn.execute(text(
                "SELECT account_id, risk FROM sharing_risk"))}
        items = await list_items(engine, status="open", limit=100)
        return {"matches": matches, "risk": risk,
                "review": {i.subject: i for i in items if i.source == "sharing"}}
    finally:
        await store.close()


def test_partner_indicators_flag_block_and_reach_the_review_queue(tmp_path: Path) -> None:
    from tests.factories import make_settings

    settings = make_settings(tmp_path, server={"trusted_proxies": ["127.0.0.0/8"]},
                             sharing=world.sharing_section(actions={"user_agent": "block"}))
    url = settings.state.url
    keys = asyncio.run(_prepare(url, _partner_bundle(tmp_path)))
    running, recorder = start_recorded_stack(settings)
    try:
        base = running.stack.base_url
        # The account holding the partner's card is known before it sends anything.
        state = _wait(lambda: (s := asyncio.run(_tables(url)))["review"] and s)
        assert state["risk"] == {"acct_mule": 0.5}
        mule_item = state["review"]["acct_mule"]
        assert mule_item.kind == "account" and "payment" in mule_item.evidence[0]

        assert _chat(base, keys["acct_fine"]).status_code == 200        # nothing matches
        flagged = _chat(base, keys["acct_fine"], ip="5.9.10.250")       # network + AS
        assert flagged.status_code == 200
        templated = _chat(base, keys["acct_fine"], prompt=world.TEMPLATE + "problem 9000")
        assert templated.status_code == 200
        blocked = _chat(base, keys["acct_fine"], ua=world.CAMPAIGN_UA)  # configured: block
        assert blocked.status_code == 403
        assert blocked.headers["x-should-retry"] == "false"
        assert blocked.json()["error"]["code"] == "shared_indicator"

        seen = _wait(lambda: len(recorder.exchanges) >= 4 and recorder.exchanges)
        notes = [e.annotations.get("sharing") for e in seen]
        assert notes[0] is None
        assert {m["kind"] for m in notes[1]["matches"]} == {"ip", "asn"}
        assert notes[1]["action"] == "flag"
        assert [m["kind"] for m in notes[2]["matches"]] == ["template"]
        assert notes[3]["action"] == "block"

        def fine_recorded() -> Any:
            s = asyncio.run(_tables(url))
            kinds = {m["kind"] for m in s["matches"] if m["account_id"] == "acct_fine"}
            return kinds == {"ip", "asn", "template", "user_agent"} and s
        state = _wait(fine_recorded)
        assert state["risk"]["acct_fine"] == 1.0  # four indicators, capped
        item = state["review"]["acct_fine"]
        assert item.status == "open" and len(item.evidence) >= 4
        assert all(m["review_item"] == item.item_id for m in state["matches"]
                   if m["account_id"] == "acct_fine")
        # A second hit counts but does not add risk or a second item.
        assert _chat(base, keys["acct_fine"], ip="5.9.10.251").status_code == 200
        _wait(lambda: any(m["hits"] == 2 for m in asyncio.run(_tables(url))["matches"]))
        final = asyncio.run(_tables(url))
        assert final["risk"]["acct_fine"] == 1.0
        # Reloading indicators (every 0.2 s here) does not count the card match again.
        (mule,) = [m for m in final["matches"] if m["account_id"] == "acct_mule"]
        assert mule["kind"] == "payment" and mule["hits"] == 0
        assert final["risk"]["acct_mule"] == 0.5
    finally:
        running.stop()


def test_expired_indicators_stop_acting(tmp_path: Path) -> None:
    bundle = _partner_bundle(tmp_path)
    url = f"sqlite:///{tmp_path}/state.sqlite"
    asyncio.run(_prepare(url, bundle))

    async def go() -> tuple[int, int, int]:
        store = open_state_store(url)
        sharing = SharingStore(store.engine, ttl=timedelta(days=30))  # type: ignore[attr-defined]
        now = len(await sharing.active_indicators())
        later = datetime.now(UTC) + timedelta(days=31)
        after = len(await sharing.active_indicators(later))
        purged = await sharing.purge_expired(later)
        await store.close()
        return now, after, purged

    now, after, purged = asyncio.run(go())
    assert now == 5 and after == 0 and purged == 5


def _indicator(n: int, pattern: str) -> dict[str, Any]:
    return {"type": "indicator", "spec_version": "2.1", "pattern_type": "stix",
            "id": f"indicator--{n:08d}-1c1c-4d4d-8e8e-9f9f9f9f9f9f", "pattern": pattern,
            "created": "2026-01-01T00:00:00Z", "modified": "2026-01-01T00:00:00Z",
            "valid_from": "2026-01-01T00:00:00Z"}


def test_a_partner_indicator_cannot_stall_or_match_every_request(tmp_path: Path) -> None:
    """A partner's User-Agent regex ran with Python's backtracking engine on every
    request, on the event loop: ``(a+)+$`` against an agent of 27 a's held the gateway
    for seconds, twice as long with each further a. And an indicator for 0.0.0.0/0, ::/0 or a regex matching the empty
    string acted on every request (with ``block``, every one was refused)."""
    from distillguard.exchange import Exchange
    from distillguard.sharing.matcher import IndicatorMatcher

    ua = "[network-traffic:extensions.'http-request-ext'.request_header.'User-Agent' "
    objects = [_indicator(1, ua + "MATCHES '(a+)+$']"),
               _indicator(2, "[ipv4-addr:value ISSUBSET '0.0.0.0/0']"),
               _indicator(3, "[ipv6-addr:value ISSUBSET '::/0']"),
               _indicator(4, ua + "MATCHES '.*']"),
               _indicator(5, "[ipv4-addr:value ISSUBSET '81.0.0.0/8']"),
               _indicator(6, ua + "MATCHES '^curl/']"),
               _indicator(7, "[ipv4-addr:value ISSUBSET '5.9.0.0/16']")]

    async def go() -> list[tuple[str, float, list[str]]]:
        store = open_state_store(f"sqlite:///{tmp_path}/state.sqlite")
        await store.migrate()
        engine = store.engine  # type: ignore[attr-defined]
        await create_schema(engine)
        summary = await SharingStore(engine, ttl=timedelta(days=30)).import_bundle(
            partner="acme", bundle_id="bundle--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f",
            objects=objects, source="test", sha256=None)
        assert summary.active == {"user_agent": 2, "ip": 1} and summary.inactive == 4
        options = parse_sharing_settings(world.sharing_section())
        matcher = IndicatorMatcher(options, lambda: engine)
        await matcher.refresh()
        out = []
        for ip, agent in (("81.2.69.9", "a" * 30 + "!"), ("2001:db8::1", "OpenAI/Python"),
                          ("5.9.10.11", "curl/8.1")):
            exchange = Exchange(id="r", ts=datetime.now(UTC), endpoint="/v1/chat/completions",
                                account_id="acct_x", client_ip=ip, user_agent=agent)
            started = time.perf_counter()
            hits = matcher.match(exchange)
            out.append((agent, time.perf_counter() - started, [h.value for h in hits]))
        await store.close()
        return out

    (slow, dur, hits), (_, _, none), (_, _, curl) = asyncio.run(go())
    assert dur < 5 and hits == [], (slow, dur)   # minutes with a backtracking engine
    assert none == []
    assert sorted(curl) == ["5.9.0.0/16", "^curl/"]


def test_user_agent_regexes_that_do_not_compile_as_one_are_tried_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The matcher joins the partners' regexes into one for the common miss; when RE2
    could not compile the join (it bounds a program's memory, and thousands of
    patterns pass it), no regex indicator matched at all."""
    from distillguard.exchange import Exchange
    from distillguard.sharing import matcher as matcher_module
    from distillguard.sharing.indicators import user_agent_regex
    from distillguard.sharing.matcher import IndicatorMatcher

    ua = "[network-traffic:extensions.'http-request-ext'.request_header.'User-Agent' "
    objects = [_indicator(1, ua + "MATCHES '^curl/']"), _indicator(2, ua + "MATCHES 'bot$']")]
    monkeypatch.setattr(matcher_module, "user_agent_regex", lambda pattern: None if (
        "|" in pattern) else user_agent_regex(pattern))

    async def go() -> list[list[str]]:
        store = open_state_store(f"sqlite:///{tmp_path}/state.sqlite")
        await store.migrate()
        engine = store.engine  # type: ignore[attr-defined]
        await create_schema(engine)
        await SharingStore(engine, ttl=timedelta(days=30)).import_bundle(
            partner="acme", bundle_id="bundle--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f",
            objects=objects, source="test", sha256=None)
        matcher = IndicatorMatcher(parse_sharing_settings(world.sharing_section()),
                                   lambda: engine)
        await matcher.refresh()
        assert matcher.snapshot.ua_any is None
        out = []
        for agent in ("curl/8.1", "harvest-bot", "OpenAI/Python"):
            exchange = Exchange(id="r", ts=datetime.now(UTC), endpoint="/v1/chat/completions",
                                account_id="acct_x", client_ip="192.0.2.1", user_agent=agent)
            out.append(sorted(h.value for h in matcher.match(exchange)))
        await store.close()
        return out

    assert asyncio.run(go()) == [["^curl/"], ["bot$"], []]
