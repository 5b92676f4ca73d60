"""Scoring a detector's verdicts against simulated ground truth.

Inputs: a trace, its accounts, the labels written by ``distillguard simulate`` and a
verdicts document (docs/formats.md). The trace is read once, streaming; memory grows with
the number of accounts, not exchanges.

Definitions (per campaign type ``T`` and overall):

* only accounts with at least one exchange in the trace count (an account that sent
  nothing cannot be judged); their number is reported as ``inactive_accounts``;
* recall: flagged attack accounts / attack accounts (of type ``T``);
* precision: flagged attack accounts / all flagged accounts. Per type, the benign
  accounts flagged count against every type: ``TP_T / (TP_T + FP)``;
* benign false-positive rate: flagged benign / benign accounts, also on hard negatives
  alone and per benign population;
* campaigns detected: campaigns with at least half of their accounts flagged;
* attribution: adjusted Rand index between predicted campaigns (the verdict's
  ``campaign_id``, or membership in a verdicts campaign; an unassigned account is its own
  cluster) and true campaigns, over attack accounts;
* exchanges before flag: an account's exchanges in the trace with ``ts`` earlier than its
  ``first_flagged_at`` (the verdict's ``exchanges_before_flag`` when it gives no time);
  time before flag: ``first_flagged_at`` minus the account's first exchange. Campaign-level
  versions count from the campaign's first exchange to the first flag of any member.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from scipy.special import comb

from distillguard.exchange import format_ts, parse_ts
from distillguard.traceio import iter_jsonl, read_accounts
from distillguard.verdicts import AccountVerdict, Verdicts


@dataclass(slots=True)
class Truth:
    account_id: str
    population: str
    campaign_id: str | None
    campaign_type: str | None
    hard_negative: bool

    @property
    def attack(self) -> bool:
        return self.campaign_id is not None


@dataclass(slots=True)
class AccountActivity:
    first: str | None = None      # earliest ts, normalised to the 24-character form
    exchanges: int = 0
    before_flag: int = 0

    @property
    def first_ts(self) -> datetime | None:
        return parse_ts(self.first) if self.first else None


def read_labels(path: str | Path) -> dict[str, Truth]:
    out: dict[str, Truth] = {}
    for number, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("account_id"), str):
            raise ValueError(f"{path}:{number}: a label needs a string 'account_id'")
        out[rec["account_id"]] = Truth(
            account_id=rec["account_id"], population=str(rec.get("population") or ""),
            campaign_id=rec.get("campaign_id"), campaign_type=rec.get("campaign_type"),
            hard_negative=bool(rec.get("hard_negative")))
    return out


def adjusted_rand_index(truth: list[str], predicted: list[str]) -> float:
    """ARI of two labelings of the same items (Hubert and Arabie, 1985)."""
    n = len(truth)
    if n < 2:
        return 1.0
    pairs = Counter(zip(truth, predicted, strict=True))
    sum_cells = sum(comb(v, 2) for v in pairs.values())
    sum_a = sum(comb(v, 2) for v in Counter(truth).values())
    sum_b = sum(comb(v, 2) for v in Counter(predicted).values())
    expected = sum_a * sum_b / comb(n, 2)
    top = (sum_a + sum_b) / 2
    if top == expected:
        return 1.0
    return float((sum_cells - expected) / (top - expected))


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(slots=True)
class Scores:
    """Everything ``bench detect`` reports; ``to_json`` is what ``--json`` writes."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    benign: dict[str, dict[str, Any]] = field(default_factory=dict)
    overall: dict[str, Any] = field(default_factory=dict)
    hours_to_flag: dict[str, list[float]] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "overall": self.overall, "campaign_types": self.rows,
                "benign": self.benign, "detector": self.detector,
                "hours_to_flag": self.hours_to_flag}


