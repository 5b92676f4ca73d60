"""The OpenAI-compatible surface, driven by the official openai client and by plain HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import pytest

from distillguard.serve import StackThread


def _client(stack: StackThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)


def test_chat_non_streaming_matches_upstream(stack: StackThread, account_key: tuple[str, str]
                                             ) -> None:
    _, key = account_key
    body = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 50}
    via_gateway = httpx.post(stack.stack.base_url + "/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"})
    direct = httpx.post(f"http://127.0.0.1:{stack.stack.demo_port}/v1/chat/completions",
                        json=body)
    assert via_gateway.status_code == 200
    a, b = via_gateway.json(), direct.json()
    a.pop("created"), b.pop("created")
    assert a == b  # passed through unchanged
    assert via_gateway.headers["x-ratelimit-limit-requests"] == "600"
    assert int(via_gateway.headers["x-ratelimit-remaining-requests"]) <= 599
    assert via_gateway.headers["x-distillguard-exchange-id"].startswith("ex_")


def test_streaming_chat_with_and_without_include_usage(
    stack: StackThread, account_key: tuple[str, str]
) -> None:
    _, key = account_key
    client = _client(stack, key)
    messages = [{"role": "user", "content": "Tell me a story"}]
    chunks = list(client.chat.completions.create(model="demo-chat-1", messages=messages,
                                                 stream=True, max_tokens=40))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # The gateway asked upstream for usage to meter the stream, but the client did not
    # ask for it, so no usage-only chunk reaches the client.
    assert all(c.choices for c in chunks)
    full = client.chat.completions.create(model="demo-chat-1", messages=messages,
                                          max_tokens=40)
    assert full.choices[0].message.content == text

    chunks = list(client.chat.completions.create(
        model="demo-chat-1", messages=messages, stream=True, max_tokens=40,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_embeddings_and_models(stack: StackThread, account_key: tuple[str, str]
                                           ) -> None:
    _, key = account_key
    client = _client(stack, key)
    comp = client.completions.create(model="demo-instruct-1", prompt="Once upon", max_tokens=8)
    assert comp.choices[0].text and comp.usage.completion_tokens <= 8
    emb = client.embeddings.create(model="demo-embed-1", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64
    models = {m.id for m in client.models.list()}
    assert {"demo-chat-1", "demo-embed-1", "demo-reasoner-1"} <= models
    assert client.models.retrieve("demo-chat-1").id == "demo-chat-1"


def test_curl_style_streaming_sse_ends_with_done(stack: StackThread,
                                                 account_key: tuple[str, str]) -> None:
    _, key = account_key
    with httpx.stream("POST", stack.stack.base_url + "/chat/completions",
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "demo-chat-1", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    first = orjson.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk"


def test_health_ready_and_metrics(stack: StackThread, account_key: tuple[str, str]) -> None:
    _, key = account_key
    base = stack.stack.base_url.removesuffix("/v1")
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    ready = httpx.get(base + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    _client(stack, key).chat.completions.create(
        model="demo-chat-1", messages=[{"role": "user", "content": "x"}])
    httpx.post(stack.stack.base_url + "/chat/completions", json={})  # 401
    stack.call(stack.stack.gateway.settle())
    metrics = httpx.get(base + "/metrics")
    assert metrics.headers["x-content-type-options"] == "nosniff"
    assert ready.headers["x-content-type-options"] == "nosniff"
    text = metrics.text
    assert 'distillguard_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'status="401"' in text
    assert "distillguard_request_duration_seconds_bucket" in text
    assert "distillguard_event_loop_lag_seconds_bucket" in text


async def test_a_held_event_loop_shows_in_the_loop_lag_metric(
        caplog: pytest.LogCaptureFixture) -> None:
    """While anything holds the gateway's event loop, every request waits, and nothing
    in a request's own timings says why: an index insert that built its statement on
    the loop held it for 200 ms at a time. The loop's lag is observed by a timer."""
    from prometheus_client import CollectorRegistry

    from distillguard.metrics import LOOP_STALL_WARN_S, LoopLag

    registry = CollectorRegistry()
    lag = LoopLag(registry, interval_s=0.01)
    lag.start()
    await asyncio.sleep(0.05)          # a few quick timers first
    with caplog.at_level("WARNING", logger="distillguard.gateway"):
        time.sleep(LOOP_STALL_WARN_S + 0.1)         # something holds the loop
        await asyncio.sleep(0.05)
    await lag.stop()
    count = registry.get_sample_value("distillguard_event_loop_lag_seconds_count")
    quick = registry.get_sample_value("distillguard_event_loop_lag_seconds_bucket",
                                      {"le": "0.25"})
    assert count is not None and quick is not None and count > quick >= 1
    below_stall = registry.get_sample_value("distillguard_event_loop_lag_seconds_bucket",
                                            {"le": str(LOOP_STALL_WARN_S)})
    assert below_stall is not None and below_stall < count    # one lag past the stall
    assert "the event loop was held for" in caplog.text
    await lag.stop()                   # stopping twice is harmless
