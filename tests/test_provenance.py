"""Provenance look-up on a leak built from real answers (see tests/leakworld.py) and on a
campaign of the traffic simulator (distillguard.simulate)."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.countermeasures import Fingerprinter
from distillguard.provenance import ProvenanceIndex, build_report
from distillguard.provenance.suspect import parse_item, read_suspect
from distillguard.traceio import write_jsonl, write_trace
from tests.leakworld import (
    SECRET,
    World,
    answer_pool,
    build_world,
    excerpt,
    paraphrase,
    reformat,
    unrelated_texts,
)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world()


def _report(world: World) -> dict:
    items = [parse_item(i + 1, o) for i, o in enumerate(world.suspect)]
    index = ProvenanceIndex([i for i in items if i is not None])
    matches = index.scan(world.exchanges, progress=False)
    return build_report(index, matches, fingerprinter=Fingerprinter(SECRET))


def test_campaign_accounts_named_and_no_benign_account(world: World) -> None:
    report = _report(world)
    named = {a["account_id"] for a in report["accounts"]}
    assert named == set(world.campaign)
    assert not named & set(world.benign)  # the eval runner shares answers but is not named
    assert any(a["account_id"] == "eval_runner" for a in report["incidental"])
    # shares follow what each account really contributed to the leak
    truth = Counter(s["_account"] for s in world.suspect if s["_account"])
    for row in report["accounts"]:
        assert abs(row["items"] - truth[row["account_id"]]) <= 0.25 * truth[row["account_id"]]
        assert row["evidence"] and row["evidence"][0]["exchange_id"].startswith("ex_")


def test_a_scan_in_worker_processes_finds_what_one_process_finds(world: World) -> None:
    """The look-up of batches spread over processes gives the same matches, in the same
    order, and the same counts; batches of 50 make the leak world 26 of them, more than
    the two batches per worker that wait at a time."""
    items = [i for i in (parse_item(n + 1, o) for n, o in enumerate(world.suspect)) if i]
    alone, spread = ProvenanceIndex(items), ProvenanceIndex(items)
    one = alone.scan(world.exchanges, progress=False, batch_size=50)
    three = spread.scan(world.exchanges, progress=False, batch_size=50, workers=3)
    assert one == three and len(one) > 100
    assert alone.stats == spread.stats and spread.stats.exchanges == len(world.exchanges)


def test_matching_survives_reformat_and_excerpt_not_unrelated(world: World) -> None:
    report = _report(world)
    matched_lines = {it["line"] for it in report["items"]}
    by_kind: dict[str, list[bool]] = {}
    for i, kind in enumerate(world.kinds):
        by_kind.setdefault(kind, []).append(i + 1 in matched_lines)
    rate = {k: sum(v) / len(v) for k, v in by_kind.items()}
    assert rate["verbatim"] == 1.0 and rate["reformat"] == 1.0
    assert rate["excerpt"] >= 0.95
    assert rate["paraphrase"] >= 0.4  # heavy paraphrase (half the common words) loses some
    assert rate["unrelated"] == 0.0
    # every matched item points at the account that really harvested it
    for it in report["items"]:
        truth = world.suspect[it["line"] - 1]["_account"]
        assert truth in {m["account_id"] for m in it["matches"]}


def test_cli_on_trace_with_html(world: World, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(world.exchanges, trace)
    suspect = tmp_path / "suspect.jsonl"
    write_jsonl(({"prompt": "", "completion": s["output"]} for s in world.suspect), suspect)
    out = tmp_path / "report.json"
    config = tmp_path / "dg.yaml"
    config.write_text(f"countermeasures:\n  fingerprint:\n    secret: {SECRET}\n")
    result = CliRunner().invoke(main, ["--config", str(config), "provenance", str(suspect),
                                       "--trace", str(trace), "--out", str(out),
                                       "--html", str(tmp_path / "report.html"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(out.read_bytes())
    assert {a["account_id"] for a in report["accounts"]} == set(world.campaign)
    assert all(a["fingerprint"]["slots"] > 0 for a in report["accounts"])
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "camp_0" in (tmp_path / "report.html").read_text()


def test_suspect_formats(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    rows = [{"instruction": "Add", "input": "1 2", "output": "The sum is three."},
            {"prompt": "p", "completion": "c"},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello there"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "just a response", {"unrelated": 1}]
    write_jsonl(rows, path)  # type: ignore[arg-type]
    items = list(read_suspect(path))
    assert [(i.prompt, i.response) for i in items] == [
        ("Add\n1 2", "The sum is three."), ("p", "c"), ("hi", "hello there"), ("q", "a"),
        ("", "just a response")]
    skipped: list[int] = []
    assert len(list(read_suspect(path, skipped))) == 5 and skipped == [6]


def test_skipped_suspect_lines_are_counted_and_named(world: World, tmp_path: Path) -> None:
    """Lines with no response to look for (a number, an object without a response field,
    an empty text) were dropped unseen: a report of 1 item read from 13 lines said
    nothing of the other 12."""
    trace = tmp_path / "trace.jsonl"
    write_trace(world.exchanges[:200], trace)
    suspect = tmp_path / "suspect.jsonl"
    rows: list[object] = [5, {"text": 7}, {"output": ""}] * 4 + [world.suspect[0]["output"]]
    write_jsonl(rows, suspect)  # type: ignore[arg-type]
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["provenance", str(suspect), "--trace", str(trace),
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(out.read_bytes())["suspect"]
    assert report["items"] == 1 and report["skipped_lines"] == 12
    assert report["skipped_examples"] == list(range(1, 11))
    assert (f"12 lines of {suspect} had no response to look for and were skipped (lines "
            "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...)") in result.output


def test_simulated_campaign_harvest_attributed(tmp_path: Path) -> None:
    """The harvest of one simulated campaign (ten accounts sharing the work), a third of it
    reformatted, excerpted or paraphrased, mixed with unrelated text and scanned against
    the whole simulated trace (other campaigns, SaaS resellers, evaluation runners, casual
    users): the campaign's accounts are named, no benign account is."""
    from distillguard.simulate import simulate
    from distillguard.traceio import iter_jsonl, read_trace

    trace, _accounts, labels_path = simulate(tmp_path / "sim", preset="smoke", seed=0)
    labels = {o["account_id"]: o for _, o in iter_jsonl(labels_path)}
    exchanges = list(read_trace(trace))
    members: dict[str, set[str]] = defaultdict(set)
    for account, label in labels.items():
        if label["campaign_id"]:
            members[label["campaign_id"]].add(account)
    campaign = max(members.values(), key=len)  # the largest network of accounts
    rng = random.Random(4)
    harvest = [(e.account_id, e.response_text()) for e in exchanges
               if e.account_id in campaign and e.status == 200 and e.response_text()]
    transforms = {"verbatim": lambda t: t, "reformat": lambda t: reformat(t, rng),
                  "excerpt": excerpt, "paraphrase": lambda t: paraphrase(t, rng)}
    suspect: list[tuple[str, str, str]] = []  # (true account, kind, text)
    for account, text in rng.sample(harvest, min(300, len(harvest))):
        kind = rng.choice(list(transforms))
        suspect.append((account or "", kind, transforms[kind](text)))
    suspect += [("", "unrelated", t) for t in rng.sample(unrelated_texts(), 150)]
    rng.shuffle(suspect)
    items = [parse_item(i + 1, {"output": text}) for i, (_, _, text) in enumerate(suspect)]
    index = ProvenanceIndex([i for i in items if i is not None])
    report = build_report(index, index.scan(exchanges, progress=False))

    named = {a["account_id"] for a in report["accounts"]}
    truth = Counter(account for account, _, _ in suspect if account)
    assert named <= campaign
    assert not any(labels[a]["population"] != "attack" for a in named)
    assert {a for a, n in truth.items() if n >= 10} <= named
    matched = {it["line"]: it for it in report["items"]}
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for line, (_, kind, _) in enumerate(suspect, start=1):
        by_kind[kind].append(line in matched)
    rate = {k: sum(v) / len(v) for k, v in by_kind.items()}
    assert min(rate["verbatim"], rate["reformat"], rate["excerpt"]) >= 0.95, rate
    assert rate["paraphrase"] >= 0.5 and rate["unrelated"] == 0.0, rate
    right = [suspect[line - 1][0] in {m["account_id"] for m in it["matches"]}
             for line, it in matched.items() if suspect[line - 1][0]]
    assert sum(right) >= 0.95 * len(right)


