"""What an upstream sends is not trusted: usage counts out of range and stream chunks of
odd shapes still end as one recorded exchange, and the client still gets the answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from distillguard.exchange import Exchange
from distillguard.serve import StackThread
from tests.factories import ADMIN_TOKEN, Recorder, make_settings, new_api_key, start_recorded_stack
from tests.fault_upstream import STREAMS, FaultyUpstreamThread


class Upstreamed:
    """A running gateway in front of the faulty upstream, its recorder and admin API, and
    a key of account ``acct_u``."""

    def __init__(self, stack: StackThread, recorder: Recorder, key: str,
                 upstream: FaultyUpstreamThread) -> None:
        self.stack, self.recorder, self.key = stack, recorder, key
        self.upstream = upstream
        self.admin = httpx.Client(base_url=stack.stack.admin_url, timeout=10,
                                  headers={"authorization": f"Bearer {ADMIN_TOKEN}"})

    @classmethod
    @contextmanager
    def running(cls, tmp_path: Path, account_id: str, **settings: Any
                ) -> Iterator[Upstreamed]:
        """A gateway with ``settings`` in front of a faulty upstream, and a key of
        ``account_id``, for the duration of the block."""
        with FaultyUpstreamThread() as upstream:
            options = make_settings(tmp_path, upstream={
                "base_url": upstream.url, **settings.pop("upstream", {})}, **settings)
            stack, recorder = start_recorded_stack(options)
            try:
                gateway = cls(stack, recorder, new_api_key(stack, account_id), upstream)
                yield gateway
                gateway.admin.close()
            finally:
                stack.stop()

    def post(self, body: dict[str, Any] | bytes) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return httpx.post(self.stack.stack.base_url + "/chat/completions", content=content,
                          headers={"authorization": f"Bearer {self.key}",
                                   "content-type": "application/json"}, timeout=10)

    def stream(self, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
        with httpx.stream("POST", self.stack.stack.base_url + "/chat/completions",
                          json={**body, "stream": True}, timeout=10,
                          headers={"authorization": f"Bearer {self.key}"}) as r:
            return r, r.read()

    def recorded(self, exchange_id: str) -> Exchange:
        deadline = time.monotonic() + 10
        while True:
            for ex in self.recorder.exchanges:
                if ex.id == exchange_id:
                    return ex
            assert time.monotonic() < deadline, f"{exchange_id} was never recorded"
            time.sleep(0.02)

    def ledger_entry(self, exchange_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while True:
            r = self.admin.get(f"/admin/v1/ledger/entries/{exchange_id}")
            if r.status_code == 200:
                return r.json()["entry"]  # type: ignore[no-any-return]
            assert r.status_code == 404, r.text
            assert time.monotonic() < deadline, f"{exchange_id} never reached the ledger"
            time.sleep(0.02)


@pytest.fixture
def upstreamed(tmp_path: Path) -> Iterator[Upstreamed]:
    with Upstreamed.running(tmp_path, "acct_u",
                            upstream={"max_response_bytes": 1024 * 1024}) as gateway:
        yield gateway


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_usage_counts_out_of_range_are_not_believed(upstreamed: Upstreamed) -> None:
    """An upstream that reported ``usage.prompt_tokens: 1e300`` (streamed or not) got its
    exchange refused by the ledger ("Integer exceeds 64-bit range"), so it was missing
    from the tamper-evident record, and the account was charged 1e300 tokens: every later
    request was a 429 quoting a 300-digit count. A count that is not a whole number from
    0 to 2**53 - 1 is now not believed: the exchange is charged the estimate, as one
    without usage is, marked ``usage_invalid``, and recorded."""
    gw = upstreamed
    plain = gw.post(chat("usage-huge"))
    assert plain.status_code == 200 and plain.json()["usage"]["prompt_tokens"] == 1e300
    streamed, data = gw.stream(chat("usage-huge-stream"))
    assert streamed.status_code == 200 and data.endswith(b"data: [DONE]\n\n")
    negative = gw.post(chat("usage-negative"))
    assert negative.status_code == 200
    for r in (plain, streamed, negative):
        exchange_id = r.headers["x-distillguard-exchange-id"]
        ex = gw.recorded(exchange_id)
        assert ex.usage is not None and ex.annotations.get("usage_invalid"), ex.annotations
        assert ex.annotations["usage_estimated"]
        # "hi" is 1 token by the estimate; "fine" 1, "partial " 2
        assert ex.usage.prompt_tokens == 1 and ex.usage.completion_tokens in (1, 2)
        entry = gw.ledger_entry(exchange_id)
        assert entry["usage"]["prompt_tokens"] == 1 and entry["status"] == 200
    # the account was charged a few tokens, not 1e300: it is not locked out
    client = openai.OpenAI(base_url=gw.stack.stack.base_url, api_key=gw.key, max_retries=0)
    answer = client.chat.completions.create(model="ok-1", messages=[{"role": "user",
                                                                     "content": "x"}])
    assert answer.choices[0].message.content == "fine"


def _events(data: bytes) -> list[bytes]:
    return [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]


@pytest.mark.parametrize("model", ["index-mixed", "index-list", "tools-not-list",
                                   "function-not-object", "tool-index-mixed",
                                   "delta-text", "delta-list"])
def test_a_stream_of_odd_chunks_is_relayed_and_recorded(upstreamed: Upstreamed,
                                                        model: str) -> None:
    """A stream whose chunks mixed ``choices[].index`` 0 and "1" (or tool-call indexes 0
    and "x", an index ``[0]``, ``tool_calls: 5``, ``function: "f"``, a delta ``"b"`` or
    ``[1]``, which also broke the countermeasures' stream filter) made reassembling
    the completion raise: the client's stream was cut without an error event or [DONE],
    and the exchange was never recorded, so the ledger lost it. The client now gets the
    upstream's events as sent, and the exchange is recorded with what could be read."""
    gw = upstreamed
    r, data = gw.stream(chat(model))
    assert r.status_code == 200
    events = _events(data)
    assert events[-1] == b"[DONE]", data
    # every upstream event passes unchanged, and the gateway adds no error event
    sent = [orjson.loads(e) for e in events[:-1]]
    assert sent[:len(STREAMS[model])] == STREAMS[model]
    assert all("error" not in e for e in sent)
    exchange_id = r.headers["x-distillguard-exchange-id"]
    ex = gw.recorded(exchange_id)
    assert ex.status == 200 and ex.error_code is None
    assert isinstance(ex.response, dict) and ex.response["choices"]
    assert ex.annotations["stream_items_skipped"] == 1    # the odd item, left out
    entry = gw.ledger_entry(exchange_id)
    assert entry["status"] == 200 and entry["response_sha256"] == ex.response_sha256


@pytest.mark.parametrize("model", ["redirect-307", "redirect-302"])
def test_a_redirect_of_the_upstream_is_not_followed(upstreamed: Upstreamed,
                                                    model: str) -> None:
    """The upstream client followed redirects: an upstream answering 307 (or 302) with a
    ``Location`` of its choosing had the gateway send the request (with the upstream's
    credentials) there, and whatever answered, an internal address only the gateway's
    host can reach, went back to the client as the model's answer. A redirect is now a
    502 ``upstream_redirect``, recorded, and nothing is fetched from its target."""
    gw = upstreamed
    r = gw.post(chat(model))
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_redirect"
    assert "only-for-the-gateway-host" not in r.text
    assert all(path != "/internal" for path, _, _ in gw.upstream.app.received)
    ex = gw.recorded(r.headers["x-distillguard-exchange-id"])
    assert ex.status == 502 and ex.error_code == "upstream_redirect"


def test_an_answer_larger_than_the_limit_is_cut_off(upstreamed: Upstreamed) -> None:
    """The gateway read an upstream's answer whole, however long (and a stream's event
    until its blank line, however long): an upstream sending without end filled the
    gateway's memory. Past ``upstream.max_response_bytes`` (1 MiB here; the upstream
    sends 4) a plain answer is a 502 and a stream ends with an error event, both
    ``upstream_response_too_large`` and recorded."""
    gw = upstreamed
    plain = gw.post(chat("huge-body"))
    assert plain.status_code == 502, plain.status_code
    assert plain.json()["error"]["code"] == "upstream_response_too_large"
    ex = gw.recorded(plain.headers["x-distillguard-exchange-id"])
    assert ex.status == 502 and ex.error_code == "upstream_response_too_large"
    streamed, data = gw.stream(chat("huge-event"))
    assert streamed.status_code == 200 and len(data) < 1024 * 1024
    last = orjson.loads(_events(data)[-1])
    assert last["error"]["code"] == "upstream_response_too_large"
    ex = gw.recorded(streamed.headers["x-distillguard-exchange-id"])
    assert ex.error_code == "upstream_response_too_large"


def test_events_split_anywhere_are_cut_where_they_end() -> None:
    """However the upstream's reads split a stream (a separator ``\\r\\n\\r\\n`` or
    ``\\n\\n`` across two reads included), the relay hands out the same events."""
    from distillguard.gateway.streaming import SSERelay

    stream = (b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
              b': keep-alive\r\n\r\n'
              b'data: {"choices": [{"index": 0, "delta": {"content": "b"}}]}\r\n\r\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n'
              b"data: [DONE]\n\n")
    whole = SSERelay(drop_usage_event=False)
    expected = whole.feed(stream)
    assert len(expected) == 5 and b"".join(expected) == stream
    for size in (1, 2, 3, 5, 7):
        relay = SSERelay(drop_usage_event=False)
        got = []
        for i in range(0, len(stream), size):
            got += relay.feed(stream[i:i + size])
        assert got == expected and relay.flush() == b"", size
        assert relay.done and relay.assembled() == whole.assembled()


@pytest.mark.parametrize("ends", [[b"\r\r"] * 5, [b"\n\r\n", b"\r\n\n", b"\r\r\n", b"\n\r",
                                                   b"\r\r\n"]])
def test_events_that_end_in_carriage_returns_are_cut_too(ends: list[bytes]) -> None:
    """The standard ends an SSE line with CRLF, LF or CR, mixed as a server likes; events
    ended by CR CR or LF CRLF were never cut, so the stream was held whole and its usage
    never read (the answer went out only when the upstream closed)."""
    from distillguard.gateway.streaming import SSERelay

    events = [b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}', b": ping",
              b'data: {"choices": [{"index": 0, "delta": {"content": "b"}}]}',
              b'data: {"choices": [], "usage": {"prompt_tokens": 1}}', b"data: [DONE]"]
    stream = b"".join(e + end for e, end in zip(events, ends, strict=True))
    for size in (1, 2, 3, 7, len(stream)):
        relay = SSERelay(drop_usage_event=False)
        got: list[bytes] = []
        for i in range(0, len(stream), size):
            got += relay.feed(stream[i:i + size])
        # a CR last in the stream may be half of a CRLF until the upstream closes
        got += [rest] if (rest := relay.flush()) else []
        assert len(got) == 5 and b"".join(got) == stream, size
        assert relay.usage == {"prompt_tokens": 1} and relay.done
        assert relay.assembled()["choices"][0]["message"]["content"] == "ab"
