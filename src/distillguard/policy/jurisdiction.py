"""Jurisdiction and export rules: conditions on the client's network and country, the
account's declared country and tier, and the model; effects deny, require a tier, or
degrade the answer. Rules are evaluated in file order; the first deny or unmet tier
requirement ends the evaluation, degrade effects accumulate.

Country conditions and private addresses: an address in a private or reserved range
(an internal client, a test) has no country, so ``country``/``country_not`` judge it by the
declared country alone; a public address the database cannot place counts as outside
every list (it matches ``*_not`` conditions), so allow-lists fail closed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from distillguard.policy.document import Condition, Rule
from distillguard.policy.networks import ClientNetwork, NetworkSet


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a rule can look at, gathered once per request from memory."""

    model: str
    endpoint: str
    tier: str
    tier_rank: int
    declared_country: str | None
    network: ClientNetwork

    @property
    def ip_country(self) -> str | None:
        return self.network.info.country

    @property
    def ip_private(self) -> bool:
        return self.network.info.private or not self.network.info.ip


def compile_globs(patterns: list[str]) -> re.Pattern[str]:
    """One regular expression for a list of shell-style patterns (``frontier-*``)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) or "(?!)")


def _in(value: str | None, allowed: frozenset[str]) -> bool:
    return value is not None and value in allowed


def _outside(value: str | None, allowed: frozenset[str]) -> bool:
    return value is None or value not in allowed


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    effect: str                       # deny | require_tier | degrade
    message: str | None
    require_tier: str | None
    require_rank: int
    degrade: dict[str, Any] | None
    model: re.Pattern[str] | None
    endpoint: frozenset[str] | None
    country: frozenset[str] | None
    country_not: frozenset[str] | None
    ip_country: frozenset[str] | None
    ip_country_not: frozenset[str] | None
    declared_country: frozenset[str] | None
    declared_country_not: frozenset[str] | None
    ip_country_unknown: bool | None
    hosting: bool | None
    anonymizer: bool | None
    networks: NetworkSet | None
    asn_name: tuple[str, ...] | None
    tier: frozenset[str] | None

    @classmethod
    def build(cls, rule: Rule, ranks: dict[str, int]) -> CompiledRule:
        w: Condition = rule.when

        def fs(values: list[str] | None) -> frozenset[str] | None:
            return None if values is None else frozenset(values)

        return cls(
            name=rule.name, effect=rule.effect(), message=rule.deny,
            require_tier=rule.require_tier,
            require_rank=ranks.get(rule.require_tier or "", 0),
            degrade=rule.degrade.model_dump() if rule.degrade else None,
            model=compile_globs(w.model) if w.model is not None else None,
            endpoint=fs(w.endpoint), country=fs(w.country), country_not=fs(w.country_not),
            ip_country=fs(w.ip_country), ip_country_not=fs(w.ip_country_not),
            declared_country=fs(w.declared_country),
            declared_country_not=fs(w.declared_country_not),
            ip_country_unknown=w.ip_country_unknown,
            hosting=w.hosting, anonymizer=w.anonymizer,
            networks=NetworkSet(w.networks) if w.networks is not None else None,
            asn_name=tuple(a.lower() for a in w.asn_name) if w.asn_name is not None else None,
            tier=fs(w.tier),
        )

    def matches(self, f: RequestFacts) -> bool:  # noqa: PLR0911 - one test per condition
        if self.model is not None and not self.model.fullmatch(f.model):
            return False
        if self.endpoint is not None and f.endpoint not in self.endpoint:
            return False
        if self.tier is not None and f.tier not in self.tier:
            return False
        if self.country is not None and not (_in(f.ip_country, self.country)
                                             or _in(f.declared_country, self.country)):
            return False
        if self.country_not is not None:
            outside_ip = not f.ip_private and _outside(f.ip_country, self.country_not)
            if not (outside_ip or _outside(f.declared_country, self.country_not)):
                return False
        if self.ip_country is not None and not _in(f.ip_country, self.ip_country):
            return False
        if self.ip_country_not is not None and (
                f.ip_private or not _outside(f.ip_country, self.ip_country_not)):
            return False
        if self.declared_country is not None and not _in(f.declared_country,
                                                         self.declared_country):
            return False
        if self.declared_country_not is not None and not _outside(
                f.declared_country, self.declared_country_not):
            return False
        if self.ip_country_unknown is not None and self.ip_country_unknown != (
                not f.ip_private and f.ip_country is None):
            return False
        if self.hosting is not None and f.network.info.hosting != self.hosting:
            return False
        if self.anonymizer is not None and f.network.anonymizer != self.anonymizer:
            return False
        if self.networks is not None and not f.network.within(self.networks):
            return False
        if self.asn_name is not None:
            name = (f.network.info.asn_name or "").lower()
            if not any(a in name for a in self.asn_name):
                return False
        return True


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """What the rules decided for one request."""

    denied_by: CompiledRule | None = None
    degrade: tuple[CompiledRule, ...] = ()


def evaluate(rules: tuple[CompiledRule, ...], facts: RequestFacts) -> RuleOutcome:
    degrade: list[CompiledRule] = []
    for rule in rules:
        if not rule.matches(facts):
            continue
        if rule.effect == "deny":
            return RuleOutcome(rule, tuple(degrade))
        if rule.effect == "require_tier":
            if facts.tier_rank < rule.require_rank:
                return RuleOutcome(rule, tuple(degrade))
            continue
        degrade.append(rule)
    return RuleOutcome(None, tuple(degrade))


def deny_message(rule: CompiledRule, facts: RequestFacts, contact: str,
                 verification_url: str | None) -> str:
    """The client-facing message: what was refused, why, and what the user can do."""
    if rule.effect == "require_tier":
        how = (f"Verify your account at {verification_url} to unlock it"
               if verification_url else f"Contact {contact} to upgrade your account")
        return (f"Access to the model '{facts.model}' from this network or location requires "
                f"a {rule.require_tier} account; this account is {facts.tier}. {how}.")
    text = rule.message or "This request is not permitted by the access policy."
    with contextlib.suppress(KeyError, IndexError, ValueError):
        text = text.format(model=facts.model, country=facts.ip_country or facts.declared_country
                           or "your location", tier=facts.tier, contact=contact)
    return (f"{text} If you believe this is a mistake, contact {contact} "
            f"(policy rule: {rule.name}).")
