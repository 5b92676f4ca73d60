"""A fast mock OpenAI-compatible upstream for overhead measurements.

A raw asyncio protocol (uvloop when available) that answers every
``POST /v1/chat/completions`` with the same small chat completion, or, when the body asks
for ``"stream": true``, with a fixed Server-Sent-Events stream (content chunks, a usage
chunk, ``[DONE]``); ``GET /v1/models`` lists the one model. HTTP/1.1 keep-alive, bodies by
Content-Length. It does no JSON parsing on the request path, so it answers far faster than
any proxy in front of it and what a benchmark measures is the proxy.

    python bench/mock_upstream.py --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import json

MODEL = "bench-model"

_COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1767225600,
    "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant",
                                         "content": "The quick brown fox jumps over the lazy "
                                                    "dog, twice, for good measure."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 14, "completion_tokens": 16, "total_tokens": 30},
}, separators=(",", ":")).encode()


def _stream_body() -> tuple[bytes, bytes]:
    words = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog."]
    events = []
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1767225600,
            "model": MODEL}
    events.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                              "content": ""},
                                        "finish_reason": None}]})
    for w in words:
        events.append({**base, "choices": [{"index": 0, "delta": {"content": w},
                                            "finish_reason": None}]})
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    usage = {**base, "choices": [],
             "usage": {"prompt_tokens": 14, "completion_tokens": 9, "total_tokens": 23}}
    out = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n"
                   for e in events)
    # The usage chunk only when asked for, as OpenAI does; the proxies ask for it.
    return out, b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"


_STREAM, _USAGE = _stream_body()
_MODELS = json.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]}).encode()


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
            + b"\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\nconnection: keep-alive\r\n\r\n" + body)


_PLAIN_RESPONSE = _response("200 OK", b"application/json", _COMPLETION)
_STREAM_RESPONSE = _response("200 OK", b"text/event-stream", _STREAM + b"data: [DONE]\n\n")
_STREAM_USAGE_RESPONSE = _response("200 OK", b"text/event-stream",
                                   _STREAM + _USAGE + b"data: [DONE]\n\n")
_MODELS_RESPONSE = _response("200 OK", b"application/json", _MODELS)
_NOT_FOUND = _response("404 Not Found", b"application/json", b'{"error":"not found"}')


class MockProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            length = 0
            lower = head.lower()
            at = lower.find(b"content-length:")
            if at >= 0:
                line_end = lower.find(b"\r\n", at)
                length = int(lower[at + 15:line_end if line_end >= 0 else None])
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body = self.buffer[head_end + 4:end]
            self.buffer = self.buffer[end:]
            assert self.transport is not None
            self.transport.write(self._answer(head, body))

    @staticmethod
    def _answer(head: bytes, body: bytes) -> bytes:
        request_line = head[:head.find(b"\r\n")]
        if request_line.startswith(b"GET") and b"/models" in request_line:
            return _MODELS_RESPONSE
        if not request_line.startswith(b"POST"):
            return _NOT_FOUND
        compact = body.replace(b" ", b"")
        if b'"stream":true' in compact:
            return _STREAM_USAGE_RESPONSE if b'"include_usage":true' in compact \
                else _STREAM_RESPONSE
        return _PLAIN_RESPONSE


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
