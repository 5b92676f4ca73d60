"""What a campaign looked like from here: the raw material of an export.

:class:`EvidenceCollector` takes the campaigns (verdicts format), the accounts (accounts
format) and the exchanges (trace format, or the dashboard's exchange index of a running
gateway) in one pass and counts, for every campaign, the values that could identify it
elsewhere: client networks (/24 or /48), AS names, user agents, prompt-template
fingerprints and payment fingerprints, each with how often it was seen inside the
campaign and in all traffic, so the export can keep only values specific to the campaign.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from distillguard.geoip import GeoIP, client_prefix
from distillguard.sharing.template import template_fingerprint
from distillguard.store.models import Account
from distillguard.verdicts import CampaignVerdict

FEATURES = ("ip", "asn", "user_agent", "template", "address")


@dataclass(slots=True)
class ValueStats:
    """One value (a network, a user agent...): exchanges inside the campaign and overall."""

    campaign: int = 0
    total: int = 0
    accounts: set[str] = field(default_factory=set)
    first: datetime | None = None
    last: datetime | None = None

    @property
    def specificity(self) -> float:
        return self.campaign / self.total if self.total else 0.0

    def see(self, ts: datetime, account_id: str | None, inside: bool) -> None:
        self.total += 1
        if not inside:
            return
        self.campaign += 1
        if account_id:
            self.accounts.add(account_id)
        if self.first is None or ts < self.first:
            self.first = ts
        if self.last is None or ts > self.last:
            self.last = ts


@dataclass(slots=True)
class CampaignEvidence:
    verdict: CampaignVerdict
    exchanges: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    accounts_seen: set[str] = field(default_factory=set)
    features: dict[str, dict[str, ValueStats]] = field(
        default_factory=lambda: {k: {} for k in FEATURES})
    payment: dict[str, ValueStats] = field(default_factory=dict)
    personal: set[str] = field(default_factory=set)  # members' orgs, domains, cards

    @property
    def campaign_id(self) -> str:
        return self.verdict.campaign_id

    def selected(self, kind: str, *, min_specificity: float, min_accounts: int
                 ) -> list[tuple[str, ValueStats]]:
        """Values of ``kind`` shared by enough campaign accounts and rare outside it,
        most used first."""
        table = self.payment if kind == "payment" else self.features[kind]
        keep = [(v, s) for v, s in table.items()
                if s.campaign and len(s.accounts) >= min_accounts
                and s.specificity >= min_specificity]
        return sorted(keep, key=lambda item: (-item[1].campaign, item[0]))


class EvidenceCollector:
    def __init__(self, campaigns: Iterable[CampaignVerdict], accounts: Iterable[Account],
                 geoip: GeoIP | None = None) -> None:
        self.evidence = {c.campaign_id: CampaignEvidence(c) for c in campaigns}
        self.member: dict[str, CampaignEvidence] = {}
        for ev in self.evidence.values():
            for account_id in ev.verdict.accounts:
                self.member.setdefault(account_id, ev)
        self.geoip = geoip
        self._global: dict[str, dict[str, ValueStats]] = {k: {} for k in FEATURES}
        self._add_payment(list(accounts))

    def _add_payment(self, accounts: list[Account]) -> None:
        # Payment fingerprints count accounts, not exchanges.
        by_fp: dict[str, list[Account]] = {}
        for account in accounts:
            if account.payment_fingerprint:
                by_fp.setdefault(account.payment_fingerprint, []).append(account)
        for account in accounts:
            ev = self.member.get(account.account_id)
            if ev is not None:
                ev.personal.update(v for v in (account.org, account.email_domain,
                                               account.payment_fingerprint) if v)
        for fp, holders in by_fp.items():
            for ev in self.evidence.values():
                inside = [a for a in holders if self.member.get(a.account_id) is ev]
                if not inside:
                    continue
                stats = ValueStats(total=len(holders))
                for a in inside:
                    stats.see(a.created_at, a.account_id, True)
                stats.total = len(holders)
                ev.payment[fp] = stats

    def add(self, *, ts: datetime, account_id: str | None, client_ip: str | None,
            user_agent: str | None = None, request: Any = None) -> None:
        ev = self.member.get(account_id) if account_id else None
        values: dict[str, str | None] = {
            "ip": client_prefix(client_ip) if client_ip else None,
            "address": client_ip,
            "user_agent": user_agent or None,
            "template": template_fingerprint(request) if request is not None else None,
            "asn": None,
        }
        if client_ip and self.geoip is not None:
            info = self.geoip.lookup(client_ip)
            values["asn"] = None if info.private else info.asn_name
        for kind, value in values.items():
            if value is None:
                continue
            stats = self._global[kind].get(value)
            if stats is None:
                stats = self._global[kind][value] = ValueStats()
            stats.total += 1
            if ev is not None:
                own = ev.features[kind].get(value)
                if own is None:
                    own = ev.features[kind][value] = ValueStats()
                own.see(ts, account_id, True)
        if ev is not None:
            ev.exchanges += 1
            ev.accounts_seen.add(account_id or "")
            if ev.first_seen is None or ts < ev.first_seen:
                ev.first_seen = ts
            if ev.last_seen is None or ts > ev.last_seen:
                ev.last_seen = ts

    def result(self) -> list[CampaignEvidence]:
        for ev in self.evidence.values():
            for kind, table in ev.features.items():
                for value, stats in table.items():
                    stats.total = self._global[kind][value].total
        return list(self.evidence.values())
