"""Per-exchange feature extraction: one by one against blocks, and trace line -> features.

    python3 -m bench.features_bench --trace held2/trace.jsonl [--limit 20000] [--runs 3] \
        [--baseline-src OLD/src]

Three measurements, each in a fresh process (cold feature caches, as a new batch run or
a new gateway starts), on the same exchanges:

* ``one_by_one``: ``extract(exchange)`` per exchange, as the online stage calls it, over
  the first ``--limit`` exchanges of the trace in time order (parsed before timing);
* ``blocks``: ``extract_many`` on blocks of ``BATCH_ROWS`` of the same exchanges, as the
  batch paths call it;
* ``end_to_end``: the DuckDB batch path's trace lines -> features over the whole trace
  (``distillguard.detect.batch._trace_features``: read and sort, parse each line into
  an Exchange, features), the part of ``distillguard detect`` before the detector.

With ``--baseline-src`` (the ``src`` folder of another checkout, e.g. a ``git worktree``
of an older commit) every measurement also runs on that code, alternating with this
checkout's run by run; medians and the ratios this/baseline are reported. Timings are
wall-clock, with the process's CPU time beside them (less sensitive to other jobs on a
shared machine), and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

MODES = ("one_by_one", "blocks", "end_to_end")
_HERE = Path(__file__).resolve().parents[1] / "src"


def first_exchanges(trace: str, limit: int) -> list[Any]:
    """The trace's first ``limit`` exchanges in time order, parsed (also used by
    ``bench.stage_batch_bench``; works with the code of older checkouts)."""
    try:
        from distillguard.detect.reader import iter_sorted_lines
    except ImportError:      # code from before the reader had a module of its own
        from distillguard.detect.batch import iter_sorted_lines  # type: ignore[attr-defined,no-redef]
    from distillguard.exchange import Exchange

    exchanges: list[Exchange] = []
    for lines in iter_sorted_lines(trace):
        exchanges += [Exchange.from_trace(orjson.loads(line)) for line in lines]
        if len(exchanges) >= limit:
            break
    del exchanges[limit:]
    return exchanges


def _worker(mode: str, trace: str, limit: int) -> dict[str, Any]:
    """Run one measurement in this process (the code PYTHONPATH points at)."""
    from distillguard.detect.batch import _trace_features
    try:
        from distillguard.detect.reader import BATCH_ROWS
    except ImportError:      # code from before the reader had a module of its own
        from distillguard.detect.batch import BATCH_ROWS  # type: ignore[attr-defined,no-redef]
    from distillguard.detect.features import extract, extract_many
    from distillguard.geoip import default_geoip

    default_geoip()  # load the database before timing
    if mode == "end_to_end":
        began, cpu = time.perf_counter(), time.process_time()
        count = sum(1 for _ in _trace_features(trace, memory_limit="1GB", geoip=None,
                                               on_block=None))
    else:
        exchanges = first_exchanges(trace, limit)
        count = len(exchanges)
        began, cpu = time.perf_counter(), time.process_time()
        if mode == "one_by_one":
            for ex in exchanges:
                extract(ex)
        else:
            for start in range(0, count, BATCH_ROWS):
                extract_many(exchanges[start:start + BATCH_ROWS])
    return {"exchanges": count, "seconds": time.perf_counter() - began,
            "cpu_seconds": time.process_time() - cpu}


def _run(src: Path, mode: str, trace: str, limit: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-m", "bench.features_bench", "--worker", mode,
                          "--trace", trace, "--limit", str(limit)], env=env, check=True,
                         capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return orjson.loads(out.stdout.splitlines()[-1])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--limit", type=int, default=20_000,
                    help="exchanges for one_by_one and blocks (end_to_end reads them all)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(orjson.dumps(_worker(args.worker, args.trace, args.limit)).decode())
        return
    trees = {"this": _HERE}
    if args.baseline_src is not None:
        trees["baseline"] = args.baseline_src.resolve()
    load_before = _load()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.runs):
        for mode in MODES:
            for name, src in trees.items():
                runs.setdefault((name, mode), []).append(_run(src, mode, args.trace,
                                                              args.limit))
    load_after = _load()
    table: dict[str, dict[str, Any]] = {}
    for (name, mode), results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        cpu = statistics.median(r["cpu_seconds"] for r in results)
        count = results[0]["exchanges"]
        table[f"{name}/{mode}"] = {"exchanges": count, "median_seconds": round(seconds, 3),
                                   "median_cpu_seconds": round(cpu, 3),
                                   "exchanges_per_s": round(count / seconds),
                                   "seconds": [round(r["seconds"], 3) for r in results]}
    ratios = {}
    one, blocks = table["this/one_by_one"], table["this/blocks"]
    ratios["this: blocks vs one_by_one"] = round(one["median_seconds"]
                                                 / blocks["median_seconds"], 2)
    if "baseline" in trees:
        for mode in MODES:
            old, new = table[f"baseline/{mode}"], table[f"this/{mode}"]
            ratios[f"{mode}: this vs baseline"] = round(
                old["median_seconds"] / new["median_seconds"], 2)
            ratios[f"{mode}: this vs baseline (cpu)"] = round(
                old["median_cpu_seconds"] / new["median_cpu_seconds"], 2)
        old = table["baseline/one_by_one"]
        ratios["this blocks vs baseline one_by_one"] = round(
            old["median_seconds"] / blocks["median_seconds"], 2)
    print(f"trace {args.trace}, {args.runs} alternating runs, load average before "
          f"{load_before}, after {load_after}\n")
    print("| code / measurement | exchanges | median s (cpu s) | exchanges/s | runs (s) |")
    print("|---|---|---|---|---|")
    for key, row in table.items():
        print(f"| {key} | {row['exchanges']:,} | {row['median_seconds']} "
              f"({row['median_cpu_seconds']}) | {row['exchanges_per_s']:,} | "
              f"{', '.join(map(str, row['seconds']))} |")
    print()
    for key, ratio in ratios.items():
        print(f"{key}: {ratio} x")
    print(orjson.dumps({"load_before": load_before, "load_after": load_after,
                        "table": table, "ratios": ratios}).decode())


if __name__ == "__main__":
    main()
