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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import ahocorasick_rs
import numpy as np

from distillguard.detect.textcache import TextCache
from distillguard.exchange import Exchange, content_text, request_text
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
_TOKEN_CACHE: dict[str, int] = {}   # word -> hash, for SimHash (bounded)
_TOKEN_CACHE_SIZE = 1_000_000
V = TypeVar("V")


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
    text = text.lower()
    # each substitution only where its pattern can match (a substring it must contain)
    if "```" in text:
        text = _CODE_BLOCK.sub(" @code ", text)
    if "http" in text or "www." in text:
        text = _URL.sub(" @url ", text)
    if '"' in text or "'" in text:
        text = _QUOTED.sub(" @q ", text)
    text = _NUMBER.sub("#", text)
    return _WORD.findall(text)


def _crc_adler(text: str) -> int:
    raw = text.encode()
    return zlib.crc32(raw) | (zlib.adler32(raw) << 32)


def _hash(word: str) -> int:
    h = _TOKEN_CACHE.get(word)
    if h is None:
        h = _crc_adler(word)
        if len(_TOKEN_CACHE) < _TOKEN_CACHE_SIZE:
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
    keys = (_crc_adler("s|" + shape(text)), _crc_adler("h|" + head),
            _crc_adler("t|" + tail))
    if system:
        return (*keys, system_key(system))
    return keys


def system_key(system: str) -> int:
    """The template key of a system prompt: a hash of its skeleton's first 40 words."""
    return _crc_adler("y|" + " ".join(skeleton_words(system)[:40]))