def test_every_fingerprint_variant_is_folded_for_matching() -> None:
    # Two accounts' copies of one answer differ only in their variant forms; the
    # look-up must see them as one text, multi-word pairs ("for example" / "for
    # instance") included, or containment and the tie between accounts depend on marks.
    from distillguard.countermeasures.variants import PAIRS
    from distillguard.provenance.minhash import shingles, words

    for a, b, _guarded in PAIRS:
        assert words(f"and {a} here") == words(f"and {b} here"), (a, b)
    fp = Fingerprinter(SECRET)
    text = ("For example, we often use lots of salt so as to cure it, rather than sugar. "
            "It is usually done in order to keep it, for instance in winter. ") * 3
    copies = {fp.mark(text, f"acct_{k}") for k in range(12)}
    assert len(copies) > 1
    assert len({shingles(c).tobytes() for c in copies}) == 1


def test_fingerprint_score_is_not_chosen_by_the_wording_it_tests() -> None:
    # Two accounts asked the same questions; the leak is the answers as generated (it went
    # through neither). The wording tie-break hands each account the items whose wording
    # happens to agree with its copy: scoring the fingerprint on just those items would
    # confirm whichever account it picked. Scored on every item the account matched as
    # well as anyone else, the key is a coin flip again.
    from distillguard.provenance.suspect import SuspectItem
    from tests.factories import make_exchange

    fp = Fingerprinter(SECRET)
    pool = [a for _, a in answer_pool()][:300]
    exchanges = [make_exchange(account_id=acct, answer=fp.mark(t, acct))
                 for acct in ("acct_a", "acct_b") for t in pool]
    index = ProvenanceIndex([SuspectItem(i + 1, "", t) for i, t in enumerate(pool)])
    report = build_report(index, index.scan(exchanges, progress=False), fingerprinter=fp)
    scores = {r["account_id"]: r["fingerprint"] for r in report["accounts"]}
    assert scores  # both are named on wording ties: see docs/provenance.md
    for score in scores.values():
        assert score["slots"] > 60 and score["p_value"] > 0.05
