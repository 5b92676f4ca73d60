"""Every failure a client can meet gets the OpenAI error body and the right status."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from distillguard.serve import StackThread
from tests.factories import (
    ADMIN_TOKEN,
    Recorder,
    make_settings,
    new_api_key,
    start_recorded_stack,
    start_stack,
)
from tests.fault_upstream import FaultyUpstreamThread

UPSTREAM_KEY = "sk-upstream-0123456789abcdef"


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[StackThread, Recorder, str]]:
    with FaultyUpstreamThread() as upstream:
        settings = make_settings(
            tmp_path,
            upstream={"base_url": upstream.url, "timeout_s": 0.5,
                      "api_key": UPSTREAM_KEY},
            server={"max_body_bytes": 10_000, "trusted_proxies": ["127.0.0.0/8"]},
            limits={"tiers": {"standard": {"requests_per_minute": 1000}}},
        )
        stack, recorder = start_recorded_stack(settings)
        try:
            admin = httpx.Client(base_url=stack.stack.admin_url,
                                 headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
            admin.post("/admin/v1/accounts", json={"account_id": "acct_f"}).raise_for_status()
            key = admin.post("/admin/v1/accounts/acct_f/keys", json={}).json()["key"]
            yield stack, recorder, key
        finally:
            stack.stop()


def _post(stack: StackThread, key: str | None, body: object, **kw: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))  # type: ignore[arg-type]
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(stack.stack.base_url + "/chat/completions", content=content,
                      headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def chat(model: str = "ok-1", **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_auth_errors(faulty: tuple[StackThread, Recorder, str]) -> None:
    stack, _, key = faulty
    _error(_post(stack, None, chat()), 401, "missing_api_key")
    _error(_post(stack, "sk-not-ours", chat()), 401, "invalid_api_key")
    forged = key[:-4] + ("0000" if not key.endswith("0000") else "1111")
    err = _error(_post(stack, forged, chat()), 401, "invalid_api_key")
    assert key not in err["message"] and forged not in err["message"]


def test_request_errors(faulty: tuple[StackThread, Recorder, str]) -> None:
    stack, _, key = faulty
    _error(_post(stack, key, b"{not json"), 400, "invalid_json")
    _error(_post(stack, key, [1, 2]), 422, "invalid_body")
    _error(_post(stack, key, {"model": "ok-1"}), 422, "invalid_messages")
    _error(_post(stack, key, chat(stream="yes")), 422, "invalid_stream")
    # The gateway adds include_usage to a stream's options: a string there was a 500.
    _error(_post(stack, key, chat(stream=True, stream_options="x")), 422,
           "invalid_stream_options")
    # "false" read as true, so usage was not asked for, and an upstream that parses it
    # leniently sent none: the stream was charged an estimate of a quarter of its text
    for value in ("false", 0, 1.0, [True]):
        err = _error(_post(stack, key, chat(stream=True, stream_options={
            "include_usage": value})), 422, "invalid_stream_options")
        assert err["param"] == "stream_options.include_usage"
    _error(_post(stack, key, chat("no-such-model")), 404, "model_not_found")
    _error(_post(stack, key, chat(padding="x" * 20_000)), 413, "request_too_large")
    r = httpx.get(stack.stack.base_url + "/files", headers={"authorization": f"Bearer {key}"})
    _error(r, 404, "unknown_url")


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def test_a_body_nested_deeper_than_the_record_can_be_is_refused(
        faulty: tuple[StackThread, Recorder, str]) -> None:
    """A request nested 300 levels deep was answered by the upstream and then recorded
    nowhere (orjson writes 254 levels at most): the ledger and detection never saw it.
    Now it is refused before the upstream; one of 60 levels is served and recorded."""
    stack, recorder, key = faulty
    before = len(recorder.exchanges)
    content = orjson.dumps(chat(metadata=_nested(60)))
    deep = content.replace(b'"x"', orjson.dumps(_nested(240))[:-1] + b"}", 1)
    err = _error(_post(stack, key, deep), 400, "body_too_deep")
    assert "more than 64 levels" in err["message"]
    assert _post(stack, key, content).status_code == 200
    deadline = time.monotonic() + 10
    while len(recorder.exchanges) < before + 2:
        assert time.monotonic() < deadline, recorder.exchanges[before:]
        time.sleep(0.05)
    refused, served = sorted(recorder.exchanges[before:before + 2],
                             key=lambda ex: ex.status, reverse=True)
    assert refused.status == 400 and served.status == 200
    assert served.request is not None and served.request["metadata"] == _nested(60)
    # an upstream's answer that deep is passed on, and recorded without that body
    r = _post(stack, key, chat("deep-json"))
    assert r.status_code == 200 and r.content.count(b'{"a":') == 300
    while len(recorder.exchanges) < before + 3:
        assert time.monotonic() < deadline, recorder.exchanges[before:]
        time.sleep(0.05)
    answered = recorder.exchanges[before + 2]
    assert answered.status == 200 and answered.response is None
    assert answered.request_sha256 and "response" in answered.annotations["bodies_dropped"]


def test_an_answer_without_usage_is_charged_an_estimate(
        faulty: tuple[StackThread, Recorder, str]) -> None:
    """A stream whose usage never came (an upstream that does not report it, or a client
    that closed its stream at finish_reason, before a usage event in a later read) was
    recorded with no usage, so token quotas were never charged for it."""
    stack, recorder, key = faulty
    before = len(recorder.exchanges)
    r = _post(stack, key, chat("no-usage", stream=True))
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    assert _post(stack, key, chat("ok-1")).status_code == 200      # reports its usage
    deadline = time.monotonic() + 10
    while len(recorder.exchanges) < before + 2:
        assert time.monotonic() < deadline, recorder.exchanges[before:]
        time.sleep(0.05)
    estimated, reported = sorted(recorder.exchanges[before:before + 2],
                                 key=lambda ex: ex.model != "no-usage")
    assert estimated.annotations["usage_estimated"] and estimated.usage is not None
    # "hi" is 1 token by the estimate (characters / 4, up); "partial partial " 4
    assert (estimated.usage.prompt_tokens, estimated.usage.completion_tokens) == (1, 4)
    assert reported.usage is not None and "usage_estimated" not in reported.annotations


def test_upstream_failures(faulty: tuple[StackThread, Recorder, str]) -> None:
    stack, recorder, key = faulty
    _error(_post(stack, key, chat("fail-500")), 502, "upstream_status_error")
    _error(_post(stack, key, chat("slow")), 504, "upstream_timeout")
    _error(_post(stack, key, chat("bad-json")), 502, "upstream_bad_response")
    # An upstream 4xx in OpenAI format is passed through as is.
    err = _error(_post(stack, key, chat("reject-400")), 400)
    assert err["param"] == "max_tokens"
    client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="fail-500", messages=[{"role": "user",
                                                                   "content": "x"}])
    assert info.value.status_code == 502
    # The process is still healthy after all of that.
    assert _post(stack, key, chat()).status_code == 200
    stack.call(stack.stack.gateway.settle())
    codes = [e.error_code for e in recorder.exchanges]
    assert "upstream_timeout" in codes and "upstream_status_error" in codes


@pytest.mark.parametrize("model,status,message", [
    ("vllm-400", 400, "max_tokens is too large"),
    ("text-404", 404, "Not Found"),
    ("html-429", 429, "The model server answered 429 Too Many Requests."),
    ("empty-400", 400, "The model server answered 400 Bad Request."),
    ("long-400", 400, "bad request: xxx"),
])
def test_an_upstream_error_not_in_openai_format_is_put_in_it(
        faulty: tuple[StackThread, Recorder, str], model: str, status: int,
        message: str) -> None:
    """An upstream 4xx whose body was not OpenAI's error object (vLLM's
    {"object": "error", "message": ...}, a text/plain "Not Found", an HTML 429, an empty
    400) reached clients as it came: the openai client's error carried no message and
    code, and one that quoted the gateway's upstream key passed the key on. Such a body
    is now wrapped in {"error": {"message", "type", "param", "code"}} with the upstream's
    status, its message text kept (cut at 500 characters) and the upstream key redacted."""
    stack, recorder, key = faulty
    r = _post(stack, key, chat(model))
    err = _error(r, status, "upstream_client_error")
    assert r.headers["content-type"] == "application/json"
    assert err["message"].startswith(message) and len(err["message"]) <= 500
    assert UPSTREAM_KEY not in r.text
    client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user",
                                                              "content": "x"}])
    assert info.value.status_code == status and info.value.code == "upstream_client_error"
    assert isinstance(info.value.body, dict) and info.value.body["message"] == err["message"]
    stack.call(stack.stack.gateway.settle())
    last = recorder.exchanges[-1]
    assert (last.status, last.error_code) == (status, "upstream_client_error")
    assert UPSTREAM_KEY not in orjson.dumps(last.to_trace()).decode()


def test_an_upstream_that_refuses_the_gateways_key_is_a_502(
        faulty: tuple[StackThread, Recorder, str]) -> None:
    """An upstream 401 (its key for the gateway is wrong or revoked) reached the client
    as a 401: the openai library raised AuthenticationError and its user looked for the
    fault in their own key, and the upstream's message could quote part of the upstream
    key. It is a 502, upstream_unauthorized, with a message of the gateway's own."""
    stack, recorder, key = faulty
    client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="key-401", messages=[{"role": "user",
                                                                  "content": "x"}])
    assert not isinstance(info.value, openai.AuthenticationError)
    assert info.value.status_code == 502 and info.value.code == "upstream_unauthorized"
    assert "not a problem with your API key" in info.value.message
    assert "Unknown key" not in info.value.message
    stack.call(stack.stack.gateway.settle())
    last = recorder.exchanges[-1]
    assert (last.status, last.error_code) == (502, "upstream_unauthorized")
    assert UPSTREAM_KEY not in orjson.dumps(last.to_trace()).decode()


