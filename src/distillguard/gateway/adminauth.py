"""The admin credential, checked in one place for every admin route (accounts and keys,
policy, the ledger): ``Authorization: Bearer <admin.token>``, compared in constant time.
The token is at least 16 characters (:class:`~distillguard.config.AdminSettings`).

Guessing is slowed down per client address: the admin app keeps a
:class:`FailedAuthThrottle` in ``app.state.failed_auth`` (see
:meth:`~distillguard.gateway.admin.AdminAPI.app`), and an address that failed
``admin.failed_auth_per_minute`` times in the last 60 s is refused with a 429 until the
oldest failure leaves the window, even when it then presents the right token (otherwise a
guesser could tell a hit from the status). The dashboard's log-in form keeps a throttle of
its own with the same class. Where the rate-limit counters are shared (``counters.backend:
redis``), failures are also counted there, so a guesser spreading tries over N replicas
gets the rate of one; with Redis away each process still counts its own.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import time
from collections import OrderedDict, deque

from starlette.requests import Request

from distillguard.errors import AuthenticationFailed, PermissionDenied, RateLimited
from distillguard.gateway.clientip import ClientIPResolver, forwarded_for
from distillguard.geoip import canonical_address
from distillguard.ratelimit import CounterRequest, CounterStore, MemoryCounterStore

log = logging.getLogger("distillguard.gateway")

WINDOW_S = 60.0
MAX_ADDRESSES = 10_000


def client_key(host: str | None) -> str:
    """Who a failure is counted against: the address (an IPv4-mapped one as IPv4,
    :func:`~distillguard.geoip.canonical_address`), or its /64 for IPv6 (one host
    commonly holds a whole /64, so counting single IPv6 addresses is no throttle)."""
    if not host:
        return "?"
    addr = canonical_address(host)
    if addr is None:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def token_matches(presented: str, token: str | None) -> bool:
    """Whether ``presented`` is the admin token (constant-time comparison)."""
    if not token or not presented:
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


class FailedAuthThrottle:
    """At most ``per_minute`` failed authentications per client in any 60 s.

    Counted in this process, exactly, and, given a ``shared`` counter store (Redis: every
    replica's), there too under ``<name>:<client>``: a client is refused when either
    count is full. A shared store that does not answer is logged (once per outage) and
    the local count alone decides. Memory is bounded: past :data:`MAX_ADDRESSES` clients
    the one that failed longest ago is forgotten (not everyone at once, which a spray of
    addresses could use to reset a guesser's count)."""

    def __init__(self, per_minute: int, shared: CounterStore | None = None,
                 name: str = "failed-auth") -> None:
        self.per_minute = per_minute
        # an in-process store would only count the same failures twice
        self.shared = None if isinstance(shared, MemoryCounterStore) else shared
        self.name = name
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._shared_failing = False

    def _window(self, who: str, now: float) -> deque[float]:
        window = self._failures.get(who)
        if window is None:
            return deque()
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        if not window:
            del self._failures[who]
        return window

    def _wait(self, window: deque[float], now: float) -> int:
        """Seconds until a full window's oldest counted failure leaves it."""
        return max(1, int(window[-self.per_minute] + WINDOW_S - now + 0.999))

    def _counter(self, who: str, cost: int) -> CounterRequest:
        return CounterRequest(f"{self.name}:{who}", self.per_minute, int(WINDOW_S), cost)

    def _shared_answered(self, error: Exception | None) -> None:
        if error is not None and not self._shared_failing:
            log.warning("%s: the shared counters cannot be reached (%s); failed "
                        "authentications are counted in this process only until they "
                        "can", self.name, type(error).__name__)
        elif error is None and self._shared_failing:
            log.info("%s: the shared counters answer again", self.name)
        self._shared_failing = error is not None

    async def retry_after_s(self, who: str) -> int:
        """Seconds until ``who`` may try again; 0 when it is not blocked."""
        now = time.monotonic()
        window = self._window(who, now)
        if len(window) >= self.per_minute:
            return self._wait(window, now)
        if self.shared is None:
            return 0
        try:
            result = await self.shared.acquire([self._counter(who, 0)], time.time())
        except Exception as exc:  # Redis away: the local count decides
            self._shared_answered(exc)
            return 0
        self._shared_answered(None)
        return 0 if result.admitted else max(1, math.ceil(result.states[0].reset_s))

    async def blocked(self, who: str) -> bool:
        return await self.retry_after_s(who) > 0

    async def failed(self, who: str) -> int:
        """Count a failed authentication of ``who``; returns the seconds it must wait
        (0: the failure is within its allowance and is answered as a failure). Counted
        here before anything is awaited, and in the shared store by one atomic
        acquire: guesses sent at once are counted one by one, where a check awaited
        before counting let every guess of a burst through it."""
        now = time.monotonic()
        window = self._window(who, now)
        if len(window) >= self.per_minute:     # refused already: not counted again
            return self._wait(window, now)
        window.append(now)
        self._failures[who] = window
        self._failures.move_to_end(who)
        while len(self._failures) > MAX_ADDRESSES:
            self._failures.popitem(last=False)
        if self.shared is None:
            return 0
        try:
            result = await self.shared.acquire([self._counter(who, 1)], time.time())
        except Exception as exc:
            self._shared_answered(exc)
            return 0
        self._shared_answered(None)
        return 0 if result.admitted else max(1, math.ceil(result.states[0].reset_s))

    async def refusal(self, who: str, *, succeeded: bool) -> int:
        """After a credential was checked: the seconds ``who`` must wait when it is
        refused, whether the credential was right or not (a guesser must not tell a hit
        from the status), else 0. A wrong credential is counted (:meth:`failed`)."""
        if succeeded:
            return await self.retry_after_s(who)
        return await self.failed(who)

    def succeeded(self, who: str) -> None:
        """Forget ``who``'s failures in this process (the shared count runs out by
        itself: another replica may be counting the same guesser)."""
        self._failures.pop(who, None)


def throttle_of(request: Request) -> tuple[FailedAuthThrottle | None, str]:
    """The admin app's count of failed authentications (None outside it), and who this
    request's failures count against (read through ``server.trusted_proxies`` where the
    app holds a resolver as ``client_ip``). The TAXII server's partner credentials, served
    on the same port, count against the same throttle."""
    throttle = getattr(request.app.state, "failed_auth", None)
    return throttle, failing_client(request, getattr(request.app.state, "client_ip", None))


def failing_client(request: Request, resolver: ClientIPResolver | None) -> str:
    """Who a request's failed credentials count against (:func:`client_key`): behind a
    trusted proxy of ``resolver``, the client's address as the proxy forwards it. Counted
    against the proxy, ten wrong tokens a minute from anyone locked every operator out."""
    peer = request.client.host if request.client else None
    if resolver is not None:
        peer = resolver.resolve(peer, forwarded_for(request.headers.getlist("x-forwarded-for")))
    return client_key(peer)


async def check_admin(request: Request, token: str | None) -> None:
    """Return if ``request`` carries the admin token; otherwise PermissionDenied (no
    token is configured: the admin API is off), RateLimited (this client failed too
    often of late) or AuthenticationFailed."""
    if not token:
        raise PermissionDenied("The admin API is disabled: no admin token is configured.",
                               code="admin_disabled")
    throttle, who = throttle_of(request)
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    matches = scheme.lower() == "bearer" and token_matches(value, token)
    if throttle is not None and (wait := await throttle.refusal(who, succeeded=matches)):
        raise RateLimited(f"Too many failed admin authentications from this address; try "
                          f"again in {wait} s.", code="too_many_failed_authentications",
                          headers={"retry-after": str(wait)})
    if not matches:
        log.warning("admin API: failed authentication from %s", who)
        raise AuthenticationFailed("Invalid admin credential.", code="invalid_admin_token")
