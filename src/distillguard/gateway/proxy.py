"""Forwarding of the OpenAI endpoints: authenticate, check, forward, record.

:func:`proxy_endpoint` serves ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings``. The request body goes upstream as the gateway parsed it (the same
JSON, written again: what was checked is what is sent), changed only where the gateway
has a reason (today: asking a stream for its usage so it can be metered), and the
response comes back unchanged; every request, refused or not, ends as one Exchange handed
to the pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from distillguard.errors import (
    APIError,
    ClientClosedRequest,
    InvalidRequest,
    NotFoundError,
    PayloadTooLarge,
    Unprocessable,
    UpstreamError,
)
from distillguard.exchange import MAX_JSON_DEPTH, Exchange, Usage, nested_deeper_than
from distillguard.gateway.errors import (
    denied_error,
    error_response,
    is_openai_error,
    sse_error_event,
    upstream_client_error,
)
from distillguard.gateway.streaming import SSERelay
from distillguard.pipeline import Denied, StreamFilter
from distillguard.upstream import UpstreamResponse

if TYPE_CHECKING:
    from distillguard.gateway.app import Gateway

log = logging.getLogger("distillguard.gateway")

# Upstream response headers passed to the client; everything else is the gateway's own.
_PASS_HEADERS = ("content-type", "openai-model", "openai-processing-ms", "openai-version",
                 "x-request-id")
# Request fields that size the completion, read by the rate limiter's reservation.
_METERED_INTS = ("max_tokens", "max_completion_tokens", "n", "best_of")
_ENDPOINT_KIND = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                  "/v1/embeddings": "embeddings"}


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        except ValueError:
            raise InvalidRequest("Content-Length is not a number.") from None
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"Request body is larger than the limit of {limit} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosedRequest(f"The client closed the connection after {size} bytes "
                                  "of the request body.") from None
    return b"".join(chunks)


def parse_request(raw: bytes, kind: str) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.",
                             code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise Unprocessable("The request body must be a JSON object.", code="invalid_body")
    if nested_deeper_than(body):
        raise InvalidRequest(f"The request body nests objects and arrays more than "
                             f"{MAX_JSON_DEPTH} levels deep.", code="body_too_deep")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Unprocessable("You must provide a model parameter (a string).", param="model",
                            code="missing_model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Unprocessable("'messages' must be a non-empty array.", param="messages",
                                code="invalid_messages")
        if not all(isinstance(m, dict) and "role" in m for m in messages):
            raise Unprocessable("Each message must be an object with a 'role'.",
                                param="messages", code="invalid_messages")
    elif kind == "completions" and "prompt" not in body:
        raise Unprocessable("You must provide a prompt.", param="prompt",
                            code="missing_prompt")
    elif kind == "embeddings" and "input" not in body:
        raise Unprocessable("You must provide an input.", param="input", code="missing_input")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise Unprocessable("'stream' must be a boolean.", param="stream",
                            code="invalid_stream")
    # The fields tokens are reserved by (RateLimiter): a whole number or null. An
    # upstream that reads "8000" or 8000.0 as 8000 (pydantic's lax mode, as vLLM's
    # request models use) generated 8000 tokens the gateway had reserved nothing for,
    # and the detector did not see a large max_tokens either.
    for name in _METERED_INTS:
        value = body.get(name)
        if value is not None and type(value) is not int:
            raise InvalidRequest(f"Invalid type for '{name}': expected an integer.",
                                 param=name, code="invalid_type")
    # The gateway adds include_usage to a stream's options (to meter it), so it reads them.
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise Unprocessable("'stream_options' must be an object.", param="stream_options",
                            code="invalid_stream_options")
    # A string such as "false" read as true here, so usage was not asked for, while an
    # upstream that parses it leniently read it as false and sent none: the stream was
    # charged a characters-over-four estimate of its text.
    usage = None if options is None else options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise Unprocessable("'stream_options.include_usage' must be a boolean.",
                            param="stream_options.include_usage",
                            code="invalid_stream_options")
    return body


def _response_headers(exchange: Exchange, upstream_headers: dict[str, str] | None = None
                      ) -> dict[str, str]:
    headers = {k: v for k, v in (upstream_headers or {}).items() if k in _PASS_HEADERS}
    headers.pop("content-type", None)
    headers.update(exchange.annotations.get("ratelimit_headers") or {})
    headers["x-distillguard-exchange-id"] = exchange.id
    return headers


async def proxy_endpoint(gateway: Gateway, request: Request) -> Response:
    path = request.url.path
    kind = _ENDPOINT_KIND[path]
    exchange = Exchange.start(path)
    exchange.retention = gateway.settings.pipeline.retention
    exchange.client_ip = gateway.client_ip(request)
    exchange.user_agent = request.headers.get("user-agent")
    try:
        return await _proxy(gateway, request, exchange, kind)
    except APIError as exc:
        exchange.status = exc.status
        exchange.error_code = exc.code
        exchange.timings.finished = time.perf_counter()
        gateway.record(exchange)
        return error_response(exc, _response_headers(exchange))


async def _proxy(gateway: Gateway, request: Request, exchange: Exchange, kind: str) -> Response:
    principal = await gateway.auth.authenticate(request.headers.get("authorization"))
    exchange.principal = principal
    exchange.account_id = principal.account.account_id
    exchange.key_id = principal.key.key_id
    raw = await read_body(request, gateway.settings.server.max_body_bytes)
    body = parse_request(raw, kind)
    exchange.request = body
    exchange.model = body["model"]
    exchange.stream = bool(body.get("stream"))
    if not await gateway.models.has(exchange.model):
        raise NotFoundError(f"The model '{exchange.model}' does not exist or you do not have "
                            "access to it.", param="model", code="model_not_found")
    decision = await gateway.pipeline.check(exchange)
    if isinstance(decision, Denied):
        raise denied_error(decision)

    # The upstream gets the body as the gateway read it, not the client's bytes: with two
    # "max_tokens" (or "model") keys, or a number past 64 bits, the client's bytes could
    # mean one thing to the gateway's parser (which checked, reserved and recorded it)
    # and another to the upstream's.
    upstream_body = body
    inject_usage = False
    if exchange.stream and kind != "embeddings":
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            inject_usage = True
            upstream_body = dict(body)
            upstream_body["stream_options"] = {**(options or {}), "include_usage": True}
    raw = orjson.dumps(upstream_body)

    exchange.timings.upstream_sent = time.perf_counter()
    upstream = await gateway.upstream.send(exchange.endpoint[len("/v1"):], raw,
                                           stream=exchange.stream)
    exchange.timings.first_byte = time.perf_counter()
    if 300 <= upstream.status < 400:
        location = upstream.headers.get("location", "")
        upstream.close()
        log.warning("upstream answered %s on %s, redirecting to %s; not followed",
                    upstream.status, exchange.endpoint, location[:200])
        raise UpstreamError(f"The model server redirected the request (status "
                            f"{upstream.status}); redirects are not followed.",
                            code="upstream_redirect")
    if upstream.status >= 500:
        await _log_refusal(gateway, exchange, upstream, "answered")
        raise UpstreamError(f"The model server returned an error (status {upstream.status}).",
                            code="upstream_status_error")
    if upstream.status in (401, 403):
        # The upstream refused the gateway's own credential: passed on, the client's
        # openai library raised AuthenticationError and its user looked for a fault in
        # their key; and the message may quote part of the upstream key ("sk-...abcd").
        await _log_refusal(gateway, exchange, upstream, "refused the gateway's credential:")
        raise UpstreamError("The model server refused the gateway's own credential; this is "
                            "not a problem with your API key.", code="upstream_unauthorized")
    content_type = upstream.headers.get("content-type", "")
    if not exchange.stream or upstream.status != 200 or "event-stream" not in content_type:
        payload = await upstream.read()
        return _finish_plain(gateway, exchange, upstream.status, upstream.headers, payload)
    relay = SSERelay(drop_usage_event=inject_usage)
    filters = [f for f in (rf.stream_filter(exchange) for rf in gateway.response_filters)
               if f is not None]
    return StreamingResponse(
        _relay_stream(gateway, exchange, upstream, relay, filters),
        status_code=200,
        media_type="text/event-stream",
        headers={**_response_headers(exchange, upstream.headers),
                 "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _log_refusal(gateway: Gateway, exchange: Exchange, upstream: UpstreamResponse,
                       what: str) -> None:
    """Log the start of an upstream answer the client will not see (the upstream key
    taken out): the operator's only view of why the model server refused."""
    detail = _without_upstream_key(gateway, await upstream.read())[:200].decode(
        "utf-8", "replace")
    log.warning("upstream %s %s on %s: %s", what, upstream.status, exchange.endpoint, detail)


