"""Hidden reasoning: find it, strip or summarise it, and detect when it leaks.

Reasoning reaches clients in three places: the ``reasoning_content`` field (vLLM,
DeepSeek), the ``reasoning`` field (OpenRouter, some vLLM versions) and ``<think>...</think>``
blocks inside the visible ``content`` (models served without a reasoning parser).
:class:`ThinkSplitter` separates ``<think>`` blocks from visible text incrementally, so a
tag cut across two stream chunks is still found.

A *leak* is reasoning that reappears in the visible answer (the model restating its chain
of thought, verbatim or lightly reworded). :class:`LeakDetector` measures it per unit of
the answer: the share of the unit's word trigrams (after lower-casing and dropping
punctuation) that also occur in the reasoning.
"""

from __future__ import annotations

import re
from enum import StrEnum

REASONING_FIELDS = ("reasoning_content", "reasoning")
_OPEN, _CLOSE = "<think>", "</think>"
_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


class ReasoningMode(StrEnum):
    """What the client gets of the reasoning. Ordered from most to least visible."""

    PASS = "pass"
    SUMMARISE = "summarise"
    STRIP = "strip"

    @property
    def rank(self) -> int:
        return ("pass", "summarise", "strip").index(self.value)


class LeakAction(StrEnum):
    """What happens to an answer that restates its hidden reasoning.

    ``flag``: recorded on the exchange only. ``annotate``: also reported to the client in
    a ``distillguard`` field of the (non-streaming) body. ``strip``: leaked units are
    removed from the answer.
    """

    OFF = "off"
    FLAG = "flag"
    ANNOTATE = "annotate"
    STRIP = "strip"


def summarise(reasoning: str, max_words: int = 40) -> str:
    """A short extractive summary: the first and last sentence, capped at ``max_words``."""
    sentences = [s.strip() for s in _SENTENCE.split(reasoning.strip()) if s.strip()]
    if not sentences:
        return ""
    picked = sentences[:1] if len(sentences) == 1 else [sentences[0], sentences[-1]]
    words = " ".join(picked).split()
    total = len(reasoning.split())
    text = " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")
    return f"[reasoning summarised from {total} words] {text}"


class ThinkSplitter:
    """Splits streamed content into (visible, reasoning) text, holding back partial tags."""

    def __init__(self) -> None:
        self._buffer = ""
        self.inside = False
        self.seen = False

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        visible: list[str] = []
        thought: list[str] = []
        while True:
            tag = _CLOSE if self.inside else _OPEN
            i = self._buffer.find(tag)
            if i < 0:
                keep = _partial_suffix(self._buffer, tag)
                out, self._buffer = self._buffer[:len(self._buffer) - keep], \
                    self._buffer[len(self._buffer) - keep:]
                (thought if self.inside else visible).append(out)
                break
            (thought if self.inside else visible).append(self._buffer[:i])
            self._buffer = self._buffer[i + len(tag):]
            self.inside = not self.inside
            self.seen = True
        return "".join(visible), "".join(thought)

    def flush(self) -> tuple[str, str]:
        rest, self._buffer = self._buffer, ""
        return ("", rest) if self.inside else (rest, "")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_think(content: str) -> tuple[str, str]:
    """(visible content, reasoning) of a whole message."""
    splitter = ThinkSplitter()
    visible, thought = splitter.feed(content)
    rest_visible, rest_thought = splitter.flush()
    return visible + rest_visible, thought + rest_thought


def _trigrams(text: str) -> set[tuple[str, str, str]]:
    words = _WORD.findall(text.lower())
    return {(words[i], words[i + 1], words[i + 2]) for i in range(len(words) - 2)}


class LeakDetector:
    """Scores answer units against the reasoning seen so far."""

    def __init__(self, threshold: float = 0.6, min_words: int = 6) -> None:
        self.threshold = threshold
        self.min_words = min_words
        self._reasoning: set[tuple[str, str, str]] = set()
        self.units = 0
        self.leaked_units = 0
        self.leaked_words = 0
        self.answer_words = 0

    @property
    def has_reasoning(self) -> bool:
        return bool(self._reasoning)

    def add_reasoning(self, text: str) -> None:
        if text:
            self._reasoning |= _trigrams(text)

    def set_reasoning(self, text: str) -> None:
        self._reasoning = _trigrams(text)

    def unit_score(self, unit: str) -> float:
        grams = _trigrams(unit)
        if not grams or not self._reasoning:
            return 0.0
        return len(grams & self._reasoning) / len(grams)

    def check(self, unit: str) -> bool:
        """Record one answer unit; True if it restates the reasoning."""
        words = len(unit.split())
        self.answer_words += words
        if words < self.min_words:
            return False
        self.units += 1
        if self.unit_score(unit) >= self.threshold:
            self.leaked_units += 1
            self.leaked_words += words
            return True
        return False

    def report(self) -> dict[str, float | int]:
        share = self.leaked_words / self.answer_words if self.answer_words else 0.0
        return {"leaked_units": self.leaked_units, "units": self.units,
                "leaked_share": round(share, 4)}
