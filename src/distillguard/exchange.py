"""The Exchange record: one per request, the only thing that flows through the pipeline.

The gateway builds an :class:`Exchange` when a request arrives, fills it in as the request
is authenticated, checked and forwarded, and hands the finished record to the pipeline
(:mod:`distillguard.pipeline`). Stages annotate it (``exchange.annotations[...]``); none
invents its own ad hoc dict.

An Exchange converts to and from one line of the public trace format (see
``docs/formats.md``): :meth:`Exchange.to_trace` and :meth:`Exchange.from_trace`.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

if TYPE_CHECKING:
    from distillguard.auth import Principal

TRACE_FIELDS = (
    "ts",
    "account_id",
    "key_id",
    "client_ip",
    "user_agent",
    "request",
    "response",
    "status",
    "latency_ms",
)

# Trace fields an Exchange has a place for; any other lands in ``extra``.
_KNOWN_FIELDS = frozenset(TRACE_FIELDS) | {"exchange_id", "endpoint", "request_sha256",
                                           "response_sha256", "usage", "model", "error_code"}


class Retention(StrEnum):
    """What is kept of request and response bodies once an exchange is persisted.

    ``full``: bodies are kept. ``hash``: only their SHA-256 is kept. Hashes are always
    computed, so a body deleted later can still be matched against its hash.
    """

    FULL = "full"
    HASH = "hash"


def body_hash(body: Any) -> str | None:
    """SHA-256 (hex) of a JSON body in canonical form (sorted keys, no spaces)."""
    if body is None:
        return None
    return hashlib.sha256(canonical_json(body)).hexdigest()


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


# The deepest a request body may nest objects and arrays. Its canonical form (the ledger's
# record, the body hash) is written by orjson, which writes at most 254 levels: a request
# nested 300 levels deep was answered by the upstream and then recorded nowhere (ledger,
# detection, dashboard). Structured outputs nest a schema 5 to 10 levels; 64 leaves room
# for any real request.
MAX_JSON_DEPTH = 64
# The largest whole number taken from a client, an upstream or a record (a usage count, a
# limit, a list offset): JSON readers keep every integer up to it exactly, and the
# stores' 64-bit columns and the counters take it; one past 64 bits failed in the
# stores' drivers.
MAX_JSON_INT = 2**53 - 1


def nested_deeper_than(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests objects and arrays more than ``limit`` levels
    (a scalar is level 0, ``{}`` level 1). Level by level, holding only containers: it
    runs on every request the gateway takes, and a value as deep as the parser allows
    would exceed Python's recursion limit."""
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        inner = []
        for item in level:
            for child in (item.values() if type(item) is dict else item):
                if type(child) is dict or type(child) is list:
                    inner.append(child)
        level = inner
    return False


def new_exchange_id(now_ns: int | None = None) -> str:
    """Time-ordered unique id: 13 hex digits of milliseconds, then 10 random hex digits."""
    ms = (now_ns or time.time_ns()) // 1_000_000
    return f"ex_{ms:013x}{os.urandom(5).hex()}"


def trace_line_id(line: dict[str, Any], ts: datetime) -> str:
    """The id of a trace line that carries no ``exchange_id``: ``ex_``, 13 hex digits of
    its own time in milliseconds, then 10 hex digits of the BLAKE2b of its content in
    canonical JSON. The same line is the same exchange whenever it is read: importing a
    file twice skips what the ledger holds, and two runs of ``detect`` name the same
    example exchanges. Only a line too deep to write again (its bodies are dropped when
    recorded, see :func:`seal_bodies`) gets a random id."""
    ms = max(0, int(ts.timestamp() * 1000))
    try:
        content = orjson.dumps(line, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return f"ex_{ms:013x}{os.urandom(5).hex()}"
    return f"ex_{ms:013x}{hashlib.blake2b(content, digest_size=5).hexdigest()}"


def parse_ts(value: str | datetime) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or offset) into an aware UTC datetime."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 time string, got {type(value).__name__}")
    text = value.strip()
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 time (such as 2026-03-01T12:00:00Z): "
                         f"{value[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except OverflowError:      # 9999-12-31T23:59:59-01:00 is past the last year in UTC
        raise ValueError(f"a time out of range in UTC: {value[:40]!r}") from None


