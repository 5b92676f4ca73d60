"""The policy layer end to end: a running gateway, the official openai client, the admin
API and detection's verdict tables."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from distillguard.errors import ConfigError
from distillguard.serve import Stack, StackThread
from tests.factories import ADMIN_TOKEN, make_settings, start_stack
from tests.test_dashboard import login

POLICY = """
version: 1
messages: {contact: compliance@example.test, verification_url: "https://example.test/verify"}
tiers:
  unverified: {models: ["demo-chat-*"], limits: {requests_per_minute: 3}}
rules:
  - name: embargo
    when: {country: [KP, IR, SY, CU]}
    deny: "Access from {country} is not permitted under export regulations."
  - name: reasoner-from-hosting
    when: {model: ["demo-reasoner-*"], hosting: true}
    require_tier: trusted
actions:
  throttle: {limits: {requests_per_minute: 2}}
verdicts:
  poll_interval_s: 0.2
  rules:
    - {name: high-risk, when: {risk_at_least: 0.9}, action: throttle, expires_in: 1h}
    - {name: confirmed-campaign, when: {campaign_status: [confirmed]}, action: suspend}
screening:
  lists: [screening.csv]
  interval_s: 0.5
audit: {flush_interval_s: 0.3}
refresh_s: 0.2
"""

SCREENING_CSV = """_id,source,entity_number,type,programs,name,alt_names
e1,Entity List (EL) - Bureau of Industry and Security,,Entity,EAR,\
"HUAWEI TECHNOLOGIES CO., LTD.",Huawei; Huawei Technologies
e2,Specially Designated Nationals (SDN) - Treasury Department,12345,Individual,RUSSIA-EO14024,\
"IVANOV, Sergei Petrovich",
"""


def write_policy(folder: Path, body: str = POLICY) -> Path:
    (folder / "screening.csv").write_text(SCREENING_CSV)
    path = folder / "policy.yaml"
    path.write_text(body)
    return path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackThread]:
    folder = tmp_path_factory.mktemp("policy")
    settings = make_settings(folder, policy={"file": str(write_policy(folder))},
                             server={"trusted_proxies": ["127.0.0.1/32"]})
    stack = start_stack(settings)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def admin(running: StackThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=running.stack.admin_url,
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}",
                               "x-distillguard-actor": "analyst@example.test"}) as client:
        yield client


def new_account(admin: httpx.Client, **fields: Any) -> tuple[str, str]:
    account_id = "acct_" + uuid.uuid4().hex[:8]
    admin.post("/admin/v1/accounts", json={"account_id": account_id, "country": "DE",
                                           **fields}).raise_for_status()
    key = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={}).json()["key"]
    return account_id, key


class Counting:
    """An openai client whose HTTP requests are counted (to see retries)."""

    def __init__(self, stack: StackThread, key: str, ip: str | None = None) -> None:
        self.sent = 0
        headers = {"x-forwarded-for": ip} if ip else {}
        self.http = httpx.Client(event_hooks={"request": [self._count]})
        self.client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key,
                                    max_retries=2, http_client=self.http,
                                    default_headers=headers)

    def _count(self, request: httpx.Request) -> None:
        self.sent += 1

    def chat(self, model: str = "demo-chat-1", prompt: str = "Explain recursion.") -> Any:
        return self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}])

    def close(self) -> None:
        self.http.close()


def until(predicate: Any, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_denied_country_through_trusted_proxy(running: StackThread, admin: httpx.Client) -> None:
    _, key = new_account(admin)
    blocked = Counting(running, key, ip="175.45.176.1")   # a North Korean address
    with pytest.raises(openai.PermissionDeniedError) as err:
        blocked.chat()
    assert err.value.status_code == 403
    assert err.value.response.headers["x-should-retry"] == "false"
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "access_denied"
    assert "KP is not permitted" in body["message"]
    assert "compliance@example.test" in body["message"]
    assert blocked.sent == 1, "the client retried a deliberate block"
    ok = Counting(running, key, ip="81.2.69.142")          # GB
    assert ok.chat().choices[0].message.content
    # the same address as a dual-stack socket or a proxy may write it had no country
    mapped = Counting(running, key, ip="::ffff:175.45.176.1")
    with pytest.raises(openai.PermissionDeniedError) as err:
        mapped.chat()
    assert "KP is not permitted" in str(err.value.body)
    blocked.close()
    ok.close()
    mapped.close()


def test_a_denied_country_is_denied_over_ipv6_and_behind_a_second_proxy_line(
        running: StackThread, admin: httpx.Client) -> None:
    """An IPv6 client had no country (the geo-IP reader loaded IPv4 only) and was
    served from a denied country; and of two X-Forwarded-For lines (a proxy that adds
    its own) only the first, the client's own, was read."""
    _, key = new_account(admin)
    ipv6 = Counting(running, key, ip="2a01:5ec0::1")       # an Iranian IPv6 address
    with pytest.raises(openai.PermissionDeniedError) as err:
        ipv6.chat()
    assert "IR is not permitted" in str(err.value.body)
    ipv6.close()
    url = running.stack.base_url + "/chat/completions"
    body = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "hi"}]}
    lines = [("authorization", f"Bearer {key}"), ("x-forwarded-for", "81.2.69.142"),
             ("x-forwarded-for", "175.45.176.1")]
    r = httpx.post(url, json=body, headers=httpx.Headers(lines))
    assert r.status_code == 403 and "KP is not permitted" in r.text, r.text


