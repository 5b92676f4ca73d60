"""Reasoning protection and leak handling, on the filter directly (streams as chunks)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from distillguard.countermeasures.filter import CountermeasureFilter
from distillguard.countermeasures.reasoning import ThinkSplitter, split_think
from distillguard.countermeasures.settings import parse_settings
from distillguard.errors import ConfigError
from tests.factories import make_exchange

REASONING = ("First I add the apples bought on Monday to those bought on Tuesday. "
             "Then I subtract the ones eaten, which leaves eleven apples in the basket.")
ANSWER = "She has eleven apples left.\n"


def _filter(**reasoning: Any) -> CountermeasureFilter:
    return CountermeasureFilter(parse_settings({"reasoning": reasoning}), None)


def _body(content: str, **message: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content, **message},
         "finish_reason": "stop"}]}


def _stream(flt: CountermeasureFilter, ex: Any, pieces: list[dict[str, Any]]) -> tuple[str, str]:
    sf = flt.stream_filter(ex)
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in pieces]
    chunks.append({"id": "c1", "object": "chat.completion.chunk", "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    out = [c for c in (sf.on_event(copy.deepcopy(c)) for c in chunks) if c is not None]
    out += sf.flush()
    deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
    return ("".join(d.get("content") or "" for d in deltas),
            "".join(d.get("reasoning_content") or "" for d in deltas))


def test_think_tags_split_across_any_chunk_boundary() -> None:
    text = "<think>plan the answer</think>The answer is 4.<think>x</think> Done"
    for size in range(1, 12):
        splitter = ThinkSplitter()
        vis, th = zip(*(splitter.feed(text[i:i + size]) for i in range(0, len(text), size)),
                      strict=True)
        rest = splitter.flush()
        assert "".join(vis) + rest[0] == "The answer is 4. Done"
        assert "".join(th) + rest[1] == "plan the answerx"
    assert split_think("a < b <thin") == ("a < b <thin", "")


@pytest.mark.parametrize("tier,mode", [("standard", "strip"), ("verified", "summarise"),
                                       ("trusted", "pass")])
def test_tier_modes_body_and_stream_agree(tier: str, mode: str) -> None:
    flt = _filter()
    ex = make_exchange()
    ex.annotations["degrade"] = {}
    from tests.factories import make_account

    ex.principal = type("P", (), {"account": make_account(tier=tier)})()  # type: ignore[assignment]
    body = flt.filter_body(ex, _body("<think>" + REASONING + "</think>" + ANSWER))
    msg = body["choices"][0]["message"]
    pieces = [{"role": "assistant", "content": ""}, {"content": "<thi"},
              {"content": "nk>" + REASONING[:50]}, {"content": REASONING[50:] + "</th"},
              {"content": "ink>" + ANSWER}]
    content, reasoning = _stream(flt, ex, pieces)
    if mode == "pass":
        assert msg["content"].startswith("<think>") and content == msg["content"]
        return
    assert msg["content"] == ANSWER == content
    if mode == "strip":
        assert "reasoning_content" not in msg and reasoning == ""
    else:
        assert msg["reasoning_content"].startswith("[reasoning summarised from 26 words]")
        assert reasoning == msg["reasoning_content"]
    assert ex.annotations["countermeasures"]["reasoning"] == mode


def test_degrade_annotation_is_stricter_than_tier() -> None:
    flt = _filter(default="pass")
    ex = make_exchange()
    body = _body(ANSWER, reasoning_content=REASONING)
    assert flt.filter_body(ex, body) is body  # pass: untouched, same object
    ex.annotations["degrade"] = {"reasoning": "strip"}
    assert "reasoning_content" not in flt.filter_body(ex, body)["choices"][0]["message"]


@pytest.mark.parametrize("action", ["flag", "annotate", "strip"])
def test_leaked_reasoning_in_answer(action: str) -> None:
    flt = _filter(leak_action=action)
    leaked = ("Then i subtract the ones EATEN - which leaves eleven apples in the basket! "
              + ANSWER)
    ex = make_exchange()
    body = flt.filter_body(ex, _body(leaked, reasoning_content=REASONING))
    leak = ex.annotations["countermeasures"]["reasoning_leak"]
    assert leak["leaked_units"] == 1
    content = body["choices"][0]["message"]["content"]
    if action == "strip":
        assert content == ANSWER
    else:
        assert content == leaked
    assert ("distillguard" in body) is (action == "annotate")
    content, _ = _stream(flt, ex, [{"reasoning_content": REASONING}, {"content": leaked[:30]},
                                   {"content": leaked[30:]}])
    assert content == (ANSWER if action == "strip" else leaked)
    clean = make_exchange()
    flt.filter_body(clean, _body(ANSWER, reasoning_content=REASONING))
    assert clean.annotations["countermeasures"]["reasoning_leak"]["leaked_units"] == 0


def test_settings_fail_fast() -> None:
    with pytest.raises(ConfigError, match="countermeasures.reasoning.default"):
        parse_settings({"reasoning": {"default": "hide"}})
    with pytest.raises(ConfigError, match="secret"):
        parse_settings({"fingerprint": {"secret": "short"}})