def _scan_trace(trace: str | Path, flags: dict[str, datetime],
                campaign_of: dict[str, str], campaign_flags: dict[str, datetime],
                ) -> tuple[dict[str, AccountActivity], Counter[str]]:
    """One streaming pass: per account its first exchange, exchange count and exchanges
    before its flag; per campaign the exchanges before its first flagged member."""
    activity: dict[str, AccountActivity] = defaultdict(AccountActivity)
    flag_text = {a: format_ts(t) for a, t in flags.items()}
    camp_text = {c: format_ts(t) for c, t in campaign_flags.items()}
    camp_before: Counter[str] = Counter()
    for _, line in iter_jsonl(trace):
        account = line.get("account_id")
        raw = line.get("ts")
        if not isinstance(account, str) or raw is None:
            continue
        # RFC 3339 in the trace's own form ("...sss" + "Z") compares as text.
        key = raw if isinstance(raw, str) and len(raw) == 24 and raw.endswith("Z") \
            else format_ts(parse_ts(raw))
        act = activity[account]
        act.exchanges += 1
        if act.first is None or key < act.first:
            act.first = key
        if account in flag_text and key < flag_text[account]:
            act.before_flag += 1
        campaign = campaign_of.get(account)
        if campaign in camp_text and key < camp_text[campaign]:
            camp_before[campaign] += 1
    return activity, camp_before


@dataclass(slots=True)
class _Judge:
    """The verdicts and what the trace says about each account, to score a group."""

    by_account: dict[str, AccountVerdict]
    member_of: dict[str, str]
    flagged: set[str]
    activity: dict[str, AccountActivity]
    campaign_flags: dict[str, datetime]
    campaign_before: Counter[str]
    false_positives: int = 0

    def cluster(self, account: str) -> str:
        v = self.by_account.get(account)
        cid = (v.campaign_id if v and v.flagged else None) or (
            self.member_of.get(account) if account in self.flagged else None)
        return f"p:{cid}" if cid else f"solo:{account}"

    def _delays(self, caught: list[Truth]) -> tuple[list[float], list[float]]:
        before: list[float] = []
        hours: list[float] = []
        for t in caught:
            v, act = self.by_account[t.account_id], self.activity.get(t.account_id)
            if v.first_flagged_at is not None and act is not None:
                before.append(act.before_flag)
                if act.first_ts is not None:
                    hours.append(max(0.0, (v.first_flagged_at - act.first_ts)
                                     .total_seconds() / 3600))
            elif v.exchanges_before_flag is not None:
                before.append(v.exchanges_before_flag)
        return before, hours

    def _campaign_delays(self, campaigns: dict[str, list[Truth]],
                         ) -> tuple[list[float], list[float]]:
        hours: list[float] = []
        before: list[float] = []
        for cid, ms in campaigns.items():
            firsts = [act.first_ts for m in ms
                      if (act := self.activity.get(m.account_id)) is not None and act.first]
            if firsts and cid in self.campaign_flags:
                start = min(t for t in firsts if t)
                hours.append(max(0.0, (self.campaign_flags[cid] - start).total_seconds() / 3600))
                before.append(self.campaign_before[cid])
        return hours, before

    def block(self, members: list[Truth]) -> tuple[dict[str, Any], list[float]]:
        """The metrics row of a group of attack accounts, and its hours to flag."""
        caught = [t for t in members if t.account_id in self.flagged]
        campaigns: dict[str, list[Truth]] = defaultdict(list)
        for t in members:
            campaigns[str(t.campaign_id)].append(t)
        detected = sum(1 for ms in campaigns.values()
                       if sum(m.account_id in self.flagged for m in ms) * 2 >= len(ms))
        before, hours = self._delays(caught)
        camp_hours, camp_before = self._campaign_delays(campaigns)
        tp = len(caught)
        return {
            "accounts": len(members), "flagged": tp,
            "exchanges": sum(self.activity[t.account_id].exchanges for t in members
                             if t.account_id in self.activity),
            "precision": _ratio(tp, tp + self.false_positives),
            "recall": _ratio(tp, len(members)),
            "campaigns": len(campaigns), "campaigns_detected": detected,
            "ari": adjusted_rand_index([str(t.campaign_id) for t in members],
                                       [self.cluster(t.account_id) for t in members])
            if len(members) >= 2 else None,
            "exchanges_before_flag_median": _median(before),
            "exchanges_before_flag_p90": _quantile(before, 0.9),
            "hours_to_flag_median": _median(hours),
            "hours_to_flag_p90": _quantile(hours, 0.9),
            "campaign_hours_to_first_flag_median": _median(camp_hours),
            "campaign_exchanges_before_first_flag_median": _median(camp_before),
        }, hours


