"""Seed a running gateway with a small, realistic mix of traffic for the dashboard tests.

Accounts and traffic go through the real admin API and the real gateway (so every
exchange passes the pipeline: rate limits, the ledger when enabled, the dashboard index).
A distillation campaign of 8 accounts shares a payment fingerprint, one /24 and sign-up
minutes, and sends templated prompts in lockstep; 6 benign accounts send varied prompts
from their own addresses; one campaign account runs into its rate limit. The campaign
verdict is written in the public verdicts format. Prompt text is real: the campaign wraps
GSM8K questions and CodeAlpaca tasks (prompts that were used to build training sets) in
two harvesting templates; benign accounts send Arena-Hard / OASST user prompts
(shared/data, see docs/data.md).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson

from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts

CAMPAIGN = [f"acct_c{i}" for i in range(8)]
BENIGN = [f"acct_b{i}" for i in range(6)]
TEMPLATES = ["Solve step by step and show all of your reasoning.\n\nProblem: {task}",
             "Write a Python function for the task below, with tests.\n\nTask: {task}"]


def _real_prompts() -> tuple[list[str], list[str], list[str]]:
    """(maths questions, coding tasks, benign prompts) from shared/data."""
    from distillguard.datasets import benign_prompts, data_dir

    folder = data_dir()
    maths = [orjson.loads(line)["question"] for line in
             (folder / "reasoning" / "gsm8k_train.jsonl").read_bytes().splitlines()[:60]]
    code = [t["instruction"] + (f"\nInput: {t['input']}" if t.get("input") else "")
            for t in orjson.loads((folder / "attack" / "codealpaca_2k.json").read_bytes())[:60]]
    return maths, code, [p[:600] for p in benign_prompts(limit=40)]


def seed(admin: httpx.Client, gateway_url: str, verdicts_path: Path) -> dict[str, str]:
    base = datetime.now(UTC) - timedelta(days=2)
    maths, code, benign = _real_prompts()
    keys: dict[str, str] = {}
    for i, account_id in enumerate(CAMPAIGN):
        admin.post("/admin/v1/accounts", json={
            "account_id": account_id, "org": f"Shell {i} Ltd", "email_domain": "mailbox.example",
            "payment_fingerprint": "pf_9f2c", "country": "SG", "tier": "standard",
            "created_at": (base + timedelta(minutes=3 * i)).isoformat(),
            "limits": {"requests_per_minute": 12} if i == 0 else {}}).raise_for_status()
    for i, account_id in enumerate(BENIGN):
        admin.post("/admin/v1/accounts", json={
            "account_id": account_id, "org": f"Customer {i}", "email_domain": f"c{i}.example",
            "payment_fingerprint": f"pf_b{i}", "country": "DE",
            "created_at": (base - timedelta(days=30 + 5 * i)).isoformat()}).raise_for_status()
    for account_id in CAMPAIGN + BENIGN:
        r = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "seed"})
        r.raise_for_status()
        keys[account_id] = r.json()["key"]
    with httpx.Client(base_url=gateway_url, timeout=30) as gw:
        for round_ in range(14):
            time.sleep(0.35)  # spread the rounds over a few seconds: lockstep, not a burst
            for i, account_id in enumerate(CAMPAIGN):
                tasks = maths if round_ % 2 == 0 else code
                prompt = TEMPLATES[round_ % 2].format(task=tasks[(round_ * 8 + i) % len(tasks)])
                _send(gw, keys[account_id], prompt, f"198.51.100.{10 + i}",
                      "demo-reasoner-1" if round_ % 2 == 0 else "demo-chat-1")
            for i, account_id in enumerate(BENIGN):
                if round_ % 3 == i % 3:
                    _send(gw, keys[account_id], benign[(round_ * 6 + i) % len(benign)],
                          f"203.0.{113 + i}.7", "demo-chat-1")
        # a revoked key: denied at authentication
        _send(gw, "sk-dg-000000000000-" + "0" * 48, "hello", "192.0.2.1", "demo-chat-1")
    Verdicts(
        accounts=[AccountVerdict(a, risk=0.93, flagged=True, campaign_id="c-1",
                                 first_flagged_at=base + timedelta(hours=1),
                                 exchanges_before_flag=12,
                                 reasons=["templated prompts", "shared payment fingerprint"])
                  for a in CAMPAIGN]
        + [AccountVerdict(a, risk=0.05) for a in BENIGN],
        campaigns=[CampaignVerdict("c-1", accounts=list(CAMPAIGN), risk=0.97,
                                   detected_at=base + timedelta(hours=1),
                                   evidence=["8 accounts share payment fingerprint pf_9f2c",
                                             "prompts follow 2 templates",
                                             "requests arrive in lockstep from 198.51.100.0/24"],
                                   extra={"edges": _template_links()})],
    ).write(verdicts_path)
    return keys


def _template_links() -> list[dict[str, str]]:
    """The links detection records for accounts sending the same prompt template (the
    dashboard draws them; it does not find templates itself)."""
    return [{"a": a, "b": b, "type": "template",
             "detail": "same template: " + TEMPLATES[0].split("\n")[0][:40]}
            for a, b in zip(CAMPAIGN, CAMPAIGN[1:], strict=False)]


def _send(gw: httpx.Client, key: str, prompt: str, ip: str, model: str) -> int:
    r = gw.post("/chat/completions", headers={"authorization": f"Bearer {key}",
                                              "x-forwarded-for": ip},
                json={"model": model, "messages": [{"role": "user", "content": prompt}],
                      "max_tokens": 64})
    return r.status_code
