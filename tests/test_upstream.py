"""The upstream connection pool against a server that gives up idle connections."""

from __future__ import annotations

import asyncio
import time

import pytest

from distillguard.config import UpstreamSettings
from distillguard.errors import UpstreamError
from distillguard.upstream import HttpUpstream

_ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
           b"connection: keep-alive\r\n\r\n{}")


class ForgetfulUpstream:
    """An HTTP/1.1 server that keeps a connection open but forgets it once it has idled
    ``idle_s``: a request that arrives on it after that is dropped unanswered. That is
    what a client sees when a server's idle close (uvicorn's default is 5 s) crosses its
    next request in flight, made certain instead of left to timing."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.connections = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        last = time.monotonic()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if time.monotonic() - last > self.idle_s:
                    self.dropped += 1
                    writer.transport.abort()
                    return
                writer.write(_ANSWER)
                await writer.drain()
                last = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _two_requests_apart(settings: UpstreamSettings, gap_s: float,
                              server: ForgetfulUpstream) -> None:
    upstream = HttpUpstream(settings, await server.start())
    await upstream.start()
    try:
        for i in range(2):
            if i:
                await asyncio.sleep(gap_s)
            response = await upstream.send("/chat/completions", b"{}", stream=False)
            assert response.status == 200 and await response.read() == b"{}"
    finally:
        await upstream.close()
        await server.close()


async def test_an_idle_connection_is_given_up_before_the_upstream_forgets_it() -> None:
    """With ``keepalive_s`` under the upstream's idle timeout, the pool opens a new
    connection rather than sending on one the upstream is done with; a POST that fails
    that way is not retried (it may not be idempotent) and the client got a 502."""
    server = ForgetfulUpstream(idle_s=0.4)
    await _two_requests_apart(UpstreamSettings(base_url="http://unused/v1", keepalive_s=0.2),
                              0.6, server)
    assert server.connections == 2 and server.dropped == 0


async def test_a_pool_that_keeps_longer_than_the_upstream_sends_into_the_close() -> None:
    """The same upstream with the pool keeping idle connections longer than it does: the
    second request goes on the forgotten connection and fails, which is why the default
    sits under common servers' idle timeouts."""
    server = ForgetfulUpstream(idle_s=0.4)
    with pytest.raises(UpstreamError):
        await _two_requests_apart(
            UpstreamSettings(base_url="http://unused/v1", keepalive_s=30), 0.6, server)
    assert server.dropped == 1


def test_the_default_keepalive_is_under_common_servers_idle_timeouts() -> None:
    """uvicorn (behind vLLM's and SGLang's OpenAI servers) and Node's http server close an
    idle connection after 5 s."""
    assert UpstreamSettings().keepalive_s < 5
    with pytest.raises(ValueError):
        UpstreamSettings(keepalive_s=0)
