"""Per-exchange features and per-account sketches, on prompts from the real data files."""

from __future__ import annotations

import sys

import orjson
import pytest

from distillguard.datasets import data_dir
from distillguard.detect.features import CATEGORIES, extract, extract_many, simhashes
from distillguard.detect.sketches import AccountState, TopK
from tests.factories import make_exchange


def _code_alpaca() -> list[dict[str, str]]:
    return orjson.loads((data_dir() / "attack/codealpaca_2k.json").read_bytes())


def _gsm8k(n: int) -> list[str]:
    lines = (data_dir() / "reasoning/gsm8k_train.jsonl").read_bytes().splitlines()[:n]
    return [orjson.loads(line)["question"] for line in lines]


def _toolformer(n: int) -> list[str]:
    recs = orjson.loads((data_dir() / "attack/gpteacher_toolformer.json").read_bytes())
    return [r["instruction"] + "\n" + r["input"] for r in recs[:n]]


def _arena(n: int) -> list[str]:
    lines = (data_dir() / "benign/arena_hard_v0.1_questions.jsonl").read_bytes().splitlines()
    return [orjson.loads(line)["prompt"] for line in lines[:n]]


def test_signals_on_real_prompts() -> None:
    cot = [f"Think step by step and show your complete reasoning.\n\n{q}" for q in _gsm8k(20)]
    plain = _gsm8k(20)
    feats = extract_many([make_exchange(p) for p in cot + plain])
    assert all(f.reasoning for f in feats[:20])
    assert not any(f.reasoning for f in feats[20:])
    assert sum(CATEGORIES[f.category] == "math" for f in feats[20:]) >= 12
    rubric = extract(make_exchange("Which response is better, A or B?\n\nResponse A:\nx\n\n"
                                   "Response B:\ny"))
    assert rubric.rubric and not rubric.reasoning
    tools = extract_many([make_exchange(p) for p in _toolformer(10)])
    assert all(f.tool_use and CATEGORIES[f.category] == "tool_use" for f in tools)
    code = extract_many([make_exchange(r["instruction"] + "\n" + r["input"])
                         for r in _code_alpaca()[:40]])
    assert sum(CATEGORIES[f.category] == "code" for f in code) >= 20


def test_template_keys_and_simhash() -> None:
    frame = "Problem to solve now:\n{q}\n\n### Response:"
    qs = _gsm8k(30)
    framed = extract_many([make_exchange(frame.format(q=q)) for q in qs])
    # the layout and the head of the frame are the same whatever the payload
    assert len({f.template_keys[0] for f in framed}) == 1
    assert len({f.template_keys[1] for f in framed}) == 1
    free = extract_many([make_exchange(p) for p in _arena(30)])
    assert len({f.template_keys[2] for f in free}) > 20
    # near copies share LSH bands; unrelated prompts rarely do
    a, b = qs[3], qs[3].replace(" the ", " a ", 1)
    near = extract_many([make_exchange(a), make_exchange(b)])
    assert set(near[0].lsh_keys) & set(near[1].lsh_keys)
    far = extract_many([make_exchange(q) for q in qs[:20]])
    shared = sum(bool(set(x.lsh_keys) & set(y.lsh_keys))
                 for i, x in enumerate(far) for y in far[i + 1:])
    assert shared <= 5
    # a batch gives the same fingerprints as one by one (one logic for both paths)
    words = [[w for w in q.lower().split()] for q in qs[:5]]
    assert simhashes(words) == [simhashes([w])[0] for w in words]


def test_harvest_depth_and_client() -> None:
    f = extract(make_exchange("Explain recursion.", n=4, logprobs=True, max_tokens=8000,
                              client_ip="5.9.1.1"))
    assert f.harvest and f.n == 4 and f.logprobs and f.max_tokens == 8000
    assert f.hosting and f.asn and "hetzner" in f.asn.lower() and f.ip_prefix == "5.9.1.0/24"
    ex = make_exchange("follow-up")
    ex.request["messages"] = [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "more"}]
    assert extract(ex).depth == 1
    assert not extract(make_exchange("hi", client_ip="73.1.2.3")).hosting


def test_account_state_is_bounded() -> None:
    topk = TopK(4)
    for i in range(1000):
        topk.add(i % 50)
    assert len(topk.counts) == 4
    state = AccountState("a")
    prompts = [r["instruction"] for r in _code_alpaca()[:1500]]
    feats = extract_many([make_exchange(p) for p in prompts])
    for f in feats[:100]:
        state.update(f)
    small = sys.getsizeof(state.templates.counts) + sys.getsizeof(state.lsh.counts)
    for f in feats[100:]:
        state.update(f)
    state.flush()
    assert len(state.templates.counts) <= state.templates.k
    assert len(state.lsh.counts) <= state.lsh.k
    assert sys.getsizeof(state.templates.counts) + sys.getsizeof(state.lsh.counts) <= 2 * small
    assert state.count == 1500 and state.diversity > 0.8


def test_repetitive_account_has_low_diversity() -> None:
    state = AccountState("r")
    for f in extract_many([make_exchange("Solve 2 + 2 step by step.") for _ in range(60)]):
        state.update(f)
    assert state.diversity < 0.1 and state.template_reuse == pytest.approx(1.0)
    assert state.share(state.reasoning) == 1.0
