"""Per-exchange features: computed once per exchange and stored with it.

:func:`extract` turns one :class:`~distillguard.exchange.Exchange` into an
:class:`ExchangeFeatures`; :func:`extract_many` does a batch (the batch path calls it on
blocks of exchanges, the online stage on one) and both give the same values, so the two
paths share one logic.

What is computed:

* **template skeleton**: the prompt lower-cased, with code blocks, URLs, numbers and
  quoted strings replaced by placeholders; its layout (line markers such as ``###``,
  ``Input:``), first and last three words are hashed into three *template keys* (a fixed
  frame around a changing payload shows in at least one of them), plus the system
  prompt's skeleton when the request has one;
* **locality-sensitive fingerprint**: a 64-bit SimHash of the skeleton's words
  (numpy, vectorised over the batch), banded into four 16-bit LSH keys so that near
  copies of one prompt share keys;
* **signals**: reasoning elicitation (``step by step``, ``show your reasoning``, ...),
  rubric grading (``on a scale of``, ``rubric``, ``which response is better``, ...),
  tool use (a ``tools`` field or tool-use framing);
* **capability category** (code, math, tool use, writing, translation, knowledge, other);
* **conversation depth** (earlier assistant turns carried in the request);
* **harvest parameters**: max_tokens, n, logprobs, temperature, output/input token ratio;
* **client fingerprint**: user agent, IP /24, AS name and whether it is a hosting network
  (:func:`distillguard.geoip.default_geoip`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distillguard.exchange import Exchange, request_text
from distillguard.geoip import GeoIP, default_geoip

CATEGORIES = ("other", "code", "math", "tool_use", "writing", "translation", "knowledge")
FRAME_WORDS = 3
SIMHASH_BANDS = 4
_HEAD_CHARS = 1_500
_TAIL_CHARS = 600

_CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.S)
_URL = re.compile(r"https?://\S+|www\.\S+")
_QUOTED = re.compile(r"\"[^\"\n]{1,200}\"|'[^'\n]{1,80}'")
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_WORD = re.compile(r"[a-z#@%$]+")
_LINE_HEAD = re.compile(
    r"(?:#+ ?)?[a-z][a-z ]{0,24}:(?=\s|$)|#+|[-*>•]|\d+[.)]|```|\[[a-z]+[-_]")

# Literal phrases, matched with substring search (much faster than one big alternation).
REASONING_PHRASES = (
    "step by step", "step-by-step", "show your work", "show your reasoning",
    "show all your work", "show the steps", "show your steps", "show your thinking",
    "explain your reasoning", "explain the reasoning", "chain of thought", "chain-of-thought",
    "think carefully", "think it through", "think through", "think aloud", "let's think",
    "lets think", "let's reason", "reason carefully", "reason through", "<think", "walk me through",
    "detailed reasoning", "full reasoning", "internal reasoning", "full derivation",
    "before answering", "before giving", "intermediate step", "justify each", "reasoning first")
RUBRIC_PHRASES = (
    "rubric", "on a scale of", "on a scale from", "-10 scale", "-5 scale", "score the",
    "score from", "score between", "rate the response", "rate the answer", "rate this",
    "grade the", "grade this", "grader", "which response is better", "which answer is better",
    "response a", "response b", "assistant a", "assistant b", "evaluate the following answer",
    "evaluate the following response", "evaluate the response", "evaluate the answer",
    "as a judge", "strict judge", "\"score\"")
TOOL_PHRASES = (
    "toolformer", "function_call", "function call", "tool_call", "tool call",
    "available tools", "access to the following tools", "you have access to tools",
    "api call", "tools:", "json schema")
# Capability keywords, matched against the skeleton's words (first rule that hits wins).
def _kw(words: str) -> frozenset[str]:
    return frozenset(words.split())


_CATEGORY_WORDS: tuple[tuple[int, frozenset[str], tuple[str, ...]], ...] = (
    (1, _kw("python javascript typescript java rust golang sql html css regex code "
                  "function program algorithm compile debug script array api def class bug "
                  "implement method recursion json xml bash shell"),
     ("```", "c++", "@code")),
    (2, _kw("solve calculate equation integral derivative probability math arithmetic "
                  "average percent sum total how many much cost price"), ()),
    (5, _kw("translate translation translating"), ()),
    (4, _kw("story poem essay email letter rewrite paraphrase summarize summarise "
                  "slogan headline blog tweet compose draft"), ()),
    (6, _kw("what who when why explain describe difference tell history"), ()),
)

_M1 = np.uint64(0x9E3779B97F4A7C15)
_BITS = np.arange(64, dtype=np.uint64)
_ONE = np.uint64(1)
_TOKEN_CACHE: dict[str, int] = {}


@dataclass(slots=True)
class ExchangeFeatures:
    """What detection keeps of one exchange (stored as ``annotations["features"]``)."""

    exchange_id: str
    account_id: str
    ts: float                      # seconds since the epoch
    template_keys: tuple[int, ...]  # layout, head, tail (and system prompt) of the skeleton
    simhash: int                   # 64-bit SimHash of the skeleton
    reasoning: bool
    rubric: bool
    tool_use: bool
    category: int                  # index into CATEGORIES
    depth: int                     # earlier assistant turns in the request
    max_tokens: int
    n: int
    logprobs: bool
    temperature: float | None
    prompt_tokens: int
    completion_tokens: int
    model: str
    user_agent: str
    ip_prefix: str | None
    asn: str | None
    hosting: bool
    status: int

    @property
    def lsh_keys(self) -> tuple[int, ...]:
        """The SimHash cut into SIMHASH_BANDS bands, each tagged with its band number."""
        h = self.simhash
        return tuple((band << 16) | ((h >> (16 * band)) & 0xFFFF)
                     for band in range(SIMHASH_BANDS))

    @property
    def output_ratio(self) -> float:
        return self.completion_tokens / max(1, self.prompt_tokens)

    @property
    def harvest(self) -> bool:
        """Asks for more than a normal client does: many samples, logprobs, huge outputs."""
        return self.n > 1 or self.logprobs or self.max_tokens >= 4000

    def to_json(self) -> dict[str, Any]:
        return {"template_keys": [f"{k:016x}" for k in self.template_keys],
                "simhash": f"{self.simhash:016x}", "reasoning": self.reasoning,
                "rubric": self.rubric, "tool_use": self.tool_use,
                "category": CATEGORIES[self.category], "depth": self.depth,
                "max_tokens": self.max_tokens, "n": self.n, "logprobs": self.logprobs,
                "temperature": self.temperature, "output_ratio": round(self.output_ratio, 3),
                "harvest": self.harvest, "user_agent": self.user_agent,
                "ip_prefix": self.ip_prefix, "asn": self.asn, "hosting": self.hosting}


def skeleton_words(text: str) -> list[str]:
    """The prompt's template skeleton as words: placeholders for code, URLs, numbers and
    quoted strings; only the head and tail of long prompts are read."""
    if len(text) > _HEAD_CHARS + _TAIL_CHARS:
        text = text[:_HEAD_CHARS] + " \n " + text[-_TAIL_CHARS:]
    text = _CODE_BLOCK.sub(" @code ", text.lower())
    text = _URL.sub(" @url ", text)
    text = _QUOTED.sub(" @q ", text)
    text = _NUMBER.sub("#", text)
    return _WORD.findall(text)


def _hash(word: str) -> int:
    h = _TOKEN_CACHE.get(word)
    if h is None:
        raw = word.encode()
        h = zlib.crc32(raw) | (zlib.adler32(raw) << 32)
        if len(_TOKEN_CACHE) < 1_000_000:
            _TOKEN_CACHE[word] = h
    return h


def shape(text: str) -> str:
    """The layout of a prompt: per line, its leading marker (``###``, ``-``, ``1.``,
    ``label:``) or ``~`` for free text, consecutive free lines folded into one."""
    parts: list[str] = []
    for line in text.lower().split("\n")[:40]:
        line = line.strip()
        if not line:
            continue
        m = _LINE_HEAD.match(line)
        part = _NUMBER.sub("#", m.group(0)) if m else "~"
        if part != "~" or not parts or parts[-1] != "~":
            parts.append(part)
    return " ".join(parts[:16])


def frame_keys(text: str, words: Sequence[str], system: str = "") -> tuple[int, ...]:
    """Hashes of the prompt's layout, its first and its last FRAME_WORDS skeleton words,
    and of the system prompt's skeleton when there is one."""
    head = " ".join(words[:FRAME_WORDS])
    tail = " ".join(words[-FRAME_WORDS:])
    keys = (_hash("s|" + shape(text)), _hash("h|" + head), _hash("t|" + tail))
    if system:
        return (*keys, _hash("y|" + " ".join(skeleton_words(system)[:40])))
    return keys


