"""Losing Redis or PostgreSQL for a moment degrades as configured, and recovers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from distillguard.serve import free_port
from tests.factories import (
    ADMIN_TOKEN,
    make_settings,
    new_api_key,
    start_recorded_stack,
    start_stack,
)
from tests.tcp_proxy import CuttableProxy

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

CHAT = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5}


def test_redis_and_postgres_outages_fail_open(tmp_path: Path, pg_url: str,
                                              redis_prefix: str) -> None:
    pg = CuttableProxy(5432).start()
    redis = CuttableProxy(6379).start()
    proxied_pg = pg_url.replace(":5432/", f":{pg.port}/")
    settings = make_settings(
        tmp_path, state={"url": proxied_pg, "on_failure": "open"},
        counters={"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
                  "prefix": redis_prefix, "on_failure": "open"},
        limits={"tiers": {"standard": {"requests_per_minute": 1000}}})
    stack, recorder = start_recorded_stack(settings)
    try:
        admin = httpx.Client(base_url=stack.stack.admin_url, timeout=10,
                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        admin.post("/admin/v1/accounts", json={"account_id": "o1"}).raise_for_status()
        key = admin.post("/admin/v1/accounts/o1/keys", json={}).json()["key"]
        other = admin.post("/admin/v1/accounts/o1/keys", json={}).json()["key"]
        auth = {"authorization": f"Bearer {key}"}

        def call(k: dict[str, str] = auth) -> httpx.Response:
            return httpx.post(stack.stack.base_url + "/chat/completions", json=CHAT,
                              headers=k, timeout=15)

        assert call().status_code == 200

        redis.cut()
        codes = [call().status_code for _ in range(5)]
        assert codes == [200] * 5  # limits not enforced while Redis is gone (fail-open)
        assert stack.stack.gateway.pipeline.checks[0].failures >= 5
        redis.restore()
        time.sleep(1.2)
        r = call()
        assert r.status_code == 200 and "x-ratelimit-remaining-requests" in r.headers

        pg.cut()
        time.sleep(0.6)  # past the key cache TTL: look-ups now reach the dead store
        assert call().status_code == 200  # a key seen recently keeps working
        r = call({"authorization": f"Bearer {other}"})  # never looked up by this replica
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        pg.restore()
        deadline = time.time() + 10
        while call({"authorization": f"Bearer {other}"}).status_code != 200:
            assert time.time() < deadline, "did not recover after PostgreSQL came back"
            time.sleep(0.2)
        stack.call(stack.stack.gateway.settle())
        statuses = [e.status for e in recorder.exchanges]
        assert statuses.count(200) >= 9 and 503 in statuses
    finally:
        stack.stop()
        pg.close()
        redis.close()


def test_postgres_outage_fail_closed_refuses(tmp_path: Path, pg_url: str) -> None:
    pg = CuttableProxy(5432).start()
    settings = make_settings(tmp_path, state={"url": pg_url.replace(":5432/", f":{pg.port}/"),
                                              "on_failure": "closed"})
    stack, _ = start_recorded_stack(settings)
    try:
        auth = {"authorization": f"Bearer {new_api_key(stack, 'c1')}"}
        url = stack.stack.base_url + "/chat/completions"
        assert httpx.post(url, json=CHAT, headers=auth).status_code == 200
        pg.cut()
        time.sleep(0.6)
        r = httpx.post(url, json=CHAT, headers=auth, timeout=15)
        assert r.status_code == 503
        pg.restore()
    finally:
        stack.stop()
        pg.close()


def _ready_as_served(on_failure: str, check: str, served: httpx.Response,
                     ready: httpx.Response) -> None:
    """With a backing service away: ``closed`` refuses the request and the replica is
    not ready; ``open`` serves it and stays ready. The check names the service either
    way."""
    assert ready.json()["checks"][check] is False
    if on_failure == "closed":
        assert served.status_code == 503
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
    else:
        assert served.status_code == 200
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


@pytest.mark.parametrize("on_failure", ["closed", "open"])
def test_ready_says_whether_requests_can_pass_the_counters(tmp_path: Path,
                                                           on_failure: str) -> None:
    """/ready did not look at Redis: with ``counters.on_failure: closed`` and Redis away,
    every request was refused with 503 while /ready answered 200, so a load balancer kept
    sending traffic to a replica that could serve none of it. With ``open`` requests
    pass (unlimited), so the replica stays ready; the check says Redis is away."""
    settings = make_settings(tmp_path, counters={
        "backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        "on_failure": on_failure})
    stack = start_stack(settings)
    try:
        key = new_api_key(stack, "r1")
        served = httpx.post(stack.stack.base_url + "/chat/completions", json=CHAT,
                            headers={"authorization": f"Bearer {key}"}, timeout=15)
        ready = httpx.get(stack.stack.base_url.removesuffix("/v1") + "/ready", timeout=15)
        _ready_as_served(on_failure, "counters", served, ready)
    finally:
        stack.stop()


@pytest.mark.parametrize("on_failure", ["closed", "open"])
def test_ready_says_whether_requests_can_pass_the_state_store(tmp_path: Path, pg_url: str,
                                                              on_failure: str) -> None:
    """/ready answered 503 whenever the state store was away, also with
    ``state.on_failure: open``, where the replica goes on serving the keys it looked up
    lately: every replica shares the store, so a load balancer took them all out and
    served nothing. Now only ``closed`` makes the replica not ready; the check says the
    store is away either way."""
    pg = CuttableProxy(5432).start()
    settings = make_settings(tmp_path, state={"url": pg_url.replace(":5432/", f":{pg.port}/"),
                                              "on_failure": on_failure})
    stack, _ = start_recorded_stack(settings)
    ready_url = stack.stack.base_url.removesuffix("/v1") + "/ready"
    try:
        auth = {"authorization": f"Bearer {new_api_key(stack, 'r2')}"}
        url = stack.stack.base_url + "/chat/completions"
        assert httpx.post(url, json=CHAT, headers=auth).status_code == 200
        assert httpx.get(ready_url, timeout=15).status_code == 200
        pg.cut()
        time.sleep(0.6)             # past the key cache TTL
        served = httpx.post(url, json=CHAT, headers=auth, timeout=15)
        ready = httpx.get(ready_url, timeout=15)
        _ready_as_served(on_failure, "state_store", served, ready)
        pg.restore()
    finally:
        stack.stop()
        pg.close()
