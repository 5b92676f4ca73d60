"""A small deterministic OpenAI-compatible model stand-in, for the demo and the tests.

It is not a model: the answer to a prompt is derived from the prompt's hash, so the same
request always gets the same answer, with lengths like real chat answers (a log-normal
spread around ~150 tokens, capped by ``max_tokens``). It serves ``/v1/models``,
``/v1/chat/completions`` (streaming, ``stream_options.include_usage``), ``/v1/completions``
and ``/v1/embeddings``, with ``n`` choices (1 to 128, as the OpenAI API allows; the
first is the answer a request without ``n`` gets) and, for completions, one choice per
prompt of a prompt array. The model ``demo-reasoner-1`` also returns ``reasoning_content``,
as reasoning models served by vLLM or DeepSeek's API do.

Run it alone with ``distillguard demo-upstream --port 9000``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from distillguard.exchange import request_text

CHAT_MODELS = ("demo-chat-1", "demo-reasoner-1", "demo-chat-2")
COMPLETION_MODELS = ("demo-instruct-1",)
EMBEDDING_MODELS = ("demo-embed-1",)
ALL_MODELS = CHAT_MODELS + COMPLETION_MODELS + EMBEDDING_MODELS
CREATED = 1_767_225_600  # 2026-01-01
MAX_CHOICES = 128

_WORDS = ["the", "model", "answer", "considers", "each", "step", "carefully", "and", "explains", "why", "result", "follows", "from", "given", "data", "first", "we", "define", "terms", "then", "compute", "value", "check", "edge", "cases", "finally", "summarise", "code", "function", "returns", "list", "of", "items", "sorted", "by", "key", "using", "a", "loop", "over", "input", "values", "while", "tracking", "state", "this", "approach", "runs", "in", "linear", "time", "memory", "stays", "constant", "example", "shows", "output", "for", "small", "case", "note", "that", "error", "handling", "matters", "when", "input", "is", "empty", "or", "invalid"]


def count_tokens(text: str) -> int:
    """Rough token count (~4 characters a token), as tokenizers give for English."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def answer_tokens(prompt: str, model: str, max_tokens: int | None) -> list[str]:
    rng = _rng(prompt, model)
    length = int(min(2000, max(5, rng.lognormvariate(math.log(150), 0.7))))
    if max_tokens is not None:
        length = max(1, min(length, int(max_tokens)))
    return [rng.choice(_WORDS) for _ in range(length)]


def _finish(limit: int | None, tokens: list[str]) -> str:
    return "length" if limit == len(tokens) else "stop"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(message: str, status: int, code: str, param: str | None = None) -> Response:
    return _json({"error": {"message": message, "type": "invalid_request_error",
                            "param": param, "code": code}}, status)


