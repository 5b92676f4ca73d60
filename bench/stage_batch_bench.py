"""The online detection stage behind the pipeline's queue: one exchange at a time (an
idle gateway: each exchange has gone through before the next arrives) against what
waited on the queue (a backlog, ``traces import``: the stage's ``prepare`` extracts up
to ``BACKGROUND_BATCH`` exchanges in one pass).

    python3 -m bench.stage_batch_bench --trace l1/trace.jsonl [--accounts l1/accounts.jsonl] \
        [--limit 20000] [--runs 3] [--baseline-src OLD/src]

Each measurement runs in a fresh process (cold feature caches), the two modes
alternating run by run, on the first ``--limit`` exchanges of the trace in time order
(parsed before timing). The stage runs as the gateway runs it by default, its detector
in a process of its own, so the CPU time of the measuring process is what the stage
costs the gateway's process: features, the hand-over to the detector, the account
look-ups (with ``--accounts``, the records are in the state store, as in a gateway; the
import is not timed). Wall-clock time is given beside it; medians and the ratio one-at-a-time /
queued are printed. With ``--baseline-src`` (the ``src`` folder of another checkout)
the queued mode also runs on that code, alternating, and the ratio baseline / this is
printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

MODES = ("one_at_a_time", "queued")


def _worker(mode: str, trace: str, limit: int, accounts: str | None) -> dict[str, Any]:
    from bench.features_bench import first_exchanges
    from distillguard.detect.calibration import Calibration
    from distillguard.detect.online import DetectionStage
    from distillguard.geoip import default_geoip
    from distillguard.pipeline import Pipeline

    exchanges = first_exchanges(trace, limit)

    async def go(folder: str) -> tuple[float, float]:
        url = f"sqlite:///{folder}/state.sqlite"
        if accounts is not None:
            from distillguard.store import open_state_store
            from distillguard.traceio import read_accounts

            store = open_state_store(url)
            await store.migrate()
            await store.import_accounts(read_accounts(accounts))
            await store.close()
        stage = DetectionStage(url, Calibration.read(), geoip=default_geoip(),
                               runs_in="process")
        pipeline = Pipeline([stage])
        await pipeline.start()
        began, cpu = time.perf_counter(), time.process_time()
        if mode == "one_at_a_time":
            for ex in exchanges:
                await pipeline.submit(ex)
                await pipeline.drain()
        else:
            await pipeline.submit_many(exchanges)
            await pipeline.drain()
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
        assert stage.fed == sum(1 for ex in exchanges if ex.account_id and ex.status)
        await pipeline.close()
        return seconds, cpu_seconds

    with tempfile.TemporaryDirectory() as folder:
        seconds, cpu_seconds = asyncio.run(go(folder))
    return {"exchanges": len(exchanges), "seconds": seconds, "cpu_seconds": cpu_seconds}


def _run(mode: str, args: argparse.Namespace, src: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    more = ["--accounts", str(args.accounts)] if args.accounts else []
    out = subprocess.run([sys.executable, "-m", "bench.stage_batch_bench", "--worker", mode,
                          "--trace", args.trace, "--limit", str(args.limit), *more],
                         check=True, env=env, capture_output=True,
                         cwd=Path(__file__).resolve().parents[1])
    return orjson.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--accounts", default=None, help="account records for the state store")
    ap.add_argument("--limit", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(orjson.dumps(_worker(args.worker, args.trace, args.limit, args.accounts)
                           ).decode())
        return
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    plan: dict[str, tuple[str, Path | None]] = {mode: (mode, None) for mode in MODES}
    if args.baseline_src is not None:
        plan["baseline queued"] = ("queued", args.baseline_src.resolve())
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    for i in range(args.runs):
        for name, (mode, src) in plan.items():
            runs[name].append(_run(mode, args, src))
            print(f"run {i + 1}/{args.runs} {name}: {runs[name][-1]['cpu_seconds']:.2f} s "
                  "CPU", file=sys.stderr)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"trace {args.trace}, first {args.limit:,} exchanges, {args.runs} alternating "
          f"runs, load average before {load_before}, after {load_after}\n")
    print("| mode | median CPU s (runs) | CPU us per exchange | median wall s |")
    print("|---|---|---|---|")
    medians = {}
    for mode, results in runs.items():
        cpu = statistics.median(r["cpu_seconds"] for r in results)
        wall = statistics.median(r["seconds"] for r in results)
        medians[mode] = cpu
        runs_text = ", ".join(f"{r['cpu_seconds']:.2f}" for r in results)
        print(f"| {mode} | {cpu:.2f} ({runs_text}) | "
              f"{cpu / results[0]['exchanges'] * 1e6:.0f} | {wall:.2f} |")
    print()
    for slow in ("one_at_a_time", "baseline queued"):
        if slow in runs:
            per_run = [a["cpu_seconds"] / b["cpu_seconds"]
                       for a, b in zip(runs[slow], runs["queued"], strict=True)]
            print(f"CPU {slow} / queued: {medians[slow] / medians['queued']:.2f} x "
                  f"(per run: {', '.join(f'{r:.2f}' for r in per_run)})")


if __name__ == "__main__":
    main()
