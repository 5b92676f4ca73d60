"""Detection scores with exchanges arriving out of timestamp order, as the online path
takes them (in the order they finish, from one gateway or several replicas).

    python3 -m bench.arrival_order --dir DIR [--delays 2,30] [--seed 1]

DIR holds a simulated world (``distillguard simulate --out DIR --preset heldout``). The
trace's features are extracted once, then fed to the detector sorted by timestamp, and
sorted by timestamp plus a random delay of up to each of ``--delays`` seconds; each
verdicts document is scored with ``distillguard.benchdetect.score``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from distillguard.benchdetect import score
from distillguard.detect.batch import run_features
from distillguard.detect.calibration import Calibration
from distillguard.detect.features import ExchangeFeatures
from distillguard.detect.reader import trace_feature_rows

COLUMNS = ("recall", "precision", "ari", "benign_flagged", "exchanges_before_flag_median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--delays", default="2,30")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    trace, accounts, labels = (args.dir / n for n in ("trace.jsonl", "accounts.jsonl",
                                                      "labels.jsonl"))
    calibration = Calibration.read()
    features = [ExchangeFeatures(*row) for rows in trace_feature_rows(
        trace, memory_limit="1GB", geoip=None) for row in rows if row[1]]
    orders = {"sorted": features}
    for delay in (float(d) for d in args.delays.split(",")):
        rng = random.Random(args.seed)
        orders[f"up to {delay:g} s late"] = sorted(
            features, key=lambda f, d=delay: f.ts + rng.uniform(0, d))
    print("| order | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, order in orders.items():
        result, _ = run_features(order, calibration, accounts=accounts)
        overall = score(trace, accounts, labels, result.verdicts).to_json()["overall"]
        print(f"| {name} | " + " | ".join(f"{overall[c]:.3f}" if isinstance(overall[c], float)
                                         else str(overall[c]) for c in COLUMNS) + " |",
              flush=True)


if __name__ == "__main__":
    main()