def _last_user(request: Any) -> str:
    messages = request.get("messages") if isinstance(request, dict) else None
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return request_text({"messages": [m]})
    return ""


def _system(request: Any) -> str:
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return ""
    return "\n".join(str(m.get("content") or "") for m in messages
                     if isinstance(m, dict) and m.get("role") in ("system", "developer"))


def simhashes(docs: Sequence[Sequence[str]]) -> list[int]:
    """64-bit SimHash of each document's words (the first 128), in one numpy pass over the
    batch. Four 16-bit bands: two fingerprints within Hamming distance 3 share a band."""
    ids: list[int] = []
    owners: list[int] = []
    for k, words in enumerate(docs):
        for word in words[:128]:
            ids.append(_hash(word))
            owners.append(k)
    out = np.zeros(len(docs), dtype=np.uint64)
    if ids:
        hashes = np.asarray(ids, dtype="<u8") * _M1   # spread crc/adler bits
        # column j = bit j of each token hash (little-endian bytes, little bit order)
        bits = np.unpackbits(hashes.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        owner = np.asarray(owners, dtype=np.intp)
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        ones = np.add.reduceat(bits.astype(np.int32), starts, axis=0)  # grouped by document
        tokens = np.diff(np.r_[starts, owner.size])
        set_bits = (2 * ones > tokens[:, None]).astype(np.uint64)     # more +1 than -1
        out[owner[starts]] = (set_bits << _BITS).sum(axis=1, dtype=np.uint64)
    return [int(v) for v in out]


def _any(text: str, phrases: tuple[str, ...]) -> bool:
    return any(p in text for p in phrases)


def _category(text: str, words: Sequence[str], tool: bool) -> int:
    if tool:
        return 3
    present = set(words)
    for index, keywords, literals in _CATEGORY_WORDS:
        if not present.isdisjoint(keywords) or _any(text, literals):
            return index
    return 0


def _depth(request: Any) -> int:
    if not isinstance(request, dict):
        return 0
    messages = request.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def extract_many(exchanges: Sequence[Exchange], geoip: GeoIP | None = None
                 ) -> list[ExchangeFeatures]:
    """Features of a batch of exchanges (same values as :func:`extract` one by one)."""
    geo = geoip or default_geoip()
    skeletons = []
    texts = []
    prompts = []
    for ex in exchanges:
        text = request_text(ex.request)
        if len(text) > _HEAD_CHARS + _TAIL_CHARS:
            text = text[:_HEAD_CHARS] + "\n" + text[-_TAIL_CHARS:]
        texts.append(text)
        prompt = _last_user(ex.request) or text    # the template lives in the user turn
        prompts.append(prompt)
        skeletons.append(skeleton_words(prompt))
    hashes = simhashes(skeletons)
    out = []
    for ex, text, prompt, words, sim in zip(exchanges, texts, prompts, skeletons, hashes,
                                            strict=True):
        low = text.lower()
        req = ex.request if isinstance(ex.request, dict) else {}
        tool = bool(req.get("tools") or req.get("functions")) or _any(low, TOOL_PHRASES)
        info = geo.lookup(ex.client_ip) if ex.client_ip else None
        usage = ex.usage
        out.append(ExchangeFeatures(
            exchange_id=ex.id, account_id=ex.account_id or "", ts=ex.ts.timestamp(),
            template_keys=frame_keys(prompt, words, _system(req)), simhash=sim,
            reasoning=_any(low, REASONING_PHRASES), rubric=_any(low, RUBRIC_PHRASES),
            tool_use=tool, category=_category(low, words, tool), depth=_depth(req),
            max_tokens=_int(req.get("max_tokens") or req.get("max_completion_tokens"), 0),
            n=_int(req.get("n"), 1), logprobs=bool(req.get("logprobs")),
            temperature=_float(req.get("temperature")),
            prompt_tokens=usage.prompt_tokens if usage else len(low) // 4,
            completion_tokens=usage.completion_tokens if usage else 0,
            model=ex.model or "", user_agent=ex.user_agent or "",
            ip_prefix=info.prefix if info and not info.private else None,
            asn=info.asn_name if info else None, hosting=bool(info and info.hosting),
            status=ex.status))
    return out


def extract(exchange: Exchange, geoip: GeoIP | None = None) -> ExchangeFeatures:
    return extract_many([exchange], geoip)[0]
