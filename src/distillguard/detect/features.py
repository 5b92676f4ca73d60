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

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distillguard.detect.prompts import (
    CATEGORY_WORDS,
    LineFeatures,
    PromptFeatures,
    TextFeatures,
    prompt_features,
    request_parts,
    system_key,
    text_features,
)
from distillguard.detect.textcache import TextCache
from distillguard.exchange import Exchange, requested_completion
from distillguard.geoip import GeoIP, default_geoip

CATEGORIES = ("other", "code", "math", "tool_use", "writing", "translation", "knowledge")
SIMHASH_BANDS = 4


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


def _first_rule(hits: int) -> int:
    for bit, (index, _, _) in enumerate(CATEGORY_WORDS):
        if hits >> bit & 1:
            return index
    return 0


# category of each combination of rule hits: the first rule that hits wins
_CATEGORY_OF = tuple(_first_rule(hits) for hits in range(1 << len(CATEGORY_WORDS)))


class FeatureCache:
    """Bounded caches of text features: prompts, their lines, request texts and system
    prompts (each at most ``entries`` texts and ``chars`` characters of them)."""

    def __init__(self, entries: int = 32_768, chars: int = 8_000_000) -> None:
        self.prompts: TextCache[PromptFeatures] = TextCache(entries, chars)
        self.lines: TextCache[LineFeatures] = TextCache(2 * entries, chars)
        self.texts: TextCache[TextFeatures] = TextCache(entries, chars)
        self.systems: TextCache[int] = TextCache(entries, chars)

    def clear(self) -> None:
        for cache in (self.prompts, self.lines, self.texts, self.systems):
            cache.clear()

    def prompt_features(self, prompts: list[str]) -> list[PromptFeatures]:
        return prompt_features(prompts, self.lines)


_CACHE = FeatureCache()


def _system_keys(systems: list[str]) -> list[int]:
    return [system_key(s) for s in systems]


def _text_features_many(texts: list[str]) -> list[TextFeatures]:
    return [text_features(t) for t in texts]


# A client's model name and user agent are kept in sketches and sent on the feature
# stream; a longer one is cut to its start plus a digest of the whole (still one value
# per distinct string), so a request cannot make either hold megabytes.
MAX_LABEL_CHARS = 256


def bounded(text: str) -> str:
    if len(text) <= MAX_LABEL_CHARS:
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8)
    return f"{text[:MAX_LABEL_CHARS - 20]}...#{digest.hexdigest()}"


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
            # the larger limit and sample count, as the upstream generates and the token
            # reservation holds them (a small max_tokens beside a large
            # max_completion_tokens, or best_of beside n, hid a harvest)
            *requested_completion(req),
            bool(req.get("logprobs")), _float(req.get("temperature")),
            usage.prompt_tokens if usage else None, usage.completion_tokens if usage else 0,
            bounded(ex.model or ""), bounded(ex.user_agent or ""),
            info.prefix if info and not info.private else None,
            info.asn_name if info else None, bool(info and info.hosting), ex.status))

    def take(self) -> list[ExchangeFeatures]:
        return [ExchangeFeatures(*row) for row in self.take_rows()]

    def take_rows(self) -> list[tuple[Any, ...]]:
        """The block's features as plain tuples in :class:`ExchangeFeatures` field order
        (cheap to send to another process: :mod:`.batch` extracts in one)."""
        rows, self._rows = self._rows, []
        memo = self.cache
        prompts = memo.prompts.resolve([r[1] for r in rows], memo.prompt_features)
        texts = memo.texts.resolve([r[0] for r in rows], _text_features_many)
        systems = memo.systems.resolve([r[2] for r in rows if r[2]], _system_keys)
        out: list[tuple[Any, ...]] = []
        for (text, prompt, system, depth, tools, ident, account, ts, max_tokens, n, logprobs,
             temperature, prompt_tokens, completion_tokens, model, user_agent, ip_prefix,
             asn, hosting, status) in rows:
            p = prompts[prompt]
            t = texts[text]
            tool = tools or t.tool
            out.append((
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