def test_declared_country_counts_too(running: StackThread, admin: httpx.Client) -> None:
    _, key = new_account(admin, country="IR")
    client = Counting(running, key)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat()
    client.close()


def test_tier_gated_model(running: StackThread, admin: httpx.Client) -> None:
    _, key = new_account(admin, tier="unverified")
    client = Counting(running, key)
    assert client.chat("demo-chat-2").choices
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat("demo-reasoner-1")
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_permitted"
    assert "https://example.test/verify" in body["message"]
    assert client.sent == 2
    # Hosting networks need a trusted account for the reasoner; a home network does not.
    _, std_key = new_account(admin, tier="standard")
    hosted = Counting(running, std_key, ip="5.9.1.1")
    with pytest.raises(openai.PermissionDeniedError) as err:
        hosted.chat("demo-reasoner-1")
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "tier_required"
    assert Counting(running, std_key, ip="81.2.69.142").chat("demo-reasoner-1").choices
    _, trusted_key = new_account(admin, tier="trusted")
    assert Counting(running, trusted_key, ip="5.9.1.1").chat("demo-reasoner-1").choices
    client.close()
    hosted.close()


def test_model_listing_hides_what_the_tier_may_not_call(running: StackThread,
                                                        admin: httpx.Client) -> None:
    _, key = new_account(admin, tier="unverified")
    client = openai.OpenAI(base_url=running.stack.base_url, api_key=key, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["demo-chat-1", "demo-chat-2"]
    assert client.models.retrieve("demo-chat-2").id == "demo-chat-2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("demo-reasoner-1")
    client.close()
    _, std_key = new_account(admin, tier="standard")
    standard = openai.OpenAI(base_url=running.stack.base_url, api_key=std_key, max_retries=0)
    assert {"demo-reasoner-1", "demo-embed-1"} <= {m.id for m in standard.models.list()}
    standard.close()


def test_suspended_account_is_blocked_without_retries(running: StackThread,
                                                      admin: httpx.Client) -> None:
    account_id, key = new_account(admin)
    client = Counting(running, key)
    assert client.chat().choices
    r = admin.post("/admin/v1/policy/actions", json={
        "account_id": account_id, "action": "suspend", "reason": "abuse report 12",
        "expires_in": "7d"})
    assert r.status_code == 201, r.text
    action = r.json()["data"][0]
    assert action["actor"] == "analyst@example.test" and action["expires_at"]
    time.sleep(0.6)  # the key cache (state.key_cache_ttl_s)
    client.sent = 0
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat()
    assert err.value.response.headers["x-should-retry"] == "false"
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "account_suspended"
    assert client.sent == 1
    assert admin.get(f"/admin/v1/accounts/{account_id}").json()["status"] == "suspended"
    r = admin.post("/admin/v1/policy/actions/revoke",
                   json={"account_id": account_id, "reason": "appeal upheld"})
    assert [a["action"] for a in r.json()["data"]] == ["suspend"]
    until(lambda: _ok(client))
    events = admin.get("/admin/v1/policy/audit",
                       params={"subject": f"account:{account_id}"}).json()["data"]
    names = [e["name"] for e in events]
    assert names[:3] == ["admin:account:reinstate", "admin:account:revoke",
                         "admin:account:suspend"]
    assert events[2]["reason"] == "abuse report 12"
    r = admin.post("/admin/v1/policy/actions", json={
        "account_ids": [account_id, "acct_nobody"], "action": "flag", "reason": "typo"})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["message"] == "no account 'acct_nobody'"
    assert not [a for a in admin.get("/admin/v1/policy/actions",
                                      params={"account": account_id}).json()["data"]
                if a["action"] == "flag"]
    # a duration past what a date holds was a 500; a string of actions was matched as
    # text; a limit's error was pydantic's message of several lines with a URL
    for body, says in (({"action": "flag", "expires_in": "99999999999d"},
                        "longer than 100 years"),
                       ({"action": "throttle", "limits": {"requests_per_minute": -1}},
                        "throttle limits: requests_per_minute: Input should be greater "
                        "than or equal to 0")):
        r = admin.post("/admin/v1/policy/actions",
                       json={"account_id": account_id, "reason": "a reason", **body})
        assert r.status_code == 422 and says in r.json()["error"]["message"], r.text
        assert "\n" not in r.json()["error"]["message"]
    admin.post("/admin/v1/policy/actions", json={
        "account_id": account_id, "action": "flag", "reason": "kept"}).raise_for_status()
    for names in ("l", "flag", [1], []):
        r = admin.post("/admin/v1/policy/actions/revoke",
                       json={"account_id": account_id, "reason": "abc", "actions": names})
        assert r.status_code == 422 and "'actions' must be a list" in r.text, (names, r.text)
    assert [a["action"] for a in admin.get("/admin/v1/policy/actions", params={
        "account": account_id, "active": "1"}).json()["data"]] == ["flag"]
    # a misspelt field gave the default expiry (a week) to an action meant for an hour,
    # and limits that were not an object gave a throttle at the policy's own limits
    for path, body, param in (
            ("/admin/v1/policy/actions", {"action": "suspend", "expire_in": "1h"},
             "expire_in"),
            ("/admin/v1/policy/actions", {"action": "throttle", "limits": "5/min"},
             "limits"),
            ("/admin/v1/policy/actions", {"action": "flag", "account_ids": [account_id]},
             "account_id"),
            ("/admin/v1/policy/actions/revoke", {"action": "flag"}, "action")):
        r = admin.post(path, json={"account_id": account_id, "reason": "a reason", **body})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    assert [a["action"] for a in admin.get("/admin/v1/policy/actions", params={
        "account": account_id, "active": "1"}).json()["data"]] == ["flag"]
    client.close()


def _ok(client: Counting) -> bool:
    try:
        client.chat()
    except openai.APIStatusError:
        return False
    return True


def test_throttle_tightens_limits(running: StackThread, admin: httpx.Client) -> None:
    account_id, key = new_account(admin)
    r = admin.post("/admin/v1/policy/actions", json={
        "account_id": account_id, "action": "throttle", "reason": "bursty harvesting",
        "expires_in": "1h"})
    assert r.status_code == 201
    client = openai.OpenAI(base_url=running.stack.base_url, api_key=key, max_retries=0)
    first = client.chat.completions.with_raw_response.create(
        model="demo-chat-1", messages=[{"role": "user", "content": "hi"}])
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    client.chat.completions.create(model="demo-chat-1",
                                   messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="demo-chat-1",
                                       messages=[{"role": "user", "content": "hi"}])
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert "temporarily reduced limits" in str(err.value.body)
    # An account without the action keeps its tier's limits.
    _, other = new_account(admin)
    plain = openai.OpenAI(base_url=running.stack.base_url, api_key=other, max_retries=0)
    for _ in range(4):
        plain.chat.completions.create(model="demo-chat-1",
                                      messages=[{"role": "user", "content": "hi"}])


def test_a_throttle_with_other_limits_is_enforced_beside_the_active_one(
        running: StackThread, admin: httpx.Client) -> None:
    """A throttle applied again with other limits extended the active throttle (or, for
    as long or shorter, changed nothing) and kept that one's limits: the account was
    served at 40 requests a minute after an analyst throttled it to 5."""
    account_id, key = new_account(admin)
    client = openai.OpenAI(base_url=running.stack.base_url, api_key=key, max_retries=0)

    def throttle(rpm: int, expires_in: str, reason: str) -> dict[str, Any]:
        r = admin.post("/admin/v1/policy/actions", json={
            "account_ids": [account_id], "action": "throttle", "reason": reason,
            "expires_in": expires_in, "limits": {"requests_per_minute": rpm}})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def limit() -> str:
        reply = client.chat.completions.with_raw_response.create(
            model="demo-chat-1", messages=[{"role": "user", "content": "hi"}])
        return str(reply.headers["x-ratelimit-limit-requests"])

    loose = throttle(40, "1h", "bursty")["data"][0]
    assert limit() == "40"
    tight = throttle(5, "2h", "ring confirmed")
    assert [(a["extended_from"], a["detail"]["limits"]["requests_per_minute"], a["reason"])
            for a in tight["data"]] == [(None, 5, "ring confirmed")], tight
    assert tight["data"][0]["action_id"] != loose["action_id"]
    assert limit() == "5"
    # Looser again, for longer: applied too, and the tighter one still holds.
    assert throttle(20, "4h", "appeal pending")["data"][0]["extended_from"] is None
    assert limit() == "5"
    # The same limits again: for longer extends that throttle, for as long changes nothing.
    again = throttle(5, "8h", "ring still active")["data"]
    assert [(a["action_id"], a["extended_from"]) for a in again] == [
        (tight["data"][0]["action_id"], tight["data"][0]["expires_at"])]
    assert throttle(5, "1h", "ring still active")["unchanged"] == [account_id]
    active = admin.get("/admin/v1/policy/actions", params={
        "account": account_id, "active": "1"}).json()["data"]
    assert sorted((a["detail"]["limits"]["requests_per_minute"], a["reason"])
                  for a in active) == [(5, "ring confirmed"), (20, "appeal pending"),
                                       (40, "bursty")]
    events = admin.get("/admin/v1/policy/audit",
                       params={"subject": f"account:{account_id}"}).json()["data"]
    assert [(e["name"], e["reason"],
             e["detail"].get("limits", {}).get("requests_per_minute")) for e in events] == [
        ("admin:account:extend", "ring still active", None),
        ("admin:account:throttle", "appeal pending", 20),
        ("admin:account:throttle", "ring confirmed", 5),
        ("admin:account:throttle", "bursty", 40)]


def test_tier_limits_apply_on_top_of_the_settings(running: StackThread,
                                                  admin: httpx.Client) -> None:
    _, key = new_account(admin, tier="unverified")
    client = openai.OpenAI(base_url=running.stack.base_url, api_key=key, max_retries=0)
    first = client.chat.completions.with_raw_response.create(
        model="demo-chat-1", messages=[{"role": "user", "content": "hi"}])
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    for _ in range(2):
        client.chat.completions.create(model="demo-chat-1",
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="demo-chat-1",
                                       messages=[{"role": "user", "content": "hi"}])
    assert "for this account's tier" in str(err.value.body)


def test_degrade_strips_reasoning(running: StackThread, admin: httpx.Client) -> None:
    account_id, key = new_account(admin, tier="trusted")
    client = openai.OpenAI(base_url=running.stack.base_url, api_key=key, max_retries=0)

    def reasoning() -> Any:
        out = client.chat.completions.create(
            model="demo-reasoner-1", messages=[{"role": "user", "content": "Why is the sky blue?"}])
        return getattr(out.choices[0].message, "reasoning_content", None)

    assert reasoning()  # trusted accounts see reasoning by default
    admin.post("/admin/v1/policy/actions", json={
        "account_id": account_id, "action": "degrade", "reason": "campaign c-9 member"}
    ).raise_for_status()
    assert reasoning() is None
    stream = client.chat.completions.create(
        model="demo-reasoner-1", stream=True,
        messages=[{"role": "user", "content": "Why is the sky blue?"}])
    chunks = list(stream)
    assert chunks and not any(getattr(c.choices[0].delta, "reasoning_content", None)
                              for c in chunks if c.choices)


def _db(stack: StackThread) -> str:
    return stack.stack.settings.state.url.replace("sqlite:///", "sqlite+aiosqlite:///")


def insert_rows(url: str, sql: str, rows: list[dict[str, Any]]) -> None:
    import asyncio

    async def go() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.execute(text(sql), rows)
        await engine.dispose()

    asyncio.run(go())


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="microseconds")


