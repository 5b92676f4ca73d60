"""A small world for the sharing tests: one distillation campaign among ordinary users,
written in the public formats (verdicts, trace, accounts)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from distillguard.config import Settings
from distillguard.store.models import Account
from distillguard.traceio import write_accounts, write_jsonl
from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts
from tests.factories import make_settings

CAMPAIGN = [f"acct_camp{i}" for i in range(6)]
LEGIT = [f"acct_user{i}" for i in range(6)]
CAMPAIGN_UA = "python-requests/2.31.0 harvest"
COMMON_UA = "OpenAI/Python 1.40.0"
CAMPAIGN_PF = "pf_shared_card_7731"
TEMPLATE = "You are a data generator. Solve step by step and show your reasoning: "
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PARTNERS: dict[str, Any] = {
    "acme": {"token": "acme-secret-0123456789", "read": ["outbound"], "write": ["inbound"]},
    "globex": {"token": "globex-secret-0123456789", "read": ["outbound"]},
    "initech": {"token": "initech-secret-0123456789", "pseudonymize": False},
}
COLLECTIONS = [
    {"id": "9a2c8e1e-5a4f-4c55-9a39-3d2b1f6b7c10", "alias": "outbound",
     "title": "Our campaigns"},
    {"id": "5d0f3b64-0f59-4a8e-8f0c-6f7f7b1c2d20", "alias": "inbound",
     "title": "Partner submissions"},
]


def sharing_section(**changes: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "organisation": "Example Lab", "pseudonym_key": "master-key-for-tests-0001",
        "partners": PARTNERS, "taxii": {"collections": COLLECTIONS, "max_page_size": 50},
        "refresh_s": 0.2}
    section.update(changes)
    return section


def sharing_settings(tmp_path: Path, **changes: Any) -> Settings:
    return make_settings(tmp_path, sharing=sharing_section(**changes))


def accounts() -> list[Account]:
    out = []
    for i, a in enumerate(CAMPAIGN):
        pf = CAMPAIGN_PF if i < 4 else f"pf_camp_own_{i}"
        out.append(Account.from_public({"account_id": a, "payment_fingerprint": pf,
                                        "country": "DE", "org": f"Shell Co {i}",
                                        "created_at": "2026-02-27T08:00:00Z"}))
    for i, a in enumerate(LEGIT):
        out.append(Account.from_public({"account_id": a, "payment_fingerprint": f"pf_u{i}",
                                        "country": "GB", "org": "Real Customer Ltd",
                                        "created_at": "2026-01-10T08:00:00Z"}))
    return out


def trace_lines() -> list[dict[str, Any]]:
    lines = []
    for n in range(120):
        a = CAMPAIGN[n % len(CAMPAIGN)]
        lines.append({
            "ts": (T0 + timedelta(seconds=30 * n)).isoformat().replace("+00:00", "Z"),
            "account_id": a, "key_id": f"key_{a}", "client_ip": f"5.9.10.{10 + n % 40}",
            "user_agent": CAMPAIGN_UA if n % 3 else COMMON_UA,
            "request": {"model": "m1", "messages": [
                {"role": "user", "content": f"{TEMPLATE}problem {n}: integrate x^{n}"}]},
            "response": None, "status": 200, "latency_ms": 700})
    for n in range(60):
        a = LEGIT[n % len(LEGIT)]
        lines.append({
            "ts": (T0 + timedelta(seconds=47 * n)).isoformat().replace("+00:00", "Z"),
            "account_id": a, "key_id": f"key_{a}", "client_ip": f"81.2.69.{100 + n % 50}",
            "user_agent": COMMON_UA,
            "request": {"model": "m1", "messages": [
                {"role": "user", "content": f"Question number {n} about my own homework "
                                            f"that nobody else asks {n * 7}"}]},
            "response": None, "status": 200, "latency_ms": 650})
    return lines


def verdicts() -> Verdicts:
    return Verdicts(
        accounts=[AccountVerdict(a, risk=0.97, flagged=True, campaign_id="c-7",
                                 first_flagged_at=T0 + timedelta(minutes=20),
                                 exchanges_before_flag=40) for a in CAMPAIGN]
        + [AccountVerdict(a, risk=0.05) for a in LEGIT],
        campaigns=[CampaignVerdict("c-7", accounts=list(CAMPAIGN), risk=0.98,
                                   detected_at=T0 + timedelta(minutes=20),
                                   evidence=[f"{CAMPAIGN[0]} and {CAMPAIGN[1]} share a card "
                                             f"({CAMPAIGN_PF}, org Shell Co 0) from "
                                             "5.9.10.11",
                                             "120 templated prompts from one /24"]),
                   CampaignVerdict("c-8", accounts=[LEGIT[0]], risk=0.3)])


def write_world(folder: Path) -> dict[str, Path]:
    paths = {"verdicts": folder / "verdicts.json", "trace": folder / "trace.jsonl",
             "accounts": folder / "accounts.jsonl"}
    verdicts().write(paths["verdicts"])
    write_jsonl(trace_lines(), paths["trace"])
    write_accounts(accounts(), paths["accounts"])
    return paths
