"""What a client sends is not trusted either: the upstream gets the request the gateway
checked, metered and recorded, and nothing the gateway did not read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_gateway_upstream_data import Upstreamed


@pytest.fixture
def upstreamed(tmp_path: Path) -> Iterator[Upstreamed]:
    with Upstreamed.running(tmp_path, "acct_r", limits={"tiers": {"standard": {
            "requests_per_minute": 1000, "tokens_per_minute": 2000}}}) as gateway:
        yield gateway


def _sent_upstream(gw: Upstreamed) -> bytes:
    return next(body for path, _, body in reversed(gw.upstream.app.received)
                if path == "/v1/chat/completions")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def test_the_upstream_gets_the_body_the_gateway_read(upstreamed: Upstreamed) -> None:
    """The client's bytes went upstream as they came while the gateway checked and
    recorded its own reading of them. A body with a key twice (``"max_tokens": 5,
    "max_tokens": 1800``), or a number past 64 bits, meant what the gateway read only
    if the upstream's JSON parser read it the same way: one that keeps the first of two
    keys (or fails on them, or reads a large integer exactly) was given a request that
    no check, reservation or ledger entry saw. The upstream now gets the gateway's
    reading, written again."""
    gw = upstreamed
    raw = (b'{"model": "ok-1", "messages": [{"role": "user", "content": "hi"}], '
           b'"max_tokens": 5, "seed": 123456789012345678901234567890, "max_tokens": 1800}')
    r = gw.post(raw)
    assert r.status_code == 200, r.text
    sent = json.loads(_sent_upstream(gw), object_pairs_hook=_no_duplicate_keys)
    recorded = gw.recorded(r.headers["x-distillguard-exchange-id"]).request
    assert sent == recorded and sent["max_tokens"] == 1800
    assert sent["seed"] == recorded["seed"]


def test_a_completion_limit_the_gateway_cannot_read_is_refused(upstreamed: Upstreamed
                                                                ) -> None:
    """``"max_tokens": "5000"`` (or ``5000.0``, or ``true``) reserved no completion
    tokens, and the detector saw no large max_tokens, while an upstream that reads it
    leniently (pydantic's lax mode, as in vLLM) generated up to 5000. It is refused as
    OpenAI refuses it: 400, ``invalid_type``, naming the field."""
    gw = upstreamed
    client = openai.OpenAI(base_url=gw.stack.stack.base_url, api_key=gw.key, max_retries=0)
    chat = {"model": "ok-1", "messages": [{"role": "user", "content": "hi"}]}
    for param, value in [("max_tokens", "5000"), ("max_completion_tokens", 5000.0),
                         ("n", "4"), ("max_tokens", True)]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**chat, extra_body={param: value})  # type: ignore[call-overload]
        assert refused.value.code == "invalid_type", (param, value)
        assert isinstance(refused.value.body, dict) and refused.value.body["param"] == param
    ok = client.chat.completions.create(**chat, extra_body={"max_tokens": None})  # type: ignore[call-overload]
    assert ok.choices[0].message.content == "fine"


def test_every_completion_limit_of_a_request_is_reserved(upstreamed: Upstreamed) -> None:
    """Only ``max_completion_tokens`` was reserved when the key was there, even null or
    0, while vLLM generates ``max_completion_tokens or max_tokens``; and ``best_of``
    completions, all generated upstream, were reserved as ``n``. Each of these now
    holds more than the 2,000 tokens a minute of the account, and is refused before it
    is sent."""
    gw = upstreamed
    client = openai.OpenAI(base_url=gw.stack.stack.base_url, api_key=gw.key, max_retries=0)
    chat = {"model": "ok-1", "messages": [{"role": "user", "content": "hi"}]}
    for extra in ({"max_completion_tokens": None, "max_tokens": 5000},
                  {"max_completion_tokens": 0, "max_tokens": 5000},
                  {"max_completion_tokens": 10, "max_tokens": 5000}):
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(**chat, extra_body=extra)  # type: ignore[call-overload]
        assert refused.value.code == "request_too_large", extra
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model="ok-1", prompt="hi", max_tokens=1000, best_of=3)
    assert refused.value.code == "request_too_large"
    assert client.completions.create(model="ok-1", prompt="hi", max_tokens=500, best_of=3)
