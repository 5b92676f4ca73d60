"""Which attack accounts detection misses, by how many exchanges each sent in the trace.

    python3 -m bench.missed_by_volume --trace s37/trace.jsonl --labels s37/labels.jsonl \
        --verdicts s37/v.json [--type slow_low]

For each campaign type (or only ``--type``): the accounts flagged and missed, and for the
missed ones how many sent 1, 2, 3, ... exchanges in the whole trace. An account's evidence
grows with its exchanges (its own behaviour, and its session starts for the co-start
tests), so this says whether a shortfall is in accounts detection had enough of to judge.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distillguard.traceio import iter_jsonl
from distillguard.verdicts import Verdicts


def count_by_account(trace: Path) -> Counter[str]:
    return Counter(str(line["account_id"]) for _, line in iter_jsonl(trace)
                   if isinstance(line, dict) and line.get("account_id") is not None)


@dataclass
class TypeMisses:
    flagged: int = 0
    missed: int = 0
    missed_by_exchanges: Counter[int] = field(default_factory=Counter)
    at_most_2: int = 0          # accounts of at most two exchanges ...
    at_most_2_flagged: int = 0  # ... and how many of them were flagged


def missed_by_volume(trace: Path, labels: Path, verdicts: Path, kind: str | None = None
                     ) -> dict[str, TypeMisses]:
    """Per campaign type: flagged and missed accounts, missed accounts by their exchanges
    in the trace, and how many accounts of at most two exchanges were caught."""
    sent = count_by_account(trace)
    flagged = {v.account_id for v in Verdicts.read(verdicts).accounts if v.flagged}
    by_type: dict[str, TypeMisses] = {}
    for _, label in iter_jsonl(labels):
        ctype = label.get("campaign_type")
        if not ctype or (kind is not None and ctype != kind):
            continue
        row = by_type.setdefault(ctype, TypeMisses())
        aid = label["account_id"]
        n, caught = sent[aid], aid in flagged
        if caught:
            row.flagged += 1
        else:
            row.missed += 1
            row.missed_by_exchanges[n] += 1
        if n <= 2:
            row.at_most_2 += 1
            row.at_most_2_flagged += caught
    return by_type


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--verdicts", type=Path, required=True)
    ap.add_argument("--type", dest="kind", help="Only this campaign type.")
    args = ap.parse_args()
    for ctype, row in sorted(missed_by_volume(args.trace, args.labels, args.verdicts,
                                              args.kind).items()):
        spread = ", ".join(f"{n}: {c}"
                           for n, c in sorted(row.missed_by_exchanges.items())) or "-"
        print(f"{ctype:16} flagged {row.flagged:4}  missed {row.missed:4}  "
              f"missed by exchanges {spread}  accounts with <= 2 exchanges caught "
              f"{row.at_most_2_flagged} of {row.at_most_2}")


if __name__ == "__main__":
    main()
