"""The compiled policy: an immutable value built once from a validated policy file.

The request check reads only this value and in-memory caches. Reloading builds a new
value off the request path and swaps one reference (:class:`PolicyHolder`), so requests in
flight finish under the policy they started with and none is dropped or half-judged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from distillguard.config import LimitSet
from distillguard.errors import ConfigError
from distillguard.geoip import GeoIP, MaxMindDatabase, default_geoip
from distillguard.policy.document import PolicyDocument, load_document, parse_duration
from distillguard.policy.jurisdiction import (
    CompiledRule,
    RequestFacts,
    RuleOutcome,
    compile_globs,
    evaluate,
)
from distillguard.policy.networks import NetworkFacts, NetworkSet, read_network_file
from distillguard.policy.screening import ScreeningList, load_lists

log = logging.getLogger("distillguard.policy")


@dataclass(frozen=True, slots=True)
class CompiledTier:
    name: str
    rank: int
    models: Any            # compiled pattern or None (every model)
    model_patterns: tuple[str, ...] | None
    reasoning: str | None
    limits: LimitSet | None


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    document: PolicyDocument
    source: str                         # file path or "defaults"
    ranks: dict[str, int]
    tiers: dict[str, CompiledTier]
    rules: tuple[CompiledRule, ...]
    networks: NetworkFacts
    screening: ScreeningList
    default_expiry_s: float | None
    _judge: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_judge", lru_cache(maxsize=65_536)(self._judge_uncached))

    @property
    def contact(self) -> str:
        return self.document.messages.contact

    @property
    def verification_url(self) -> str | None:
        return self.document.messages.verification_url

    def rank(self, tier: str | None) -> int:
        """A tier's rank in ``tier_order``; tiers not listed rank lowest."""
        return self.ranks.get(tier or "", 0)

    def tier(self, name: str | None) -> CompiledTier | None:
        """The gates of tier ``name``; a tier not in ``tier_order`` (one only
        ``limits.tiers`` names) has the lowest tier's, as it has its rank: it had none,
        every model and capability open to it."""
        if (name or "") not in self.ranks and self.document.tier_order:
            name = self.document.tier_order[0]
        return self.tiers.get(name or "")

    def judge(self, model: str, endpoint: str, tier: str, declared_country: str | None,
              ip: str | None) -> tuple[RuleOutcome, RequestFacts]:
        """The rules' outcome for these facts, memoised (LRU): a client sends the same
        model from the same address many times, and the rules depend on nothing else."""
        return self._judge(model, endpoint, tier, declared_country, ip)  # type: ignore[no-any-return]

    def _judge_uncached(self, model: str, endpoint: str, tier: str,
                        declared_country: str | None,
                        ip: str | None) -> tuple[RuleOutcome, RequestFacts]:
        facts = RequestFacts(model=model, endpoint=endpoint, tier=tier,
                             tier_rank=self.rank(tier), declared_country=declared_country,
                             network=self.networks.lookup(ip))
        return evaluate(self.rules, facts), facts

    def expiry_for(self, value: Any) -> float | None:
        """Seconds until an action expires: ``"default"`` uses actions.default_expiry."""
        if value == "default":
            return self.default_expiry_s
        return parse_duration(value)


def _geoip(doc: PolicyDocument, base: Path | None) -> Callable[[], GeoIP]:
    """Check the configured databases now; open them (or the shipped one) on first use."""
    n = doc.networks

    def resolve(path: str | None) -> str | None:
        if path is None:
            return None
        p = Path(path)
        if base is not None and not p.is_absolute():
            p = base / p
        if not p.exists():
            raise ConfigError(f"networks: MaxMind database {p} does not exist")
        return str(p)

    paths = {k: resolve(getattr(n, k)) for k in ("maxmind_country_db", "maxmind_asn_db",
                                                   "maxmind_anonymous_db")}
    if not any(paths.values()) and not n.hosting_cidrs:
        return default_geoip
    database: Any = None
    if any(paths.values()):
        try:
            database = MaxMindDatabase(paths["maxmind_country_db"],
                                       asn_path=paths["maxmind_asn_db"],
                                       anonymous_path=paths["maxmind_anonymous_db"])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"networks: cannot open a MaxMind database: {exc}") from None
    hosting = list(n.hosting_cidrs)

    def build() -> GeoIP:
        shipped = default_geoip().database
        if database is None:
            return GeoIP(shipped, hosting_networks=hosting)
        database.fallback = shipped
        return GeoIP(database, hosting_networks=hosting)

    return build


def compile_policy(doc: PolicyDocument, *, source: str = "defaults",
                   base: Path | None = None) -> CompiledPolicy:
    """Build the value the request check reads; raises ConfigError naming the option."""
    ranks = {name: i for i, name in enumerate(doc.tier_order)}
    tiers = {}
    for name, tp in doc.tiers.items():
        tiers[name] = CompiledTier(
            name=name, rank=ranks[name],
            models=compile_globs(tp.models) if tp.models is not None else None,
            model_patterns=tuple(tp.models) if tp.models is not None else None,
            reasoning=tp.reasoning, limits=tp.limits)
    rules = []
    for i, rule in enumerate(doc.rules):
        try:
            rules.append(CompiledRule.build(rule, ranks))
        except ValueError as exc:
            raise ConfigError(f"rules.{i} ({rule.name}): {exc}") from None
    anonymizers = list(doc.networks.anonymizer_cidrs)
    for path in doc.networks.anonymizer_files:
        p = Path(path)
        anonymizers += read_network_file(str(base / p if base and not p.is_absolute() else p))
    try:
        anon_set = NetworkSet(anonymizers)
        geoip = _geoip(doc, base)
    except ValueError as exc:
        raise ConfigError(f"networks: {exc}") from None
    screening = load_lists(doc.screening.lists, base)
    return CompiledPolicy(
        document=doc, source=source, ranks=ranks, tiers=tiers, rules=tuple(rules),
        networks=NetworkFacts(geoip, anon_set), screening=screening,
        default_expiry_s=parse_duration(doc.actions.default_expiry))


def load_policy(path: str | Path | None) -> CompiledPolicy:
    doc = load_document(path)
    if path is None:
        return compile_policy(doc)
    p = Path(path)
    return compile_policy(doc, source=str(p), base=p.resolve().parent)


class PolicyHolder:
    """The current compiled policy; :meth:`reload` swaps it atomically."""

    def __init__(self, path: str | Path | None, policy: CompiledPolicy | None = None) -> None:
        self.path = path
        self.current = policy if policy is not None else load_policy(path)
        self.generation = 1
        self._lock = threading.Lock()

    def reload(self) -> CompiledPolicy:
        """Re-read the file. On any error the running policy stays and ConfigError is
        raised (the caller reports it); on success the new value replaces it."""
        with self._lock:
            fresh = load_policy(self.path)
            fresh.networks.lookup("8.8.8.8")   # open the databases before the swap
            self.current = fresh
            self.generation += 1
            return fresh


_holders: dict[str, PolicyHolder] = {}
_holders_lock = threading.Lock()


def shared_holder(path: str | Path | None) -> PolicyHolder:
    """The process's one :class:`PolicyHolder` for a policy file, so the gateway's check,
    the admin API and the dashboard read the same value and see the same reloads."""
    key = str(Path(path).resolve()) if path is not None else ""
    with _holders_lock:
        holder = _holders.get(key)
        if holder is None:
            holder = _holders[key] = PolicyHolder(path)
        return holder

