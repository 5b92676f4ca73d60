"""Server-Sent Events relay: forward upstream events and reassemble the completion.

:class:`SSERelay` splits the upstream byte stream into whole events, hands each back to
be forwarded unchanged, and builds from the ``data:`` payloads the non-streaming shape of
the response (content, reasoning, tool calls, finish reasons, usage) for the Exchange.
When the gateway itself asked for ``include_usage`` (to meter a stream whose client did
not), the usage-only event is consumed here and not forwarded.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# An event ends at a blank line: two line ends in a row, each CRLF, LF or CR (the SSE
# standard allows all three, and mixed). A CR followed by LF is one line end, not two, so
# a CR last in the buffer waits for the next byte.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?=[^\n]))")


class SSERelay:
    def __init__(self, *, drop_usage_event: bool) -> None:
        self.drop_usage_event = drop_usage_event
        self._buffer = bytearray()
        self._scanned = 0       # bytes of _buffer already searched for a separator
        self.done = False
        self.usage: dict[str, Any] | None = None
        self.meta: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.events = 0
        self.skipped = 0    # choices and tool calls left out of the completion

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes from upstream; return the complete events to forward, in order.

        Each byte is searched for an event's end once (an end split across two reads is
        found from the last 4 bytes already searched), and the buffer grows in place:
        an event arriving in many small reads was copied and searched from its start on
        each read, which took time quadratic in its length on the event loop."""
        self._buffer += data
        out: list[bytes] = []
        start = 0
        while True:
            found = _EVENT_END.search(self._buffer, max(start, self._scanned - 4))
            if found is None:
                break
            event = bytes(self._buffer[start:found.end()])
            start = found.end()
            self._scanned = start
            if self._consume(event):
                out.append(event)
        if start:
            del self._buffer[:start]
        self._scanned = len(self._buffer)
        return out

    def flush(self) -> bytes:
        """Whatever is left when upstream closes (an unterminated last event)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        if rest.strip():
            self._consume(rest)
        return rest

    def _consume(self, event: bytes) -> bool:
        """Record one event; return False if it must not be forwarded."""
        payload = b"".join(
            line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")
        )
        if not payload:
            return True
        self.events += 1
        if payload == b"[DONE]":
            self.done = True
            return True
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for field in ("id", "object", "created", "model", "system_fingerprint"):
            if field in chunk and field not in self.meta:
                self.meta[field] = chunk[field]
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._merge_choice(choice)
            if not choices and self.drop_usage_event and isinstance(chunk.get("usage"), dict):
                return False
        return True

    def _merge_choice(self, choice: dict[str, Any]) -> None:
        """Add one chunk's choice to the completion. What the OpenAI format does not allow
        there (an index that is not a whole number, ``tool_calls`` that is not an array,
        a ``function`` that is not an object) is left out of the completion and counted
        in ``skipped``; the event itself is forwarded as it came. An index ``"1"`` beside
        an index 0 made the completion fail to assemble, and the exchange went
        unrecorded."""
        index = choice.get("index", 0)
        if type(index) is not int:
            self.skipped += 1
            return
        acc = self._choices.setdefault(index, {"index": index, "content": [], "reasoning": [],
                                               "text": [], "tool_calls": {}, "role": None,
                                               "finish_reason": None})
        if choice.get("finish_reason"):
            acc["finish_reason"] = choice["finish_reason"]
        if isinstance(choice.get("text"), str):
            acc["text"].append(choice["text"])
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            if delta is not None:        # "b", [1]: not a delta
                self.skipped += 1
            return
        if delta.get("role"):
            acc["role"] = delta["role"]
        if isinstance(delta.get("content"), str):
            acc["content"].append(delta["content"])
        for field in ("reasoning_content", "reasoning"):
            if isinstance(delta.get(field), str):
                acc["reasoning"].append(delta[field])
        calls = delta.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            self.skipped += 1
            return
        for call in calls or []:
            call_index = call.get("index", 0) if isinstance(call, dict) else None
            if type(call_index) is not int:
                self.skipped += 1
                continue
            slot = acc["tool_calls"].setdefault(call_index, {
                "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if call.get("id"):
                slot["id"] = call["id"]
            fn = call.get("function")
            if fn is not None and not isinstance(fn, dict):
                self.skipped += 1
                continue
            fn = fn or {}
            if isinstance(fn.get("name"), str):
                slot["function"]["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                slot["function"]["arguments"] += fn["arguments"]

    def assembled(self) -> dict[str, Any]:
        """The stream as one non-streaming response body."""
        choices = []
        chat = self.meta.get("object") != "text_completion"
        for index in sorted(self._choices):
            acc = self._choices[index]
            if chat:
                message: dict[str, Any] = {"role": acc["role"] or "assistant",
                                           "content": "".join(acc["content"])}
                if acc["reasoning"]:
                    message["reasoning_content"] = "".join(acc["reasoning"])
                if acc["tool_calls"]:
                    message["tool_calls"] = [acc["tool_calls"][i]
                                             for i in sorted(acc["tool_calls"])]
                choices.append({"index": index, "message": message,
                                "finish_reason": acc["finish_reason"]})
            else:
                choices.append({"index": index, "text": "".join(acc["text"]),
                                "finish_reason": acc["finish_reason"]})
        body: dict[str, Any] = dict(self.meta)
        if chat:
            body["object"] = "chat.completion"
        body["choices"] = choices
        if self.usage is not None:
            body["usage"] = self.usage
        return body
