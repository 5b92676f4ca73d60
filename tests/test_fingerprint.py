"""Fingerprint: determinism, stream equality, tracing, robustness and false positives,
and the model test against simulated students. Texts are real answers (shared/data)."""

from __future__ import annotations

import copy
import random
from collections import defaultdict

import pytest

from distillguard.countermeasures import Fingerprinter
from distillguard.countermeasures.fingerprint import StreamMarker
from distillguard.countermeasures.modeltest import model_test
from distillguard.countermeasures.variants import FORMS, PAIRS, SLOT_RE, normal_form
from tests.leakworld import (
    SECRET,
    answer_pool,
    excerpt,
    paraphrase,
    reformat,
    unrelated_texts,
)

fp = Fingerprinter(SECRET)


@pytest.fixture(scope="module")
def pool() -> list[str]:
    return [a for _, a in answer_pool()]


def test_mark_is_deterministic_meaning_preserving_and_streamable(pool: list[str]) -> None:
    text = ("It is clear that we do not often compute this, whereas they are usually fine.\n"
            "```python\nx = 'it is'  # do not touch code\n```\nYes, it is. I'm done.")
    a, b = fp.mark(text, "acct_a"), fp.mark(text, "acct_b")
    assert a == fp.mark(text, "acct_a") and a != b
    assert "x = 'it is'  # do not touch code" in a and "Yes, it is." in a  # code, clause end
    for t in pool[:300]:
        marker = StreamMarker(fp, "acct_a")
        rng = random.Random(len(t))
        pieces, i = [], 0
        while i < len(t):
            j = i + rng.randint(1, 9)
            pieces.append(marker.feed(t[i:j]))
            i = j
        assert "".join(pieces) + marker.flush() == fp.mark(t, "acct_a")
        # only variant forms change: the texts agree once forms are folded
        assert _fold(fp.mark(t, "acct_b")) == _fold(t)


def _fold(text: str) -> str:
    return SLOT_RE.sub(lambda m: PAIRS[FORMS[normal_form(m.group(0))][0]][0],
                       text.replace("\u2019", "'")).lower()


def _rewrite_slots(text: str, rng: random.Random) -> str:
    """A paraphraser that picks its own wording at every variant (half the time)."""
    def pick(m):  # type: ignore[no-untyped-def]
        pair = FORMS[normal_form(m.group(0))][0]
        return PAIRS[pair][rng.randint(0, 1)] if rng.random() < 0.5 else m.group(0)
    return SLOT_RE.sub(pick, text)


def test_trace_robustness_and_false_positive_rate(pool: list[str]) -> None:
    rng = random.Random(3)
    candidates = [f"acct_{i}" for i in range(500)]
    leaked = [fp.mark(t, "acct_7") for t in rng.sample(pool[:7000], 400)]
    cut = 0.01 / len(candidates)
    transforms = {"copy": lambda t: t, "reformat": lambda t: reformat(t, rng),
                  "excerpt": lambda t: excerpt(t, 0.6),
                  "rewrite-slots": lambda t: _rewrite_slots(t, rng)}
    results = {}
    for name, transform in transforms.items():
        best = fp.trace([transform(t) for t in leaked], candidates)
        results[name] = best[0]
        assert best[0].subject == "acct_7" and best[0].p_value < cut, (name, best[0])
        assert best[1].p_value > cut  # nobody else is named
    assert results["copy"].matches == results["copy"].slots
    assert results["rewrite-slots"].matches < results["rewrite-slots"].slots
    # a word-level paraphrase rewrites the words the choices are keyed on (the word before
    # each slot): the mark is lost, and no other account may be named instead
    para = fp.trace([paraphrase(t, rng) for t in leaked], candidates)
    assert all(s.subject == "acct_7" for s in para if s.p_value < cut), para[:3]
    # false positives: unmarked text, groups of 40 texts, against every candidate key
    unmarked = unrelated_texts() + rng.sample(pool, 2000)
    rng.shuffle(unmarked)
    tests = flagged = 0
    for g in range(0, len(unmarked) - 40, 40):
        for score in fp.trace(unmarked[g:g + 40], candidates[:50]):
            tests += 1
            flagged += score.p_value < 0.01
    assert tests > 2000 and flagged / tests <= 0.015, (flagged, tests)


class Trigram:
    """A word trigram language model: the simplest "student"."""

    def __init__(self, texts: list[str]) -> None:
        self.next: dict[tuple[str, str], list[str]] = defaultdict(list)
        for t in texts:
            words = ["<s>", "<s>", *t.split(), "</s>"]
            for i in range(len(words) - 2):
                self.next[(words[i], words[i + 1])].append(words[i + 2])

    def sample(self, rng: random.Random, n: int = 80) -> str:
        a, b, out = "<s>", "<s>", []
        for _ in range(n):
            c = rng.choice(self.next.get((a, b)) or ["</s>"])
            if c == "</s>":
                break
            out.append(c)
            a, b = b, c
        return " ".join(out)


def test_model_test_separates_students(pool: list[str]) -> None:
    rng = random.Random(5)
    corpus = rng.sample(pool, 4000)
    accounts = [f"camp_{i}" for i in range(25)]  # the harvest is spread over 25 accounts
    marked = Trigram([fp.mark(t, rng.choice(accounts)) for t in corpus])
    clean = Trigram(corpus)
    out_marked = [marked.sample(rng) for _ in range(1500)]
    out_clean = [clean.sample(rng) for _ in range(1500)]
    on_marked, on_clean = model_test(fp, out_marked), model_test(fp, out_clean)
    assert on_marked["trained_on_marked_outputs"] and on_marked["p_value"] < 1e-6
    assert not on_clean["trained_on_marked_outputs"]
    # a different provider's key finds nothing in either student
    other = Fingerprinter("another-providers-secret-000")
    assert model_test(other, out_marked)["p_value"] > 0.01