def simhashes(docs: Sequence[Sequence[str]]) -> list[int]:
    """64-bit SimHash of each document's words (the first 128), in one numpy pass over the
    batch. Four 16-bit bands: two fingerprints within Hamming distance 3 share a band.

    Each word's 64-bit hash is unpacked into 64 bytes of 0/1; a document's per-bit counts
    are sums of those rows. At most 128 words make a document, so a count fits in a byte
    and eight counts are summed at once in each uint64 lane (no carry crosses a byte)."""
    get = _TOKEN_CACHE.get
    ids: list[int | None] = []
    sizes: list[int] = []
    for words in docs:
        head = words[:128]
        ids.extend(map(get, head))
        sizes.append(len(head))
    out = [0] * len(docs)
    if not ids:
        return out
    if None in ids:
        flat = [w for words in docs for w in words[:128]]
        ids = [h if h is not None else _hash(w) for h, w in zip(ids, flat, strict=True)]
    hashes = np.array(ids, dtype=np.uint64) * _M1        # spread crc/adler bits
    # row i, column j = bit j of word i's hash (little-endian bytes, little bit order)
    bits = np.unpackbits(hashes.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    tokens = np.array(sizes, dtype=np.intp)
    full = np.flatnonzero(tokens)                         # documents with words
    starts = (np.cumsum(tokens) - tokens)[full]
    counts = np.add.reduceat(bits.view(np.uint64), starts, axis=0).view(np.uint8)
    set_bits = 2 * counts.astype(np.int32) > tokens[full, None]   # more +1 than -1
    values = np.packbits(set_bits, axis=1, bitorder="little").view("<u8").ravel()
    for k, value in zip(full.tolist(), values.tolist(), strict=True):
        out[k] = value
    return out


def _phrase_automaton() -> tuple[ahocorasick_rs.AhoCorasick, tuple[int, ...]]:
    """One Aho-Corasick automaton over every literal phrase, and each phrase's signal
    bits: _REASONING, _RUBRIC, _TOOL, then bit _LITERAL + i for rule i of
    _CATEGORY_WORDS. One pass over a text finds them all (overlaps included)."""
    masks: dict[str, int] = {}
    groups = [REASONING_PHRASES, RUBRIC_PHRASES, TOOL_PHRASES,
              *(literals for _, _, literals in _CATEGORY_WORDS)]
    for bit, phrases in enumerate(groups):
        for phrase in phrases:
            masks[phrase] = masks.get(phrase, 0) | 1 << bit
    return ahocorasick_rs.AhoCorasick(list(masks)), tuple(masks.values())


_REASONING, _RUBRIC, _TOOL, _LITERAL = 1, 2, 4, 3
_PHRASES, _PHRASE_BITS = _phrase_automaton()


def phrase_bits(low: str) -> int:
    """The signal bits (see _phrase_automaton) of the phrases found in a lower-cased
    text: the same as testing ``phrase in low`` for each phrase."""
    bits = 0
    for index, _, _ in _PHRASES.find_matches_as_indexes(low, overlapping=True):
        bits |= _PHRASE_BITS[index]
    return bits


class PromptFeatures(NamedTuple):
    """What the prompt (the last user turn) gives, computed once per distinct prompt.
    (Tuples of plain values: the garbage collector stops tracking cached ones.)"""

    frame: tuple[int, int, int]   # layout, head and tail keys (frame_keys)
    simhash: int
    topics: int                   # bit i: a keyword of _CATEGORY_WORDS[i] among the words


class TextFeatures(NamedTuple):
    """What the request's whole (head and tail) text gives, once per distinct text."""

    reasoning: bool
    rubric: bool
    tool: bool                    # tool-use framing
    literals: int                 # bit i: a literal of _CATEGORY_WORDS[i] in the text
    length: int                   # characters of the lower-cased text


def prompt_features(prompts: Sequence[str]) -> list[PromptFeatures]:
    """Skeleton, template keys, SimHash (one numpy pass) and topics of each prompt."""
    docs = [skeleton_words(p) for p in prompts]
    out = []
    for prompt, words, sim in zip(prompts, docs, simhashes(docs), strict=True):
        present = set(words)
        topics = 0
        for bit, (_, keywords, _) in enumerate(_CATEGORY_WORDS):
            if not present.isdisjoint(keywords):
                topics |= 1 << bit
        keys = frame_keys(prompt, words)
        out.append(PromptFeatures((keys[0], keys[1], keys[2]), sim, topics))
    return out


def text_features(text: str) -> TextFeatures:
    """Phrase signals of a request's text (head and tail of long texts)."""
    low = text.lower()
    bits = phrase_bits(low)
    return TextFeatures(bool(bits & _REASONING), bool(bits & _RUBRIC), bool(bits & _TOOL),
                        bits >> _LITERAL, len(low))


def _first_rule(hits: int) -> int:
    for bit, (index, _, _) in enumerate(_CATEGORY_WORDS):
        if hits >> bit & 1:
            return index
    return 0


# category of each combination of rule hits: the first rule that hits wins
_CATEGORY_OF = tuple(_first_rule(hits) for hits in range(1 << len(_CATEGORY_WORDS)))


class FeatureCache:
    """Bounded caches of per-text features: prompts, request texts, system prompts."""

    def __init__(self, entries: int = 32_768, chars: int = 16_000_000) -> None:
        self.prompts: TextCache[PromptFeatures] = TextCache(entries, chars)
        self.texts: TextCache[TextFeatures] = TextCache(entries, chars)
        self.systems: TextCache[int] = TextCache(entries, chars)

    def clear(self) -> None:
        for cache in (self.prompts, self.texts, self.systems):
            cache.clear()


_CACHE = FeatureCache()


def _resolve(cache: TextCache[V], keys: Iterable[str],
             compute: Callable[[list[str]], list[V]]) -> dict[str, V]:
    """key -> value for every key: from the cache, else computed for the distinct
    missing keys in one call (and cached)."""
    found: dict[str, V] = {}
    missing: dict[str, None] = {}
    get = cache.get
    for key in keys:
        if key in found or key in missing:
            continue
        value = get(key)
        if value is None:
            missing[key] = None
        else:
            found[key] = value
    if missing:
        todo = list(missing)
        for key, value in zip(todo, compute(todo), strict=True):
            found[key] = value
            cache.put(key, value)
    return found


def request_parts(request: Any) -> tuple[str, str, str, int]:
    """(text, prompt, system, depth) of a request body, in one pass over its messages:
    its whole text (only the head and tail of a long one), the last user turn (the
    template lives there; the text when there is none), the system and developer
    prompts joined, and the number of earlier assistant turns."""
    if not isinstance(request, dict):
        return "", "", "", 0
    messages = request.get("messages")
    if not isinstance(messages, list):
        text = _head_tail(request_text(request))
        return text, text, "", 0
    pieces = []
    user = ""
    system = []
    depth = 0
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        piece = content if isinstance(content, str) else content_text(content)
        pieces.append(piece)
        role = m.get("role")
        if role == "user":
            user = piece
        elif role == "assistant":
            depth += 1
        elif role == "system" or role == "developer":
            system.append(str(content or ""))
    text = _head_tail("\n".join(pieces))
    return text, user or text, "\n".join(system), depth


def _head_tail(text: str) -> str:
    if len(text) > _HEAD_CHARS + _TAIL_CHARS:
        return text[:_HEAD_CHARS] + "\n" + text[-_TAIL_CHARS:]
    return text


def _system_keys(systems: list[str]) -> list[int]:
    return [system_key(s) for s in systems]


def _text_features_many(texts: list[str]) -> list[TextFeatures]:
    return [text_features(t) for t in texts]


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


_NO_REQUEST: dict[str, Any] = {}


class Extractor:
    """Features of a block of exchanges. :meth:`add` keeps only what features need of
    each exchange (its texts and a few plain values), so a caller can drop the exchange
    and its bodies at once; :meth:`take` computes what depends on a text once per
    distinct text of the block (SimHashes in one numpy pass), keeps it in ``cache`` (the
    module's bounded one by default) for later blocks, and returns the block's features
    in the order the exchanges were added. :func:`extract_many` and :func:`extract` are
    built on it, so every path computes features one way."""

    def __init__(self, geoip: GeoIP | None = None, cache: FeatureCache | None = None
                 ) -> None:
        self.geo = geoip or default_geoip()
        self.cache = _CACHE if cache is None else cache
        self._rows: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, ex: Exchange) -> None:
        text, prompt, system, depth = request_parts(ex.request)
        req = ex.request if isinstance(ex.request, dict) else _NO_REQUEST
        info = self.geo.lookup(ex.client_ip) if ex.client_ip else None
        usage = ex.usage
        self._rows.append((
            text, prompt, system, depth, bool(req.get("tools") or req.get("functions")),
            ex.id, ex.account_id or "", ex.ts.timestamp(),
            _int(req.get("max_tokens") or req.get("max_completion_tokens"), 0),
            _int(req.get("n"), 1), bool(req.get("logprobs")), _float(req.get("temperature")),
            usage.prompt_tokens if usage else None, usage.completion_tokens if usage else 0,
            ex.model or "", ex.user_agent or "",
            info.prefix if info and not info.private else None,
            info.asn_name if info else None, bool(info and info.hosting), ex.status))

    def take(self) -> list[ExchangeFeatures]:
        rows, self._rows = self._rows, []
        memo = self.cache
        prompts = _resolve(memo.prompts, [r[1] for r in rows], prompt_features)
        texts = _resolve(memo.texts, [r[0] for r in rows], _text_features_many)
        systems = _resolve(memo.systems, [r[2] for r in rows if r[2]], _system_keys)
        out = []
        for (text, prompt, system, depth, tools, ident, account, ts, max_tokens, n, logprobs,
             temperature, prompt_tokens, completion_tokens, model, user_agent, ip_prefix,
             asn, hosting, status) in rows:
            p = prompts[prompt]
            t = texts[text]
            tool = tools or t.tool
            out.append(ExchangeFeatures(
                ident, account, ts, (*p.frame, systems[system]) if system else p.frame,
                p.simhash, t.reasoning, t.rubric, tool,
                3 if tool else _CATEGORY_OF[p.topics | t.literals], depth, max_tokens, n,
                logprobs, temperature,
                t.length // 4 if prompt_tokens is None else prompt_tokens,
                completion_tokens, model, user_agent, ip_prefix, asn, hosting, status))
        return out


def extract_many(exchanges: Sequence[Exchange], geoip: GeoIP | None = None,
                 cache: FeatureCache | None = None) -> list[ExchangeFeatures]:
    """Features of a batch of exchanges (same values as :func:`extract` one by one)."""
    block = Extractor(geoip, cache)
    for ex in exchanges:
        block.add(ex)
    return block.take()


def extract(exchange: Exchange, geoip: GeoIP | None = None,
            cache: FeatureCache | None = None) -> ExchangeFeatures:
    return extract_many([exchange], geoip, cache)[0]
