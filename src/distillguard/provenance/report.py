"""From matches to a provenance report: which accounts harvested what share of the set.

Each suspect item is credited to the account(s) of its best matching exchanges (those
within ``tie`` of the best containment, then the closest exact wording); an item found in
several accounts' exchanges is split between them. An account is *named* only when at
least ``min_items`` items are explained by that account alone: one coincidental match
never names an account, nor does receiving the same answers as a harvesting account (an
evaluation runner asking the same benchmark questions). Every other account with
matches is listed under ``incidental`` with its (shared) share. When a fingerprint key is given,
each named account also gets the fingerprint score of the items it matched as well as any
other account (before the wording tie-break, which would select items for agreeing with
that account's marks): an independent check that the text was delivered to that account.

Report format (version 1): see docs/provenance.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distillguard.countermeasures.fingerprint import Fingerprinter
from distillguard.provenance.lookup import Match, ProvenanceIndex

EVIDENCE_PER_ACCOUNT = 20
# The suspect file's skipped lines named in the report (all are counted).
SKIPPED_EXAMPLES = 10


@dataclass(frozen=True, slots=True)
class AttributionRule:
    min_items: int = 3
    tie: float = 0.05


def near_matches(matches: Sequence[Match], tie: float) -> dict[int, list[Match]]:
    """Each item's matches within ``tie`` of its best containment. Containment is taken
    on folded text, so which accounts are here does not depend on fingerprint wording."""
    by_item: dict[int, list[Match]] = defaultdict(list)
    for m in matches:
        by_item[m.item].append(m)
    out = {}
    for item, ms in by_item.items():
        top = max(m.containment for m in ms)
        out[item] = [m for m in ms if m.containment >= top - tie]
    return out


def best_matches(matches: Sequence[Match], tie: float) -> dict[int, list[Match]]:
    out = {}
    for item, near in near_matches(matches, tie).items():
        # Copies of one answer delivered to several accounts differ in their fingerprint
        # variants: the copy whose exact wording the item carries wins.
        top_exact = max(m.exact for m in near)
        out[item] = sorted((m for m in near if m.exact >= top_exact - 0.01),
                           key=lambda m: (-m.containment, -m.jaccard, m.ts))
    return out


def build_report(index: ProvenanceIndex, matches: Sequence[Match], *,
                 rule: AttributionRule | None = None, source: dict[str, Any] | None = None,
                 fingerprinter: Fingerprinter | None = None,
                 skipped_lines: Sequence[int] = ()) -> dict[str, Any]:
    """The report (docs/provenance.md). ``skipped_lines``: the suspect file's lines that
    had no response to look for (counted, the first few named)."""
    rule = rule or AttributionRule()
    best = best_matches(matches, rule.tie)
    # The fingerprint is scored on every item an account matched as well as any other,
    # before the wording tie-break: the items the tie-break credits were picked because
    # their wording agrees with that account's copy, which is what the score measures.
    scored_items: dict[str, list[int]] = defaultdict(list)
    for item, ms in near_matches(matches, rule.tie).items():
        for account in sorted({m.account_id or "(unknown)" for m in ms}):
            scored_items[account].append(item)
    credit: dict[str, float] = defaultdict(float)
    evidence: dict[str, list[Match]] = defaultdict(list)
    unique: dict[str, int] = defaultdict(int)
    for ms in best.values():
        accounts = sorted({m.account_id or "(unknown)" for m in ms})
        for account in accounts:
            credit[account] += 1 / len(accounts)
        if len(accounts) == 1:
            unique[accounts[0]] += 1
        for m in ms:
            evidence[m.account_id or "(unknown)"].append(m)
    n = len(index.items)
    named: list[dict[str, Any]] = []
    incidental: list[dict[str, Any]] = []
    for account, value in sorted(credit.items(), key=lambda kv: -kv[1]):
        row: dict[str, Any] = {
            "account_id": account, "items": round(value, 3),
            "share": round(value / n, 4) if n else 0.0,
            "unique_items": unique[account],
            "exchanges": len({m.exchange_id for m in evidence[account]}),
            "first_ts": min(m.ts for m in evidence[account]),
            "last_ts": max(m.ts for m in evidence[account]),
        }
        if unique[account] < rule.min_items:
            incidental.append(row)
            continue
        row["evidence"] = [_match_dict(index, m) for m in evidence[account][:EVIDENCE_PER_ACCOUNT]]
        if fingerprinter is not None:
            texts = [index.items[i].response for i in scored_items[account]]
            row["fingerprint"] = {**fingerprinter.score_account(texts, account).to_dict(),
                                  "items": len(texts)}
        named.append(row)
    stats = index.stats
    return {
        "version": 1,
        "suspect": {"items": n, "matched": len(best), "unmatched": n - len(best),
                    "too_short": len(index.too_short),
                    "matched_share": round(len(best) / n, 4) if n else 0.0,
                    "skipped_lines": len(skipped_lines),
                    "skipped_examples": list(skipped_lines[:SKIPPED_EXAMPLES])},
        "source": {**(source or {}), "exchanges_scanned": stats.exchanges,
                   "exchanges_with_text": stats.with_text,
                   "lsh_candidates": stats.candidates, "verified_matches": stats.matches},
        "rule": {"min_items": rule.min_items, "tie": rule.tie,
                 "min_containment": index.min_containment},
        "accounts": named,
        "incidental": incidental,
        "items": [{"line": index.items[i].line,
                   "matches": [_match_dict(index, m) for m in ms[:5]]}
                  for i, ms in sorted(best.items())],
    }


def _match_dict(index: ProvenanceIndex, m: Match) -> dict[str, Any]:
    return {"line": index.items[m.item].line, "exchange_id": m.exchange_id,
            "account_id": m.account_id, "ts": m.ts, "containment": m.containment,
            "jaccard": m.jaccard, "exact_containment": m.exact}
