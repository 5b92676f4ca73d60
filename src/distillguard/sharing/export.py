"""Campaigns as STIX 2.1 bundles, built with the OASIS ``stix2`` library.

One bundle per export holds, per campaign: the ``campaign``; ``indicator`` objects for
client networks, AS names, user agents, prompt-template fingerprints and payment
fingerprints (salted hashes); the ``infrastructure`` (its proxy network) and
``observed-data`` with counts and time ranges; ``relationship`` objects tying them
together and a ``sighting`` of the campaign by us. Our ``identity`` and a TLP marking
come once. What each field carries is specified in ``docs/sharing.md``.

Identifiers are derived (UUIDv5) from our organisation, the partner, the campaign and
the value, so exporting again to the same partner yields new *versions* of the same
objects, never duplicates; ``created`` stays fixed and ``modified`` is the export time.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import stix2

from distillguard.sharing.evidence import CampaignEvidence, ValueStats
from distillguard.sharing.pseudonym import Pseudonymizer, salted_hash
from distillguard.sharing.settings import SharingSettings

NAMESPACE = uuid.UUID("6d1c3f4e-2b7a-5c39-9f0e-64697374696c")
MAX_SIGHTING_COUNT = 999_999_999
TLP = {"clear": stix2.TLP_WHITE, "white": stix2.TLP_WHITE, "green": stix2.TLP_GREEN,
       "amber": stix2.TLP_AMBER, "red": stix2.TLP_RED}
UA_PATH = "network-traffic:extensions.'http-request-ext'.request_header.'User-Agent'"
KIND_LABEL = {"ip": "client network", "asn": "autonomous system", "user_agent": "user agent",
              "template": "prompt template", "payment": "payment fingerprint"}


def _indicator_description(kind: str, stats: ValueStats) -> str:
    """What a partner's analyst reads first: how much of the campaign, and how little
    else, used the value (the figures of the ``x_distillguard_*`` counts)."""
    label = KIND_LABEL[kind]
    article = "An" if label[0] in "aeiou" else "A"
    return (f"{article} {label} seen in {stats.campaign:,} exchanges of a model "
            f"distillation campaign, from {len(stats.accounts):,} of its accounts; "
            f"{stats.specificity:.0%} of all exchanges seen with it were the campaign's.")


def quote(value: str) -> str:
    """A STIX pattern string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pattern_for(kind: str, value: str) -> str:
    if kind == "ip":
        version = ipaddress.ip_network(value, strict=False).version
        return f"[ipv{version}-addr:value ISSUBSET {quote(value)}]"
    if kind == "asn":
        return f"[autonomous-system:name = {quote(value)}]"
    if kind == "user_agent":
        return f"[{UA_PATH} = {quote(value)}]"
    if kind == "template":
        return f"[x-distillguard-prompt:template_fingerprint = {quote(value)}]"
    if kind == "payment":
        return f"[user-account:x_payment_fingerprint_sha256 = {quote(value)}]"
    raise ValueError(f"unknown indicator kind {kind!r}")


@dataclass
class ExportSummary:
    bundle_id: str
    partner: str
    campaigns: list[str] = field(default_factory=list)
    indicators: dict[str, int] = field(default_factory=dict)
    objects: int = 0
    pseudonymized: bool = True


