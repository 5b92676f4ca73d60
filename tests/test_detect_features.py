"""Per-exchange features and per-account sketches, on prompts from the real data files."""

from __future__ import annotations

import sys

import orjson
import pytest

from distillguard.datasets import data_dir
from distillguard.detect.features import CATEGORIES, FeatureCache, extract, extract_many
from distillguard.detect.prompts import (
    CATEGORY_WORDS,
    REASONING_PHRASES,
    RUBRIC_PHRASES,
    TOOL_PHRASES,
    LineFeatures,
    _hash,
    frame_keys,
    phrase_bits,
    prompt_features,
    simhashes,
    skeleton_words,
    topics,
)
from distillguard.detect.sketches import AccountState, TopK
from distillguard.detect.textcache import TextCache
from distillguard.exchange import Exchange
from tests.factories import make_exchange, make_features


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
    assert len({f.template_keys[-1] for f in free}) > 20
    # one plain paragraph has no layout to share: only its head and tail are keys
    plain = extract_many([make_exchange(q) for q in qs if "\n" not in q.strip()])
    assert plain and all(len(f.template_keys) == 2 for f in plain)
    assert len({f.template_keys[0] for f in framed} & {k for f in plain
                                                         for k in f.template_keys}) == 0
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


def test_harvest_reads_the_larger_limit_and_sample_count() -> None:
    """``max_tokens or max_completion_tokens`` read a small max_tokens beside a large
    max_completion_tokens (the upstream generates the larger) as no harvest, and best_of
    samples were not counted; an infinite limit made extraction fail."""
    ex = make_exchange("Explain recursion.", max_tokens=16)
    ex.request["max_completion_tokens"] = 8000
    f = extract(ex)
    assert f.max_tokens == 8000 and f.harvest
    ex = make_exchange("Explain recursion.")
    ex.request.update(best_of=5, n=1)
    assert extract(ex).n == 5 and extract(ex).harvest
    ex = make_exchange("Explain recursion.")
    ex.request["max_tokens"] = float("inf")
    assert extract(ex).max_tokens == 0


def test_a_huge_model_name_or_user_agent_is_held_bounded() -> None:
    """A request's model and user agent went whole into sketches and onto the feature
    stream: a megabyte of either per request, queued while Redis is away, could fill a
    replica's memory. A long one is its start plus a digest of the whole, so two
    different long strings stay apart and a normal one is as it was."""
    ex = make_exchange("hi")
    ex.model = "m" * 1_000_000
    ex.user_agent = "ua/" + "x" * 1_000_000
    other = make_exchange("hi")
    other.model = "m" * 999_999 + "n"
    f, g = extract(ex), extract(other)
    assert len(f.model) <= 256 and len(f.user_agent) <= 256
    assert f.model != g.model and f.model.startswith("mmm")
    assert extract(make_exchange("hi")).user_agent == make_exchange("hi").user_agent


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


def test_space_saving_keeps_what_it_inherited_apart() -> None:
    """A counter taken over from an evicted item carries that item's count as its error:
    its guaranteed count is what was really seen, never more."""
    topk = TopK(3)
    for item in ("a", "a", "a", "b", "c", "d", "e", "f"):
        topk.add(item)
    assert topk.guaranteed("a") == 3 and topk.errors.get("a", 0) == 0
    for item, n in topk.counts.items():
        assert 0 <= topk.guaranteed(item) <= n
        assert topk.guaranteed(item) <= ("a", "a", "a", "b", "c", "d", "e", "f").count(item)
    assert topk.max_guaranteed() == 3 and topk.max_count() >= 3


def test_space_saving_evicts_the_first_smallest_counter() -> None:
    """The listed-minimum eviction picks the same victims as scanning every counter for
    the first (in insertion order) with the smallest count."""
    import random

    rng = random.Random(1)
    for _ in range(500):
        k = rng.randint(1, 8)
        topk = TopK(k)
        counts: dict[object, int] = {}
        errors: dict[object, int] = {}
        universe = rng.randint(1, 30)
        for _ in range(rng.randint(0, 300)):
            item = rng.randint(0, universe) if rng.random() < 0.7 else rng.randint(0, 3)
            weight = rng.choice((1, 1, 1, 2, 0))
            topk.add(item, weight)
            if item in counts:
                counts[item] += weight
            elif len(counts) < k:
                counts[item] = weight
            else:
                victim = min(counts, key=counts.__getitem__)
                floor = counts.pop(victim)
                errors.pop(victim, None)
                counts[item], errors[item] = floor + weight, floor
            assert list(topk.counts.items()) == list(counts.items())
            assert topk.errors == errors


def test_add_each_is_add_for_every_item() -> None:
    import random

    rng = random.Random(2)
    one, many = TopK(5), TopK(5)
    for _ in range(400):
        items = [rng.randint(0, 12) for _ in range(rng.randint(0, 4))]
        for item in items:
            one.add(item)
        many.add_each(items)
        assert list(many.counts.items()) == list(one.counts.items())
        assert many.errors == one.errors


