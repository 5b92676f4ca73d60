"""Detection quality when gateway replicas each run their own detector, side by side with
one detector over all of their traffic (``detect.runs_in: follower``).

    python3 -m bench.replica_split --dir DIR [--replicas 3]

DIR holds a simulated world (``distillguard simulate --out DIR --preset heldout``). The
trace's features are extracted once; then, in one run:

* ``one detector``: every exchange through one detector, as the follower sees the
  replicas' stream (the batch path, which gives the same verdicts);
* ``per replica, by request``: exchanges dealt to the replicas in turn (a load balancer
  without stickiness), one detector per replica;
* ``per replica, by account``: each account's exchanges to one replica (sticky by API
  key: a hash of the account id), one detector per replica.

Per-replica verdicts are merged the kindest way for them: an account counts as flagged
if any replica flagged it, in that replica's campaign (ids prefixed with the replica),
from its earliest flag. (In the verdict tables the latest row written wins, so a replica
that did not flag an account can overwrite one that did.) All are scored with
``distillguard.benchdetect.score``; a Markdown table goes to standard output and the
numbers to DIR/replica_split.json.
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from distillguard.benchdetect import score
from distillguard.detect.batch import run_features
from distillguard.detect.calibration import Calibration
from distillguard.detect.features import ExchangeFeatures
from distillguard.detect.reader import trace_feature_rows
from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts


def _kinder(mine: AccountVerdict, held: AccountVerdict) -> bool:
    """Whether ``mine`` shows the account in a better light for detection: flagged where
    ``held`` is not, flagged earlier, or (neither flagged) at a higher risk."""
    if mine.flagged != held.flagged:
        return mine.flagged
    if mine.flagged:
        return (mine.first_flagged_at is not None and held.first_flagged_at is not None
                and mine.first_flagged_at < held.first_flagged_at)
    return mine.risk > held.risk


def merge(parts: list[Verdicts]) -> Verdicts:
    """Per-replica verdicts as one document, kindest to them (see the module text)."""
    accounts: dict[str, AccountVerdict] = {}
    campaigns: list[CampaignVerdict] = []
    for n, part in enumerate(parts):
        campaigns += [replace(c, campaign_id=f"r{n}:{c.campaign_id}") for c in part.campaigns]
        for v in part.accounts:
            mine = replace(v, campaign_id=f"r{n}:{v.campaign_id}" if v.campaign_id else None)
            held = accounts.get(v.account_id)
            if held is None or _kinder(mine, held):
                accounts[v.account_id] = mine
    return Verdicts(accounts=sorted(accounts.values(), key=lambda a: a.account_id),
                    campaigns=campaigns)


def _detect(features: list[ExchangeFeatures | None], calibration: Calibration,
            accounts: Path) -> Verdicts:
    result, _ = run_features(features, calibration, accounts=accounts)
    return result.verdicts


def _split(features: list[ExchangeFeatures | None], replicas: int,
           to: Callable[[int, ExchangeFeatures], int]) -> list[list[ExchangeFeatures | None]]:
    parts: list[list[ExchangeFeatures | None]] = [[] for _ in range(replicas)]
    for n, f in enumerate(features):
        if f is not None:
            parts[to(n, f)].append(f)
    return parts


def _row(name: str, scores: Any) -> dict[str, Any]:
    overall = scores.to_json()["overall"]
    return {"setup": name, "recall": overall["recall"], "precision": overall["precision"],
            "ari": overall["ari"], "campaigns": f"{overall['campaigns_detected']}/"
            f"{overall['campaigns']}", "benign_flagged": overall["benign_flagged"],
            "benign": overall["benign_accounts"],
            "exchanges_before_flag_median": overall["exchanges_before_flag_median"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--replicas", type=int, default=3)
    args = ap.parse_args()
    trace, accounts, labels = (args.dir / n for n in ("trace.jsonl", "accounts.jsonl",
                                                      "labels.jsonl"))
    calibration = Calibration.read()
    features = [ExchangeFeatures(*row) if row[1] else None
                for rows in trace_feature_rows(trace, memory_limit="1GB", geoip=None)
                for row in rows]
    r = args.replicas
    setups: dict[str, Verdicts] = {"one detector (follower)": _detect(
        features, calibration, accounts)}
    by_request = _split(features, r, lambda n, f: n % r)
    setups[f"{r} replicas, by request"] = merge(
        [_detect(part, calibration, accounts) for part in by_request])
    by_account = _split(features, r, lambda n, f: zlib.crc32(f.account_id.encode()) % r)
    setups[f"{r} replicas, by account"] = merge(
        [_detect(part, calibration, accounts) for part in by_account])
    rows = [_row(name, score(trace, accounts, labels, verdicts))
            for name, verdicts in setups.items()]
    (args.dir / "replica_split.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    print("| setup | recall | precision | ARI | campaigns detected | benign flagged | "
          "median exchanges before flag |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setup']} | {row['recall']:.3f} | {row['precision']:.3f} | "
              f"{row['ari']:.3f} | {row['campaigns']} | {row['benign_flagged']} of "
              f"{row['benign']} | {row['exchanges_before_flag_median']} |")


if __name__ == "__main__":
    main()
