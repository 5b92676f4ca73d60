"""Rate limits and quotas: the counter stores directly, then through the gateway."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from distillguard.config import CounterSettings
from distillguard.exchange import (
    IMAGE_TOKENS,
    IMAGE_TOKENS_LOW,
    Usage,
    prompt_token_estimate,
)
from distillguard.ratelimit import (
    CounterRequest,
    MemoryCounterStore,
    RedisCounterStore,
    _fmt_duration,
    tokens_to_reserve,
)
from distillguard.serve import StackThread
from tests.factories import ADMIN_TOKEN, make_settings, new_api_key, start_stack


@pytest.fixture(params=["memory", "redis"])
async def counters(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    if request.param == "memory":
        store = MemoryCounterStore()
    else:
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        store = RedisCounterStore(CounterSettings(backend="redis", redis_url=url,
                                                  prefix=prefix))
    yield store
    await store.close()


async def test_request_window_admits_exactly_the_limit(counters) -> None:  # type: ignore[no-untyped-def]
    now = 1_000_040.0  # 20 s into a minute window, previous window empty
    req = [CounterRequest("account:a:rpm:60", 5, 60, 1)]
    admitted = [(await counters.acquire(req, now)).admitted for _ in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    denied = await counters.acquire(req, now)
    # 40 s left in this window, then 12 s until 5 * (1 - f) + 1 <= 5 in the next one.
    assert denied.blocking == 0 and denied.states[0].reset_s == pytest.approx(52)


async def test_a_burst_past_the_connection_pool_is_counted_not_failed(counters) -> None:  # type: ignore[no-untyped-def]
    """Redis's client raised MaxConnectionsError past 100 look-ups at once, and a
    counter store that fails admits the request uncounted (``on_failure: open``): of
    300 requests at once, 200 went through unchecked. They now wait for a connection."""
    import asyncio

    req = [CounterRequest("account:burst:rpm:60", 10, 60, 1)]
    results = await asyncio.gather(*(counters.acquire(req, 2_000_010.0) for _ in range(300)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:1]
    assert sum(r.admitted for r in results) == 10


async def test_a_burst_on_a_busy_process_waits_for_redis_rather_than_failing_open(
        counters) -> None:  # type: ignore[no-untyped-def]
    """Past the pool's connections a look-up waited a second at most, and on a process
    busy serving a burst (1,000 requests at once) many waited longer, failed, and were
    admitted uncounted: 129 of them on a limit of 30. The wait is now long enough for
    the process's own backlog; only Redis itself not answering fails a look-up."""
    import asyncio
    import time

    async def busy() -> None:       # the event loop held by other requests' work
        for _ in range(8):
            time.sleep(0.25)
            await asyncio.sleep(0)

    req = [CounterRequest("account:busy:rpm:60", 30, 60, 1)]
    results = await asyncio.gather(
        busy(), *(counters.acquire(req, 3_000_010.0) for _ in range(600)),
        return_exceptions=True)
    errors = [r for r in results[1:] if isinstance(r, BaseException)]
    assert not errors, errors[:1]
    assert sum(r.admitted for r in results[1:]) == 30


async def test_sliding_window_weights_previous_window(counters) -> None:  # type: ignore[no-untyped-def]
    req = [CounterRequest("account:b:rpm:60", 10, 60, 1)]
    start = 6_000_000.0  # start of a window
    for _ in range(10):
        assert (await counters.acquire(req, start + 1)).admitted
    # A quarter into the next window 75% of the previous count still weighs: 7.5 used.
    later = start + 60 + 15
    results = [(await counters.acquire(req, later)).admitted for _ in range(4)]
    assert results == [True, True, False, False]


async def test_token_windows_check_then_charge(counters) -> None:  # type: ignore[no-untyped-def]
    now = 9_000_030.0
    check = [CounterRequest("key:k:tpm:60", 100, 60, 0)]
    assert (await counters.acquire(check, now)).admitted
    await counters.add([CounterRequest("key:k:tpm:60", 100, 60, 150)], now)
    result = await counters.acquire(check, now)
    assert not result.admitted and result.states[0].usage == 150