def test_cached_readings_follow_the_sketches() -> None:
    """The distinct-count estimate and the top AS name are kept between evaluations and
    recomputed only when their sketch moved: after every exchange they read as they would
    computed afresh, and ``TopK.first`` is the first item of the counters sorted by count
    (highest first), ties by text."""
    import random
    import warnings

    rng = random.Random(3)
    state = AccountState("c")
    for i in range(400):
        state.update(make_features("c", 1_000.0 + 30 * i, simhash=rng.randrange(60),
                                   asn=rng.choice(("AS1 A", "AS2 B", "AS3 C", "AS4 D",
                                                   "AS5 E", "AS6 F"))))
        if rng.random() < 0.3:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                fresh = min(1.0, state.distinct.count() / state.count)
            assert state.diversity == fresh
            top = sorted(state.asns.counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
            assert state.top_asn == str(top[0][0])
            assert state.asns.first() == top[0][0]
    assert TopK(3).first() is None and AccountState("e").top_asn is None


def test_frames_that_only_filled_the_sketch_are_not_dominant() -> None:
    """An account whose every prompt ends in new words (harvested items around one
    system prompt): the sketch's counters all climb past a quarter of its traffic, but
    only the system prompt's frame is really in every exchange."""
    state = AccountState("h")
    for i in range(40):
        state.update(make_features("h", 1_000.0 + 60 * i, simhash=i, template_keys=(
            7, *(1_000 * k + i for k in range(1, 5)))))
    assert min(state.templates.counts.values()) >= 10          # every counter climbed
    assert state.dominant_keys(0.25, 3, frames=True, bands=False) == [(7, 1.0)]
    assert state.template_reuse == 1.0


def test_repetitive_account_has_low_diversity() -> None:
    state = AccountState("r")
    for f in extract_many([make_exchange("Solve 2 + 2 step by step.") for _ in range(60)]):
        state.update(f)
    assert state.diversity < 0.1 and state.template_reuse == pytest.approx(1.0)
    assert state.share(state.reasoning) == 1.0


# --- one logic for blocks, single exchanges, caches and line-by-line skeletons ---------

def _varied_exchanges() -> list[Exchange]:
    """Exchanges of every request shape the features read, with repeated and near-repeated
    prompts (campaign-style job tags), long prompts, code blocks and odd characters."""
    qs = _gsm8k(12)
    code = _code_alpaca()[:6]
    long_text = "\n".join(_arena(8))
    prompts = [
        *qs, *qs[:4],                                             # exact repeats
        *(f"Solve step by step.\n\n{q}\n[job-{i:06x}]" for i, q in enumerate(qs[:6])),
        *(f"Solve step by step.\n\n{qs[0]}\n[job-{i:06x}]" for i in range(4)),
        *(r["instruction"] + "\n```python\n" + r["output"] + "\n```\nExplain." for r in code),
        "```\nunclosed code block\n### Response:\n1. a\n2. b",
        long_text, long_text + "\n[job-1]", "x" * 5000 + "\n### Input:\nsee http://a.b/c",
        "Rate the answer on a scale of 1-10.\nResponse A: 'yes'\nResponse B: \"no\"",
        "ΟΔΥΣΣΕΥΣ ΚΑΙ ΣΙΣΥΦΟΣ\nİstanbul İZMİR\r\nTabs\tand\u2028separators",
        "", "   \n\n  ", "Use the available tools: search(query).", "tools: calc",
        "Translate 'bonjour' to English.", "Write a poem about 3.14, 1,000 and 12:30.",
    ]
    out = [make_exchange(p, account_id=f"acct_{i % 5}", max_tokens=100 + i,
                         temperature=0.5 if i % 3 else None) for i, p in enumerate(prompts)]
    system = make_exchange(qs[1])
    system.request["messages"].insert(0, {"role": "system", "content": "You grade math."})
    developer = make_exchange(qs[1])
    developer.request["messages"][:0] = [{"role": "developer", "content": ""},
                                         {"role": "system", "content": ["odd", 1]}]
    turns = make_exchange("and now?", n=3, logprobs=True)
    turns.request["messages"][:0] = [{"role": "user", "content": qs[2]},
                                     {"role": "assistant", "content": "42"}, "junk"]
    parts = make_exchange("ignored", tools=[{"type": "function"}])
    parts.request["messages"] = [{"role": "user", "content": [
        {"type": "text", "text": qs[3]}, {"type": "image_url"}, {"type": "text", "text": "!"}]}]
    no_user = make_exchange("x", functions=[{}])
    no_user.request["messages"] = [{"role": "system", "content": "Only a system prompt."}]
    completion = make_exchange("x", client_ip="10.0.0.1")
    completion.request = {"model": "m", "prompt": ["Q: 2+2?", 7, "A:"], "max_tokens": "12"}
    embedding = make_exchange("x", client_ip="not an ip")
    embedding.request, embedding.usage = {"model": "e", "input": "embed me"}, None
    bare = make_exchange("x", client_ip="2001:db8::1")
    bare.request, bare.usage = None, None
    listed = make_exchange("x")
    listed.request = ["not", "a", "dict"]
    return [*out, system, developer, turns, parts, no_user, completion, embedding, bare,
            listed]


def test_block_equals_one_by_one_and_cache_equals_no_cache() -> None:
    exchanges = _varied_exchanges()
    alone = [extract(ex, cache=FeatureCache(entries=0)) for ex in exchanges]  # no cache
    assert extract_many(exchanges, cache=FeatureCache()) == alone
    # a tiny cache evicts all the time; a warm cache answers from what it kept
    tiny = FeatureCache(entries=3, chars=2_000)
    warm = FeatureCache()
    for _ in range(2):
        for start in range(0, len(exchanges), 7):
            block = exchanges[start:start + 7]
            assert extract_many(block, cache=tiny) == alone[start:start + 7]
            assert extract_many(block, cache=warm) == alone[start:start + 7]
    assert [extract(ex, cache=warm) for ex in exchanges] == alone
    assert len(warm.prompts) > 0 and len(tiny.prompts) <= 3 and len(tiny.lines) <= 6
    # what each signal means is unchanged
    by_prompt = {ex.request["messages"][-1]["content"]: f
                 for ex, f in zip(exchanges, alone, strict=True)
                 if isinstance(ex.request, dict) and len(ex.request.get("messages", [])) == 1
                 and isinstance(ex.request["messages"][0]["content"], str)}
    assert by_prompt["Solve step by step.\n\n" + _gsm8k(1)[0] + "\n[job-000000]"].reasoning
    assert by_prompt["Use the available tools: search(query)."].tool_use
    assert CATEGORIES[by_prompt["Translate 'bonjour' to English."].category] == "translation"


def test_line_by_line_skeleton_equals_whole_text() -> None:
    """prompt_features builds a prompt's skeleton, layout and topics from its lines; the
    whole-text functions are the reference."""
    prompts = [ex.request["messages"][-1]["content"] for ex in _varied_exchanges()
               if isinstance(ex.request, dict) and ex.request.get("messages")]
    prompts = [p for p in prompts if isinstance(p, str)]
    prompts += [r["instruction"] + "\n" + r["input"] for r in _code_alpaca()[:200]]
    prompts += _arena(60) + _toolformer(30)
    lines = TextCache[LineFeatures](entries=50)
    for cache in (lines, None, lines):
        got = prompt_features(prompts, cache)
        for prompt, pf in zip(prompts, got, strict=True):
            words = skeleton_words(prompt)
            assert pf.frame == frame_keys(prompt, words), prompt
            assert pf.topics == topics(words)
        assert [pf.simhash for pf in got] == simhashes([skeleton_words(p) for p in prompts])


def _simhash_reference(words: list[str]) -> int:
    """SimHash in plain Python: bit j is set when most of the first 128 words' spread
    hashes have bit j set."""
    hashes = [(_hash(w) * 0x9E3779B97F4A7C15) % (1 << 64) for w in words[:128]]
    return sum(1 << j for j in range(64)
               if 2 * sum(h >> j & 1 for h in hashes) > len(hashes))


def test_simhash_matches_plain_python() -> None:
    docs = [skeleton_words(p) for p in _arena(40) + _gsm8k(40)]
    docs += [[], ["one"], ["w"] * 300, [f"w{i % 7}" for i in range(129)]]
    assert simhashes(docs) == [_simhash_reference(d) for d in docs]


def test_phrase_search_equals_substring_tests() -> None:
    texts = [t.lower() for t in _arena(40) + _toolformer(20)]
    texts += ["let's think step-by-step", "score the answer. \"score\": 3", "c++ and ```",
              "responseb response a", "json schemajson schema", ""]
    groups = [REASONING_PHRASES, RUBRIC_PHRASES, TOOL_PHRASES,
              *(literals for _, _, literals in CATEGORY_WORDS)]
    for low in texts:
        want = sum(1 << bit for bit, phrases in enumerate(groups)
                   if any(p in low for p in phrases))
        assert phrase_bits(low) == want, low


def test_text_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = TextCache[int](entries=3, chars=1_024)
    for i, text in enumerate(["a", "b", "c"]):
        cache.put(text, i)
    assert cache.get("a") == 0          # "a" is now the most recently used
    cache.put("d", 3)
    assert cache.get("b") is None and cache.get("a") == 0 and len(cache) == 3
    cache.put("x" * 5, 4)               # longer than chars // 256: never kept
    assert cache.get("x" * 5) is None
    for i in range(200):
        cache.put(f"{i:03d}", i)
    assert len(cache) == 3 and cache.size == 9
    chars = TextCache[int](entries=1_000, chars=256 * 10)
    for i in range(1_000):
        chars.put(f"{i:010d}", i)
    assert chars.size == 2_560 and len(chars) == 256 and chars.get(f"{999:010d}") == 999
    assert TextCache[int](entries=0).get("a") is None