def _token_limit(body: dict[str, Any], *names: str) -> int | None | Response:
    """The first of ``names`` the body sets (a whole number of at least 1, as the OpenAI
    API requires), None when it sets none, or the 400 answer the API gives a bad one."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            return _error(f"Invalid type for '{name}': expected an integer, but got "
                          f"{type(value).__name__}.", 400, "invalid_type", name)
        if value < 1:
            return _error(f"Invalid '{name}': integer below minimum value. Expected a value "
                          f">= 1, but got {value} instead.", 400, "integer_below_min_value",
                          name)
        return value
    return None


def _choice_count(body: dict[str, Any]) -> int | Response:
    """``n``: how many choices to generate for each prompt (1 to 128), or the 400 answer
    the OpenAI API gives a bad one."""
    n = body.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool):
        return _error(f"Invalid type for 'n': expected an integer, but got "
                      f"{type(n).__name__}.", 400, "invalid_type", "n")
    if not 1 <= n <= MAX_CHOICES:
        return _error(f"Invalid 'n': integer {'below minimum' if n < 1 else 'above maximum'} "
                      f"value. Expected a value {'>= 1' if n < 1 else f'<= {MAX_CHOICES}'}, "
                      f"but got {n} instead.", 400,
                      "integer_below_min_value" if n < 1 else "integer_above_max_value", "n")
    return n


def _answers(prompt: str, model: str, limit: int | None, n: int) -> list[list[str]]:
    """``n`` answers to one prompt: the first is the answer to a request without ``n``."""
    return [answer_tokens(prompt if i == 0 else f"{prompt}\x00choice {i}", model, limit)
            for i in range(n)]


def _prompts(body: dict[str, Any]) -> list[str]:
    """The completions API's prompts: an array of strings or of token arrays is several
    prompts, each answered on its own; a string or one token array is one."""
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return [p if isinstance(p, str) else request_text({"prompt": p}) for p in prompt]
    return [request_text(body)]


def _is_prompt(prompt: Any) -> bool:
    """What the completions API takes as ``prompt``: a string, or a non-empty array of
    strings, of tokens (integers) or of token arrays."""
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    def token(t: Any) -> bool:
        return isinstance(t, int) and not isinstance(t, bool)
    return (all(isinstance(p, str) for p in prompt) or all(token(t) for t in prompt)
            or all(isinstance(p, list) and p and all(token(t) for t in p) for p in prompt))


async def _body(request: Request) -> dict[str, Any] | Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _error("invalid JSON body", 400, "invalid_json")
    if not isinstance(body, dict):
        return _error("body must be a JSON object", 400, "invalid_body")
    return body


class DemoUpstream:
    """The ASGI app. ``chunk_delay_s`` slows streaming to look like real generation."""

    def __init__(self, chunk_delay_s: float = 0.0) -> None:
        self.chunk_delay_s = chunk_delay_s
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    async def models(self, request: Request) -> Response:
        return _json({"object": "list", "data": [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "distillguard-demo"}
            for m in ALL_MODELS
        ]})

    async def chat(self, request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        model = body.get("model")
        if model not in CHAT_MODELS:
            return _error(f"The model '{model}' does not exist", 404, "model_not_found")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error("'messages' must be a non-empty list", 400, "invalid_messages")
        limit = _token_limit(body, "max_completion_tokens", "max_tokens")
        if isinstance(limit, Response):
            return limit
        n = _choice_count(body)
        if isinstance(n, Response):
            return n
        prompt = request_text(body)
        answers = _answers(prompt, model, limit, n)
        reasoning = None
        if model == "demo-reasoner-1":
            reasoning = " ".join(answer_tokens("reason:" + prompt, model, 60))
        completion = sum(map(len, answers))
        usage = {"prompt_tokens": count_tokens(prompt), "completion_tokens": completion,
                 "total_tokens": count_tokens(prompt) + completion}
        ident = "chatcmpl-" + hashlib.sha256(prompt.encode()).hexdigest()[:24]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._chat_stream(ident, model, answers, limit, reasoning, usage,
                                  include_usage),
                media_type="text/event-stream",
            )
        choices = []
        for index, tokens in enumerate(answers):
            message: dict[str, Any] = {"role": "assistant", "content": " ".join(tokens)}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": _finish(limit, tokens)})
        return _json({
            "id": ident, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_demo", "choices": choices,
            "usage": usage,
        })

    async def _chat_stream(
        self, ident: str, model: str, answers: list[list[str]], limit: int | None,
        reasoning: str | None, usage: dict[str, int], include_usage: bool,
    ) -> AsyncIterator[bytes]:
        """The choices' chunks interleaved, as the OpenAI API sends them for ``n`` > 1."""
        created = int(time.time())

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": model, "system_fingerprint": "fp_demo",
                    "choices": [{"index": index, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}]}
            if include_usage:
                data["usage"] = None
            return b"data: " + orjson.dumps(data) + b"\n\n"

        for index in range(len(answers)):
            yield chunk(index, {"role": "assistant", "content": ""})
            if reasoning is not None:
                yield chunk(index, {"reasoning_content": reasoning})
        longest = max(map(len, answers))
        for i in range(0, longest, 4):
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            for index, tokens in enumerate(answers):
                if i < len(tokens):
                    piece = " ".join(tokens[i:i + 4])
                    yield chunk(index, {"content": piece if i == 0 else " " + piece})
        for index, tokens in enumerate(answers):
            yield chunk(index, {}, _finish(limit, tokens))
        if include_usage:
            yield b"data: " + orjson.dumps({
                "id": ident, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def completions(self, request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        model = body.get("model")
        if model not in COMPLETION_MODELS + CHAT_MODELS:
            return _error(f"The model '{model}' does not exist", 404, "model_not_found")
        if not _is_prompt(body.get("prompt")):
            return _error("Invalid type for 'prompt': expected a string, an array of strings, "
                          "an array of tokens or an array of token arrays.", 400,
                          "invalid_type", "prompt")
        limit = _token_limit(body, "max_tokens")
        if isinstance(limit, Response):
            return limit
        n = _choice_count(body)
        if isinstance(n, Response):
            return n
        prompts = _prompts(body)
        # One choice per prompt and answer, numbered prompt by prompt.
        cap = 16 if limit is None else limit
        answers = [tokens for p in prompts for tokens in _answers(p, model, cap, n)]
        prompt_tokens = sum(count_tokens(p) for p in prompts)
        completion = sum(map(len, answers))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        ident = "cmpl-" + hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:24]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def gen() -> AsyncIterator[bytes]:
                for i in range(0, max(map(len, answers)), 4):
                    for index, tokens in enumerate(answers):
                        if i >= len(tokens):
                            continue
                        piece = " " + " ".join(tokens[i:i + 4])
                        yield b"data: " + orjson.dumps({
                            "id": ident, "object": "text_completion", "created": CREATED,
                            "model": model, "choices": [{
                                "index": index, "text": piece, "logprobs": None,
                                "finish_reason": _finish(cap, tokens)
                                if i + 4 >= len(tokens) else None}],
                        }) + b"\n\n"
                if include_usage:
                    yield b"data: " + orjson.dumps({
                        "id": ident, "object": "text_completion", "created": CREATED,
                        "model": model, "choices": [], "usage": usage}) + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")
        return _json({
            "id": ident, "object": "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": index, "text": " " + " ".join(tokens), "logprobs": None,
                         "finish_reason": _finish(cap, tokens)}
                        for index, tokens in enumerate(answers)],
            "usage": usage,
        })

    async def embeddings(self, request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        model = body.get("model")
        if model not in EMBEDDING_MODELS:
            return _error(f"The model '{model}' does not exist", 404, "model_not_found")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            return _error("'input' must be a string or a non-empty list", 400, "invalid_input")
        dims = int(body.get("dimensions") or 64)
        data = []
        total = 0
        for i, text in enumerate(inputs):
            text = text if isinstance(text, str) else orjson.dumps(text).decode()
            rng = _rng(text, model)
            vec = [rng.gauss(0, 1) for _ in range(dims)]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            values = [v / norm for v in vec]
            encoded: Any = [round(v, 6) for v in values]
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dims}f", *values)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
            total += count_tokens(text)
        return _json({"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": total, "total_tokens": total}})


def create_demo_upstream(chunk_delay_s: float = 0.0) -> DemoUpstream:
    return DemoUpstream(chunk_delay_s)
