"""Ledger entries and their leaf encoding (entry format version 1, docs/ledger.md).

The leaf of entry ``idx`` is the canonical JSON (sorted keys, no spaces, UTF-8) of an
object that carries ``v`` (1), ``idx``, ``kind`` and the entry's fields. An exchange's
leaf holds its metadata in the clear and the SHA-256 of its request and response bodies,
never the bodies: bodies are stored beside the leaf (when the retention policy keeps them)
and may be deleted later without changing any hash. An event's leaf holds the whole event.
Embedding ``idx`` makes a moved entry detectable on its own.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from distillguard.exchange import Exchange, Retention, canonical_json
from distillguard.ledger import merkle
from distillguard.ledger.store import Row

ENTRY_VERSION = 1
KIND_EXCHANGE = "exchange"
KIND_EVENT = "event"


@dataclass(slots=True)
class Pending:
    """An entry waiting for its index.

    :meth:`encode` turns ``fields`` into the canonical JSON on either side of the
    ``idx`` member once (``from_exchange`` and ``from_event`` call it, off the writer's
    thread); :meth:`to_row` then only splices the index in and hashes the leaf. Fields
    changed after encoding are not seen.
    """

    kind: str
    entry_id: str
    ts: str
    account_id: str | None
    fields: dict[str, Any]
    request: bytes | None = None
    response: bytes | None = None
    _head: bytes = b""
    _tail: bytes = b""

    def encode(self) -> Pending:
        """Split the leaf object at its ``idx`` key. Canonical JSON sorts keys by code
        point, so every key below ``"idx"`` precedes it and every other follows it: the
        two halves joined around ``"idx":N`` are exactly the canonical JSON of the whole."""
        below: dict[str, Any] = {}
        above: dict[str, Any] = {}
        for key, value in self.fields.items():
            if key not in ("idx", "kind", "v"):
                (below if key < "idx" else above)[key] = value
        return self._encode(below, above)

    def _encode(self, below: dict[str, Any], above: dict[str, Any]) -> Pending:
        """``encode`` given ``fields`` already split at ``"idx"`` (``above`` gains
        ``kind`` and ``v``)."""
        above["kind"] = self.kind
        above["v"] = ENTRY_VERSION
        self._head = orjson.dumps(below, option=orjson.OPT_SORT_KEYS)[:-1]
        self._head += b',"idx":' if below else b'"idx":'
        self._tail = b"," + orjson.dumps(above, option=orjson.OPT_SORT_KEYS)[1:]
        return self

    def leaf(self, idx: int) -> bytes:
        if not self._head:
            self.encode()
        return b"%s%d%s" % (self._head, idx, self._tail)

    def to_row(self, idx: int) -> Row:
        leaf = self.leaf(idx)
        return Row(idx, self.kind, self.entry_id, self.ts, self.account_id, leaf,
                   merkle.leaf_hash(leaf), self.request, self.response)


_SECONDS: dict[int, str] = {}


def _ts(dt: datetime) -> str:
    """``format_ts`` (RFC 3339, milliseconds, ``Z``), several times faster: the
    date-and-second prefix is formatted once per second."""
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    stamp = dt.timestamp()
    if stamp < 0:
        return dt.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"
    secs = int(stamp)
    prefix = _SECONDS.get(secs)
    if prefix is None:
        if len(_SECONDS) > 256:
            _SECONDS.clear()
        prefix = _SECONDS[secs] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{prefix}.{dt.microsecond // 1000:03d}Z"


def _body(body: Any, known: str | None, sealed: bytes | None, keep: bool
          ) -> tuple[str | None, bytes | None]:
    if body is None:
        return known, None
    if known is not None and not keep:
        return known, None
    raw = sealed if sealed is not None and known is not None else canonical_json(body)
    return known or hashlib.sha256(raw).hexdigest(), raw if keep else None


def from_exchange(ex: Exchange, retention: Retention) -> Pending:
    keep = retention is Retention.FULL
    ex.request_sha256, request = _body(ex.request, ex.request_sha256, ex.request_json, keep)
    ex.response_sha256, response = _body(ex.response, ex.response_sha256, ex.response_json,
                                         keep)
    usage = ex.usage
    ts = _ts(ex.ts)
    # the leaf's keys below "idx", then the others: Pending.encode's split, done here
    below = {"account_id": ex.account_id, "client_ip": ex.client_ip,
             "completion_tokens": usage.completion_tokens if usage else None,
             "endpoint": ex.endpoint, "error_code": ex.error_code, "id": ex.id}
    above = {"key_id": ex.key_id, "latency_ms": ex.latency_ms, "method": ex.method,
             "model": ex.model, "prompt_tokens": usage.prompt_tokens if usage else None,
             "request_sha256": ex.request_sha256, "response_sha256": ex.response_sha256,
             "status": ex.status, "stream": ex.stream, "ts": ts,
             "user_agent": ex.user_agent}
    pending = Pending(KIND_EXCHANGE, ex.id, ts, ex.account_id, {**below, **above}, request,
                      response)
    return pending._encode(below, above)


def new_event_id() -> str:
    return f"ev_{time.time_ns() // 1_000_000:013x}{os.urandom(5).hex()}"


def check_event_name(name: str) -> None:
    parts = name.split(":")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"audit event name {name!r} must be source:subject:action")


def from_event(name: str, subject: str, actor: str | None, reason: str | None,
               detail: dict[str, Any], *, ts: datetime | None = None) -> Pending:
    check_event_name(name)
    when = _ts(ts or datetime.now(UTC))
    event_id = new_event_id()
    fields = {"id": event_id, "ts": when, "name": name, "subject": subject, "actor": actor,
              "reason": reason, "detail": detail}
    return Pending(KIND_EVENT, event_id, when, None, fields).encode()


def decode_leaf(leaf: bytes) -> dict[str, Any]:
    value = orjson.loads(leaf)
    if not isinstance(value, dict):
        raise ValueError("a leaf is a JSON object")
    return value


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def to_trace(row: Row) -> dict[str, Any]:
    """An exchange entry as one trace-format object: bodies when retained, else hashes."""
    return trace_of(row.leaf, row.request, row.response, row.idx)


def export_trace_line(leaf_bytes: bytes, request_json: str | None,
                      response_json: str | None, index: int) -> bytes | None:
    """A row of a Parquet export (``ledger export``) as a trace line, from its leaf: None
    for an entry that is not an exchange (whatever its ``kind`` column says). ValueError
    when a body does not have the hash the leaf commits to. The leaf itself is not checked
    against the export's signed checkpoint here: ``ledger verify-proof FILE.parquet
    --key`` does that (docs/ledger.md)."""
    from distillguard.ledger.verifier import body_mismatch

    leaf = decode_leaf(leaf_bytes)
    if leaf.get("kind") != KIND_EXCHANGE:
        return None
    wrong = body_mismatch(leaf, request_json, response_json)
    if wrong is not None:
        raise ValueError(wrong)
    return orjson.dumps(trace_of(leaf_bytes, request_json, response_json, index))


def trace_of(leaf_bytes: bytes, request_json: bytes | str | None,
             response_json: bytes | str | None, index: int) -> dict[str, Any]:
    """:func:`to_trace` from an entry's parts: the leaf, the retained bodies (canonical
    JSON, None when not retained) and its index; also what a row of the Parquet export
    (``ledger export``) holds."""
    leaf = decode_leaf(leaf_bytes)
    request = orjson.loads(request_json) if request_json is not None else None
    response = orjson.loads(response_json) if response_json is not None else None
    out: dict[str, Any] = {
        "ts": leaf.get("ts"), "exchange_id": leaf.get("id"),
        "account_id": leaf.get("account_id"), "key_id": leaf.get("key_id"),
        "client_ip": leaf.get("client_ip"), "user_agent": leaf.get("user_agent"),
        "endpoint": leaf.get("endpoint"), "model": leaf.get("model"),
        "request": request, "response": response, "status": leaf.get("status"),
        "latency_ms": leaf.get("latency_ms"),
        "request_sha256": leaf.get("request_sha256"),
        "response_sha256": leaf.get("response_sha256"),
        "ledger_index": index,
    }
    if leaf.get("prompt_tokens") is not None:
        out["usage"] = {"prompt_tokens": leaf.get("prompt_tokens"),
                        "completion_tokens": leaf.get("completion_tokens")}
    if leaf.get("error_code"):
        out["error_code"] = leaf["error_code"]
    return out