def format_ts(dt: datetime) -> str:
    """RFC 3339 with millisecond precision and a ``Z`` suffix, as the trace format uses."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def usage_count(value: Any) -> int | None:
    """A usage count as reported: absent or null is 0; a whole number from 0 to
    MAX_JSON_INT (``12.0`` included) is itself; anything else (a string, a boolean, a
    fraction, a negative or larger number: no answer uses 2**53 tokens) is None."""
    if value is None:
        return 0
    if type(value) is int:
        return value if 0 <= value <= MAX_JSON_INT else None
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_JSON_INT:
        return int(value)
    return None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_body(cls, usage: Any) -> Usage | None:
        """The usage an upstream (or a trace line) reported; None when there is none or
        when a count is not a :func:`usage_count` (``1e300``, ``-5``, ``"12"``): a count
        past what the ledger and the counters keep failed the exchange's ledger entry and
        charged the account that many tokens, and a negative one credited it."""
        if not isinstance(usage, dict):
            return None
        prompt = usage_count(usage.get("prompt_tokens"))
        completion = usage_count(usage.get("completion_tokens"))
        if prompt is None or completion is None:
            return None
        return cls(prompt_tokens=prompt, completion_tokens=completion)

    @classmethod
    def estimate(cls, request: Any, response: Any) -> Usage:
        """A stand-in for usage the upstream did not report: the prompt as
        :func:`prompt_token_estimate` counts it, and characters over CHARS_PER_TOKEN,
        rounded up, of what was generated (content, reasoning, tool-call arguments)."""
        generated = _generated_text(response)
        return cls(prompt_tokens=prompt_token_estimate(request),
                   completion_tokens=-(-len(generated) // CHARS_PER_TOKEN))


@dataclass(slots=True)
class Timings:
    """Monotonic clock readings (seconds) taken along the request path."""

    received: float = 0.0
    upstream_sent: float | None = None
    first_byte: float | None = None
    finished: float | None = None

    def ms(self, start: float | None, end: float | None) -> float | None:
        if start is None or end is None:
            return None
        return round((end - start) * 1000.0, 3)

    @property
    def latency_ms(self) -> float | None:
        return self.ms(self.received, self.finished)

    @property
    def upstream_ms(self) -> float | None:
        return self.ms(self.upstream_sent, self.finished)

    @property
    def time_to_first_byte_ms(self) -> float | None:
        return self.ms(self.received, self.first_byte)


@dataclass(slots=True)
class Exchange:
    """One API request and its outcome.

    Fields are filled in as the request advances; a finished Exchange has a ``status``.
    ``request`` and ``response`` hold the JSON bodies (for a stream, ``response`` is the
    reassembled completion); ``retention`` says what persisting stages may keep of them.
    """

    id: str
    ts: datetime
    endpoint: str
    method: str = "POST"
    account_id: str | None = None
    key_id: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    model: str | None = None
    stream: bool = False
    request: Any = None
    response: Any = None
    request_sha256: str | None = None
    response_sha256: str | None = None
    usage: Usage | None = None
    status: int = 0
    error_code: str | None = None
    retention: Retention = Retention.FULL
    timings: Timings = field(default_factory=Timings)
    latency_ms_override: float | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # The authenticated account and key; in memory only, never persisted or exported.
    principal: Principal | None = field(default=None, repr=False, compare=False)
    # The canonical JSON that seal_bodies hashed, kept so that a stage persisting the
    # bodies stores exactly the bytes behind the hashes without serialising them again.
    request_json: bytes | None = field(default=None, repr=False, compare=False)
    response_json: bytes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def start(cls, endpoint: str, method: str = "POST") -> Exchange:
        now_ns = time.time_ns()
        return cls(
            id=new_exchange_id(now_ns),
            ts=datetime.fromtimestamp(now_ns / 1e9, tz=UTC),
            endpoint=endpoint,
            method=method,
            timings=Timings(received=time.perf_counter()),
        )

    @property
    def latency_ms(self) -> float | None:
        if self.latency_ms_override is not None:
            return self.latency_ms_override
        return self.timings.latency_ms

    def settle_usage(self, reported: Any) -> None:
        """The exchange's usage from the upstream's report; when there is none (an
        upstream that does not report it, or a stream the client closed after the last
        token and before the usage event), an estimate (:meth:`Usage.estimate`), marked
        ``annotations["usage_estimated"]``: quotas are charged either way. A client that
        closed its stream at ``finish_reason`` otherwise used tokens for free. A report
        whose counts are not believed (:meth:`Usage.from_body`) is estimated the same way
        and marked ``annotations["usage_invalid"]``; the response keeps it as sent."""
        self.usage = Usage.from_body(reported)
        if self.usage is None and isinstance(reported, dict):
            self.annotations["usage_invalid"] = True
        if self.usage is None and (self.request is not None or self.response is not None):
            self.usage = Usage.estimate(self.request, self.response)
            self.annotations["usage_estimated"] = True

    def seal_bodies(self) -> None:
        """Compute body hashes (always) once the exchange is complete. A body that cannot
        be written as JSON (an upstream's answer nested deeper than orjson writes; a
        client's request that deep is refused before it is sent) is dropped and named in
        ``annotations["bodies_dropped"]``, so that the exchange is still recorded rather
        than lost with the error."""
        if self.request is not None and self.request_sha256 is None:
            sealed = self._sealed("request", self.request)
            if sealed is None:
                self.request = None
            else:
                self.request_json, self.request_sha256 = sealed
        if self.response is not None and self.response_sha256 is None:
            sealed = self._sealed("response", self.response)
            if sealed is None:
                self.response = None
            else:
                self.response_json, self.response_sha256 = sealed

    def _sealed(self, name: str, body: Any) -> tuple[bytes, str] | None:
        """A body's canonical JSON and its hash; None (and the body named in
        ``annotations["bodies_dropped"]``) when it cannot be written."""
        try:
            raw = canonical_json(body)
        except (orjson.JSONEncodeError, TypeError) as exc:
            self.annotations.setdefault("bodies_dropped", {})[name] = str(exc)
            return None
        return raw, hashlib.sha256(raw).hexdigest()

    def to_trace(self, retention: Retention | None = None) -> dict[str, Any]:
        """This exchange as one object of the trace format (see docs/formats.md)."""
        keep = (retention or self.retention) is Retention.FULL
        self.seal_bodies()
        line: dict[str, Any] = dict(self.extra)
        usage = self.usage
        response = self.response if keep else None
        if keep and isinstance(response, dict) and usage is not None and "usage" not in response:
            response = {**response, "usage": {"prompt_tokens": usage.prompt_tokens,
                                              "completion_tokens": usage.completion_tokens}}
        line.update(
            {
                "ts": format_ts(self.ts),
                "exchange_id": self.id,
                "account_id": self.account_id,
                "key_id": self.key_id,
                "client_ip": self.client_ip,
                "user_agent": self.user_agent,
                "endpoint": self.endpoint,
                "request": self.request if keep else None,
                "response": response,
                "status": self.status,
                "latency_ms": self.latency_ms,
            }
        )
        if not keep or self.request is None:
            line["request_sha256"] = self.request_sha256
        if not keep or self.response is None:
            line["response_sha256"] = self.response_sha256
        if not keep and usage is not None:
            line["usage"] = {"prompt_tokens": usage.prompt_tokens,
                             "completion_tokens": usage.completion_tokens}
        if self.model is not None and not keep:
            line["model"] = self.model
        if self.error_code:
            line["error_code"] = self.error_code
        return line

    @classmethod
    def from_trace(cls, line: dict[str, Any]) -> Exchange:
        """Build an Exchange from one trace object; unknown fields land in ``extra``."""
        if not isinstance(line, dict):
            raise ValueError("a trace line must be a JSON object")
        if "ts" not in line:
            raise ValueError("a trace line needs 'ts'")
        request = line.get("request")
        response = line.get("response")
        usage = Usage.from_body(response.get("usage")) if isinstance(response, dict) else None
        if usage is None:
            usage = Usage.from_body(line.get("usage"))
        model = text_field(line, "model")
        if model is None and isinstance(request, dict):
            model = text_field(request, "model")
        stream = bool(request.get("stream")) if isinstance(request, dict) else False
        latency = _trace_number(line, "latency_ms", "a number of milliseconds", float)
        ts = parse_ts(line["ts"])
        ex = cls(
            id=id_field(line, "exchange_id") or trace_line_id(line, ts),
            ts=ts,
            endpoint=text_field(line, "endpoint") or "/v1/chat/completions",
            account_id=id_field(line, "account_id"),
            key_id=id_field(line, "key_id"),
            client_ip=text_field(line, "client_ip"),
            user_agent=text_field(line, "user_agent"),
            model=model,
            stream=stream,
            request=request,
            response=response,
            request_sha256=line.get("request_sha256"),
            response_sha256=line.get("response_sha256"),
            usage=usage,
            status=_trace_number(line, "status", "an HTTP status code", int) or 0,
            error_code=line.get("error_code"),
            latency_ms_override=latency,
            extra={k: v for k, v in line.items() if k not in _KNOWN_FIELDS},
        )
        return ex

    def prompt_text(self) -> str:
        """The user-visible prompt text of a chat or completions request, joined."""
        return request_text(self.request)

    def response_text(self) -> str:
        return response_text(self.response)


N = TypeVar("N", int, float)


def _trace_number(line: dict[str, Any], name: str, what: str, kind: type[N]) -> N | None:
    """A trace line's numeric field (None when absent), or ValueError naming the field:
    ``int("ok")``'s own message says neither which field nor what it wants."""
    value = line.get(name)
    if value is None:
        return None
    if type(value) is kind and value >= 0 and math.isfinite(value):   # nearly every line
        return value
    try:
        number = kind(value)
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise ValueError
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"'{name}' must be {what}, not {value!r}") from None
    return number


_JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
               float: "a number"}


def text_field(record: dict[str, Any], name: str) -> str | None:
    """A record's text field (None when absent or null), or ValueError naming the field.
    The formats (docs/formats.md) give ids, addresses and fingerprints as strings; taking
    ``str()`` of anything else made ids such as ``"{'x': 1}"`` or ``"True"``, which no
    other record shares, or which two unrelated records share by accident."""
    return text_value(record.get(name), name)


# The longest id (exchange, account, key) a trace line may carry: ids are indexed where
# they are kept, and PostgreSQL keeps at most 2,704 bytes in an index entry.
MAX_ID_CHARS = 256


def id_field(record: dict[str, Any], name: str) -> str | None:
    """A record's id (:func:`text_field`), which must not hold the NUL character nor be
    longer than MAX_ID_CHARS: the gateway never makes such an id (accounts refuse one),
    and PostgreSQL cannot keep it, so one imported from a trace failed the ledger's
    append and every verdict write that named the account. The text a client chose
    (``model``) may hold one; it is kept."""
    value = text_field(record, name)
    if value is not None:
        if "\x00" in value:
            raise ValueError(f"'{name}' must not contain the NUL character")
        if len(value) > MAX_ID_CHARS:
            raise ValueError(f"'{name}' is {len(value)} characters long; ids are at most "
                             f"{MAX_ID_CHARS}")
    return value