def _judge(trace: str | Path, truth: dict[str, Truth], verdicts: Verdicts) -> _Judge:
    by_account: dict[str, AccountVerdict] = {v.account_id: v for v in verdicts.accounts}
    member_of: dict[str, str] = {}
    for camp in verdicts.campaigns:
        for acct in camp.accounts:
            member_of.setdefault(acct, camp.campaign_id)
    flagged = {a for a, v in by_account.items() if v.flagged and a in truth}
    flags = {a: v.first_flagged_at for a, v in by_account.items()
             if a in flagged and v.first_flagged_at is not None}
    campaign_of = {a: t.campaign_id for a, t in truth.items() if t.campaign_id}
    campaign_flags: dict[str, datetime] = {}
    for account, when in flags.items():
        true_id = campaign_of.get(account)
        if true_id and (true_id not in campaign_flags or when < campaign_flags[true_id]):
            campaign_flags[true_id] = when
    activity, campaign_before = _scan_trace(trace, flags, campaign_of, campaign_flags)
    return _Judge(by_account, member_of, flagged, activity, campaign_flags, campaign_before)


def score(trace: str | Path, accounts: str | Path, labels: str | Path,
          verdicts: Verdicts, elapsed_s: float | None = None) -> Scores:
    truth = read_labels(labels)
    known = {a.account_id for a in read_accounts(accounts)}
    missing_labels = known - set(truth)
    if missing_labels:
        raise ValueError(f"{len(missing_labels)} accounts have no label, e.g. "
                         f"{sorted(missing_labels)[0]}")
    judge = _judge(trace, truth, verdicts)
    # Accounts that sent nothing in the trace cannot be judged; they are left out.
    active = [t for t in truth.values() if t.account_id in judge.activity]
    attack = [t for t in active if t.attack]
    benign = [t for t in active if not t.attack]
    judge.false_positives = sum(1 for t in benign if t.account_id in judge.flagged)
    scores = Scores()
    by_type: dict[str, list[Truth]] = defaultdict(list)
    for t in attack:
        by_type[str(t.campaign_type)].append(t)
    for kind in sorted(by_type):
        scores.rows[kind], scores.hours_to_flag[kind] = judge.block(by_type[kind])
    overall, _ = judge.block(attack)
    pops: dict[str, list[Truth]] = defaultdict(list)
    for t in benign:
        pops[t.population].append(t)
    for name, members in sorted(pops.items()):
        n_fp = sum(1 for t in members if t.account_id in judge.flagged)
        scores.benign[name] = {"accounts": len(members), "flagged": n_fp,
                               "fpr": _ratio(n_fp, len(members)),
                               "hard_negative": any(t.hard_negative for t in members)}
    hard = [t for t in benign if t.hard_negative]
    fp = judge.false_positives
    p, r = overall["precision"], overall["recall"]
    overall.update({
        "benign_accounts": len(benign), "benign_flagged": fp,
        "benign_fpr": _ratio(fp, len(benign)),
        "hard_negative_accounts": len(hard),
        "hard_negative_fpr": _ratio(sum(1 for t in hard if t.account_id in judge.flagged),
                                    len(hard)),
        "f1": 2 * p * r / (p + r) if p and r else 0.0,
        "verdicts_missing": len(set(truth) - set(judge.by_account)),
        "inactive_accounts": len(truth) - len(active),
        "trace_exchanges": sum(a.exchanges for a in judge.activity.values()),
    })
    # Where attribution is lost: the ARI over the attack accounts of every type but one
    # (a type whose operators are split or merged is the one whose absence lifts it).
    without: dict[str, float] = {}
    for kind in sorted(by_type):
        rest = [t for t in attack if str(t.campaign_type) != kind]
        if len(rest) >= 2:
            without[kind] = adjusted_rand_index([str(t.campaign_id) for t in rest],
                                                [judge.cluster(t.account_id) for t in rest])
    overall["ari_without_type"] = without
    scores.overall = overall
    elapsed = elapsed_s
    if elapsed is None:
        raw = verdicts.extra.get("elapsed_seconds")
        elapsed = float(raw) if isinstance(raw, int | float) else None
    scores.detector = {"elapsed_seconds": elapsed,
                       "exchanges_per_second": overall["trace_exchanges"] / elapsed
                       if elapsed else None}
    return scores
