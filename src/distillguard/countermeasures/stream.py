"""The streaming side of the countermeasures filter (one instance per streamed exchange).

Reasoning deltas are dropped (strip) or held back and replaced by one summary delta
(summarise); ``<think>`` blocks in content deltas are cut out even when a tag is split
across chunks; the visible answer is held back only to the end of the current unit (a
sentence or line) so the leak check and the fingerprint see whole units. What is still
held when a choice finishes goes out in that choice's final chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distillguard.countermeasures.filter import drop_logprobs
from distillguard.countermeasures.reasoning import (
    REASONING_FIELDS,
    ReasoningMode,
    ThinkSplitter,
    summarise,
)

if TYPE_CHECKING:
    from distillguard.countermeasures.filter import AnswerFilter, CountermeasureFilter, Plan
    from distillguard.exchange import Exchange


class _ChoiceState:
    def __init__(self, index: Any, answer: AnswerFilter) -> None:
        self.index = index
        self.answer = answer
        self.think = ThinkSplitter()
        self.reasoning: list[str] = []
        self.summary_sent = False
        self.finished = False


class CountermeasureStream:
    def __init__(self, owner: CountermeasureFilter, exchange: Exchange, plan: Plan) -> None:
        self.owner = owner
        self.exchange = exchange
        self.plan = plan
        self.states: dict[tuple[bool, int | str], _ChoiceState] = {}
        self.meta: dict[str, Any] = {}
        self.chat = True

    def _state(self, index: Any) -> _ChoiceState:
        """The state of the choice ``index``. An index that is not a whole number (``"1"``,
        ``[0]``: not the OpenAI format, but an upstream sent them) is a choice of its own,
        filtered like any other and sent with the index it came with; ``int()`` of a list
        raised and cut the stream."""
        key: tuple[bool, int | str] = ((False, index) if type(index) is int
                                       else (True, repr(index)))
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _ChoiceState(index, self.owner.answer_filter(self.plan))
        return state

    def on_event(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return chunk
        for field in ("id", "object", "created", "model", "system_fingerprint"):
            if field in chunk:
                self.meta[field] = chunk[field]
        self.chat = chunk.get("object") != "text_completion"
        out = [c for c in (self._choice(c) for c in choices if isinstance(c, dict))
               if c is not None]
        self._record()
        if len(out) == len(choices) and all(a is b for a, b in zip(out, choices, strict=True)):
            return chunk
        if not out and chunk.get("usage") is None:
            return None
        return {**chunk, "choices": out}

    def _choice(self, original: dict[str, Any]) -> dict[str, Any] | None:
        choice = self._rewrite(original)
        return original if choice == original else choice

    def _rewrite(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        state = self._state(choice.get("index", 0))
        choice = dict(choice)
        drop_logprobs(self.plan, choice)
        finish = choice.get("finish_reason")
        if not self.chat:
            text = choice.get("text")
            text = state.answer.feed(text) if isinstance(text, str) else ""
            if finish:
                text += state.answer.flush()
                state.finished = True
            choice["text"] = text
            return choice if text or finish else None
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            return choice      # not a delta this filter can read ("b", [1]): passed on
        delta = dict(delta)
        visible = self._delta_text(state, delta)
        if finish:
            visible += self._finish(state)
        if self.plan.reasoning is ReasoningMode.SUMMARISE and not state.summary_sent \
                and state.reasoning and (visible or finish):
            delta["reasoning_content"] = summarise(
                "".join(state.reasoning), self.owner.settings.reasoning.summary_words)
            state.summary_sent = True
        if visible or "content" in delta and "role" in delta:
            delta["content"] = visible
        else:
            delta.pop("content", None)
        if not delta and not finish and choice.get("logprobs") is None:
            return None
        choice["delta"] = delta
        return choice

    def _delta_text(self, state: _ChoiceState, delta: dict[str, Any]) -> str:
        strip = self.plan.reasoning is not ReasoningMode.PASS
        for field in REASONING_FIELDS:
            piece = delta.get(field)
            if isinstance(piece, str):
                state.reasoning.append(piece)
                state.answer.leak.add_reasoning(piece)
                if strip:
                    del delta[field]
        content = delta.get("content")
        if not isinstance(content, str):
            return ""
        if strip:
            content, thought = state.think.feed(content)
            if thought:
                state.reasoning.append(thought)
                state.answer.leak.add_reasoning(thought)
        return state.answer.feed(content)

    def _finish(self, state: _ChoiceState) -> str:
        state.finished = True
        visible, thought = state.think.flush()
        if thought:
            state.reasoning.append(thought)
        return state.answer.feed(visible) + state.answer.flush()

    def flush(self) -> list[dict[str, Any]]:
        """Anything still held for choices that never sent a finish_reason."""
        out = []
        for _, state in sorted(self.states.items()):
            if state.finished:
                continue
            text = self._finish(state)
            if not text:
                continue
            piece: dict[str, Any] = {"index": state.index, "finish_reason": None}
            piece.update({"delta": {"content": text}} if self.chat else {"text": text})
            out.append({**self.meta, "choices": [piece]})
        self._record()
        return out

    def _record(self) -> None:
        from distillguard.countermeasures.filter import record

        record(self.exchange, self.plan,
               [s.answer.leak.report() for _, s in sorted(self.states.items())])
