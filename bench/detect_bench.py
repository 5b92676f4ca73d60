"""Detection quality and batch throughput, side by side with the volume baseline.

    python3 -m bench.detect_bench --dir DIR [--runs 3] [--readers inline,process]

DIR holds a simulated world (``distillguard simulate --out DIR --preset heldout``).
Each run times the baseline (``distillguard.benchdetect.run_baseline``) and the detector
(``distillguard.detect.batch.run_batch`` with the shipped calibration) alternately in
this process, on the same trace; the medians and their ratio are reported, then both
verdicts are scored with ``distillguard.benchdetect.score``. With ``--readers
inline,process`` the detector runs once per reader in every run (trace read and features
extracted in this process, or in a second one), so the two are timed side by side too;
their verdicts must be identical. Results go to
DIR/detect_bench.json and a Markdown table on standard output.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from distillguard.benchdetect import run_baseline, score
from distillguard.detect.batch import run_batch
from distillguard.detect.calibration import Calibration
from distillguard.verdicts import Verdicts


def _timed(fn: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tick-seconds", type=float, default=300.0)
    ap.add_argument("--readers", default="auto",
                    help="comma-separated readers of run_batch to time (auto, inline, "
                         "process)")
    args = ap.parse_args()
    readers = args.readers.split(",")
    trace, accounts, labels = (args.dir / n for n in ("trace.jsonl", "accounts.jsonl",
                                                      "labels.jsonl"))
    calibration = Calibration.read()
    base_times: list[float] = []
    det_times: dict[str, list[float]] = {r: [] for r in readers}
    base: Verdicts | None = None
    ours: dict[str, Verdicts] = {}
    exchanges = 0
    for _ in range(args.runs):
        t, base = _timed(lambda: run_baseline(trace, accounts))
        base_times.append(t)
        for reader in readers:
            t, (result, _d) = _timed(lambda r=reader: run_batch(
                trace, calibration, accounts=accounts, tick_seconds=args.tick_seconds,
                reader=r))
            det_times[reader].append(t)
            ours[reader], exchanges = result.verdicts, result.exchanges
    assert base is not None and ours
    first = readers[0]
    for reader in readers[1:]:
        assert ours[reader].to_json() == ours[first].to_json(), f"{reader} verdicts differ"
    b = statistics.median(base_times)
    d = {r: statistics.median(ts) for r, ts in det_times.items()}
    out: dict[str, Any] = {
        "exchanges": exchanges, "runs": args.runs,
        "baseline_seconds": base_times, "detector_seconds": det_times[first],
        "baseline_exchanges_per_s": exchanges / b,
        "detector_exchanges_per_s": exchanges / d[first],
        "detector_time_over_baseline": d[first] / b,
        "readers": {r: {"seconds": det_times[r], "exchanges_per_s": exchanges / d[r],
                        "time_over_baseline": d[r] / b,
                        f"time_over_{first}": d[r] / d[first]} for r in readers},
        "scores": {"detector": score(trace, accounts, labels, ours[first], d[first]).to_json(),
                   "baseline": score(trace, accounts, labels, base, b).to_json()}}
    (args.dir / "detect_bench.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    ours[first].write(args.dir / "verdicts.json")
    print(f"exchanges: {exchanges}; median of {args.runs} alternating runs")
    print(f"| detector | exchanges/s | time vs baseline | time vs reader {first} |\n"
          f"|---|---|---|---|\n| baseline-volume | {exchanges / b:,.0f} | 1.00 | |")
    for r in readers:
        print(f"| distillguard detect (reader {r}) | {exchanges / d[r]:,.0f} | "
              f"{d[r] / b:.2f} | {d[r] / d[first]:.2f} |")
    for name in ("detector", "baseline"):
        print(f"\n{name}: overall {orjson.dumps(out['scores'][name]['overall']).decode()}")
        for kind, row in out["scores"][name]["campaign_types"].items():
            print(f"  {kind}: {orjson.dumps(row).decode()}")


if __name__ == "__main__":
    main()
