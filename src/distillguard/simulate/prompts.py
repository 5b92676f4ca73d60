"""Prompt pools from the real data sets, split into disjoint development and held-out halves.

Each pool is a list of :class:`Item` (the text a client sends, and where the data set has
one, the reference answer the teacher gave). An item's half is decided by a hash of its
text, so the split is stable across runs and machines: the ``tune`` presets draw only
from the ``dev`` half of every pool, ``heldout`` only from the ``heldout`` half.

Pools (file, role):

* ``chat``: Chatbot Arena hard questions and Open Assistant prompts (benign users)
* ``code``: Code Alpaca instructions sent to text-davinci-003 (distillation)
* ``seed``: the 175 Alpaca self-instruct seed tasks (distillation meta-prompts)
* ``tools``: GPTeacher tool-use instructions (agentic distillation; held-out variant)
* ``math``: GSM8K word problems with worked solutions (dual use: evaluation and
  chain-of-thought harvesting)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import orjson

from distillguard.datasets import data_dir

Split = Literal["dev", "heldout", "all"]
POOLS = ("chat", "code", "seed", "tools", "math")


@dataclass(frozen=True, slots=True)
class Item:
    text: str                 # the instruction or question
    input: str = ""           # an input the instruction works on (may be empty)
    reference: str = ""       # the answer recorded in the data set, if any
    topic: str = ""           # a cluster or task name when the data set has one


def half_of(text: str) -> str:
    digest = hashlib.blake2b(text.encode(), digest_size=2).digest()
    return "dev" if digest[0] % 2 == 0 else "heldout"


def _jsonl(path: Path) -> list[object]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _load(pool: str) -> list[Item]:
    root = data_dir()
    items: list[Item] = []
    if pool == "chat":
        for rec in _jsonl(root / "benign/arena_hard_v0.1_questions.jsonl"):
            assert isinstance(rec, dict)
            items.append(Item(text=str(rec["prompt"]), topic=str(rec.get("cluster") or "")))
        for rec in _jsonl(root / "benign/oasst_prompt_lottery_en_250.jsonl"):
            text = rec if isinstance(rec, str) else str(rec)
            items.append(Item(text=text))
    elif pool == "code":
        for rec in orjson.loads((root / "attack/codealpaca_2k.json").read_bytes()):
            items.append(Item(text=rec["instruction"], input=rec.get("input") or "",
                              reference=rec.get("output") or ""))
    elif pool == "seed":
        for rec in _jsonl(root / "attack/alpaca_seed_tasks.jsonl"):
            assert isinstance(rec, dict)
            inst = (rec.get("instances") or [{}])[0]
            items.append(Item(text=rec["instruction"], input=inst.get("input") or "",
                              reference=inst.get("output") or "", topic=rec.get("name") or ""))
    elif pool == "tools":
        for rec in orjson.loads((root / "attack/gpteacher_toolformer.json").read_bytes()):
            items.append(Item(text=rec["instruction"], input=rec.get("input") or "",
                              reference=rec.get("response") or ""))
    elif pool == "math":
        for rec in _jsonl(root / "reasoning/gsm8k_train.jsonl"):
            assert isinstance(rec, dict)
            items.append(Item(text=rec["question"], reference=rec["answer"]))
    else:
        raise ValueError(f"unknown prompt pool {pool!r}; pools: {', '.join(POOLS)}")
    return [i for i in items if i.text.strip()]


@lru_cache(maxsize=16)
def pool(name: str, split: Split = "all") -> tuple[Item, ...]:
    items = _load(name)
    if split != "all":
        items = [i for i in items if half_of(i.text) == split]
    return tuple(items)


@lru_cache(maxsize=1)
def selfinstruct_prompt() -> str:
    return (data_dir() / "attack/alpaca_selfinstruct_prompt.txt").read_text().strip()


@lru_cache(maxsize=1)
def answer_corpus() -> str:
    """Real answer text (Code Alpaca outputs, GSM8K solutions, GPTeacher responses) joined
    into one string, sliced by the response stand-in for realistic wording."""
    parts = [i.reference for name in ("code", "math", "tools") for i in pool(name)[:1500]
             if i.reference]
    return " ".join(" ".join(parts).split())