class BundleBuilder:
    def __init__(self, options: SharingSettings, partner: str, *,
                 now: datetime | None = None, salt: str | None = None) -> None:
        self.options = options
        self.partner = partner
        self.pseudonyms = Pseudonymizer.for_partner(options, partner)
        self.now = now or datetime.now(UTC)
        self.salt = salt or os.urandom(16).hex()
        self.marking = TLP[options.tlp]
        self.identity = stix2.Identity(
            id=self._id("identity", "self"), name=options.organisation,
            identity_class="organization", created=datetime(2026, 1, 1, tzinfo=UTC),
            modified=datetime(2026, 1, 1, tzinfo=UTC), object_marking_refs=[self.marking])

    def _id(self, stix_type: str, *parts: str) -> str:
        key = "\x1f".join((self.options.organisation, self.partner, stix_type, *parts))
        return f"{stix_type}--{uuid.uuid5(NAMESPACE, key)}"

    def _common(self, created: datetime) -> dict[str, Any]:
        return {"created": min(created, self.now), "modified": self.now,
                "created_by_ref": self.identity.id, "object_marking_refs": [self.marking]}

    def build(self, evidence: list[CampaignEvidence]) -> tuple[stix2.Bundle, ExportSummary]:
        objects: list[Any] = [self.identity]
        bundle_id = f"bundle--{uuid.uuid4()}"
        summary = ExportSummary(bundle_id=bundle_id, partner=self.partner,
                                pseudonymized=self.pseudonyms.active)
        for ev in evidence:
            objects.extend(self._campaign(ev, summary))
            summary.campaigns.append(ev.campaign_id)
        bundle = stix2.Bundle(objects=objects, id=bundle_id, allow_custom=True)
        summary.objects = len(objects)
        return bundle, summary

    def _campaign(self, ev: CampaignEvidence, summary: ExportSummary) -> list[Any]:
        v = ev.verdict
        cid = v.campaign_id
        first = ev.first_seen or v.detected_at or self.now
        last = max(ev.last_seen or first, first)
        members = list(v.accounts)
        campaign = stix2.Campaign(
            id=self._id("campaign", cid),
            name=f"Distillation campaign {cid}",
            description=(f"{len(members)} accounts harvesting model outputs "
                         f"({ev.exchanges} exchanges seen)."),
            objective="Harvest model outputs to train a copy of the model (distillation).",
            first_seen=first, last_seen=last, **self._common(v.detected_at or first),
            custom_properties={
                "x_distillguard_campaign_id": cid,
                "x_distillguard_risk": round(v.risk, 4),
                "x_distillguard_account_count": len(members),
                "x_distillguard_evidence": [
                    self.pseudonyms.text(e, members, ev.personal,
                                         keep_addresses=self.options.share_exact_ips)
                    for e in v.evidence][:50],
            })
        infra = stix2.Infrastructure(
            id=self._id("infrastructure", cid),
            name=f"Access network of distillation campaign {cid}",
            infrastructure_types=["anonymization"], first_seen=first, last_seen=last,
            **self._common(first))
        observed = self._observed(ev, first, last, members)
        out: list[Any] = [campaign, infra]
        rels: list[Any] = [self._rel("uses", campaign.id, infra.id, first)]
        if observed is not None:
            out.extend(observed[1])
            out.append(observed[0])
            rels.append(self._rel("consists-of", infra.id, observed[0].id, first))
        for kind in ("ip", "asn", "user_agent", "template", "payment"):
            chosen = ev.selected(kind, min_specificity=self.options.min_specificity,
                                 min_accounts=self.options.min_accounts)
            for value, stats in chosen[:100]:
                ind = self._indicator(cid, kind, value, stats, first)
                out.append(ind)
                rels.append(self._rel("indicates", ind.id, campaign.id, first))
                if kind in ("ip", "asn"):
                    rels.append(self._rel("indicates", ind.id, infra.id, first))
                summary.indicators[kind] = summary.indicators.get(kind, 0) + 1
        sighting = stix2.Sighting(
            id=self._id("sighting", cid), sighting_of_ref=campaign.id,
            first_seen=first, last_seen=last + timedelta(milliseconds=1),
            count=min(ev.exchanges, MAX_SIGHTING_COUNT),
            where_sighted_refs=[self.identity.id],
            observed_data_refs=[observed[0].id] if observed is not None else None,
            **self._common(first))
        return [*out, *rels, sighting]

    def _rel(self, kind: str, source: str, target: str, created: datetime) -> Any:
        return stix2.Relationship(id=self._id("relationship", kind, source, target),
                                  relationship_type=kind, source_ref=source,
                                  target_ref=target, **self._common(created))

    def _indicator(self, cid: str, kind: str, value: str, stats: ValueStats,
                   first: datetime) -> Any:
        custom: dict[str, Any] = {
            "x_distillguard_kind": kind,
            "x_distillguard_campaign_exchanges": stats.campaign,
            "x_distillguard_total_exchanges": stats.total,
            "x_distillguard_accounts": len(stats.accounts),
        }
        shown = value
        if kind == "payment":
            shown = salted_hash(self.salt, value)
            custom["x_distillguard_salt"] = self.salt
            custom["x_distillguard_hash"] = "sha256(salt || 0x00 || fingerprint)"
        return stix2.Indicator(
            id=self._id("indicator", cid, kind, shown if kind != "payment" else value),
            name=f"{KIND_LABEL[kind]} of distillation campaign {cid}",
            description=_indicator_description(kind, stats),
            indicator_types=["malicious-activity"],
            pattern=pattern_for(kind, shown), pattern_type="stix",
            valid_from=stats.first or first,
            valid_until=self.now + timedelta(days=self.options.indicator_ttl_days),
            confidence=max(1, min(100, round(stats.specificity * 100))),
            **self._common(stats.first or first), custom_properties=custom)

    def _observed(self, ev: CampaignEvidence, first: datetime, last: datetime,
                  members: list[str]) -> tuple[Any, list[Any]] | None:
        scos: list[Any] = []
        kind = "address" if self.options.share_exact_ips else "ip"
        networks = sorted(ev.features[kind].items(), key=lambda kv: -kv[1].campaign)[:200]
        for value, _stats in networks:
            if ":" in value:
                scos.append(stix2.IPv6Address(value=value))
            else:
                scos.append(stix2.IPv4Address(value=value))
        for account_id in sorted(set(members))[:1000]:
            scos.append(stix2.UserAccount(user_id=self.pseudonyms.account(account_id),
                                          account_type="distillguard-api"))
        if not scos or ev.exchanges == 0:
            return None
        observed = stix2.ObservedData(
            id=self._id("observed-data", ev.campaign_id),
            first_observed=first, last_observed=last,
            number_observed=max(1, min(ev.exchanges, MAX_SIGHTING_COUNT)),
            object_refs=[s.id for s in scos], **self._common(first),
            custom_properties={
                "x_distillguard_exchanges_by_network": {
                    v: s.campaign for v, s in networks},
                "x_distillguard_accounts_seen": len(ev.accounts_seen)})
        return observed, scos
