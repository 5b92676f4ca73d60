"""Rate limits and quotas: requests/minute, tokens/minute, tokens/day, per key and account.

Counting is done by a :class:`CounterStore`: :class:`MemoryCounterStore` inside one process,
:class:`RedisCounterStore` shared by every replica (one Lua script per request, so the
check-and-count is atomic across replicas). Minute limits use a sliding window estimated
from the current and previous fixed windows (the weighted-window method); the daily quota
is a fixed UTC day.

Requests are counted when admitted. Tokens are only known once the upstream answers, so a
request is admitted while the token windows are below their limits and the tokens it used
are added afterwards (the same approach OpenAI documents for its own limits).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from distillguard.config import CounterSettings, LimitSet, Settings
from distillguard.errors import ServiceUnavailable
from distillguard.exchange import (
    MAX_JSON_INT,
    Exchange,
    prompt_token_estimate,
    requested_completion,
)
from distillguard.pipeline import Allowed, Decision, Denied

if TYPE_CHECKING:
    from distillguard.auth import Principal

log = logging.getLogger("distillguard.ratelimit")

MINUTE = 60
DAY = 86_400


@dataclass(frozen=True, slots=True)
class CounterRequest:
    """One counter to check and charge. ``cost`` 0 means check only (usage < limit)."""

    key: str
    limit: int
    window_s: int
    cost: int
    sliding: bool = True

    @property
    def scope(self) -> str:
        """The key's first part (``account``, ``key``, ``throttle``...), of a limit's key
        ``{scope}:{subject}:{kind}:{window}``."""
        return self.key.split(":", 1)[0]

    @property
    def kind(self) -> str:
        """The limit's kind (``rpm``, ``tpm``, ``tpd``): the key's last part but one, read
        from the right, since the subject (an account id) may itself hold ``:``."""
        return self.key.rsplit(":", 2)[1]


@dataclass(frozen=True, slots=True)
class CounterState:
    usage: float
    limit: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class AcquireResult:
    admitted: bool
    states: list[CounterState]
    blocking: int | None = None  # index of the first counter that refused


class CounterStore(Protocol):
    async def acquire(self, requests: Sequence[CounterRequest], now: float) -> AcquireResult: ...

    async def add(self, requests: Sequence[CounterRequest], now: float) -> None: ...

    async def ping(self) -> None:
        """Return when the store answers; raise when it cannot be reached (``/ready``)."""
        ...

    async def close(self) -> None: ...


def _window_usage(cur: float, prev: float, now: float, window: int, sliding: bool) -> float:
    if not sliding:
        return cur
    elapsed = (now % window) / window
    return prev * (1.0 - elapsed) + cur


def _reset_after(cur: float, prev: float, now: float, req: CounterRequest) -> float:
    """Seconds until the counter has room for ``req.cost`` (or one unit if cost is 0)."""
    window = req.window_s
    left_in_window = window - (now % window)
    if not req.sliding:
        return left_in_window
    need = max(req.cost, 1)
    if cur + need <= req.limit:
        if prev <= 0:
            return 0.0
        # The previous window's weight decays linearly until the end of this window.
        excess = prev * (1 - (now % window) / window) + cur + need - req.limit
        return max(0.0, min(left_in_window, excess / prev * window))
    # This window is full: it becomes the previous window and must decay enough.
    return left_in_window + window * (cur + need - req.limit) / cur


class MemoryCounterStore:
    """Counters in this process only: correct for a single replica."""

    def __init__(self) -> None:
        self._counts: dict[str, float] = {}
        self._last_sweep = 0.0

    def _get(self, key: str, bucket: int) -> float:
        return self._counts.get(f"{key}:{bucket}", 0.0)

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        keep: dict[str, float] = {}
        for name, value in self._counts.items():
            key, _, bucket = name.rpartition(":")
            window = int(key.rsplit(":", 1)[1])
            if int(bucket) >= int(now // window) - 1:
                keep[name] = value
        self._counts = keep

    async def acquire(self, requests: Sequence[CounterRequest], now: float) -> AcquireResult:
        self._sweep(now)
        states = []
        blocking = None
        for i, req in enumerate(requests):
            bucket = int(now // req.window_s)
            cur = self._get(req.key, bucket)
            prev = self._get(req.key, bucket - 1) if req.sliding else 0.0
            usage = _window_usage(cur, prev, now, req.window_s, req.sliding)
            over = usage + req.cost > req.limit if req.cost else usage >= req.limit
            if over and blocking is None:
                blocking = i
            states.append(CounterState(usage, req.limit, _reset_after(cur, prev, now, req)))
        if blocking is not None:
            return AcquireResult(False, states, blocking)
        await self.add(requests, now)
        states = [CounterState(s.usage + r.cost, s.limit, s.reset_s)
                  for s, r in zip(states, requests, strict=True)]
        return AcquireResult(True, states)

    async def add(self, requests: Sequence[CounterRequest], now: float) -> None:
        for req in requests:
            if req.cost:
                name = f"{req.key}:{int(now // req.window_s)}"
                self._counts[name] = self._counts.get(name, 0.0) + req.cost

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


# KEYS: 2 per counter (current bucket, previous bucket).
# ARGV: now, then 4 per counter (limit, window, cost, sliding).
# Returns {admitted, blocking_index, cur1, prev1, cur2, prev2, ...} as strings.
_ACQUIRE_LUA = """
local now = tonumber(ARGV[1])
local n = #KEYS / 2
local curs, prevs = {}, {}
local blocking = -1
for i = 1, n do
  local limit = tonumber(ARGV[2 + (i-1)*4])
  local window = tonumber(ARGV[3 + (i-1)*4])
  local cost = tonumber(ARGV[4 + (i-1)*4])
  local sliding = ARGV[5 + (i-1)*4] == '1'
  local cur = tonumber(redis.call('GET', KEYS[2*i-1]) or '0')
  local prev = 0
  if sliding then prev = tonumber(redis.call('GET', KEYS[2*i]) or '0') end
  curs[i] = cur; prevs[i] = prev
  local usage = cur
  if sliding then usage = prev * (1 - (now % window) / window) + cur end
  local over
  if cost > 0 then over = usage + cost > limit else over = usage >= limit end
  if over and blocking < 0 then blocking = i - 1 end
