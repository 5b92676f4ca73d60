"""Partner indicators as policy inputs: the ``sharing`` request check and its stage.

:class:`IndicatorMatcher` keeps the active (unexpired) indicators in memory, reloaded
from the state store every ``sharing.refresh_s`` seconds in the background, so the
request check answers from memory: client networks (prefix tables per length), AS names
(:mod:`distillguard.geoip`), user agents (exact or RE2 regular expression), prompt-template
fingerprints, and accounts whose payment fingerprint hashes to a shared salted hash.

:class:`SharingCheck` annotates a matching exchange (``exchange.annotations["sharing"]``)
and, when ``sharing.action`` (or ``sharing.actions[kind]``) is ``block``, refuses it with
403 ``shared_indicator`` and ``retry=False``. :class:`MatchStage` records the match,
raises the account's risk once per indicator and opens a review item through
``distillguard.policy.review.open_item`` when the policy component provides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.exchange import Exchange
from distillguard.geoip import GeoIP, default_geoip
from distillguard.pipeline import Allowed, Decision, Denied
from distillguard.sharing.indicators import network, user_agent_regex
from distillguard.sharing.pseudonym import salted_hash
from distillguard.sharing.settings import Action, SharingSettings
from distillguard.sharing.store import SharingStore
from distillguard.sharing.template import template_fingerprint

log = logging.getLogger("distillguard.sharing")
UA_CACHE_SIZE = 4096


def _address(ip: str) -> tuple[int, int] | None:
    """(IP version, address as an integer), or None; strict, and much cheaper than
    :func:`ipaddress.ip_address` on the request path."""
    try:
        if ":" in ip:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Hit:
    partner: str
    indicator_id: str
    kind: str
    value: str

    def to_json(self) -> dict[str, str]:
        return {"partner": self.partner, "indicator": self.indicator_id, "kind": self.kind,
                "value": self.value}


@dataclass
class Snapshot:
    networks: dict[tuple[int, int], dict[int, list[Hit]]] = field(default_factory=dict)
    asn: dict[str, list[Hit]] = field(default_factory=dict)
    ua_exact: dict[str, list[Hit]] = field(default_factory=dict)
    ua_regex: list[tuple[Any, Hit]] = field(default_factory=list)   # RE2 regexes
    ua_any: Any | None = None   # all regexes in one, for the common miss
    ua_cache: dict[str, list[Hit]] = field(default_factory=dict)
    template: dict[str, list[Hit]] = field(default_factory=dict)
    accounts: dict[str, list[Hit]] = field(default_factory=dict)
    risk: dict[str, float] = field(default_factory=dict)
    size: int = 0

    def user_agent(self, ua: str) -> list[Hit]:
        found = self.ua_cache.get(ua)
        if found is None:
            found = list(self.ua_exact.get(ua, []))
            # ua_any is None when the regexes did not compile as one (RE2 bounds a
            # program's memory): each is tried then, rather than none
            if self.ua_regex and (self.ua_any is None or self.ua_any.search(ua)):
                found += [hit for rx, hit in self.ua_regex if rx.search(ua)]
            if len(self.ua_cache) >= UA_CACHE_SIZE:
                self.ua_cache.clear()
            self.ua_cache[ua] = found
        return found

    def asn_hits(self, ip: str | None, geoip: Callable[[], GeoIP]) -> list[Hit]:
        if not ip or not self.asn:
            return []
        name = geoip().lookup(ip).asn_name
        return list(self.asn.get(name.casefold(), [])) if name else []

    def match(self, exchange: Exchange, geoip: Callable[[], GeoIP], *,
              with_asn: bool = True) -> list[Hit]:
        hits: list[Hit] = []
        if self.size == 0:
            return hits
        ip = exchange.client_ip
        if ip and self.networks:
            parsed = _address(ip)
            if parsed is not None:
                version, number = parsed
                bits = 32 if version == 4 else 128
                for (net_version, length), table in self.networks.items():
                    if net_version == version:
                        hits += table.get(number >> (bits - length) << (bits - length), [])
        if with_asn:
            hits += self.asn_hits(ip, geoip)
        ua = exchange.user_agent
        if ua and (self.ua_exact or self.ua_regex):
            hits += self.user_agent(ua)
        if self.template and exchange.request is not None:
            fp = template_fingerprint(exchange.request)
            if fp:
                hits += self.template.get(fp, [])
        if exchange.account_id:
            hits += self.accounts.get(exchange.account_id, [])
        return hits


class IndicatorMatcher:
    def __init__(self, options: SharingSettings, engine: Callable[[], AsyncEngine],
                 geoip: Callable[[], GeoIP] = default_geoip) -> None:
        self.options = options
        self._engine = engine
        self.geoip = geoip
        self.snapshot = Snapshot()
        self._hashes: dict[tuple[str, str], str] = {}
        self.loaded_at: datetime | None = None

    @property
    def store(self) -> SharingStore:
        from datetime import timedelta

        return SharingStore(self._engine(),
                            ttl=timedelta(days=self.options.indicator_ttl_days))

    async def refresh(self) -> list[tuple[str, Hit]]:
        """Reload; returns (account, hit) pairs of payment matches, for the stage."""
        store = self.store
        rows = await store.active_indicators()
        snap = Snapshot(size=len(rows))
        by_salt: dict[str, dict[str, list[Hit]]] = {}
        for row in rows:
            hit = Hit(row["partner"], row["indicator_id"], row["kind"], row["value"])
            kind, value = row["kind"], row["value"]
            # rows stored before a guard of indicators.py existed are held to it too
            if kind == "ip":
                net = network(value)
                if net is None:
                    continue
                table = snap.networks.setdefault((net.version, net.prefixlen), {})
                table.setdefault(int(net.network_address), []).append(hit)
            elif kind == "asn":
                snap.asn.setdefault(value, []).append(hit)
            elif kind == "user_agent" and row["op"] == "MATCHES":
                if (rx := user_agent_regex(value)) is not None:
                    snap.ua_regex.append((rx, hit))
            elif kind == "user_agent":
                snap.ua_exact.setdefault(value, []).append(hit)
            elif kind == "template":
                snap.template.setdefault(value, []).append(hit)
            elif kind == "payment" and row["salt"]:
                by_salt.setdefault(row["salt"], {}).setdefault(value, []).append(hit)
        payment_hits: list[tuple[str, Hit]] = []
        if by_salt:
            for account_id, fp in await self._payment_fingerprints():
                for salt, wanted in by_salt.items():
                    key = (salt, fp)
                    digest = self._hashes.get(key)
                    if digest is None:
                        digest = self._hashes[key] = salted_hash(salt, fp)
                    for hit in wanted.get(digest, []):
                        snap.accounts.setdefault(account_id, []).append(hit)
                        payment_hits.append((account_id, hit))
        if snap.ua_regex:
            snap.ua_any = user_agent_regex("|".join(f"(?:{rx.pattern})"
                                                    for rx, _ in snap.ua_regex))
        if snap.asn:
            await asyncio.to_thread(self.geoip)  # load the database off the loop
        snap.risk = await store.risk()
        self.snapshot = snap
        self.loaded_at = datetime.now(UTC)
        return payment_hits

    async def _payment_fingerprints(self) -> list[tuple[str, str]]:
        async with self._engine().connect() as conn:
            rows = await conn.execute(text(
                "SELECT account_id, payment_fingerprint FROM accounts"
                " WHERE payment_fingerprint IS NOT NULL"))
            return [(r[0], r[1]) for r in rows]

    @property
    def asn_inline(self) -> bool:
        """AS names are matched on the request path only when a match blocks: the
        look-up of an address not seen recently costs a few hundred microseconds."""
        return self.options.action_for("asn") is Action.BLOCK

    def match(self, exchange: Exchange) -> list[Hit]:
        return self.snapshot.match(exchange, self.geoip, with_asn=self.asn_inline)


class SharingCheck:
    """The ``sharing`` request check: flag or block traffic matching partner indicators."""

    name = "sharing"

    def __init__(self, matcher: IndicatorMatcher, lifecycle: Any = None) -> None:
        self.matcher = matcher
        self._lifecycle = lifecycle

    async def start(self) -> None:
        if self._lifecycle is not None:
            await self._lifecycle.start()

    async def close(self) -> None:
        if self._lifecycle is not None:
            await self._lifecycle.close()

    async def check(self, exchange: Exchange) -> Decision:
        hits = self.matcher.match(exchange)
        if not hits:
            return Allowed()
        options = self.matcher.options
        blocking = [h for h in hits if options.action_for(h.kind) is Action.BLOCK]
        exchange.annotations["sharing"] = {
            "matches": [h.to_json() for h in hits],
            "action": "block" if blocking else "flag",
            "account_risk": self.matcher.snapshot.risk.get(exchange.account_id or "", 0.0)}
        if blocking:
            return Denied("This request matches a threat indicator shared by a partner.",
                          code="shared_indicator", status=403, retry=False)
        return Allowed(notes=("sharing:flagged",))


def review_opener() -> Callable[..., Any] | None:
    """``distillguard.policy.review.open_item`` when the policy component is installed."""
    try:
        from distillguard.policy.review import open_item  # type: ignore[import-not-found]
    except ImportError:
        return None
    return open_item  # type: ignore[no-any-return]


class MatchStage:
    """Records matches, raises account risk once per indicator, opens review items."""

    name = "sharing-matches"

    def __init__(self, matcher: IndicatorMatcher) -> None:
        self.matcher = matcher
        self.reviews_opened = 0

    async def on_exchange(self, exchange: Exchange) -> None:
        snap = self.matcher.snapshot
        if snap.asn and not self.matcher.asn_inline and exchange.client_ip:
            late = await asyncio.to_thread(snap.asn_hits, exchange.client_ip,
                                           self.matcher.geoip)
            if late:
                found = exchange.annotations.setdefault(
                    "sharing", {"matches": [], "action": "flag",
                                "account_risk": snap.risk.get(exchange.account_id or "", 0.0)})
                found["matches"] += [h.to_json() for h in late]
        found = exchange.annotations.get("sharing")
        if not found or not exchange.account_id:
            return
        for m in found["matches"]:
            hit = Hit(m["partner"], m["indicator"], m["kind"], m["value"])
            await self.record(exchange.account_id, hit, exchange.ts,
                              blocked=found["action"] == "block")

    async def record(self, account_id: str, hit: Hit, when: datetime, *,
                     blocked: bool = False, hits: int = 1) -> None:
        store = self.matcher.store
        options = self.matcher.options
        first = await store.record_match(
            account_id=account_id, partner=hit.partner, indicator_id=hit.indicator_id,
            kind=hit.kind, value=hit.value, when=when, risk=options.match_risk, hits=hits)
        if not first:
            return
        opener = review_opener()
        if opener is None:
            return
        risk = (await store.risk()).get(account_id, options.match_risk)
        outcome = ("request blocked" if blocked else "request flagged") if hits else (
            "matched when the indicator was loaded")
        evidence = [f"matched a {hit.kind} indicator shared by partner {hit.partner}: "
                    f"{hit.value}", f"indicator {hit.indicator_id}", outcome]
        item = opener(store.engine, kind="account", subject=account_id, risk=risk,
                      evidence=evidence, source="sharing")
        if inspect.isawaitable(item):
            item = await item
        self.reviews_opened += 1
        await store.set_review_item(account_id, hit.partner, hit.indicator_id, str(item))


class Refresher:
    """Reloads the matcher in the background; payment matches go to the stage."""

    name = "sharing-refresh"

    def __init__(self, matcher: IndicatorMatcher, stage: MatchStage) -> None:
        self.matcher = matcher
        self.stage = stage
        self._task: asyncio.Task[None] | None = None
        self._known: set[tuple[str, Hit]] = set()

    async def once(self) -> None:
        for account_id, hit in await self.matcher.refresh():
            if (account_id, hit) not in self._known:
                await self.stage.record(account_id, hit, datetime.now(UTC), hits=0)
                self._known.add((account_id, hit))

    async def start(self) -> None:
        await self.once()
        self._task = asyncio.create_task(self._loop(), name="distillguard-sharing-refresh")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.matcher.options.refresh_s)
            try:
                await self.once()
            except Exception:
                log.exception("sharing: reloading indicators failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
