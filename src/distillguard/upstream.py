"""Upstream transport: how the gateway reaches the model server.

:class:`UpstreamTransport` is the interface; :class:`HttpUpstream` implements it with an
``aiohttp`` connection pool (chosen over httpx for its lower per-request overhead, which
is most of what a proxy adds). Tests and the demo point it at the built-in demo upstream
(:mod:`distillguard.demo_upstream`) over real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from distillguard.config import UpstreamSettings
from distillguard.errors import UpstreamError, UpstreamTimeout

# Hop-by-hop and gateway-owned headers that never pass between client and upstream.
_DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length",
                          "content-encoding", "server", "date"}


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError(f"The model server's answer is larger than the limit of {limit} "
                         "bytes.", code="upstream_response_too_large")


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    _response: aiohttp.ClientResponse
    # The most read of the body (upstream.max_response_bytes), streamed or not: aiohttp
    # reads a body whole, as long as it is (decompressed, when it came compressed).
    max_bytes: int = 64 * 1024 * 1024

    async def read(self) -> bytes:
        try:
            chunks = []
            size = 0
            async for chunk in self._response.content.iter_any():
                size += len(chunk)
                if size > self.max_bytes:
                    raise _too_large(self.max_bytes)
                chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError as exc:
            raise UpstreamTimeout("The model server did not answer in time.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"The model server closed the connection ({exc.__class__.__name__})."
            ) from exc
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive. Raises UpstreamError / UpstreamTimeout mid-stream."""
        size = 0
        try:
            async for chunk in self._response.content.iter_any():
                size += len(chunk)
                if size > self.max_bytes:
                    raise _too_large(self.max_bytes)
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout("The model server stopped sending mid-stream.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"The model server dropped the connection mid-stream ({exc.__class__.__name__})."
            ) from exc
        finally:
            self._response.release()

    def close(self) -> None:
        self._response.close()


class UpstreamTransport(Protocol):
    async def start(self) -> None: ...

    async def send(self, path: str, body: bytes, *, stream: bool) -> UpstreamResponse: ...

    async def list_models(self) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class HttpUpstream:
    """An OpenAI-compatible server at ``base_url`` (which includes ``/v1``)."""

    def __init__(self, settings: UpstreamSettings, base_url: str | None = None) -> None:
        self.settings = settings
        self.base_url = (base_url or settings.base_url).rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        headers = {"content-type": "application/json"}
        if settings.api_key:
            headers["authorization"] = f"Bearer {settings.api_key}"
        self._headers = headers

    async def start(self) -> None:
        # An idle connection is given up after upstream.keepalive_s. A server that closes
        # idle connections itself races the next request sent on one as it closes it: the
        # request fails, and a POST is not retried (aiohttp retries idempotent methods
        # only, RFC 9112 section 9.3.1), so the client gets a 502. Giving the connection up
        # first, under the server's idle timeout, leaves no such moment.
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections,
                                         keepalive_timeout=self.settings.keepalive_s,
                                         ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpUpstream.start() was not awaited")
        return self._session

    async def send(self, path: str, body: bytes, *, stream: bool) -> UpstreamResponse:
        timeout = aiohttp.ClientTimeout(
            total=None if stream else self.settings.timeout_s,
            connect=self.settings.connect_timeout_s,
            sock_read=self.settings.timeout_s,
        )
        try:
            # A redirect is not followed: the gateway's upstream credentials and the
            # client's request would go where the upstream says, and whatever answered
            # there (an internal service the gateway's host can reach) went back to the
            # client. The proxy turns a 3xx into a 502.
            resp = await self.session.post(self.base_url + path, data=body, timeout=timeout,
                                           allow_redirects=False)
        except TimeoutError as exc:
            raise UpstreamTimeout("The model server did not answer in time.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Could not reach the model server ({exc.__class__.__name__})."
            ) from exc
        headers = {k.lower(): v for k, v in resp.headers.items()
                   if k.lower() not in _DROP_RESPONSE_HEADERS}
        return UpstreamResponse(resp.status, headers, resp, self.settings.max_response_bytes)

    async def list_models(self) -> list[dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=self.settings.connect_timeout_s + 5)
        try:
            async with self.session.get(self.base_url + "/models", timeout=timeout,
                                        allow_redirects=False) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"The model server answered {resp.status} to /models.")
                listing = UpstreamResponse(resp.status, {}, resp,
                                           self.settings.max_response_bytes)
                data = orjson.loads(await listing.read())
        except TimeoutError as exc:
            raise UpstreamTimeout("The model server did not list its models in time.") from exc
        except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            raise UpstreamError(f"Could not list models ({exc.__class__.__name__}).") from exc
        models = data.get("data") if isinstance(data, dict) else None
        return [m for m in models or [] if isinstance(m, dict) and "id" in m]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
