"""Reading a suspect data set: JSON Lines of prompt/response pairs, or responses only.

Field names vary between published training sets; the first present of each list wins:

* response: ``output``, ``response``, ``completion``, ``answer``, ``chosen``, ``text``,
  ``content``, or the last ``assistant`` message of ``messages`` / ``conversations``
  (ShareGPT's ``{"from": "gpt", "value": ...}`` too);
* prompt: ``instruction`` (+ ``input``), ``prompt``, ``question``, ``query``, or the
  ``user`` messages.

A line that is a bare JSON string is a response.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillguard.traceio import FormatError, iter_jsonl

RESPONSE_FIELDS = ("output", "response", "completion", "answer", "chosen", "text", "content")
PROMPT_FIELDS = ("prompt", "question", "query")
_ASSISTANT = {"assistant", "gpt", "model", "bot"}
_USER = {"user", "human"}


@dataclass(frozen=True, slots=True)
class SuspectItem:
    line: int
    prompt: str
    response: str


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(p["text"] for p in value if isinstance(p, dict)
                         and isinstance(p.get("text"), str))
    return ""


def _from_messages(messages: list[Any]) -> tuple[str, str]:
    prompt: list[str] = []
    response = ""
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = str(m.get("role") or m.get("from") or "").lower()
        text = _text(m.get("content", m.get("value")))
        if role in _ASSISTANT:
            response = text
        elif role in _USER:
            prompt.append(text)
    return "\n".join(prompt), response


def parse_item(line: int, obj: Any) -> SuspectItem | None:
    if isinstance(obj, str):
        return SuspectItem(line, "", obj)
    if not isinstance(obj, dict):
        return None
    messages = obj.get("messages") or obj.get("conversations")
    if isinstance(messages, list):
        prompt, response = _from_messages(messages)
        if response:
            return SuspectItem(line, prompt, response)
    response = next((_text(obj[f]) for f in RESPONSE_FIELDS if _text(obj.get(f))), "")
    if not response:
        return None
    prompt = ""
    if isinstance(obj.get("instruction"), str):
        prompt = "\n".join(p for p in (obj["instruction"], _text(obj.get("input"))) if p)
    else:
        prompt = next((_text(obj[f]) for f in PROMPT_FIELDS if _text(obj.get(f))), "")
    return SuspectItem(line, prompt, response)


def read_suspect(path: str | Path, skipped: list[int] | None = None
                 ) -> Iterator[SuspectItem]:
    """Items of a suspect JSONL file; lines with no recognisable response are skipped
    (their numbers appended to ``skipped`` when it is given: a report of 1,000 items
    read from 10,000 lines should say so)."""
    found = False
    for number, obj in iter_jsonl(path):
        item = parse_item(number, obj)
        if item is not None:
            found = True
            yield item
        elif skipped is not None:
            skipped.append(number)
    if not found:
        raise FormatError(f"{path}: no line has a response field ({', '.join(RESPONSE_FIELDS)}"
                          " or messages)")
