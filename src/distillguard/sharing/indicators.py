"""From a STIX indicator to something a request check can match.

A STIX pattern can say far more than a request check can test from memory. These
patterns (single comparisons, or several joined by ``OR``) become matchable inputs:

=========  ==========================================================================
kind       pattern
=========  ==========================================================================
ip         ``[ipv4-addr:value ISSUBSET '198.51.100.0/24']``, ``=`` an address; ipv6 too
asn        ``[autonomous-system:name = 'Example Hosting']`` (case-insensitive)
user_agent ``[network-traffic:extensions.'http-request-ext'.request_header.'User-Agent'
           = 'python-requests/2.31']``, or ``MATCHES '<regex>'`` (RE2 syntax)
template   ``[x-distillguard-prompt:template_fingerprint = 'tfp1:...']``
payment    ``[user-account:x_payment_fingerprint_sha256 = '<hex>']`` with the indicator's
           ``x_distillguard_salt``
=========  ==========================================================================

Other indicators are kept (with their provenance) but do not act; so are indicators
that would act on every request or nearly: a network broader than MIN_PREFIX (such as
``0.0.0.0/0``) and a regular expression that matches the empty string (``.*``). Partner
regular expressions run on every request's user agent, so they are compiled with RE2,
whose matching time is linear in the agent's length: Python's backtracking engine took
minutes on ``(a+)+$`` (and a pattern RE2 cannot compile, such as a back-reference, does
not act).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import re2  # type: ignore[import-untyped]
from stix2patterns.v21.pattern import Pattern

from distillguard.exchange import parse_ts

UA_PATH = ["extensions", "http-request-ext", "request_header", "User-Agent"]
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'")
# The broadest network an indicator may name and still act: a /8 or a /0 would flag (or
# block) a large part of all traffic on one partner's word.
MIN_PREFIX = {4: 16, 6: 32}
_RE2 = re2.Options()
_RE2.log_errors = False  # RE2 would print every pattern it refuses to stderr


def user_agent_regex(pattern: str) -> Any | None:
    """``pattern`` compiled with RE2, or None when RE2 cannot compile it or it matches
    the empty string (and so every user agent)."""
    try:
        compiled = re2.compile(pattern, _RE2)
    except re2.error:
        return None
    return None if compiled.search("") else compiled


def network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network ``value`` names, or None when it is not one or is broader than
    MIN_PREFIX."""
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None
    return net if net.prefixlen >= MIN_PREFIX[net.version] else None


@dataclass(frozen=True, slots=True)
class IndicatorInput:
    indicator_id: str
    n: int
    kind: str
    op: str
    value: str
    salt: str | None
    name: str | None
    confidence: int | None
    valid_from: datetime | None
    expires_at: datetime


def _unquote(literal: str) -> str | None:
    if len(literal) < 2 or literal[0] != "'" or literal[-1] != "'":
        return None
    return re.sub(r"\\(.)", r"\1", literal[1:-1])


def _comparisons(pattern: str) -> list[tuple[str, list[Any], str, str]] | None:
    try:
        data = Pattern(pattern).inspect()
    except Exception:  # the parser raises its own family of errors
        return None
    bare = _QUOTED.sub("''", pattern)
    if data.qualifiers or data.observation_ops - {"OR"} or re.search(
            r"\b(AND|FOLLOWEDBY|NOT)\b", bare):
        return None
    out = []
    for object_type, comps in data.comparisons.items():
        for path, op, literal in comps:
            value = _unquote(literal)
            if value is None:
                return None
            out.append((object_type, list(path), op, value))
    return out


def _one(object_type: str, path: list[Any], op: str, value: str, obj: dict[str, Any]
         ) -> tuple[str, str, str] | None:
    if object_type in ("ipv4-addr", "ipv6-addr") and path == ["value"] and op in (
            "=", "ISSUBSET"):
        net = network(value)
        return None if net is None else ("ip", "in", str(net))
    if object_type == "autonomous-system" and path == ["name"] and op == "=":
        return "asn", "=", value.casefold()
    if object_type == "network-traffic" and path == UA_PATH and op in ("=", "MATCHES"):
        if op == "MATCHES" and user_agent_regex(value) is None:
            return None
        return "user_agent", op, value
    if (object_type == "x-distillguard-prompt" and path == ["template_fingerprint"]
            and op == "="):
        return "template", "=", value
    if (object_type == "user-account" and path == ["x_payment_fingerprint_sha256"]
            and op == "=" and isinstance(obj.get("x_distillguard_salt"), str)):
        return "payment", "=", value.lower()
    return None


def indicator_inputs(obj: dict[str, Any], *, now: datetime, ttl: timedelta
                     ) -> list[IndicatorInput]:
    """The matchable inputs of one STIX indicator (empty when it cannot act)."""
    if obj.get("type") != "indicator" or obj.get("pattern_type") != "stix":
        return []
    if obj.get("revoked"):
        return []
    comps = _comparisons(str(obj.get("pattern", "")))
    if not comps:
        return []
    until = obj.get("valid_until")
    expires = parse_ts(until) if until else now + ttl
    start = obj.get("valid_from")
    out = []
    for n, (object_type, path, op, value) in enumerate(comps):
        found = _one(object_type, path, op, value, obj)
        if found is None:
            continue  # comparisons are OR-ed: testing the others is still sound
        kind, mode, normal = found
        out.append(IndicatorInput(
            indicator_id=obj["id"], n=n, kind=kind, op=mode, value=normal,
            salt=obj.get("x_distillguard_salt") if kind == "payment" else None,
            name=obj.get("name"), confidence=obj.get("confidence"),
            valid_from=parse_ts(start) if start else None, expires_at=expires))
    return out