def test_model_test_false_positive_rate_on_unmarked_text(pool: list[str]) -> None:
    """The model test's p-value is valid under its null: on outputs that never saw a key
    (an unmarked student's samples, unmarked real answers, unrelated prompts) the share of
    tests under alpha stays at or below alpha."""
    rng = random.Random(8)
    clean = Trigram(rng.sample(pool, 3000))
    unmarked = ([clean.sample(rng) for _ in range(2000)] + rng.sample(pool, 3000)
                + unrelated_texts())
    rng.shuffle(unmarked)
    keys = [Fingerprinter(f"unmarked-text-key-{k:04d}") for k in range(80)]
    tests = slots = 0
    under = {0.01: 0, 0.05: 0}
    for g in range(0, len(unmarked) - 200, 200):
        found = keys[0].distinct_slots(unmarked[g:g + 200])
        for key in keys:
            score = key.score_slots(found, key.global_key, "global", kind="global")
            tests += 1
            slots += score.slots
            for alpha in under:
                under[alpha] += score.p_value < alpha
    assert tests >= 2000 and slots / tests >= 20, (tests, slots / tests)
    print(f"model test on unmarked text: {tests} tests, {slots / tests:.1f} global slots "
          f"each, rate under 0.01: {under[0.01] / tests:.4f}, under 0.05: "
          f"{under[0.05] / tests:.4f}")
    assert under[0.01] / tests <= 0.02 and under[0.05] / tests <= 0.07, (under, tests)


def test_cli_trace_and_model_test(pool: list[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    import orjson
    from click.testing import CliRunner

    from distillguard.cli import main
    from distillguard.traceio import write_jsonl

    leak = tmp_path / "leak.jsonl"
    write_jsonl([*({"output": fp.mark(t, "acct_3")} for t in pool[:300]), {"id": 1}, 5],
                leak)
    config = tmp_path / "dg.yaml"
    config.write_text(f"countermeasures:\n  fingerprint:\n    secret: {SECRET}\n")
    run = CliRunner().invoke(main, ["--config", str(config), "fingerprint", "trace",
                                    str(leak), *[f"--account=acct_{i}" for i in range(20)]])
    assert run.exit_code == 0, run.output
    traced = orjson.loads(run.output)
    assert traced["named"] == ["acct_3"]
    # the two lines with no response are counted, not read as texts
    assert traced["texts"] == 300 and traced["skipped_lines"] == 2
    run = CliRunner().invoke(main, ["--config", str(config), "fingerprint", "model-test",
                                    "--outputs", str(leak)])
    assert run.exit_code == 0 and orjson.loads(run.output)["trained_on_marked_outputs"]
    assert orjson.loads(run.output)["skipped_lines"] == 2
    no_secret = tmp_path / "none.yaml"
    no_secret.write_text("countermeasures: {}\n")
    run = CliRunner().invoke(main, ["--config", str(no_secret), "fingerprint", "trace",
                                    str(leak), "--account=a"], env={})
    assert run.exit_code != 0 and "no fingerprint secret" in run.output
    # a prompt file without a prompt asked nothing and answered "not trained"
    empty = tmp_path / "prompts.jsonl"
    write_jsonl([{"id": 1}, ""], empty)
    run = CliRunner().invoke(main, ["--config", str(config), "fingerprint", "model-test",
                                    "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                    "--prompts", str(empty)])
    assert run.exit_code == 2 and "holds no prompt" in run.output, run.output


def test_structured_output_is_never_fingerprinted() -> None:
    # A JSON answer's values can be enum members or exact strings: "large" must not
    # become "big" whatever the key says, asked for with response_format or not.
    from distillguard.countermeasures.filter import CountermeasureFilter
    from distillguard.countermeasures.settings import parse_settings
    from tests.factories import make_exchange

    flt = CountermeasureFilter(parse_settings({"reasoning": {"default": "pass"}}), fp)
    answer = ('{\n  "size": "large",\n  "note": "It is often used. We do not know why",\n'
              '  "tags": ["usually", "for example"]\n}')
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "stop"}]}
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
        for k in range(16):
            ex = make_exchange(account_id=f"acct_{k}", response_format=fmt)
            ex.annotations["degrade"] = {"fingerprint": True}
            assert flt.plan(ex).fingerprint_key is None
            out = flt.filter_body(ex, copy.deepcopy(body))
            assert out["choices"][0]["message"]["content"] == answer
    # the same JSON written into an ordinary answer: its members are left alone too
    for k in range(16):
        assert '"size": "large",' in fp.mark(answer, f"acct_{k}")


def test_identifiers_in_prose_are_not_slots() -> None:
    # A module path, a command-line flag or a file name mentioned in prose (no backticks)
    # names something exact: "scipy.optimize" is not "scipy.optimise".
    text = ("Call scipy.optimize to fit it, or pass --optimize to the tool. "
            "See summarize.py and utils/analyze for the code, then set mode=compute.\n")
    for k in range(32):
        marked = fp.mark(text, f"acct_{k}")
        for name in ("scipy.optimize", "--optimize", "summarize.py", "utils/analyze",
                     "mode=compute"):
            assert name in marked, (name, marked)