@pytest.mark.parametrize("model,code", [("drop-stream", "upstream_error"),
                                        ("no-done", "upstream_stream_incomplete")])
def test_mid_stream_failure_sends_sse_error_then_closes(
    faulty: tuple[StackThread, Recorder, str], model: str, code: str
) -> None:
    stack, recorder, key = faulty
    with httpx.stream("POST", stack.stack.base_url + "/chat/completions",
                      headers={"authorization": f"Bearer {key}"},
                      json=chat(model, stream=True), timeout=10) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 3
    error = orjson.loads(events[-1])["error"]
    assert error["code"] == code and error["message"]
    stack.call(stack.stack.gateway.settle())
    last = recorder.exchanges[-1]
    assert last.error_code == code
    assert last.response["choices"][0]["message"]["content"] == "partial partial "


def test_an_upstream_5xx_that_quotes_its_key_is_logged_without_it(
        faulty: tuple[StackThread, Recorder, str], caplog: pytest.LogCaptureFixture) -> None:
    """The warning for an upstream 5xx logged the first 200 bytes of its body as they
    came, the gateway's upstream key included when the upstream quoted it."""
    stack, _, key = faulty
    with caplog.at_level(logging.WARNING, logger="distillguard.gateway"):
        _error(_post(stack, key, chat("key-500")), 502, "upstream_status_error")
    logged = [r.getMessage() for r in caplog.records if "upstream answered 500" in
              r.getMessage()]
    assert logged and all(UPSTREAM_KEY not in m and "[redacted]" in m for m in logged)