def test_verdict_rows_become_actions_within_seconds(running: StackThread,
                                                   admin: httpx.Client) -> None:
    risky, risky_key = new_account(admin)
    members = [new_account(admin) for _ in range(2)]
    calm, calm_key = new_account(admin)
    url = _db(running)
    insert_rows(url, "INSERT INTO account_verdicts VALUES (:a, :r, :f, NULL, NULL, 12, :why, :t)",
                [{"a": risky, "r": 0.95, "f": 1, "why": '["template prompts"]', "t": _now()},
                 {"a": calm, "r": 0.2, "f": 0, "why": "[]", "t": _now()}])
    insert_rows(url, "INSERT INTO campaigns VALUES (:c, 0.99, :t, :e, :a, 'confirmed', :t)",
                [{"c": "c-" + uuid.uuid4().hex[:6], "t": _now(),
                  "e": '["shared payment fingerprint"]',
                  "a": orjson.dumps([m[0] for m in members]).decode()}])
    throttled = openai.OpenAI(base_url=running.stack.base_url, api_key=risky_key,
                              max_retries=0)

    def is_throttled() -> bool:
        r = throttled.chat.completions.with_raw_response.create(
            model="demo-chat-1", messages=[{"role": "user", "content": "x"}])
        return r.headers.get("x-ratelimit-limit-requests") == "2"

    assert until(is_throttled, 5.0) < 5.0
    member = Counting(running, members[0][1])
    until(lambda: not _ok(member), 5.0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        member.chat()
    assert err.value.response.headers["x-should-retry"] == "false"
    assert _ok(Counting(running, calm_key))
    actions = admin.get("/admin/v1/policy/actions", params={"account": members[1][0]}).json()
    assert actions["data"][0]["action"] == "suspend"
    assert actions["data"][0]["caused_by"].startswith("campaign:c-")
    assert actions["data"][0]["source"] == "verdicts"


def test_screening_matches_go_to_review(running: StackThread, admin: httpx.Client) -> None:
    hit, hit_key = new_account(admin, org="Huawei Technologies Company Limited")
    person, _ = new_account(admin, org="Northwind Traders", name="Sergey Ivanov")
    clean, _ = new_account(admin, org="Huawei Fan Club Berlin e.V.")

    def items() -> dict[str, Any]:
        rows = admin.get("/admin/v1/review", params={"status": "open", "limit": 500}
                         ).json()["data"]
        return {r["subject"]: r for r in rows if r["source"] == "screening"}

    until(lambda: hit in items() and person in items(), 10.0)
    found = items()
    assert clean not in found
    assert "HUAWEI TECHNOLOGIES CO., LTD." in found[hit]["evidence"][0]
    assert found[hit]["action"] == "suspend"
    # A match is not a block: the account keeps working until an analyst confirms.
    client = Counting(running, hit_key)
    assert _ok(client)
    r = admin.post(f"/admin/v1/review/{found[person]['item_id']}",
                   json={"decision": "dismiss", "reasons": "different person"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "reasons", r.text
    r = admin.post(f"/admin/v1/review/{found[person]['item_id']}",
                   json={"decision": "dismiss", "reason": "different person, DOB differs"})
    assert r.json()["status"] == "dismissed" and r.json()["applied"] == []
    r = admin.post(f"/admin/v1/review/{found[hit]['item_id']}",
                   json={"decision": "confirm", "reason": "same entity per legal"})
    assert [a["action"] for a in r.json()["applied"]] == ["suspend"]
    until(lambda: not _ok(client), 5.0)
    assert admin.post(f"/admin/v1/review/{found[hit]['item_id']}",
                      json={"decision": "dismiss", "reason": "again"}).status_code == 422
    client.close()


def test_denials_are_aggregated_into_audit_events(running: StackThread,
                                                 admin: httpx.Client) -> None:
    account_id, key = new_account(admin, tier="unverified")
    client = openai.OpenAI(base_url=running.stack.base_url, api_key=key, max_retries=0)
    for _ in range(5):
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="demo-reasoner-1",
                                           messages=[{"role": "user", "content": "x"}])
    running.call(running.stack.extensions[1].runtime.flush_audit(force=True))  # type: ignore[attr-defined]
    events = admin.get("/admin/v1/policy/audit",
                       params={"subject": f"account:{account_id}"}).json()["data"]
    deny = [e for e in events if e["name"] == "policy:request:deny"]
    assert sum(e["count"] for e in deny) == 5
    assert deny[0]["detail"]["code"] == "model_not_permitted"
    assert deny[0]["detail"]["models"] == ["demo-reasoner-1"]


def test_audit_events_reach_the_ledger(running: StackThread, admin: httpx.Client) -> None:
    account_id, _ = new_account(admin)
    admin.post("/admin/v1/policy/actions", json={
        "account_id": account_id, "action": "flag", "reason": "odd prompt templates"}
    ).raise_for_status()

    def forwarded() -> list[dict[str, Any]]:
        rows = admin.get("/admin/v1/policy/audit",
                         params={"subject": f"account:{account_id}"}).json()["data"]
        return [r for r in rows if (r["ledger_seq"] or -1) >= 0]

    until(lambda: bool(forwarded()), 10.0)
    seq = forwarded()[0]["ledger_seq"]
    entry = admin.get(f"/admin/v1/ledger/entries/{seq}")
    assert entry.status_code == 200, entry.text
    text_ = entry.text
    assert "admin:account:flag" in text_ and "odd prompt templates" in text_


def test_reload_under_load_without_a_failed_request(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    stack = start_stack(make_settings(tmp_path, policy={"file": str(path)}))
    admin = httpx.Client(base_url=stack.stack.admin_url,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        _, key = new_account(admin, tier="trusted")
        failures: list[str] = []
        served = [0]
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=stack.stack.base_url,
                              headers={"authorization": f"Bearer {key}"}) as c:
                while not stop.is_set():
                    r = c.post("/chat/completions", json={
                        "model": "demo-chat-1", "messages": [{"role": "user", "content": "x"}]})
                    if r.status_code != 200:
                        failures.append(r.text)
                    served[0] += 1

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        chat = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
        assert chat.chat.completions.create(
            model="demo-chat-2", messages=[{"role": "user", "content": "x"}]).choices
        for i in range(4):
            path.write_text(POLICY.replace(
                "tiers:\n", f'tiers:\n  trusted: {{models: ["demo-chat-1", "demo-x-{i}"]}}\n'))
            r = admin.post("/admin/v1/policy/reload")
            assert r.status_code == 200, r.text
            time.sleep(0.2)
        with pytest.raises(openai.PermissionDeniedError):   # the new file took effect
            chat.chat.completions.create(
                model="demo-chat-2", messages=[{"role": "user", "content": "x"}])
        path.write_text(POLICY.replace("require_tier: trusted", "require_tier: platinum"))
        r = admin.post("/admin/v1/policy/reload")
        assert r.status_code == 422 and "rules.1" in r.text and "platinum" in r.text
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        assert failures == [] and served[0] > 10
        status = admin.get("/admin/v1/policy").json()
        assert status["generation"] == 5
        names = [e["name"] for e in admin.get("/admin/v1/policy/audit").json()["data"]]
        assert names.count("policy:file:reload") == 4
        assert "policy:file:reload_failed" in names
    finally:
        admin.close()
        stack.stop()


def test_bad_policy_file_stops_start_up_naming_the_option(tmp_path: Path) -> None:
    path = write_policy(tmp_path, POLICY.replace("KP, IR", "KP, IRN"))
    with pytest.raises(ConfigError) as err:
        Stack(make_settings(tmp_path, policy={"file": str(path)}))
    assert "rules.0.when.country" in str(err.value) and "'IRN'" in str(err.value)
    with pytest.raises(ConfigError, match="policy.file: cannot read"):
        Stack(make_settings(tmp_path, policy={"file": str(tmp_path / "missing.yaml")}))
    with pytest.raises(ConfigError, match="policy.colour"):
        Stack(make_settings(tmp_path, policy={"colour": "red"}))


@pytest.mark.postgres
def test_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    path = write_policy(tmp_path)
    stack = start_stack(make_settings(tmp_path, policy={"file": str(path)},
                                      state={"url": pg_url}))
    admin = httpx.Client(base_url=stack.stack.admin_url,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        risky, key = new_account(admin, org="HUAWEI TECHNOLOGIES CO LTD")
        insert_rows(pg_url.replace("postgresql://", "postgresql+asyncpg://"),
                    "INSERT INTO account_verdicts VALUES (:a, 0.97, 1, NULL, NULL, 3, '[]', :t)",
                    [{"a": risky, "t": _now()}])
        client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)

        def throttled() -> bool:
            r = client.chat.completions.with_raw_response.create(
                model="demo-chat-1", messages=[{"role": "user", "content": "x"}])
            return r.headers.get("x-ratelimit-limit-requests") == "2"

        until(throttled, 5.0)
        until(lambda: any(i["subject"] == risky for i in admin.get(
            "/admin/v1/review").json()["data"]), 10.0)
        events = admin.get("/admin/v1/policy/audit",
                           params={"subject": f"account:{risky}"}).json()["data"]
        assert "policy:account:throttle" in [e["name"] for e in events]
    finally:
        admin.close()
        stack.stop()


def test_sighup_reloads_a_running_server(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from tests.factories import StderrLines

    policy = write_policy(tmp_path)
    cfg = tmp_path / "dg.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"port": 0, "admin_port": 0},
        "admin": {"token": ADMIN_TOKEN}, "upstream": {"base_url": "demo"},
        "state": {"url": f"sqlite:///{tmp_path / 's.sqlite'}"},
        "ledger": {"path": str(tmp_path / "ledger")}, "policy": {"file": str(policy)}}))
    proc = subprocess.Popen([sys.executable, "-m", "distillguard.cli", "-c", str(cfg), "serve"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    output = StderrLines(proc)
    admin = httpx.Client(headers={"authorization": f"Bearer {ADMIN_TOKEN}"})

    def generation() -> int:
        try:
            status = admin.get("/admin/v1/policy").json()
        except httpx.HTTPError:
            return 0
        return int(status["generation"]) if status["passes"] else 0   # runtime started

    try:
        admin.base_url = httpx.URL(output.wait_for(r" admin on (http://\S+)")[1])
        until(lambda: generation() == 1, 30.0)
        policy.write_text(POLICY.replace("name: embargo", "name: embargo-v2"))
        os.kill(proc.pid, signal.SIGHUP)
        until(lambda: generation() == 2, 10.0)
        assert "embargo-v2" in admin.get("/admin/v1/policy").json()["rules"]
        policy.write_text("rules: [{name: broken}]")
        os.kill(proc.pid, signal.SIGHUP)
        until(lambda: "policy:file:reload_failed" in admin.get(
            "/admin/v1/policy/audit").text, 10.0)
        assert generation() == 2 and proc.poll() is None   # still serving the old policy
    finally:
        admin.close()
        proc.terminate()
        output.text(timeout=30)


def test_screening_now_takes_an_object_or_no_body(admin: httpx.Client) -> None:
    """A body that was JSON but not an object ([1]) was a 500."""
    for body in ([1], "force", 5):
        r = admin.post("/admin/v1/policy/screen", json=body)
        assert r.status_code == 422 and "JSON object" in r.json()["error"]["message"], r.text
    assert admin.post("/admin/v1/policy/screen").status_code == 200
    assert admin.post("/admin/v1/policy/screen", json={"force": True}).status_code == 200
    r = admin.post("/admin/v1/policy/screen", json={"forced": True})
    assert r.status_code == 422 and r.json()["error"]["param"] == "forced"



@pytest.fixture(scope="module")
def slow_refresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackThread]:
    """A gateway whose background pass is a minute away (refresh_s and the verdict poll
    bound it), so only what an admin request does itself takes effect at once."""
    folder = tmp_path_factory.mktemp("slow")
    body = POLICY.replace("refresh_s: 0.2", "refresh_s: 60").replace(
        "poll_interval_s: 0.2", "poll_interval_s: 60")
    stack = start_stack(make_settings(folder, policy={"file": str(write_policy(folder, body))},
                                      state={"key_cache_ttl_s": 1.0}))
    try:
        yield stack
    finally:
        stack.stop()



@pytest.mark.parametrize("way", ["patch", "import", "revoke", "dashboard"])
def test_an_admin_change_holds_on_this_replica_before_it_answers(
        slow_refresh: StackThread, way: str) -> None:
    """A suspension lifted through the admin API (by setting the status or revoking it)
    or the dashboard holds for the next request to the replica that answered, not from
    its next refresh
    (the mirror of actions) or the end of its key cache (which held the status); a
    suspension set that way holds at once too."""
    admin = httpx.Client(base_url=slow_refresh.stack.admin_url,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    account_id, key = new_account(admin)
    public = httpx.Client(base_url=slow_refresh.stack.base_url,
                          headers={"authorization": f"Bearer {key}"})
    dashboard = httpx.Client(base_url=slow_refresh.stack.admin_url + "/dashboard")
    csrf = login(dashboard) if way == "dashboard" else ""

    def answer() -> str:
        r = public.post("chat/completions", json={
            "model": "demo-chat-1", "messages": [{"role": "user", "content": "hi"}]})
        return "served" if r.status_code == 200 else str(r.json()["error"]["code"])

    def change(status: str) -> None:
        if way == "patch":
            r = admin.patch(f"/admin/v1/accounts/{account_id}",
                            json={"status": status, "reason": "abuse report 12"})
        elif way == "import":
            r = admin.post("/admin/v1/accounts/import", content=orjson.dumps(
                {"account_id": account_id, "country": "DE", "status": status}))
        elif way == "dashboard":
            r = dashboard.post("/actions", data={
                "kind": "account", "target": account_id, "csrf": csrf,
                "action": "suspend" if status == "suspended" else "reinstate",
                "reason": "abuse report 12", "next": "/dashboard/accounts"})
            assert r.status_code == 303, r.text
            return
        elif status == "suspended":
            r = admin.post("/admin/v1/policy/actions", json={
                "account_id": account_id, "action": "suspend", "reason": "abuse report 12"})
        else:
            r = admin.post("/admin/v1/policy/actions/revoke",
                           json={"account_id": account_id, "reason": "appeal upheld"})
        r.raise_for_status()

    try:
        assert answer() == "served"
        admin.post("/admin/v1/policy/actions", json={
            "account_id": account_id, "action": "suspend", "reason": "abuse report 11"}
        ).raise_for_status()
        assert answer() == "account_suspended"
        time.sleep(1.1)     # past the key cache, which holds the suspended status now
        assert answer() == "account_suspended"
        change("active")
        assert answer() == "served"
        change("suspended")
        assert answer() == "account_suspended"
        time.sleep(1.1)
        change("active")
        assert answer() == "served"
    finally:
        public.close()
        admin.close()
        dashboard.close()
