"""A reference baseline detector: per-account daily volume, grouped by payment method.

Deliberately simple, for comparison only (``baseline-volume`` in the verdicts): an
account is flagged once it has sent more than ``per_day`` exchanges within any 24 hours;
flagged accounts that share a payment fingerprint form one campaign. It processes the
trace in time order (sorting it first: the (time, account) pairs are held in memory) and
writes the verdicts format, including ``first_flagged_at`` and
``exchanges_before_flag``.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from datetime import datetime
from pathlib import Path

from distillguard.exchange import format_ts, parse_ts
from distillguard.traceio import iter_jsonl, read_accounts
from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts

NAME = "baseline-volume"


def run_baseline(trace: str | Path, accounts: str | Path, per_day: int = 300) -> Verdicts:
    began = time.perf_counter()
    payment = {a.account_id: a.payment_fingerprint for a in read_accounts(accounts)}
    events: list[tuple[str, str]] = []
    for _, line in iter_jsonl(trace):
        if isinstance(line.get("account_id"), str) and line.get("ts") is not None:
            raw = line["ts"]
            # the trace's own form sorts as text; other RFC 3339 forms are normalised
            key = raw if isinstance(raw, str) and len(raw) == 24 and raw.endswith("Z") \
                else format_ts(parse_ts(raw))
            events.append((key, line["account_id"]))
    events.sort()
    windows: dict[str, deque[float]] = defaultdict(deque)
    seen: dict[str, int] = defaultdict(int)
    flagged: dict[str, tuple[datetime, int]] = {}
    for raw, account in events:
        seen[account] += 1
        if account in flagged:
            continue
        ts = parse_ts(raw)
        window = windows[account]
        now = ts.timestamp()
        window.append(now)
        while window and window[0] <= now - 86_400:
            window.popleft()
        if len(window) > per_day:
            flagged[account] = (ts, seen[account] - 1)
            del windows[account]
    groups: dict[str, list[str]] = defaultdict(list)
    for account in sorted(flagged):
        groups[payment.get(account) or account].append(account)
    campaigns: list[CampaignVerdict] = []
    campaign_of: dict[str, str] = {}
    for n, (_, members) in enumerate(sorted(groups.items()), 1):
        cid = f"{NAME}-{n}"
        for m in members:
            campaign_of[m] = cid
        campaigns.append(CampaignVerdict(
            campaign_id=cid, accounts=members, risk=0.9,
            detected_at=min(flagged[m][0] for m in members),
            evidence=[f"more than {per_day} exchanges in 24 h"]))
    verdicts = [
        AccountVerdict(account_id=a, risk=0.9 if a in flagged else 0.0, flagged=a in flagged,
                       campaign_id=campaign_of.get(a),
                       first_flagged_at=flagged[a][0] if a in flagged else None,
                       exchanges_before_flag=flagged[a][1] if a in flagged else None,
                       reasons=[f"more than {per_day} exchanges in 24 h"] if a in flagged
                       else [])
        for a in sorted(set(payment) | set(seen))]
    return Verdicts(accounts=verdicts, campaigns=campaigns,
                    extra={"detector": NAME, "elapsed_seconds":
                           round(time.perf_counter() - began, 3)})
