"""The simulated world: clock, models, accounts, labels and the exchange builder.

Populations and campaigns (:mod:`.populations`, :mod:`.campaigns`) are *actors*: each is
built against a :class:`World`, registers its accounts and labels, and provides
``events()``, a generator of ``(epoch_seconds, trace_line)`` in time order. The engine
merges all actors' generators into one time-ordered trace.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from distillguard.simulate.network import NetworkAllocator
from distillguard.simulate.prompts import Split, answer_corpus
from distillguard.simulate.timing import ServiceFit, TimingModel
from distillguard.store.models import Account

DAY = 86_400.0
HOUR = 3_600.0
OLD_MODEL, NEW_MODEL, REASONER = "demo-chat-1", "demo-chat-2", "demo-reasoner-1"
# Local-time offsets (hours from UTC) used for diurnal activity.
UTC_OFFSET = {"US": -6, "BR": -3, "GB": 0, "DE": 1, "FR": 1, "ES": 1, "IT": 1, "CH": 1}
CONSUMER_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me",
                    "gmx.de", "hotmail.co.uk", "orange.fr", "web.de", "uol.com.br")
SDK_AGENTS = ("openai-python/1.40.0", "openai-python/1.51.2", "OpenAI/Python 1.35.13",
              "openai-node/4.52.0", "OpenAI/JS 4.67.1", "langchain-openai/0.1.20",
              "python-httpx/0.27.0")
SCRIPT_AGENTS = ("python-requests/2.31.0", "python-requests/2.32.3", "aiohttp/3.9.5",
                 "openai-python/0.28.1", "curl/8.5.0", "Go-http-client/1.1")


@dataclass(frozen=True, slots=True)
class Label:
    """Ground truth for one account (one line of labels.jsonl)."""

    account_id: str
    population: str
    campaign_id: str | None = None
    campaign_type: str | None = None
    hard_negative: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"account_id": self.account_id, "campaign_id": self.campaign_id,
                "campaign_type": self.campaign_type, "population": self.population,
                "hard_negative": self.hard_negative}


@dataclass(slots=True)
class Client:
    """What the gateway sees of one account's requests: key, address, agent."""

    account_id: str
    key_id: str
    ip: str
    user_agent: str


@dataclass(slots=True)
class World:
    seed: int
    start: float
    days: float
    split: Split
    timing: TimingModel
    net: NetworkAllocator
    rng: random.Random
    release_ts: float = 0.0
    accounts: list[Account] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set)

    @property
    def end(self) -> float:
        return self.start + self.days * DAY

    def _hex(self, n: int) -> str:
        while True:
            value = f"{self.rng.getrandbits(4 * n):0{n}x}"
            if value not in self._ids:
                self._ids.add(value)
                return value

    def new_id(self, prefix: str, n: int = 10) -> str:
        return f"{prefix}{self._hex(n)}"

    def add_account(self, label_population: str, *, campaign_id: str | None = None,
                    campaign_type: str | None = None, hard_negative: bool = False,
                    created_days_before: float = 30.0, org: str | None = None,
                    email_domain: str | None = None, payment: str | None = None,
                    country: str | None = None, tier: str = "standard") -> Client:
        account_id = self.new_id("acct_")
        created = self.start - created_days_before * DAY
        self.accounts.append(Account(
            account_id=account_id, created_at=datetime.fromtimestamp(created, UTC), org=org,
            email_domain=email_domain or self.rng.choice(CONSUMER_DOMAINS),
            payment_fingerprint=payment or self.new_id("pf_", 8), country=country, tier=tier))
        self.labels.append(Label(account_id=account_id, population=label_population,
                                 campaign_id=campaign_id, campaign_type=campaign_type,
                                 hard_negative=hard_negative))
        return Client(account_id=account_id, key_id=self.new_id("key_", 8), ip="",
                      user_agent=self.rng.choice(SDK_AGENTS))


_second: list[Any] = [None, ""]


def iso(ts: float) -> str:
    """RFC 3339 with milliseconds and ``Z`` (the trace's form); caches the last second."""
    ms = int(round(ts * 1000))
    sec = ms // 1000
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{ms % 1000:03d}Z"


def diurnal(hour: float, business: bool = False) -> float:
    """Relative activity at a local hour (mean about 1 over a day): a smooth day curve
    peaking in the afternoon (consumer) or in office hours (business)."""
    if business:
        return 0.08 + 2.6 * max(0.0, math.sin(math.pi * (hour - 8.0) / 10.0)) ** 1.5 \
            if 8.0 <= hour <= 18.0 else 0.08
    return 0.25 + 1.35 * max(0.0, math.sin(math.pi * (hour - 7.0) / 17.0)) ** 1.2 \
        if 7.0 <= hour <= 24.0 else 0.25