def test_a_request_whose_client_left_before_its_body_is_recorded(
        faulty: tuple[StackThread, Recorder, str], caplog: pytest.LogCaptureFixture) -> None:
    """A client that sent its key and then closed the connection before the whole body
    arrived (a timeout, a killed process) left two tracebacks in the log per request and
    no record at all: the authenticated attempt was missing from the trace and the
    ledger. It is now recorded as nginx logs it, status 499 (client closed request),
    error code client_disconnected, and nothing is logged as an error."""
    stack, recorder, key = faulty
    before = len(recorder.exchanges)
    body = orjson.dumps(chat())
    address = httpx.URL(stack.stack.base_url)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((address.host, address.port)) as conn:
        conn.sendall(head + body[:10])
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while len(recorder.exchanges) < before + 1:
        assert time.monotonic() < deadline, "the request was never recorded"
        time.sleep(0.05)
    left = recorder.exchanges[before]
    assert (left.status, left.error_code) == (499, "client_disconnected")
    assert left.account_id == "acct_f" and left.key_id and left.request is None
    stack.call(stack.stack.gateway.settle())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_exchange_record_and_trusted_proxy_ip(faulty: tuple[StackThread, Recorder, str]
                                              ) -> None:
    stack, recorder, key = faulty
    r = _post(stack, key, chat(), headers={"x-forwarded-for": "198.51.100.9, 10.0.0.1",
                                           "user-agent": "curl/8.0"})
    assert r.status_code == 200
    stack.call(stack.stack.gateway.settle())
    ex = recorder.exchanges[-1]
    # 127.0.0.1 (peer) is trusted; 10.0.0.1 is not, so it is the client.
    assert ex.client_ip == "10.0.0.1"
    assert ex.account_id == "acct_f" and ex.key_id and ex.key_id[4:] in key
    assert ex.user_agent == "curl/8.0" and ex.model == "ok-1" and ex.status == 200
    assert ex.usage is not None and ex.usage.total_tokens == 4
    assert ex.request_sha256 and ex.response_sha256
    assert ex.timings.latency_ms is not None and ex.timings.upstream_ms is not None
    line = ex.to_trace()
    assert key not in orjson.dumps(line).decode()
    assert line["request"]["model"] == "ok-1" and line["status"] == 200


