"""Human-readable evidence: why an account or a campaign was flagged.

Account reasons name the features that pushed its risk up most (the model's per-feature
contributions), with the measured values; campaign evidence says how its members are
linked, what they do on average, where from, and which exchanges show it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from distillguard.detect.graph import Community
from distillguard.detect.scoring import ACCOUNT_FEATURES, FEATURES, Model
from distillguard.detect.sketches import AccountState


def _pct(x: float) -> str:
    return f"{100.0 * x:.0f}%"


_TEXT = {
    "log_volume": lambda v: f"high volume: {math.expm1(v):.0f} exchanges",
    "log_rate": lambda v: f"sustained rate: {math.expm1(v):.0f} exchanges/hour",
    "template_reuse": lambda v: f"one template frame in {_pct(v)} of prompts",
    "diversity": lambda v: f"prompt diversity {v:.2f} distinct fingerprints per exchange",
    "concentration": lambda v: f"{_pct(v)} of prompts in one capability",
    "reasoning_share": lambda v: f"reasoning elicitation in {_pct(v)} of prompts",
    "rubric_share": lambda v: f"rubric-grading requests in {_pct(v)} of prompts",
    "tool_share": lambda v: f"tool-use prompts in {_pct(v)} of exchanges",
    "harvest_share": lambda v: f"harvest parameters (n>1, logprobs, huge max_tokens) in {_pct(v)}",
    "multi_turn_share": lambda v: f"multi-turn conversations in only {_pct(v)} of exchanges",
    "log_output_ratio": lambda v: f"output/input token ratio {math.expm1(v):.1f}",
    "timing_regularity": lambda v: f"machine-regular timing (regularity {v:.2f})",
    "diurnal_entropy": lambda v: f"round-the-clock activity (hour entropy {v:.2f})",
    "hosting_share": lambda v: f"{_pct(v)} of requests from hosting/datacenter networks",
    "model_switch_rate": lambda v: f"model switching in {_pct(v)} of exchanges",
    "log_age_days": lambda v: f"account {math.expm1(v):.1f} days old at first request",
    "log_completion_limit": lambda v: f"asks for up to {math.expm1(v):.0f} completion tokens on average",
    "log_completion_tokens": lambda v: f"answers of {math.expm1(v):.0f} tokens on average",
    "log_networks": lambda v: f"requests from {math.expm1(v):.0f} different networks (AS)",
    "error_share": lambda v: f"{_pct(v)} of requests failed",
    "group_size": lambda v: f"member of a linked group of {1.0 / max(1e-9, 1.0 - v):.0f} accounts",
    "template_linked": lambda v: f"{_pct(v)} of its group share template frames",
    "lockstep_linked": lambda v: f"{_pct(v)} of its group act in lockstep",
    "payment_linked": lambda v: f"{_pct(v)} of its group share a payment fingerprint",
    "prefix_linked": lambda v: f"{_pct(v)} of its group share client /24 networks",
    "signup_linked": lambda v: f"{_pct(v)} of its group signed up in the same window",
    "log_member_volume": lambda v: f"group members send {math.expm1(v):.0f} exchanges each on average",
    "same_asn": lambda v: f"{_pct(v)} of its group on one network (AS)",
}


def _describe(name: str, value: float) -> str:
    if name in _TEXT:
        return _TEXT[name](value)
    base = name.removeprefix("mean_")
    return f"group average: {_TEXT[base](value)}" if base in _TEXT else f"{name}={value:.3g}"


def account_reasons(model: Model, row: np.ndarray, linked: bool, limit: int = 4) -> list[str]:
    """The features that raise the risk most; group features only for linked accounts."""
    contrib = model.contributions(row)
    if not linked:
        contrib[len(ACCOUNT_FEATURES):] = 0.0
    order = np.argsort(-contrib)
    return [_describe(FEATURES[i], float(row[i])) for i in order[:limit] if contrib[i] > 0.05]


def group_reasons(model: Model, row: np.ndarray, limit: int = 3) -> list[str]:
    """The community features that raise the community model's risk most."""
    contrib = model.contributions(row)
    offset = len(ACCOUNT_FEATURES)
    order = np.argsort(-contrib)
    return [_describe(FEATURES[offset + i], float(row[i])) for i in order[:limit]
            if contrib[i] > 0.05]


_KIND_TEXT = {"template": "share template frames", "lockstep": "act in lockstep",
              "payment": "share payment fingerprints", "prefix": "share client /24 networks",
              "signup": "signed up in the same window",
              "domain": "share a mail domain that is no public provider's",
              "exit": "rotate through the same proxy exit /24s"}


def campaign_headline(linked: int, flagged: int, unlinked: int) -> str:
    """A campaign's first line of evidence: its community's size and flagged members, and
    the accounts attributed to it that are no longer linked to it (flags and campaign
    ids are sticky: an account flagged as a member keeps both after its links went, and
    the campaign's account list keeps it, so the count says why the list is longer)."""
    line = f"{linked} linked accounts, {flagged} flagged"
    if unlinked == 1:
        line += "; 1 more account flagged as a member earlier is no longer linked"
    elif unlinked:
        line += f"; {unlinked} more accounts flagged as members earlier are no longer linked"
    return line


def campaign_evidence(community: Community, states: Mapping[str, AccountState],
                      flagged: list[str]) -> list[str]:
    """A campaign's evidence after its headline (:func:`campaign_headline`): how its
    community's members are linked, what they send, from where, and examples."""
    members = sorted(community.members)
    size = len(members)
    out: list[str] = []
    for kind, n in sorted(community.kinds.items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(f"{n} of {size} accounts {_KIND_TEXT.get(kind, kind)}")
    total = sum(states[m].count for m in members) or 1
    shares = {
        "reasoning elicitation": sum(states[m].reasoning for m in members) / total,
        "rubric grading": sum(states[m].rubric for m in members) / total,
        "tool use": sum(states[m].tool_use for m in members) / total,
        "multi-turn": sum(states[m].multi_turn for m in members) / total,
        "hosting networks": sum(states[m].hosting for m in members) / total,
    }
    out.append(f"{total} exchanges; " + ", ".join(f"{k} {_pct(v)}" for k, v in shares.items()))
    asns = [a for m in members if (a := states[m].top_asn)]
    if asns:
        top = max(sorted(set(asns)), key=asns.count)
        out.append(f"most common network: {top} ({asns.count(top)} of {size} accounts)")
    examples = [e for m in (flagged or members)[:3] for e in states[m].examples[:1]]
    if examples:
        out.append("example exchanges: " + ", ".join(examples))
    out.append("accounts: " + ", ".join(members[:8]) + (" ..." if size > 8 else ""))
    return out
