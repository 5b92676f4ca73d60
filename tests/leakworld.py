"""A small leak scenario built from the real data sets in shared/data, for the
provenance and fingerprint tests and the provenance benchmark.

Campaign accounts harvest answers (GSM8K worked solutions, CodeAlpaca and GPTeacher
outputs) through a gateway that fingerprints per account; benign accounts get other
answers, and one benign evaluation runner asks some of the very same GSM8K questions as
the campaign (dual use). The leaked "suspect" set is the campaign's harvest, partly
paraphrased, reformatted or cut to an excerpt, mixed with unrelated text.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from distillguard.countermeasures import Fingerprinter
from distillguard.datasets import data_dir
from distillguard.exchange import Exchange
from tests.factories import make_exchange

SECRET = "leakworld-secret-0123456789abcdef"
_CALC = re.compile(r"<<[^>]*>>")


def answer_pool() -> list[tuple[str, str]]:
    """(prompt, answer) pairs with answers of at least 12 words, in a fixed order."""
    root = data_dir()
    pairs = []
    with open(root / "reasoning" / "gsm8k_train.jsonl") as fh:
        for line in fh:
            o = json.loads(line)
            pairs.append((o["question"], _CALC.sub("", o["answer"])))
    for o in json.loads((root / "attack" / "codealpaca_2k.json").read_text()):
        pairs.append((o["instruction"] + "\n" + o.get("input", ""), o["output"]))
    for o in json.loads((root / "attack" / "gpteacher_toolformer.json").read_text()):
        pairs.append((o["instruction"] + "\n" + o.get("input", ""), o["response"]))
    return [p for p in pairs if len(p[1].split()) >= 12]


def unrelated_texts() -> list[str]:
    root = data_dir()
    arena = (root / "benign" / "arena_hard_v0.1_questions.jsonl").read_text().splitlines()
    oasst = (root / "benign" / "oasst_prompt_lottery_en_250.jsonl").read_text().splitlines()
    out = [json.loads(line)["prompt"] for line in arena if line.strip()]
    out += [json.loads(line) for line in oasst if line.strip()]
    return [t for t in out if isinstance(t, str) and len(t.split()) >= 12]


_SYNONYMS = {"the": "this", "is": "was", "a": "one", "of": "from", "and": "plus",
             "to": "towards", "in": "within", "for": "regarding", "total": "sum",
             "each": "every", "number": "count", "function": "routine", "sold": "moved",
             "has": "holds", "how": "in what way", "many": "numerous", "so": "thus",
             "then": "afterwards", "with": "alongside", "returns": "gives back"}


def paraphrase(text: str, rng: random.Random, rate: float = 0.5) -> str:
    """A crude paraphrase: swaps common words for synonyms, drops a share of the rest."""
    out = []
    for word in text.split():
        low = word.lower()
        if low in _SYNONYMS and rng.random() < rate:
            out.append(_SYNONYMS[low])
        elif rng.random() < rate / 5:
            continue
        else:
            out.append(word)
    return " ".join(out)


def reformat(text: str, rng: random.Random) -> str:
    """Markdown/whitespace/case changes: meaning and words unchanged."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    style = rng.choice(["bullets", "joined", "upper-first", "numbered"])
    if style == "bullets":
        return "\n".join(f"- {ln}" for ln in lines)
    if style == "numbered":
        return "\n\n".join(f"{i + 1}) {ln}" for i, ln in enumerate(lines))
    if style == "joined":
        return "  ".join(lines)
    return "\n".join(ln[:1].upper() + ln[1:] + "  " for ln in lines)


def excerpt(text: str, share: float = 0.6) -> str:
    words = text.split()
    return " ".join(words[: max(6, int(len(words) * share))])


@dataclass
class World:
    exchanges: list[Exchange]
    campaign: list[str]
    benign: list[str]
    suspect: list[dict[str, str]]
    kinds: list[str]  # per suspect line: verbatim | reformat | excerpt | paraphrase | unrelated
    harvested: dict[str, list[str]] = field(default_factory=dict)  # account -> texts received


def build_world(seed: int = 7, campaign_accounts: int = 5, per_account: int = 120,
                benign_accounts: int = 20, per_benign: int = 25, leaked: int = 400,
                unrelated: int = 150) -> World:
    rng = random.Random(seed)
    fp = Fingerprinter(SECRET)
    pool = answer_pool()
    gsm = [p for p in pool[:7000]]
    rng.shuffle(gsm)
    others = pool[7000:]
    rng.shuffle(others)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    exchanges: list[Exchange] = []
    world = World([], [f"camp_{i}" for i in range(campaign_accounts)],
                  [f"user_{i}" for i in range(benign_accounts)] + ["eval_runner"], [], [])
    k = 0
    for account in world.campaign:
        for prompt, answer in gsm[k:k + per_account // 2] + others[k:k + per_account // 2]:
            text = fp.mark(answer, account)
            world.harvested.setdefault(account, []).append(text)
            exchanges.append(make_exchange(prompt, account_id=account, answer=text,
                                           ts=start + timedelta(seconds=len(exchanges))))
        k += per_account // 2
    benign_pool = gsm[k:] + others[k:]
    rng.shuffle(benign_pool)
    for j, account in enumerate(world.benign[:-1]):
        for prompt, answer in benign_pool[j * per_benign:(j + 1) * per_benign]:
            exchanges.append(make_exchange(prompt, account_id=account,
                                           answer=fp.mark(answer, account),
                                           ts=start + timedelta(seconds=len(exchanges))))
    for prompt, answer in gsm[:40]:  # the evaluation runner asks the campaign's questions
        exchanges.append(make_exchange(prompt, account_id="eval_runner",
                                       answer=fp.mark(answer, "eval_runner"),
                                       ts=start + timedelta(seconds=len(exchanges))))
    rng.shuffle(exchanges)
    world.exchanges = exchanges
    harvest = [(a, t) for a in world.campaign for t in world.harvested[a]]
    for account, text in rng.sample(harvest, leaked):
        kind = rng.choice(["verbatim", "reformat", "excerpt", "paraphrase"])
        changed = {"verbatim": text, "reformat": reformat(text, rng), "excerpt": excerpt(text),
                   "paraphrase": paraphrase(text, rng)}[kind]
        world.suspect.append({"instruction": "", "output": changed, "_account": account})
        world.kinds.append(kind)
    for text in rng.sample(unrelated_texts(), unrelated):
        world.suspect.append({"instruction": "", "output": text, "_account": ""})
        world.kinds.append("unrelated")
    return world