def test_a_client_that_stops_sending_is_disconnected_but_a_slow_answer_is_not(
        tmp_path: Path) -> None:
    """uvicorn waited for ever for the rest of a request: a connection that sent part
    of its headers or body, or nothing, and then nothing more, held its socket open (45
    s and counting); thousands of them (slowloris) would hold as many. With
    server.read_timeout_s such a client is disconnected, while an answer that takes
    longer than the timeout (the upstream's 'slow' model, 3 s) is still given."""
    import socket

    with FaultyUpstreamThread() as upstream:
        settings = make_settings(tmp_path, upstream={"base_url": upstream.url},
                                 server={"read_timeout_s": 1.0})
        stack, _ = start_recorded_stack(settings)
        try:
            key = new_api_key(stack, "acct_t")
            ports = {settings.server.port: (b"/v1/chat/completions", key),
                     settings.server.admin_port: (b"/admin/v1/accounts", ADMIN_TOKEN)}
            for port, (path, token) in ports.items():
                head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                        + f"Authorization: Bearer {token}\r\n".encode())
                for sent in (b"", head, head + b"Content-Length: 100\r\n\r\n{\"a\": "):
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                        conn.sendall(sent)
                        began = time.monotonic()
                        assert conn.recv(1024) == b"", (port, sent)   # closed by the gateway
                        assert time.monotonic() - began < 5
            r = _post(stack, key, chat("slow"))
            assert r.status_code == 200, r.text
        finally:
            stack.stop()


def _trickle(port: int, first: bytes, line: bytes, every_s: float, limit_s: float
             ) -> tuple[float, bytes]:
    """Send ``first``, then ``line`` every ``every_s`` until the gateway closes the
    connection or ``limit_s`` passes; returns how long it stayed open and what came."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=every_s) as conn:
        conn.sendall(first)
        began = time.monotonic()
        got = b""
        while time.monotonic() - began < limit_s:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                try:
                    conn.sendall(line)
                except OSError:        # closed meanwhile
                    break
                continue
            if not data:
                break
            got += data
        return time.monotonic() - began, got


def test_a_request_head_that_trickles_in_is_cut_off(tmp_path: Path) -> None:
    """Slowloris proper: a partial request head, then a header line every few seconds.
    Each line re-armed the read timeout, so such a connection stayed open as long as
    the lines came (20 s and counting, with a timeout of 1 s). A head must now come whole
    within server.read_timeout_s of its first byte, pipelined behind a request or not."""
    settings = make_settings(tmp_path, server={"read_timeout_s": 1.0})
    stack = start_stack(settings)
    try:
        port = settings.server.port
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
        open_s, got = _trickle(port, head, b"X-a: b\r\n", 0.3, 20)
        assert open_s < 5 and got == b"", (open_s, got)
        # behind a whole request on the same connection: that one is answered first
        open_s, got = _trickle(port, head + b"\r\n" + head, b"X-a: b\r\n", 0.3, 20)
        assert open_s < 5 and got.count(b"HTTP/1.1 200") == 1, (open_s, got)
        # a head that comes whole in time, line by line, is served
        open_s, got = _trickle(port, head, b"\r\n", 0.3, 2)
        assert got.startswith(b"HTTP/1.1 200"), got
    finally:
        stack.stop()
