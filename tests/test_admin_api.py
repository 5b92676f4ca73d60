"""The admin API: its credential, accounts, keys, import and export."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from distillguard.exchange import format_ts
from distillguard.serve import StackThread
from tests.factories import ADMIN_TOKEN, make_settings, start_stack


def test_admin_requires_its_own_credential(stack: StackThread,
                                           account_key: tuple[str, str]) -> None:
    url = stack.stack.admin_url + "/admin/v1/accounts"
    assert httpx.get(url).status_code == 401
    _, api_key = account_key
    r = httpx.get(url, headers={"authorization": f"Bearer {api_key}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"


ADMIN_ROUTES = ("/admin/v1/accounts", "/admin/v1/policy", "/admin/v1/ledger/key")


def test_every_admin_surface_checks_the_one_credential(stack: StackThread,
                                                       tmp_path: Path) -> None:
    """Accounts, policy and the ledger each had a copy of the credential check; one
    function serves them all now, with the same answers."""
    for path in ADMIN_ROUTES:
        url = stack.stack.admin_url + path
        for headers in ({}, {"authorization": "Bearer not-the-admin-token-at-all"},
                        {"authorization": f"Basic {ADMIN_TOKEN}"}):
            r = httpx.get(url, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_admin_token"
        assert httpx.get(url, headers={"authorization": f"bearer {ADMIN_TOKEN}"}
                         ).status_code == 200
    off = start_stack(make_settings(tmp_path / "off", admin={"token": None}))
    try:
        for path in ADMIN_ROUTES:
            r = httpx.get(off.stack.admin_url + path,
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    finally:
        off.stop()


def test_failed_admin_authentications_are_throttled_per_address(tmp_path: Path) -> None:
    """Guessing the admin token is slowed down: after ``failed_auth_per_minute``
    failures an address is refused with a 429, on every admin route and even with the
    right token (a guesser must not tell a hit from the status); others are not."""
    stack = start_stack(make_settings(tmp_path, admin={"token": ADMIN_TOKEN,
                                                       "failed_auth_per_minute": 3}))
    good = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        url = stack.stack.admin_url
        for path in ADMIN_ROUTES:
            r = httpx.get(url + path, headers={"authorization": "Bearer guess-guess-guess"})
            assert r.status_code == 401, r.text
        for path in (*ADMIN_ROUTES, "/admin/v1/accounts"):
            r = httpx.get(url + path, headers=good)
            assert r.status_code == 429, (path, r.text)
            assert r.json()["error"]["code"] == "too_many_failed_authentications"
            assert 1 <= int(r.headers["retry-after"]) <= 60
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with other:
            assert other.get(url + "/admin/v1/accounts", headers=good).status_code == 200
    finally:
        stack.stop()


def test_behind_a_proxy_failed_admin_authentications_count_against_the_client(
        tmp_path: Path) -> None:
    """Counted against the TCP peer, failures behind a trusted proxy were the proxy's:
    three wrong tokens from anyone refused every operator. They count against the
    address the proxy forwards now, believed from a trusted proxy only."""
    stack = start_stack(make_settings(tmp_path, admin={"token": ADMIN_TOKEN,
                                                       "failed_auth_per_minute": 3},
                                      server={"trusted_proxies": ["127.0.0.1/32"]}))
    url = stack.stack.admin_url + "/admin/v1/accounts"
    good = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        guesser = {"x-forwarded-for": "192.0.2.66"}
        for _ in range(3):
            r = httpx.get(url, headers={**guesser, "authorization": "Bearer guess-guess"})
            assert r.status_code == 401, r.text
        assert httpx.get(url, headers={**guesser, **good}).status_code == 429
        spoofed = {"x-forwarded-for": "203.0.113.9, 192.0.2.66"}
        assert httpx.get(url, headers={**spoofed, **good}).status_code == 429
        operator = {"x-forwarded-for": "198.51.100.5"}
        assert httpx.get(url, headers={**operator, **good}).status_code == 200
    finally:
        stack.stop()


def test_failed_auth_throttle_counts_by_network_and_forgets_the_oldest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from distillguard.gateway import adminauth
    from distillguard.gateway.adminauth import FailedAuthThrottle, client_key

    assert client_key("2001:db8:1:2:3:4:5:6") == client_key("2001:db8:1:2::9") \
        == "2001:db8:1:2::/64"
    assert client_key("::ffff:203.0.113.9") == "203.0.113.9" == client_key("203.0.113.9")
    assert client_key(None) == "?"
    monkeypatch.setattr(adminauth, "MAX_ADDRESSES", 3)
    throttle = FailedAuthThrottle(2)

    async def go() -> None:
        await throttle.failed("a")
        await throttle.failed("a")
        for who in ("b", "c"):
            await throttle.failed(who)
        assert await throttle.blocked("a")
        await throttle.failed("d")   # a spray of new addresses forgets the oldest
        assert not await throttle.blocked("a")
        await throttle.failed("b")
        assert await throttle.blocked("b") and await throttle.retry_after_s("b") >= 59
        throttle.succeeded("b")
        assert not await throttle.blocked("b") and await throttle.retry_after_s("b") == 0
    asyncio.run(go())


def test_an_unknown_route_or_method_is_an_api_error(stack: StackThread,
                                                     admin: httpx.Client) -> None:
    """The admin API answers a route it does not have, or a method a route does not
    take, in its own error format, not the router's plain text."""
    r = admin.get("/admin/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "Unknown endpoint GET /admin/v1/nothing.",
        "type": "invalid_request_error", "param": None, "code": "unknown_url"}
    r = admin.put("/admin/v1/accounts")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in r.headers["allow"]
    # the public API keeps its catch-all (OpenAI's 404 for a method it does not serve)
    r = httpx.delete(stack.stack.base_url + "/v1/chat/completions")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