def _without_upstream_key(gateway: Gateway, payload: bytes) -> bytes:
    """An upstream's error body with the key the gateway sent it replaced by
    ``[redacted]``: an upstream that quotes the key it was given ("unknown key sk-...")
    would hand it to the client, the record and the log."""
    key = gateway.settings.upstream.api_key
    if key and key.encode() in payload:
        return payload.replace(key.encode(), b"[redacted]")
    return payload


def _finish_plain(gateway: Gateway, exchange: Exchange, status: int,
                  headers: dict[str, str], payload: bytes) -> Response:
    exchange.status = status
    if status >= 400:
        payload = _without_upstream_key(gateway, payload)
    try:
        parsed = orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        parsed = None
    if status >= 400 and not is_openai_error(parsed):
        error = upstream_client_error(status, headers.get("content-type", ""), payload,
                                      parsed)
        error.headers.update(_response_headers(exchange, headers))
        exchange.response = error.body()
        raise error
    if status == 200 and not isinstance(parsed, dict):
        raise UpstreamError("The model server sent a response that is not JSON.",
                            code="upstream_bad_response")
    if status == 200 and isinstance(parsed, dict) and gateway.response_filters:
        filtered = _filter_body(gateway, exchange, parsed)
        if filtered is not parsed:
            parsed, payload = filtered, orjson.dumps(filtered)
    exchange.response = parsed
    if isinstance(parsed, dict):
        if status < 400:
            exchange.settle_usage(parsed.get("usage"))
        else:
            exchange.usage = Usage.from_body(parsed.get("usage"))
        if status >= 400 and isinstance(parsed.get("error"), dict):
            exchange.error_code = str(parsed["error"].get("code") or "upstream_client_error")
    exchange.timings.finished = time.perf_counter()
    gateway.record(exchange)
    return Response(payload, status_code=status,
                    media_type=headers.get("content-type", "application/json"),
                    headers=_response_headers(exchange, headers))