end
local admitted = 0
if blocking < 0 then
  admitted = 1
  for i = 1, n do
    local window = tonumber(ARGV[3 + (i-1)*4])
    local cost = tonumber(ARGV[4 + (i-1)*4])
    if cost > 0 then
      redis.call('INCRBY', KEYS[2*i-1], cost)
      redis.call('EXPIRE', KEYS[2*i-1], window * 2 + 1)
    end
  end
end
local out = {tostring(admitted), tostring(blocking)}
for i = 1, n do out[#out+1] = tostring(curs[i]); out[#out+1] = tostring(prevs[i]) end
return out
"""


# Connections to Redis one process keeps at most; a counter look-up is one round trip.
REDIS_CONNECTIONS = 64
# How long a look-up waits for one of them.
POOL_WAIT_S = 30.0


class RedisCounterStore:
    """Counters in Redis, shared by every gateway replica."""

    def __init__(self, settings: CounterSettings) -> None:
        import redis.asyncio as redis

        self.prefix = settings.prefix
        # A request past the pool's connections waits for one. The client's own pool
        # raised MaxConnectionsError past 100 at once instead, and a counter store that
        # fails admits the request uncounted (on_failure: open). The wait is this
        # process's own backlog (a second was too short for a burst of a thousand); a
        # Redis that does not answer still fails each look-up after socket_timeout.
        pool = redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=REDIS_CONNECTIONS, timeout=POOL_WAIT_S,
            socket_timeout=1.0, socket_connect_timeout=1.0)
        self.client = redis.Redis.from_pool(pool)
        self._script = self.client.register_script(_ACQUIRE_LUA)

    def _keys(self, req: CounterRequest, now: float) -> tuple[str, str]:
        bucket = int(now // req.window_s)
        base = f"{self.prefix}:rl:{req.key}"
        return f"{base}:{bucket}", f"{base}:{bucket - 1}"

    async def acquire(self, requests: Sequence[CounterRequest], now: float) -> AcquireResult:
        keys: list[str] = []
        args: list[str | int] = [repr(now)]
        for req in requests:
            keys.extend(self._keys(req, now))
            args.extend([req.limit, req.window_s, req.cost, 1 if req.sliding else 0])
        raw = await self._script(keys=keys, args=args)
        admitted = raw[0] in (b"1", "1")
        blocking = int(raw[1])
        states = []
        for i, req in enumerate(requests):
            cur, prev = float(raw[2 + 2 * i]), float(raw[3 + 2 * i])
            usage = _window_usage(cur, prev, now, req.window_s, req.sliding)
            if admitted:
                usage += req.cost
            states.append(CounterState(usage, req.limit, _reset_after(cur, prev, now, req)))
        return AcquireResult(admitted, states, None if blocking < 0 else blocking)

    async def add(self, requests: Sequence[CounterRequest], now: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        for req in requests:
            if req.cost:
                key = self._keys(req, now)[0]
                pipe.incrby(key, req.cost)
                pipe.expire(key, req.window_s * 2 + 1)
        await pipe.execute()

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()


def open_counter_store(settings: CounterSettings) -> CounterStore:
    if settings.backend == "redis":
        return RedisCounterStore(settings)
    return MemoryCounterStore()


def _fmt_duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``1h2m3s``."""
    seconds = max(0, math.ceil(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


# How each limit is counted: its kind in counter keys, its window, whether the window
# slides. Which limits there are, and their order, is config.LimitSet's fields: a field
# added there and not here stops this import with a KeyError naming it.
_COUNTING = {
    "requests_per_minute": ("rpm", MINUTE, True),
    "tokens_per_minute": ("tpm", MINUTE, True),
    "tokens_per_day": ("tpd", DAY, False),
}
_OPTIONS = tuple(LimitSet.model_fields)
_LIMIT_KINDS = tuple((option, *_COUNTING[option]) for option in _OPTIONS)
# "requests per minute" for "rpm", in messages
_WHAT = {short: option.replace("_", " ") for option, short, *_ in _LIMIT_KINDS}


def tokens_to_reserve(request: Any) -> int:
    """Tokens a request may use, held against its token windows from the moment it is
    admitted until its usage is known: its prompt (as
    :func:`~distillguard.exchange.prompt_token_estimate` counts it) and the completion it allows
    (:func:`~distillguard.exchange.requested_completion`: the larger completion limit
    times the larger sample count), when it sets one. Only the usage already charged was
    checked: requests admitted at once, or one with a long prompt and a large limit,
    each ran past a token quota; and ``"max_completion_tokens": null`` or ``0`` beside a
    large ``max_tokens`` had reserved nothing while the upstream used the large one."""
    if not isinstance(request, dict):
        return 0
    limit, samples = requested_completion(request)
    return min(prompt_token_estimate(request) + limit * samples, MAX_JSON_INT)


class RateLimiter:
    """Request check (admission) and inline stage (token accounting) in one.

    Each request is checked against the key's own limits, if any, and its account's limits
    (the tier's defaults, overridden by the account's ``limits``).
    """

    name = "ratelimit"
    inline = True

    def __init__(self, settings: Settings, counters: CounterStore) -> None:
        self.settings = settings
        self.counters = counters
        self.fail_open = settings.counters.on_failure == "open"
        self.failures = 0

    def _limit_sets(self, principal: Principal) -> list[tuple[str, str, dict[str, int | None]]]:
        """(scope, subject, limits) for the account and, if it has its own, the key.

        Plain dicts on the request path: the tier's limits were validated with the
        settings, the account's and key's overrides when they were stored.
        """
        account = principal.account
        tier: LimitSet = self.settings.limits_for_tier(account.tier)
        values = {option: getattr(tier, option) for option in _OPTIONS}
        for option, value in account.limits.items():
            # null is no override (the tier's limit), as documented; it lifted the limit
            if option in values and value is not None:
                values[option] = value
        sets = [("account", account.account_id, values)]
        if principal.key.limits:
            sets.append(("key", principal.key.key_id,
                         {option: principal.key.limits.get(option) for option in _OPTIONS}))
        return sets

    def _requests(self, principal: Principal, tokens: int | None, reserve: int = 0
                  ) -> list[CounterRequest]:
        """The counters of a request: with ``tokens`` None, the check before it is
        served (one request on each request window, ``reserve`` tokens on each token
        window); else ``tokens`` more (or, negative, fewer) on each token window."""
        out = []
        for scope, subject, limits in self._limit_sets(principal):
            for option, short, window, sliding in _LIMIT_KINDS:
                limit = limits[option]
                if limit is None:
                    continue
                if short == "rpm":
                    if tokens is not None:
                        continue
                    cost = 1
                else:
                    cost = reserve if tokens is None else tokens
                out.append(CounterRequest(f"{scope}:{subject}:{short}:{window}", limit,
                                          window, cost, sliding))
        return out

    async def check(self, exchange: Exchange) -> Decision:
        principal = exchange.principal
        if principal is None:
            return Allowed()
        reserve = tokens_to_reserve(exchange.request)
        reqs = self._requests(principal, None, reserve)
        if not reqs:
            return Allowed()
        too_large = next((r for r in reqs if r.kind != "rpm" and r.cost > r.limit), None)
        if too_large is not None:
            return self._too_large(exchange, too_large)
        now = time.time()
        try:
            result = await self.counters.acquire(reqs, now)
        except Exception as exc:  # Redis down: degrade per the configured failure mode
            self.failures += 1
            log.warning("counter store unavailable (%s); failing %s", exc.__class__.__name__,
                        "open" if self.fail_open else "closed")
            exchange.annotations["ratelimit_unavailable"] = True
            if self.fail_open:
                return Allowed(notes=("rate limits not enforced: counter store down",))
            raise ServiceUnavailable(
                "Rate limiting is temporarily unavailable; please retry shortly."
            ) from None
        exchange.annotations["ratelimit_headers"] = self._headers(reqs, result.states)
        if result.admitted:
            if reserve and any(r.kind != "rpm" for r in reqs):
                exchange.annotations["tokens_reserved"] = reserve
            return Allowed()
        blocking = reqs[result.blocking or 0]
        state = result.states[result.blocking or 0]
        scope, short = blocking.scope, blocking.kind
        what = _WHAT[short]
        retry_after = max(1, math.ceil(state.reset_s))
        exchange.annotations["ratelimited"] = f"{scope}:{short}"
        return Denied(
            reason=(f"Rate limit reached for {what} on this {scope}: limit {blocking.limit}, "
                    f"used {int(state.usage)}. Retry after {retry_after}s."),
            code="rate_limit_exceeded" if short != "tpd" else "insufficient_quota",
            status=429,
            retry=True,
            retry_after_s=retry_after,
            headers=exchange.annotations["ratelimit_headers"],
        )

    @staticmethod
    def _too_large(exchange: Exchange, req: CounterRequest) -> Denied:
        """A request whose own token reservation is more than a token window holds: no
        wait admits it, so it is refused without a Retry-After and with
        ``x-should-retry: false``. It was a 429 saying "retry after" the window's reset
        (hours for a large ``max_tokens``), which the official clients obeyed twice, to
        be refused again."""
        what = _WHAT[req.kind]
        exchange.annotations["ratelimited"] = f"{req.scope}:{req.kind}"
        return Denied(
            reason=(f"Request too large for the {what} limit of this {req.scope}: limit "
                    f"{req.limit}, and the request may use {req.cost} tokens (its prompt, "
                    f"and max_tokens times n). Lower max_tokens, n or the prompt."),
            code="request_too_large", status=429, retry=False)

    async def on_exchange(self, exchange: Exchange) -> None:
        """Charge the tokens the exchange used to its token windows, less those reserved
        for it when it was admitted (given back when it used fewer, or none)."""
        principal = exchange.principal
        if principal is None:
            return
        used = exchange.usage.total_tokens if exchange.usage is not None else 0
        delta = used - int(exchange.annotations.get("tokens_reserved", 0))
        if not delta:
            return
        reqs = self._requests(principal, delta)
        if reqs:
            try:
                await self.counters.add(reqs, time.time())
            except Exception as exc:
                self.failures += 1
                log.warning("could not charge tokens: %s", exc.__class__.__name__)

    @staticmethod
    def _headers(reqs: list[CounterRequest], states: list[CounterState]) -> dict[str, str]:
        """``x-ratelimit-*`` headers from the tightest request and token windows."""
        headers: dict[str, str] = {}
        for kind, shorts in (("requests", ("rpm",)), ("tokens", ("tpm", "tpd"))):
            best: tuple[float, CounterRequest, CounterState] | None = None
            for req, state in zip(reqs, states, strict=True):
                if req.kind in shorts:
                    remaining = req.limit - state.usage
                    if best is None or remaining < best[0]:
                        best = (remaining, req, state)
            if best is not None:
                remaining, req, state = best
                headers[f"x-ratelimit-limit-{kind}"] = str(req.limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(remaining)))
                headers[f"x-ratelimit-reset-{kind}"] = _fmt_duration(state.reset_s)
        return headers