SLASH_VARIANTS = ("/admin/v1/accounts/", "/admin/v1/accounts/a/", "/admin/v1/accounts/a/keys/",
                  "/admin/v1/keys/k/", "/admin/v1/policy/", "/admin/v1/review/",
                  "/admin/v1/ledger/key/", "/admin/v1/accounts/export/", "/admin/v1/")


def test_no_redirect_takes_its_host_from_the_host_header(stack: StackThread,
                                                         admin: httpx.Client) -> None:
    """GET /admin/v1/accounts/ was answered by Starlette's router with a 307 to
    http://<Host>/admin/v1/accounts, the Host header's value: a forged Host redirected
    the client to another site. A path with a final slash too many or too few is an
    unknown path, in the API's error format; the public API (a catch-all route) never
    redirected and does not now."""
    admin.post("/admin/v1/accounts", json={"account_id": "a"}).raise_for_status()
    forged = {"host": "evil.example"}
    for path in SLASH_VARIANTS:
        for method in ("GET", "POST", "PATCH", "DELETE"):
            r = admin.request(method, path, headers=forged)
            assert "location" not in r.headers and r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "unknown_url", (method, path, r.text)
    for path in ("/v1/models/", "/v1/chat/completions/", "/v1/embeddings/", "/health/",
                 "/metrics/", "/ready/", "/v1/"):
        for method in ("GET", "POST"):
            r = httpx.request(method, stack.stack.base_url.removesuffix("/v1") + path,
                              headers=forged)
            assert "location" not in r.headers and r.status_code in (401, 404), (
                method, path, r.text)
    # the routes themselves are unchanged
    assert admin.get("/admin/v1/accounts", headers=forged).status_code == 200
    assert admin.get("/admin/v1/accounts/a/keys", headers=forged).status_code == 200