def text_value(value: Any, name: str) -> str | None:
    """``value`` of the text field ``name``, as :func:`text_field` takes it."""
    if value is None or type(value) is str:
        return value
    what = _JSON_TYPES.get(type(value), type(value).__name__)
    raise ValueError(f"'{name}' must be a string, not {what}")


def content_text(content: Any) -> str:
    """The text of one message's ``content`` (a string, or the text parts of a list)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


# Characters per token when usage must be estimated: OpenAI's rule of thumb for English.
CHARS_PER_TOKEN = 4
# Tokens an image in a prompt is counted as when usage must be estimated: OpenAI's price
# of a 1024 x 1024 image at high detail (85 + 4 tiles of 170), and of any image at low
# detail. An estimate cannot see the image's size; a larger one costs more upstream.
IMAGE_TOKENS = 765
IMAGE_TOKENS_LOW = 85


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def _token_ids(value: Any) -> int | None:
    """Tokens of a prompt or input given as token ids (a list of integers, or a list of
    such lists); None for any other form."""
    if not isinstance(value, list) or not value:
        return None
    if _is_token_ids(value):
        return len(value)
    if all(_is_token_ids(v) for v in value):
        return sum(len(v) for v in value)
    return None


def _image_tokens(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    tokens = 0
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            image = part.get("image_url")
            low = isinstance(image, dict) and image.get("detail") == "low"
            tokens += IMAGE_TOKENS_LOW if low else IMAGE_TOKENS
    return tokens


def _json_chars(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):
        return 0


def _lax_int(value: Any) -> int | None:
    """A whole number as a lenient upstream reads one (pydantic's lax mode, as vLLM's
    request models use): an int, a float with no fraction, or a string of digits; a
    boolean or anything else is no number."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def requested_completion(request: Any) -> tuple[int, int]:
    """What a request lets the upstream generate: the larger of ``max_tokens`` and
    ``max_completion_tokens`` (0 when neither is a positive number) and the larger of
    ``n`` and ``best_of`` (at least 1). Upstreams differ on which of a pair wins (vLLM
    takes ``max_completion_tokens or max_tokens``), and ``best_of`` completions are all
    generated though ``n`` are returned, so the larger of each is what may be generated.
    The token reservation and detection's harvest features both read it here."""
    if not isinstance(request, dict):
        return 0, 1
    limits = [_lax_int(request.get(k)) for k in ("max_tokens", "max_completion_tokens")]
    samples = [_lax_int(request.get(k)) for k in ("n", "best_of")]
    limit = max((v for v in limits if v is not None), default=0)
    count = max((v for v in samples if v is not None), default=1)
    return min(max(limit, 0), MAX_JSON_INT), min(max(count, 1), MAX_JSON_INT)


