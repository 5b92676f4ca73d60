"""Prompt-template fingerprints (``tfp1``): the same on both sides of a share.

A harvesting campaign sends thousands of prompts cut from a few templates ("You are a
helpful tutor. Solve step by step: <problem>"). The fingerprint keeps what a template
fixes and drops what it varies: the system prompt and the first
:data:`LEADING_WORDS` words of the first user message, lower-cased, runs of ASCII digits
folded to ``0`` and white space (``str.split``) collapsed to single spaces; then
``tfp1:`` + 16 hex digits of their SHA-256.

It is deliberately simple so that any partner can recompute it from this description;
a template whose variable part comes first is not caught by it.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any

VERSION = "tfp1"
LEADING_WORDS = 8
_DIGITS = re.compile(r"[0-9]+")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _normal(text: str) -> str:
    return _DIGITS.sub("0", " ".join(text.lower().split()))


_normal_system = lru_cache(maxsize=1024)(_normal)  # system prompts repeat


def _lead(text: str) -> str:
    """The first words of the normalised text (splitting first: folding digits and case
    never moves a word boundary, so only the words kept are normalised)."""
    words = text.split(maxsplit=LEADING_WORDS)[:LEADING_WORDS]
    return _DIGITS.sub("0", " ".join(words).lower())


def template_fingerprint(request: Any) -> str | None:
    """The fingerprint of a chat-completions (or completions) request body, or None."""
    if not isinstance(request, dict):
        return None
    system, user = "", None
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if role in ("system", "developer") and not system:
                system = _normal_system(_text(message.get("content")))
            elif role == "user" and user is None:
                user = _lead(_text(message.get("content")))
    elif isinstance(request.get("prompt"), str):
        user = _lead(request["prompt"])
    if not user:
        return None
    lead = user
    digest = hashlib.sha256(f"{system}\x00{lead}".encode()).hexdigest()[:16]
    return f"{VERSION}:{digest}"