def test_accounts_and_keys_life_cycle(stack: StackThread, admin: httpx.Client) -> None:
    r = admin.post("/admin/v1/accounts", json={
        "account_id": "acct_17", "created_at": "2026-02-20T09:00:00Z", "org": "Acme Ltd",
        "email_domain": "acme.example", "payment_fingerprint": "pf_3c1e", "country": "de",
        "tier": "unverified"})
    assert r.status_code == 201 and r.json()["country"] == "DE"
    assert admin.post("/admin/v1/accounts", json={"account_id": "acct_17"}).status_code == 422
    assert admin.post("/admin/v1/accounts", json={"org": "x"}).status_code == 422
    assert admin.get("/admin/v1/accounts/none").status_code == 404
    # a negative offset is refused (PostgreSQL would fail on it); a limit is kept in 1-1000
    r = admin.get("/admin/v1/accounts", params={"offset": "-1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "offset"
    assert len(admin.get("/admin/v1/accounts", params={"limit": "-1"}).json()["data"]) == 1

    for bad, param in (({"expires_in_days": "inf"}, "expires_in_days"),
                       ({"expires_in_days": 1e12}, "expires_in_days"),
                       ({"expires_in_days": -5}, "expires_in_days"),
                       ({"expires_in_days": True}, "expires_in_days"),
                       ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
                       ({"expires_at": 5}, "expires_at"),
                       ({"limits": {"requests_per_minute": -1}}, "limits")):
        r = admin.post("/admin/v1/accounts/acct_17/keys", json=bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["param"] == param
    # a key is never created already expired (a typo in a year, a sign), nor kept
    assert admin.get("/admin/v1/accounts/acct_17/keys").json()["data"] == []
    for r in (admin.patch("/admin/v1/accounts/acct_17", json={"country": "XYZ"}),
              admin.post("/admin/v1/accounts", json={"account_id": "acct_18",
                                                      "country": "Germany"})):
        assert r.status_code == 422 and r.json()["error"]["param"] == "country", r.text
    created = admin.post("/admin/v1/accounts/acct_17/keys",
                         json={"name": "prod", "expires_in_days": 30}).json()
    secret = created["key"]
    listed = admin.get("/admin/v1/accounts/acct_17/keys").json()["data"]
    assert [k["key_id"] for k in listed] == [created["key_id"]]
    assert secret not in orjson.dumps(listed).decode()  # shown once only

    chat = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"authorization": f"Bearer {secret}"}
    assert httpx.post(stack.stack.base_url + "/chat/completions", json=chat,
                      headers=auth).status_code == 200
    # Suspension is a 403 that tells the client not to retry.
    admin.patch("/admin/v1/accounts/acct_17", json={"status": "suspended"}).raise_for_status()
    r = httpx.post(stack.stack.base_url + "/chat/completions", json=chat, headers=auth)
    assert r.status_code == 403 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "account_suspended"
    admin.patch("/admin/v1/accounts/acct_17", json={"status": "active"}).raise_for_status()
    assert admin.delete(f"/admin/v1/keys/{created['key_id']}").json()["revoked_at"]
    r = httpx.post(stack.stack.base_url + "/chat/completions", json=chat, headers=auth)
    assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"

    soon = datetime.now(UTC) + timedelta(seconds=1)
    expired = admin.post("/admin/v1/accounts/acct_17/keys",
                         json={"expires_at": format_ts(soon)}).json()["key"]
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.05)
    r = httpx.post(stack.stack.base_url + "/chat/completions", json=chat,
                   headers={"authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "expired_api_key"


def test_import_export_accounts_jsonl(admin: httpx.Client) -> None:
    lines = [orjson.dumps({"account_id": f"imp_{i}", "country": "FR", "tier": "verified",
                           "payment_fingerprint": "pf_x", "note": i}) for i in range(20)]
    r = admin.post("/admin/v1/accounts/import", content=b"\n".join(lines))
    assert r.json() == {"imported": 20, "suspended": 0, "reinstated": 0}
    bad = b"\n".join([*lines[:3], b'{"account_id": 5}'])
    r = admin.post("/admin/v1/accounts/import", content=bad)
    assert r.status_code == 422 and "line 4" in r.json()["error"]["message"]
    exported = [orjson.loads(x) for x in admin.get("/admin/v1/accounts/export").content
                .splitlines()]
    mine = [a for a in exported if a["account_id"].startswith("imp_")]
    assert len(mine) == 20 and mine[0]["note"] is not None and mine[0]["tier"] == "verified"


def test_a_tier_not_configured_or_a_field_of_the_wrong_type_is_refused(
        admin: httpx.Client) -> None:
    """An unknown tier was stored (and the account then served the default tier's
    limits); org 5 was stored as a number; a key body that is not JSON was a 500; a
    store check was answered with the code 'conflict'."""
    def refused(r: httpx.Response, param: str | None, says: str) -> None:
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == param and says in error["message"], error

    refused(admin.post("/admin/v1/accounts", json={"account_id": "t1", "tier": "gold"}),
            "tier", "account 't1': unknown tier 'gold' (tiers of limits.tiers and the policy "
            "file: standard, trusted, unverified, verified)")
    refused(admin.post("/admin/v1/accounts/import", content=b'{"account_id": "t2"}\n'
                       b'{"account_id": "t3", "tier": "gold"}\n'), "tier", "'t3'")
    assert admin.get("/admin/v1/accounts/t2").status_code == 404     # all or nothing
    admin.post("/admin/v1/accounts", json={"account_id": "t4"}).raise_for_status()
    refused(admin.patch("/admin/v1/accounts/t4", json={"tier": "gold"}), "tier",
            "account 't4': unknown tier 'gold'")
    refused(admin.patch("/admin/v1/accounts/t4", json={"tier": ["verified"]}), "tier",
            "unknown tier ['verified']")
    refused(admin.patch("/admin/v1/accounts/t4", json={"tier": "verified", "org": 5}),
            "org", "account 'org' must be a string, not a number")
    refused(admin.patch("/admin/v1/accounts/t4", json={"payment_fingerprint": {"x": 1}}),
            "payment_fingerprint", "must be a string, not an object")
    refused(admin.post("/admin/v1/accounts", json={"account_id": "t5", "org": True}),
            "org", "must be a string, not a boolean")
    changed = admin.patch("/admin/v1/accounts/t4", json={"tier": "verified", "org": "5"})
    assert changed.json()["tier"] == "verified" and changed.json()["org"] == "5"
    r = admin.post("/admin/v1/accounts/t4/keys", content=b"{")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    refused(admin.post("/admin/v1/accounts/t4/keys", json={"name": 5}), "name",
            "'name' must be a string")
    # a NUL, which PostgreSQL cannot keep in text (a 500 there), is refused on every store
    refused(admin.post("/admin/v1/accounts", json={"account_id": "t6\x00"}), "account_id",
            "account 'account_id' must not contain the NUL character")
    refused(admin.post("/admin/v1/accounts/t4/keys", json={"name": "lap\x00top"}), "name",
            "key 'name' must not contain the NUL character")
    assert admin.get("/admin/v1/accounts/t6%00").status_code == 404
    assert admin.get("/admin/v1/accounts", params={"query": "t\x00"}).json()["data"] == []
    refused(admin.patch("/admin/v1/accounts/t4", json={"limits": {"tokens_per_day": "²"}}),
            "limits", "must be a whole number from 0 to")     # was int()'s own message
    r = admin.post("/admin/v1/accounts/t4/keys", json={"limits": {"tokens_per_day": -1}})
    assert r.json()["error"]["code"] == "unprocessable_request"
    assert admin.get("/admin/v1/accounts/t4/keys").json()["data"] == []


@pytest.mark.redis
def test_failed_admin_authentications_are_counted_across_replicas(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    """With the counters in Redis, a guesser that spreads its tries over two replicas
    is refused after the rate of one; an address that failed nowhere is not."""
    stacks = [start_stack(make_settings(
        tmp_path / name, admin={"token": ADMIN_TOKEN, "failed_auth_per_minute": 4},
        counters={"backend": "redis", "redis_url": redis_url, "prefix": redis_prefix}))
        for name in ("a", "b")]
    good = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        urls = [s.stack.admin_url + "/admin/v1/accounts" for s in stacks]
        for url in (*urls, *urls):        # two failures on each replica
            r = httpx.get(url, headers={"authorization": "Bearer guess-guess-guess"})
            assert r.status_code == 401, r.text
        for url in urls:
            r = httpx.get(url, headers=good)
            assert r.status_code == 429, r.text
            assert 1 <= int(r.headers["retry-after"]) <= 120
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with other:
            assert other.get(urls[0], headers=good).status_code == 200
    finally:
        for s in stacks:
            s.stop()


def test_failed_auth_throttle_counts_locally_while_the_shared_counters_are_away(
        caplog: pytest.LogCaptureFixture) -> None:
    from distillguard.config import CounterSettings
    from distillguard.gateway.adminauth import FailedAuthThrottle
    from distillguard.ratelimit import RedisCounterStore
    from distillguard.serve import free_port

    away = RedisCounterStore(CounterSettings(backend="redis",
                                             redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    throttle = FailedAuthThrottle(2, away)

    async def go() -> None:
        assert not await throttle.blocked("a")
        await throttle.failed("a")
        await throttle.failed("a")
        assert await throttle.blocked("a") and not await throttle.blocked("b")
        await away.close()
    with caplog.at_level("WARNING", logger="distillguard.gateway"):
        asyncio.run(go())
    assert caplog.text.count("shared counters cannot be reached") == 1


@pytest.mark.parametrize("shared", ["memory", "redis"])
def test_guesses_sent_at_once_are_counted_one_by_one(shared: str, request: pytest.FixtureRequest
                                                     ) -> None:
    """The limit was checked (with Redis, awaited) before a failure was counted, so a
    burst of guesses all passed the check: with Redis counters 90 of 90 wrong tokens sent
    at once were answered 401, each one a guess tried. The right token among a burst
    past the limit is refused like the rest."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from distillguard.config import CounterSettings
    from distillguard.errors import DistillguardError
    from distillguard.gateway.adminauth import FailedAuthThrottle, check_admin
    from distillguard.ratelimit import MemoryCounterStore, RedisCounterStore

    store = (MemoryCounterStore() if shared == "memory" else RedisCounterStore(
        CounterSettings(backend="redis", redis_url=request.getfixturevalue("redis_url"),
                        prefix=request.getfixturevalue("redis_prefix"))))

    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            await check_admin(request, ADMIN_TOKEN)
        except DistillguardError as exc:
            return PlainTextResponse(type(exc).__name__, status_code=exc.status)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/admin", endpoint)])
    app.state.failed_auth = FailedAuthThrottle(10, store)

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            tokens = [f"guess-{i:06d}-xxxxxxxxxxxx" for i in range(90)]
            tokens[60] = ADMIN_TOKEN
            replies = await asyncio.gather(*(client.get(
                "/admin", headers={"authorization": f"Bearer {t}"}) for t in tokens))
        await store.close()
        return [r.status_code for r in replies]
    codes = asyncio.run(go())
    assert codes.count(401) == 10 and codes.count(429) == 80 and codes[60] == 429


def test_values_no_store_could_keep_are_refused_not_kept(admin: httpx.Client) -> None:
    """Each of these was a 500. A PATCH of 'extra' that was not an object was written
    all the same, and from then on every listing of accounts was a 500; a limit past 64
    bits, a time that overflows when moved to UTC and an offset past 64 bits failed in
    the store's driver; a limit under a misspelt name was kept and never applied."""
    assert admin.post("/admin/v1/accounts", json={"account_id": "acct_x"}).status_code == 201
    for body, param in (({"extra": [1, 2]}, "extra"), ({"extra": "x"}, "extra"),
                        ({"limits": {"requests_per_minute": 1e30}}, "limits"),
                        ({"limits": {"tokens_per_day": "9" * 30}}, "limits"),
                        ({"limits": {"request_per_minute": 5}}, "limits"),
                        ({"created_at": "9999-12-31T23:59:59-01:00"}, "created_at"),
                        ({"created_at": "0001-01-01T00:00:00+01:00"}, "created_at")):
        r = admin.patch("/admin/v1/accounts/acct_x", json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (body, r.text)
    r = admin.post("/admin/v1/accounts/acct_x/keys",
                   json={"expires_at": "9999-12-31T23:59:59-01:00"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "expires_at", r.text
    assert admin.post("/admin/v1/accounts/acct_x/keys", json={
        "limits": {"tokens_per_minute": 2**64}}).status_code == 422
    assert admin.get("/admin/v1/accounts", params={"offset": 10**20}).status_code == 400
    listed = admin.get("/admin/v1/accounts")
    assert listed.status_code == 200 and [a["account_id"] for a in listed.json()["data"]
                                          ] == ["acct_x"]
    assert admin.patch("/admin/v1/accounts/acct_x", json={"limits": {
        "tokens_per_day": 2**53 - 1}}).json()["limits"] == {"tokens_per_day": 2**53 - 1}


def test_fields_that_would_be_dropped_are_refused(stack: StackThread,
                                                  admin: httpx.Client) -> None:
    """A new key's misspelt expiry made a key that never expires, and a PATCH naming
    another account id changed this account as if the id had not been given; both are
    422 now, naming the field, and nothing is written."""
    admin.post("/admin/v1/accounts", json={"account_id": "fd"}).raise_for_status()
    for bad, param in (({"expires_in": 30}, "expires_in"),
                       ({"name": "ci", "expire_at": "2030-01-01T00:00:00Z"}, "expire_at")):
        r = admin.post("/admin/v1/accounts/fd/keys", json=bad)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param and "expires_at" in r.json()[
            "error"]["message"]
    assert admin.get("/admin/v1/accounts/fd/keys").json()["data"] == []
    r = admin.patch("/admin/v1/accounts/fd", json={"account_id": "other", "org": "Renamed"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "account_id"
    assert admin.get("/admin/v1/accounts/fd").json()["org"] is None
    assert admin.get("/admin/v1/accounts/other").status_code == 404
    # the same id is no change, and an unknown field names itself and what can change
    r = admin.patch("/admin/v1/accounts/fd", json={"account_id": "fd", "org": "Kept"})
    assert r.status_code == 200 and r.json()["org"] == "Kept"
    r = admin.patch("/admin/v1/accounts/fd", json={"orgg": "x"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "orgg"
    assert "payment_fingerprint" in r.json()["error"]["message"]
