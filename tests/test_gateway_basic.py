from __future__ import annotations

import socket
from pathlib import Path

import openai
import pytest

from distillguard.errors import ConfigError
from distillguard.serve import Stack, StackThread
from tests.factories import make_settings, new_api_key


def test_chat_completion_through_gateway_with_openai_client(
    stack: StackThread, account_key: tuple[str, str]
) -> None:
    _, key = account_key
    client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
    out = client.chat.completions.create(
        model="demo-chat-1", messages=[{"role": "user", "content": "Say hello"}], max_tokens=20)
    assert out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens <= 20


def test_the_demo_upstream_refuses_a_bad_token_limit_as_the_api_does(
    stack: StackThread, account_key: tuple[str, str]
) -> None:
    """A string limit made the demo upstream fail with a 500 (a 502 at the gateway); a
    negative one was answered with one token; a completions prompt of 5 was answered."""
    _, key = account_key
    client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
    chat = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "hi"}]}
    for param, value, code in [("max_tokens", "lots", "invalid_type"),
                               ("max_completion_tokens", 2.5, "invalid_type"),
                               ("max_tokens", True, "invalid_type"),
                               ("max_tokens", -5, "integer_below_min_value")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**chat, extra_body={param: value})  # type: ignore[call-overload]
        assert refused.value.status_code == 400 and refused.value.code == code, value
        assert isinstance(refused.value.body, dict) and refused.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo-chat-1", prompt="hi", extra_body={
            "max_tokens": 0})
    assert info.value.code == "integer_below_min_value"
    for prompt in (5, [], [[1, 2], "x"], [True], {"text": "hi"}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="demo-chat-1", prompt=prompt)  # type: ignore[arg-type]
        assert info.value.code == "invalid_type", prompt
    for prompt in ("hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert client.completions.create(model="demo-chat-1", prompt=prompt, max_tokens=2)
    out = client.chat.completions.create(**chat, max_completion_tokens=3)  # type: ignore[call-overload]
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_the_demo_upstream_keeps_idle_connections_longer_than_the_gateway(
        stack: StackThread) -> None:
    """The gateway's pool gives up an idle upstream connection before the demo upstream
    closes it: with the two equal, a request sent as the upstream closed the connection
    failed with a 502 now and again."""
    demo = stack.stack.servers[-1]
    assert demo.config.port == stack.stack.demo_port
    assert demo.config.timeout_keep_alive > stack.stack.settings.upstream.keepalive_s


def test_the_demo_upstream_port_is_held_from_the_start(tmp_path: Path) -> None:
    """The demo upstream's port is bound when the stack is made, not only when it starts
    serving: a port picked early and bound later was sometimes taken in between."""
    stack = Stack(make_settings(tmp_path))
    assert stack.demo_port is not None
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", stack.demo_port))
    running = StackThread(stack).start()
    try:
        client = openai.OpenAI(base_url=stack.base_url, api_key="sk-none", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        assert running.stack.servers[-1].started
    finally:
        running.stop()


def test_a_stack_that_cannot_be_made_lets_its_demo_port_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distillguard import serve

    made: list[socket.socket] = []
    real = serve.listen

    def recorded(host: str, port: int, what: str) -> socket.socket:
        made.append(real(host, port, what))
        return made[-1]
    monkeypatch.setattr(serve, "listen", recorded)
    with pytest.raises(ConfigError):
        Stack(make_settings(tmp_path, policy={"colour": "red"}))
    assert len(made) == 1 and made[0].fileno() == -1      # closed


def test_a_gateway_on_an_ipv6_address_gives_urls_a_client_can_use(tmp_path: Path) -> None:
    """Unbracketed, ``http://::1:8080/v1`` is not a URL a client can connect to: the
    port reads as one more group of the address."""
    settings = make_settings(tmp_path, server={"host": "::1", "admin_host": "::1"})
    running = StackThread(Stack(settings)).start()
    try:
        stack = running.stack
        port, admin_port = settings.server.port, settings.server.admin_port
        assert stack.base_url == f"http://[::1]:{port}/v1"
        assert stack.admin_url == f"http://[::1]:{admin_port}"
        key = new_api_key(running, "acct_v6")
        client = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
        out = client.chat.completions.create(
            model="demo-chat-1", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert out.choices[0].message.content
    finally:
        running.stop()


def test_an_address_that_cannot_be_had_is_named_as_a_url_would_name_it() -> None:
    from distillguard.serve import listen

    with socket.create_server(("::1", 0), family=socket.AF_INET6) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"on \[::1\]:{port}: "):
            listen("::1", port, "public API")
