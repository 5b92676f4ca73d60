"""An upstream that misbehaves on purpose, chosen by the requested model name."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import orjson
import uvicorn

from distillguard.serve import listen

_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
          "choices": [{"index": 0, "delta": {"content": "partial "}, "finish_reason": None}]}
_OK = {"id": "c1", "object": "chat.completion", "created": 1, "model": "ok-1",
       "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                    "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def _chunk(choices: list[Any], **fields: Any) -> dict[str, Any]:
    return {**_CHUNK, "choices": choices, **fields}


def _delta(index: Any = 0, **delta: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": None}


# A reasoning model's answer with log probabilities, which cover every generated token,
# the reasoning's included (as vLLM's do).
REASONING = "The user asks about the sky. Rayleigh scattering favours short wavelengths."
ANSWER = "It is blue because air scatters blue light the most."


def _logprobs(text: str) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": -0.1, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": t, "logprob": -0.1,
                                           "bytes": list(t.encode())}]}
                        for t in text.split(" ")]}


_REASONED = {**_OK, "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": ANSWER,
                                             "reasoning_content": REASONING},
                                 "logprobs": _logprobs(REASONING + " " + ANSWER)}]}

# Answers sent whole: model -> (status, content type, body).
PLAIN: dict[str, tuple[int, str, bytes]] = {
    "usage-huge": (200, "application/json", orjson.dumps(
        {**_OK, "usage": {"prompt_tokens": 1e300, "completion_tokens": 1}})),
    "usage-negative": (200, "application/json", orjson.dumps(
        {**_OK, "usage": {"prompt_tokens": -1_000_000, "completion_tokens": 1}})),
    "vllm-400": (400, "application/json", orjson.dumps(
        {"object": "error", "message": "max_tokens is too large", "type": "BadRequestError",
         "param": None, "code": 400})),
    "text-404": (404, "text/plain", b"Not Found"),
    "html-429": (429, "text/html", b"<html><body>slow down</body></html>"),
    "empty-400": (400, "application/json", b""),
    "long-400": (400, "text/plain", b"bad request: " + b"x" * 5000),
    "reasoner-logprobs": (200, "application/json", orjson.dumps(_REASONED)),
}
# Streams: model -> the chunks sent as SSE events, then [DONE].
STREAMS: dict[str, list[dict[str, Any]]] = {
    "usage-huge-stream": [_CHUNK, _chunk([], usage={"prompt_tokens": 1e300,
                                                    "completion_tokens": 1})],
    "index-mixed": [_chunk([_delta(0, content="a")]), _chunk([_delta("1", content="b")])],
    "index-list": [_chunk([_delta([0], content="a")]), _CHUNK],
    "tools-not-list": [_CHUNK, _chunk([_delta(0, tool_calls=5)])],
    "function-not-object": [_CHUNK, _chunk([_delta(0, tool_calls=[
        {"index": 0, "function": "f"}])])],
    "tool-index-mixed": [_CHUNK, _chunk([_delta(0, tool_calls=[
        {"index": 0, "function": {"name": "a"}}, {"index": "x", "function": {"name": "b"}}])])],
    "delta-text": [_CHUNK, _chunk([{"index": 0, "delta": "b", "finish_reason": None}])],
    "delta-list": [_CHUNK, _chunk([{"index": 0, "delta": [1], "finish_reason": None}])],
    "reasoner-logprobs-stream": [
        *(_chunk([{**_delta(0, reasoning_content=w + " "), "logprobs": _logprobs(w)}])
          for w in REASONING.split(" ")),
        *(_chunk([{**_delta(0, content=w + " "), "logprobs": _logprobs(w)}])
          for w in ANSWER.split(" ")),
        _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        _chunk([], usage=_OK["usage"])],
}
MODELS = ["ok-1", "fail-500", "slow", "drop-stream", "no-done", "bad-json", "reject-400",
          "deep-json", "no-usage", "key-401", "key-500", "slow-stream", "redirect-307",
          "redirect-302", "huge-body", "huge-event", *PLAIN, *STREAMS]
# What a redirect of the upstream points at: something the gateway's host can reach and
# its clients must not.
INTERNAL = {"object": "internal", "secret": "only-for-the-gateway-host"}


class FaultyUpstream:
    def __init__(self) -> None:
        # (path, headers, body) of every request received, in order
        self.received: list[tuple[str, dict[bytes, bytes], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.received.append((scope["path"], dict(scope["headers"]), body))
        if scope["path"] == "/internal":
            await self._send(send, 200, orjson.dumps(INTERNAL))
            return
        if scope["path"] == "/v1/models":
            data = {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}
            await self._send(send, 200, orjson.dumps(data))
            return
        model = orjson.loads(body).get("model")
        if model in ("key-401", "key-500"):   # an upstream that quotes the key it was sent
            auth = dict(scope["headers"]).get(b"authorization", b"")
            await send({"type": "http.response.start", "status": int(model[-3:]),
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Unknown key in " + auth})
        elif model in PLAIN:
            status, content_type, payload = PLAIN[model]
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", content_type.encode())]})
            await send({"type": "http.response.body", "body": payload})
        elif model in STREAMS:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for chunk in STREAMS[model]:
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + orjson.dumps(chunk) + b"\n\n"})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        elif model in ("redirect-307", "redirect-302"):
            host = dict(scope["headers"]).get(b"host", b"")
            await send({"type": "http.response.start", "status": int(model[-3:]),
                        "headers": [(b"location", b"http://" + host + b"/internal"),
                                    (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b"{}"})
        elif model == "huge-body":       # 4 MiB of answer, sent in pieces
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "more_body": True,
                        "body": orjson.dumps(_OK)[:-1] + b', "x": "'})
            for _ in range(64):
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"y" * 65536})
            await send({"type": "http.response.body", "body": b'"}'})
        elif model == "huge-event":      # an SSE event that never ends: no blank line
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps(_CHUNK) + b"\n\n"})
            for _ in range(64):
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + b"y" * 65536 + b"\n"})
            await send({"type": "http.response.body", "body": b"\ndata: [DONE]\n\n"})
        elif model == "slow-stream":     # a stream whose first byte takes a second
            await asyncio.sleep(1)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for chunk in (_CHUNK, _chunk([], usage=_OK["usage"])):
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + orjson.dumps(chunk) + b"\n\n"})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        elif model == "fail-500":
            await self._send(send, 500, b'{"error": {"message": "boom"}}')
        elif model == "slow":
            await asyncio.sleep(3)
            await self._send(send, 200, orjson.dumps(_OK))
        elif model == "bad-json":
            await self._send(send, 200, b"<html>oops</html>")
        elif model == "deep-json":       # an answer nested deeper than orjson writes
            await self._send(send, 200, orjson.dumps(_OK)[:-1] + b', "x_deep": '
                             + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}")
        elif model == "reject-400":
            await self._send(send, 400, orjson.dumps({"error": {
                "message": "max_tokens too large", "type": "invalid_request_error",
                "param": "max_tokens", "code": None}}))
        elif model == "no-usage":        # a stream that never reports its usage
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            done = {**_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            for chunk in (_CHUNK, _CHUNK, done):
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + orjson.dumps(chunk) + b"\n\n"})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        elif model in ("drop-stream", "no-done"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for _ in range(2):
                await send({"type": "http.response.body",
                            "body": b"data: " + orjson.dumps(_CHUNK) + b"\n\n",
                            "more_body": True})
            if model == "drop-stream":
                raise ConnectionAbortedError("upstream dies mid-stream (on purpose)")
            await send({"type": "http.response.body", "body": b""})
        else:
            await self._send(send, 200, orjson.dumps(_OK))

    @staticmethod
    async def _send(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class FaultyUpstreamThread:
    def __init__(self) -> None:
        # Bound now, so that no other process can take the port before it serves.
        self.socket = listen("127.0.0.1", 0, "faulty upstream")
        self.port = self.socket.getsockname()[1]
        self.app = FaultyUpstream()
        config = uvicorn.Config(self.app, log_level="critical", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.socket],),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FaultyUpstreamThread:
        self.thread.start()
        while not self.server.started:
            threading.Event().wait(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()