def prompt_token_estimate(request: Any) -> int:
    """Tokens a request's prompt is counted as when they must be estimated (before the
    upstream answers, and when it reports no usage): characters over CHARS_PER_TOKEN,
    rounded up, of everything the model reads as text (message contents and names,
    earlier tool calls, the tool and function definitions, a response format's schema),
    plus one token per token id of a prompt given as ids and IMAGE_TOKENS per image.
    Counting the message text alone charged 76 tokens for an 80,000-character tool
    schema, and nothing for a prompt of token ids or for images. Audio parts are not
    counted."""
    if not isinstance(request, dict):
        return 0
    chars = len(request_text(request))
    tokens = 0
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            tokens += _image_tokens(message.get("content"))
            for name in ("name", "tool_call_id"):
                if isinstance(message.get(name), str):
                    chars += len(message[name])
            for field_name in ("tool_calls", "function_call"):
                if message.get(field_name):
                    chars += _json_chars(message[field_name])
    else:
        for name in ("prompt", "input"):
            ids = _token_ids(request.get(name))
            if ids is not None:
                tokens += ids
            elif name == "input" and isinstance(request.get(name), list):
                chars += sum(len(p) for p in request[name] if isinstance(p, str))
    for name in ("tools", "functions", "response_format"):
        if request.get(name):
            chars += _json_chars(request[name])
    return min(tokens + -(-chars // CHARS_PER_TOKEN), MAX_JSON_INT)


def _choices(response: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """A response's choices, each with its message (None for a completion's text)."""
    if not isinstance(response, dict):
        return
    for choice in response.get("choices") or []:
        if isinstance(choice, dict):
            message = choice.get("message")
            yield choice, message if isinstance(message, dict) else None


def _generated_text(response: Any) -> str:
    """Everything a response's choices generated: content, reasoning, tool-call
    arguments, completion text."""
    out = []
    for choice, message in _choices(response):
        if isinstance(choice.get("text"), str):
            out.append(choice["text"])
        if message is None:
            continue
        out.append(content_text(message.get("content")))
        if isinstance(message.get("reasoning_content"), str):
            out.append(message["reasoning_content"])
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                out.append(function["arguments"])
    return "".join(out)


def request_text(request: Any) -> str:
    if not isinstance(request, dict):
        return ""
    messages = request.get("messages")
    if isinstance(messages, list):
        return "\n".join(
            content_text(m.get("content")) for m in messages if isinstance(m, dict)
        )
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    inp = request.get("input")
    if isinstance(inp, str):
        return inp
    return ""


def response_text(response: Any) -> str:
    out = []
    for choice, message in _choices(response):
        if message is not None:
            out.append(content_text(message.get("content")))
        elif isinstance(choice.get("text"), str):
            out.append(choice["text"])
    return "\n".join(out)