def local_hour(ts: float, offset_h: float) -> float:
    return ((ts / HOUR) + offset_h) % 24.0


def nhpp(rng: random.Random, start: float, end: float, per_day: float, offset_h: float,
         business: bool = False, weekdays_only: bool = False) -> Iterator[float]:
    """Arrival times of a diurnal non-homogeneous Poisson process (thinning)."""
    peak = 2.7 if business else 1.6
    lam = per_day / DAY * peak
    if lam <= 0:
        return
    t = start
    while True:
        t += rng.expovariate(lam)
        if t >= end:
            return
        local = t + offset_h * HOUR
        if weekdays_only and time.gmtime(local).tm_wday >= 5:
            continue
        if rng.random() * peak < diurnal(local_hour(t, offset_h), business):
            yield t


class Responder:
    """The cheap stand-in for the upstream model: answers with real answer wording
    (the data set's reference answer when there is one, then slices of other real
    answers) at a length drawn from the fitted token distribution."""

    def __init__(self) -> None:
        self.corpus = answer_corpus()

    def text(self, rng: random.Random, tokens: int, reference: str = "") -> str:
        want = max(4, tokens * 4)
        if len(reference) >= want:
            return reference[:want]
        need = want - len(reference)
        at = rng.randrange(max(1, len(self.corpus) - need - 1))
        at = self.corpus.find(" ", at) + 1
        filler = self.corpus[at:at + need]
        return f"{reference}\n\n{filler}" if reference else filler


@lru_cache(maxsize=1)
def responder() -> Responder:
    return Responder()


def renewal(rng: random.Random, fit: ServiceFit, start: float, end: float, per_day: float,
            offset_h: float | None = None, business: bool = False) -> Iterator[float]:
    """Arrivals of a renewal process whose gaps follow the fitted Azure gap distribution
    (its burstiness) at a mean of ``per_day`` a day, optionally thinned by the diurnal
    curve at local offset ``offset_h`` (None: flat, round the clock)."""
    if per_day <= 0:
        return
    peak = 1.0 if offset_h is None else (2.7 if business else 1.6)
    mean_gap = DAY / (per_day * peak)
    t = start
    while True:
        t += fit.gap(rng, mean_gap)
        if t >= end:
            return
        if offset_h is None or rng.random() * peak < diurnal(local_hour(t, offset_h), business):
            yield t


def exchange(world: World, rng: random.Random, ts: float,
             client: Client, model: str, messages: list[dict[str, str]], *,
             completion_tokens: int, reference: str = "", max_tokens: int | None = 1024,
             temperature: float | None = None, reasoning: bool = False,
             ip: str | None = None, stream: bool = False) -> tuple[float, dict[str, Any]]:
    """One finished chat-completions exchange as a trace line (for a stream, the
    response is the reassembled completion, as the gateway records it)."""
    request: dict[str, Any] = {"model": model, "messages": messages}
    if stream:
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
        completion_tokens = min(completion_tokens, max_tokens)
    if temperature is not None:
        request["temperature"] = temperature
    content = responder().text(rng, completion_tokens, reference)
    prompt_tokens = max(1, sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = responder().text(rng, completion_tokens // 2)
    ms = int(ts * 1000)
    response = {
        "id": f"chatcmpl-{rng.getrandbits(64):016x}", "object": "chat.completion",
        "created": int(ts), "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "length" if max_tokens is not None
                     and completion_tokens >= max_tokens else "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    latency = 180.0 + rng.lognormvariate(4.5, 0.6) + completion_tokens * rng.uniform(14, 30)
    return ts, {
        "ts": iso(ts), "exchange_id": f"ex_{ms:013x}{rng.getrandbits(40):010x}",
        "account_id": client.account_id, "key_id": client.key_id,
        "client_ip": ip or client.ip, "user_agent": client.user_agent,
        "endpoint": "/v1/chat/completions", "request": request, "response": response,
        "status": 200, "latency_ms": round(latency, 1),
    }


def benign_model(world: World, rng: random.Random, ts: float) -> str:
    """Benign users adopt a newly released model gradually (a few percent a day)."""
    if ts >= world.release_ts:
        days = (ts - world.release_ts) / DAY
        if rng.random() < min(0.6, 0.05 + 0.12 * days):
            return NEW_MODEL
    return REASONER if rng.random() < 0.08 else OLD_MODEL
