"""The countermeasures response filter: reasoning protection, leak handling, fingerprint.

:class:`CountermeasureFilter` implements :class:`distillguard.pipeline.ResponseFilter`.
For each exchange it makes a :class:`Plan` from the account's tier, the settings and the
policy's ``exchange.annotations["degrade"]`` (the stricter of tier default and degrade
wins), then applies it to a JSON body or, chunk by chunk, to a stream. Both paths use the
same per-unit processing, so a streamed answer and a non-streamed one are identical.

What was done is recorded in ``exchange.annotations["countermeasures"]``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from distillguard.countermeasures.fingerprint import Fingerprinter
from distillguard.countermeasures.reasoning import (
    REASONING_FIELDS,
    LeakAction,
    LeakDetector,
    ReasoningMode,
    split_think,
    summarise,
)
from distillguard.countermeasures.settings import CountermeasuresSettings
from distillguard.countermeasures.variants import UnitSplitter
from distillguard.exchange import Exchange


@dataclass(frozen=True, slots=True)
class Plan:
    reasoning: ReasoningMode
    leak: LeakAction
    fingerprint_key: bytes | None

    @property
    def noop(self) -> bool:
        return (self.reasoning is ReasoningMode.PASS and self.leak is LeakAction.OFF
                and self.fingerprint_key is None)

    @property
    def rewrites(self) -> bool:
        """Whether the answer the client gets may differ from what was generated. Its
        log probabilities then go (:func:`drop_logprobs`): they list every generated
        token, reasoning included, in the words the model chose, so a client that asked
        for them read back stripped reasoning and the wording under a fingerprint."""
        return (self.reasoning is not ReasoningMode.PASS or self.fingerprint_key is not None
                or self.leak is LeakAction.STRIP)


def asks_for_json(request: Any) -> bool:
    """Whether the request asked for structured output (``response_format`` JSON): the
    answer is data, whose strings may be enum members or exact values, and is never
    fingerprinted."""
    fmt = request.get("response_format") if isinstance(request, dict) else None
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def drop_logprobs(plan: Plan, choice: dict[str, Any]) -> None:
    """Null a choice's ``logprobs`` when ``plan`` rewrites answers (:attr:`Plan.rewrites`);
    the key stays, as OpenAI sends it when none were asked for."""
    if plan.rewrites and choice.get("logprobs") is not None:
        choice["logprobs"] = None


class AnswerFilter:
    """One choice's visible answer, unit by unit: leak check, then fingerprint."""

    def __init__(self, plan: Plan, fingerprinter: Fingerprinter | None,
                 threshold: float) -> None:
        self.plan = plan
        self.fingerprinter = fingerprinter
        self.leak = LeakDetector(threshold)
        self._splitter = UnitSplitter()
        self._carry = "^"

    @property
    def active(self) -> bool:
        """Text is held to unit ends only when there is something to do with whole units:
        a fingerprint, or a leak check once reasoning has been seen."""
        return self.plan.fingerprint_key is not None or (
            self.plan.leak is not LeakAction.OFF and self.leak.has_reasoning)

    def feed(self, text: str) -> str:
        if not self.active:
            return text
        return "".join(self._unit(u, p) for u, p in self._splitter.feed(text))

    def flush(self) -> str:
        return "".join(self._unit(u, p) for u, p in self._splitter.flush())

    def _unit(self, unit: str, prose: bool) -> str:
        if not prose:
            return unit
        if self.plan.leak is not LeakAction.OFF and self.leak.check(unit) \
                and self.plan.leak is LeakAction.STRIP:
            return "\n" if unit.endswith("\n") else ""
        if self.plan.fingerprint_key is not None and self.fingerprinter is not None:
            unit, self._carry = self.fingerprinter.mark_unit(unit, self.plan.fingerprint_key,
                                                             self._carry)
        return unit


class CountermeasureFilter:
    name = "countermeasures"

    def __init__(self, settings: CountermeasuresSettings,
                 fingerprinter: Fingerprinter | None) -> None:
        self.settings = settings
        self.fingerprinter = fingerprinter

    def plan(self, exchange: Exchange) -> Plan:
        principal = exchange.principal
        tier = principal.account.tier if principal is not None else None
        rs = self.settings.reasoning
        mode = rs.mode_for(tier)
        degrade = exchange.annotations.get("degrade")
        if isinstance(degrade, dict) and degrade.get("reasoning") in ReasoningMode._value2member_map_:
            wanted = ReasoningMode(degrade["reasoning"])
            mode = wanted if wanted.rank > mode.rank else mode
        key = None
        fs = self.settings.fingerprint
        forced = isinstance(degrade, dict) and bool(degrade.get("fingerprint"))
        if (self.fingerprinter is not None and exchange.account_id
                and (tier in fs.tiers or forced) and not asks_for_json(exchange.request)):
            key = self.fingerprinter.account_key(exchange.account_id)
        return Plan(mode, rs.leak_action, key)

    def answer_filter(self, plan: Plan) -> AnswerFilter:
        return AnswerFilter(plan, self.fingerprinter, self.settings.reasoning.leak_threshold)

    # -- non-streaming --------------------------------------------------------------------

    def filter_body(self, exchange: Exchange, body: dict[str, Any]) -> dict[str, Any]:
        plan = self.plan(exchange)
        choices = body.get("choices")
        if plan.noop or not isinstance(choices, list):
            return body
        new = dict(body)
        new["choices"] = [copy.deepcopy(c) for c in choices]
        reports = [self._filter_choice(plan, c) for c in new["choices"] if isinstance(c, dict)]
        record(exchange, plan, reports)
        if plan.leak is LeakAction.ANNOTATE and any(r["leaked_units"] for r in reports):
            new["distillguard"] = {"reasoning_leak": reports}
        return body if new == body else new

    def _filter_choice(self, plan: Plan, choice: dict[str, Any]) -> dict[str, Any]:
        answer = self.answer_filter(plan)
        drop_logprobs(plan, choice)
        message = choice.get("message")
        if not isinstance(message, dict):
            if isinstance(choice.get("text"), str):
                choice["text"] = answer.feed(choice["text"]) + answer.flush()
            return answer.leak.report()
        reasoning = "".join(message[f] for f in REASONING_FIELDS
                            if isinstance(message.get(f), str))
        content = message.get("content")
        if plan.reasoning is not ReasoningMode.PASS:
            for field in REASONING_FIELDS:
                message.pop(field, None)
            if isinstance(content, str) and "<think>" in content:
                content, thought = split_think(content)
                reasoning += thought
            if plan.reasoning is ReasoningMode.SUMMARISE and reasoning:
                message["reasoning_content"] = summarise(
                    reasoning, self.settings.reasoning.summary_words)
        answer.leak.set_reasoning(reasoning)
        if isinstance(content, str):
            message["content"] = answer.feed(content) + answer.flush()
        return answer.leak.report()

    # -- streaming ------------------------------------------------------------------------

    def stream_filter(self, exchange: Exchange) -> Any:
        plan = self.plan(exchange)
        if plan.noop:
            return None
        from distillguard.countermeasures.stream import CountermeasureStream

        return CountermeasureStream(self, exchange, plan)


def record(exchange: Exchange, plan: Plan, reports: list[dict[str, Any]]) -> None:
    leaked = sum(int(r["leaked_units"]) for r in reports)
    exchange.annotations["countermeasures"] = {
        "reasoning": plan.reasoning.value,
        "fingerprint": plan.fingerprint_key is not None,
        "reasoning_leak": {"action": plan.leak.value, "leaked_units": leaked,
                           "choices": reports},
    }