async def test_any_counter_refusing_charges_none(counters) -> None:  # type: ignore[no-untyped-def]
    now = 12_000_010.0
    key_rpm = CounterRequest("key:k2:rpm:60", 100, 60, 1)
    acct_rpm = CounterRequest("account:a2:rpm:60", 1, 60, 1)
    assert (await counters.acquire([key_rpm, acct_rpm], now)).admitted
    refused = await counters.acquire([key_rpm, acct_rpm], now)
    assert not refused.admitted and refused.blocking == 1
    alone = await counters.acquire([key_rpm], now)
    assert alone.states[0].usage == 2  # the refused request was not counted


def test_reset_format() -> None:
    assert _fmt_duration(0.2) == "1s"
    assert _fmt_duration(360) == "6m0s"
    assert _fmt_duration(3723) == "1h2m3s"


def test_gateway_429_with_headers_and_quota(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, limits={"tiers": {"standard": {
        "requests_per_minute": 3, "tokens_per_minute": None, "tokens_per_day": None}}})
    stack = start_stack(settings)
    try:
        admin = httpx.Client(base_url=stack.stack.admin_url,
                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        admin.post("/admin/v1/accounts", json={"account_id": "a1"}).raise_for_status()
        key = admin.post("/admin/v1/accounts/a1/keys", json={}).json()["key"]
        body = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"authorization": f"Bearer {key}"}
        codes = [httpx.post(stack.stack.base_url + "/chat/completions", json=body,
                            headers=auth).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = httpx.post(stack.stack.base_url + "/chat/completions", json=body, headers=auth)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "requests per minute" in r.json()["error"]["message"]
        # The official client sees a RateLimitError.
        client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**body)

        # An account id may hold ':' (org:team:7), as the counter keys do around it: the
        # limit kind was read from the key's third part, so such an account had no
        # x-ratelimit-* headers and its refusal was a 500 instead of a 429.
        admin.post("/admin/v1/accounts", json={"account_id": "org:team:7"}
                   ).raise_for_status()
        colon = admin.post("/admin/v1/accounts/org:team:7/keys", json={}).json()["key"]
        answers = [httpx.post(stack.stack.base_url + "/chat/completions", json=body,
                              headers={"authorization": f"Bearer {colon}"})
                   for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
        assert "requests per minute" in answers[3].json()["error"]["message"]

        # An account limit of null is no override, the tier's limit: it lifted the limit.
        admin.post("/admin/v1/accounts", json={"account_id": "a3", "limits": {
            "requests_per_minute": None}}).raise_for_status()
        key3 = admin.post("/admin/v1/accounts/a3/keys", json={}).json()["key"]
        codes = [httpx.post(stack.stack.base_url + "/chat/completions", json=body,
                            headers={"authorization": f"Bearer {key3}"}).status_code
                 for _ in range(4)]
        assert codes == [200, 200, 200, 429]

        # A daily token quota on a key: once spent, the key is refused with insufficient_quota.
        admin.post("/admin/v1/accounts", json={"account_id": "a2"}).raise_for_status()
        key2 = admin.post("/admin/v1/accounts/a2/keys",
                          json={"limits": {"tokens_per_day": 30}}).json()["key"]
        auth2 = {"authorization": f"Bearer {key2}"}
        first = httpx.post(stack.stack.base_url + "/chat/completions", json=body, headers=auth2)
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 30
        stack.call(stack.stack.gateway.settle())
        r = httpx.post(stack.stack.base_url + "/chat/completions", json=body, headers=auth2)
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    finally:
        stack.stop()


@pytest.mark.parametrize("mode,status", [("open", 200), ("closed", 503)])
def test_counter_store_down_fails_open_or_closed(tmp_path: Path, mode: str, status: int
                                                 ) -> None:
    from distillguard.serve import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = make_settings(tmp_path, counters={"backend": "redis", "redis_url": dead,
                                                 "on_failure": mode})
    stack = start_stack(settings)
    try:
        admin = httpx.Client(base_url=stack.stack.admin_url,
                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        admin.post("/admin/v1/accounts", json={"account_id": "a1"}).raise_for_status()
        key = admin.post("/admin/v1/accounts/a1/keys", json={}).json()["key"]
        r = httpx.post(stack.stack.base_url + "/chat/completions", timeout=10,
                       headers={"authorization": f"Bearer {key}"},
                       json={"model": "demo-chat-1",
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == status
        if status == 503:
            assert r.json()["error"]["code"] == "service_unavailable"
    finally:
        stack.stop()


def test_a_token_quota_holds_what_requests_may_use_while_they_run(tmp_path: Path) -> None:
    """Only the usage already charged was checked, so requests admitted at once each ran
    past a token quota (40 at once spent 9,420 tokens of a 3,000-a-minute limit). A
    request now holds its prompt and the completion it allows (max_tokens times n)
    against its token windows while it runs, and gives back what it did not use."""
    import asyncio

    from tests.fault_upstream import FaultyUpstreamThread

    async def run(stack: StackThread, key: str) -> None:
        client = openai.AsyncOpenAI(base_url=stack.stack.base_url, api_key=key,
                                    max_retries=0)

        async def ask(max_tokens: int, n: int = 1) -> object:
            try:        # "slow": every answer takes 3 s, so all ten are checked at once
                return await client.chat.completions.create(
                    model="slow", max_tokens=max_tokens, n=n,
                    messages=[{"role": "user", "content": "Explain recursion."}])
            except openai.RateLimitError as exc:
                return exc
        outcomes = await asyncio.gather(*(ask(300) for _ in range(10)))
        served = [o for o in outcomes if not isinstance(o, Exception)]
        assert len(served) == 3, outcomes            # 3 x (300 + prompt) fit in 1,000
        assert sum(isinstance(o, openai.RateLimitError) for o in outcomes) == 7
        stack.call(stack.stack.gateway.settle())
        # what the three did not use is given back: another 300 fits again
        assert not isinstance(await ask(300), Exception)
        # a request allowing more than the whole window is refused before it runs, as
        # one no wait admits: it said "retry after" the window's reset, and the official
        # client retried it
        too_large = await ask(400, n=3)
        assert isinstance(too_large, openai.RateLimitError)
        assert too_large.code == "request_too_large" and "1000" in too_large.message
        assert too_large.response.headers["x-should-retry"] == "false"
        assert "retry-after" not in too_large.response.headers
        await client.close()

    with FaultyUpstreamThread() as upstream:
        settings = make_settings(tmp_path, upstream={"base_url": upstream.url}, limits={
            "tiers": {"standard": {"requests_per_minute": 1000, "tokens_per_minute": 1000,
                                   "tokens_per_day": None}}})
        stack = start_stack(settings)
        try:
            asyncio.run(run(stack, new_api_key(stack, "acct_q")))
        finally:
            stack.stop()


def test_a_reservation_takes_the_largest_limit_and_sample_count() -> None:
    """Upstreams differ on which of two limits wins (vLLM: ``max_completion_tokens or
    max_tokens``); a null or 0 ``max_completion_tokens`` beside a large ``max_tokens``
    reserved nothing. ``best_of`` samples are all generated."""
    hi = {"messages": [{"role": "user", "content": "abcd"}]}      # 1 token
    assert tokens_to_reserve({**hi, "max_completion_tokens": None, "max_tokens": 900}) == 901
    assert tokens_to_reserve({**hi, "max_completion_tokens": 0, "max_tokens": 900}) == 901
    assert tokens_to_reserve({**hi, "max_completion_tokens": 90, "max_tokens": 900}) == 901
    assert tokens_to_reserve({**hi, "max_completion_tokens": 900, "max_tokens": 90}) == 901
    assert tokens_to_reserve({"prompt": "abcd", "max_tokens": 10, "n": 2, "best_of": 5}) == 51
    assert tokens_to_reserve({**hi, "max_tokens": 10, "n": 3}) == 31
    assert tokens_to_reserve({**hi, "max_tokens": 10, "n": 0}) == 11
    assert tokens_to_reserve({**hi, "max_tokens": -10}) == 1
    assert tokens_to_reserve(hi) == 1


def test_a_prompt_estimate_counts_what_the_model_reads() -> None:
    """The estimate behind the token reservation (and the usage charged when the
    upstream reports none) counted only message text: an 80,000-character tool schema
    was 76 tokens, a prompt of token ids or an image nothing."""
    schema = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "description": "x" * 80_000}}}
    text_only = {"messages": [{"role": "user", "content": "hello there"}]}
    assert prompt_token_estimate(text_only) == 3              # 11 characters / 4, up
    with_tools = {**text_only, "tools": [schema]}
    assert prompt_token_estimate(with_tools) >= 20_000
    assert tokens_to_reserve({**with_tools, "max_tokens": 10}) == (
        prompt_token_estimate(with_tools) + 10)
    # a completion prompt of token ids: one token each, in one list or several
    assert prompt_token_estimate({"prompt": list(range(5000))}) == 5000
    assert prompt_token_estimate({"prompt": [[1, 2, 3], [4, 5]]}) == 5
    assert prompt_token_estimate({"input": [[7] * 40]}) == 40
    assert prompt_token_estimate({"input": ["abcd", "efgh"]}) == 2
    # images: a fixed count per image, less at low detail
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "abcd"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]}]}
    assert prompt_token_estimate(image) == 1 + IMAGE_TOKENS + IMAGE_TOKENS_LOW
    # earlier tool calls and their results are read too
    calls = {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type":
         "function", "function": {"name": "f", "arguments": "y" * 4000}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
    assert prompt_token_estimate(calls) > 1000
    # odd bodies are not an error: what can be read is counted
    assert prompt_token_estimate({"messages": "x", "tools": 5, "prompt": [1, "a"]}) == 1
    assert prompt_token_estimate(None) == prompt_token_estimate([1, 2]) == 0
    assert Usage.estimate(with_tools, None).prompt_tokens == prompt_token_estimate(with_tools)


def test_the_reservation_and_detection_read_one_completion_allowance() -> None:
    """The token reservation and detection's harvest features read a request's
    completion limit and sample count in one place, as a lenient upstream reads them."""
    from distillguard.detect.features import extract
    from distillguard.exchange import requested_completion
    from tests.factories import make_exchange

    cases = [
        ({"max_tokens": 90, "max_completion_tokens": 900, "n": 2, "best_of": 5}, (900, 5)),
        ({"max_tokens": "8000"}, (8000, 1)),
        ({"max_completion_tokens": 8000.0, "n": 3.0}, (8000, 3)),
        ({"max_tokens": -10, "n": -3}, (0, 1)),
        ({"max_tokens": True, "n": "many", "best_of": None}, (0, 1)),
        ({}, (0, 1)),
    ]
    for fields, expected in cases:
        assert requested_completion(fields) == expected, fields
        request = {"messages": [{"role": "user", "content": "abcd"}], **fields}
        limit, samples = expected
        assert tokens_to_reserve(request) == tokens_to_reserve(
            {"messages": request["messages"]}) + limit * samples
        ex = make_exchange("abcd")
        ex.request.pop("max_tokens", None)
        ex.request.update(fields)
        features = extract(ex)
        assert (features.max_tokens, features.n) == expected, fields
    assert requested_completion(["not", "a", "request"]) == (0, 1)