def _filter_body(gateway: Gateway, exchange: Exchange, body: dict[str, Any]
                 ) -> dict[str, Any]:
    """Run the response filters in order; returns ``body`` itself when none changed it."""
    out = body
    for response_filter in gateway.response_filters:
        changed = response_filter.filter_body(exchange, out)
        if changed is not out:
            exchange.annotations.setdefault("response_filtered", []).append(
                response_filter.name)
            out = changed
    return out


def _filter_event(event: bytes, filters: list[StreamFilter]) -> list[bytes]:
    """One upstream SSE event through the stream filters: zero or more events to send."""
    payload = b"".join(
        line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
    if not payload:
        return [event]
    if payload == b"[DONE]":
        held: list[bytes] = []
        for i, stream_filter in enumerate(filters):
            for chunk in stream_filter.flush():
                held += _run_filters(chunk, filters[i + 1:])
        return [*held, event]
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return [event]
    if not isinstance(chunk, dict):
        return [event]
    return _run_filters(chunk, filters, event)


def _run_filters(chunk: dict[str, Any], filters: list[StreamFilter],
                 event: bytes | None = None) -> list[bytes]:
    """A chunk through the filters; ``event`` (its original bytes) goes out unchanged when
    every filter returned the chunk itself."""
    current = chunk
    for stream_filter in filters:
        out = stream_filter.on_event(current)
        if out is None:
            return []
        current = out
    if current is chunk and event is not None:
        return [event]
    return [b"data: " + orjson.dumps(current) + b"\n\n"]


def _assembled(exchange: Exchange, relay: SSERelay) -> dict[str, Any] | None:
    """The completion a stream delivered, for the record. It is assembled in the stream's
    ``finally``: an error there cut the client's stream and lost the exchange from the
    ledger, so one is logged and the exchange recorded without its response."""
    if relay.skipped:
        exchange.annotations["stream_items_skipped"] = relay.skipped
    try:
        return relay.assembled()
    except Exception as exc:
        log.exception("could not assemble the stream of exchange %s", exchange.id)
        exchange.annotations["bodies_dropped"] = {"response": repr(exc)[:200]}
        return None


async def _relay_stream(gateway: Gateway, exchange: Exchange, upstream: Any,
                        relay: SSERelay, filters: list[StreamFilter] | None = None
                        ) -> AsyncIterator[bytes]:
    exchange.status = 200
    # With filters active the client gets rewritten events; this second relay assembles
    # what it actually received. Without filters, events pass byte for byte.
    delivered = SSERelay(drop_usage_event=False) if filters else None
    try:
        async for chunk in upstream.iter_chunks():
            # Events that arrived together leave together: one write per upstream read
            # rather than one per event (each write is a trip through the ASGI stack).
            events = relay.feed(chunk)
            if delivered is None:
                if events:
                    yield b"".join(events)
                continue
            outs = []
            for event in events:
                for out in _filter_event(event, filters or []):
                    delivered.feed(out)
                    outs.append(out)
            if outs:
                yield b"".join(outs)
        rest = relay.flush()
        if rest and delivered is None:
            yield rest
        elif rest and delivered is not None:
            for out in _filter_event(rest, filters or []):
                delivered.feed(out)
                yield out
        if not relay.done:
            raise UpstreamError("The model server ended the stream before it was complete.",
                                code="upstream_stream_incomplete")
    except APIError as exc:
        exchange.error_code = exc.code
        exchange.annotations["stream_error"] = exc.message
        yield sse_error_event(exc)
    finally:
        upstream.close()
        if delivered is not None:
            delivered.usage = relay.usage
        exchange.response = _assembled(exchange, delivered or relay)
        exchange.settle_usage(relay.usage)
        exchange.timings.finished = time.perf_counter()
        if exchange.error_code is None and not relay.done:
            exchange.error_code = "client_disconnected"
        gateway.record(exchange)
