"""Simulator throughput and memory: does memory stay flat as the trace grows?

Runs ``distillguard simulate --preset large`` in a child process, twice per round,
alternating: a short run (``--days`` D) and a long run (4 x D days) with the same actors,
so the long run writes about four times the exchanges. The child's RSS is sampled every
0.2 s with psutil. Reported per run: exchanges, exchanges/s (start-up included), peak RSS and RSS at
25/50/75 % of the run; the steady-state rate (the long run's extra exchanges over its extra
seconds, which cancels start-up: loading the data sets and the geo-IP database); and the
ratios long/short of exchanges and peak RSS (flat memory: RSS ratio near 1 while exchanges
grow 4x). With ``--workers W`` each round also runs the long span with W processes
(``simulate --workers``) and reports the speed-up. Medians over --rounds.

    python -m bench.simulate_scale --scale 0.1 --days 1 --rounds 2 --workers 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil


def one_run(scale: float, days: float, out: Path, workers: int = 1) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "distillguard.cli", "simulate", "--out", str(out),
           "--preset", "large", "--scale", str(scale), "--days", str(days), "--quiet",
           "--workers", str(workers)]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    child = psutil.Process(proc.pid)
    samples: list[tuple[float, int]] = []
    while proc.poll() is None:
        try:
            rss = child.memory_info().rss + sum(
                c.memory_info().rss for c in child.children(recursive=True))
            samples.append((time.perf_counter() - began, rss))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    _, err = proc.communicate()
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"simulate failed: {err}")
    match = re.search(r"wrote (\d+) exchanges", err)
    exchanges = int(match.group(1)) if match else 0
    size = (out / "trace.jsonl").stat().st_size
    shutil.rmtree(out, ignore_errors=True)

    def rss_at(frac: float) -> float:
        target = frac * elapsed
        return min(samples, key=lambda s: abs(s[0] - target))[1] / 2**20 if samples else 0.0

    return {"days": days, "exchanges": exchanges, "seconds": elapsed,
            "exchanges_per_s": exchanges / elapsed, "trace_mb": size / 2**20,
            "rss_peak_mb": max(s[1] for s in samples) / 2**20 if samples else 0.0,
            "rss_25_50_75_mb": [round(rss_at(f), 1) for f in (0.25, 0.5, 0.75)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--days", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0,
                        help="Also run the long span with this many worker processes.")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dgsim-"))
    short: list[dict[str, Any]] = []
    long: list[dict[str, Any]] = []
    par: list[dict[str, Any]] = []
    for r in range(args.rounds):
        short.append(one_run(args.scale, args.days, tmp / f"s{r}"))
        long.append(one_run(args.scale, args.days * 4, tmp / f"l{r}"))
        print(f"round {r + 1}: short {short[-1]}\n         long  {long[-1]}", flush=True)
        if args.workers > 1:
            par.append(one_run(args.scale, args.days * 4, tmp / f"p{r}", args.workers))
            print(f"         long, {args.workers} workers {par[-1]}", flush=True)

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(row[key] for row in rows))

    print("\n| run | days | exchanges | exchanges/s | trace MB | peak RSS MB | RSS at 25/50/75 % |")
    print("|---|---|---|---|---|---|---|")
    runs = [("short", short), ("long", long)]
    if par:
        runs.append((f"long, {args.workers} workers", par))
    for name, rows in runs:
        last = rows[-1]
        print(f"| {name} | {last['days']:g} | {med(rows, 'exchanges'):,.0f} | "
              f"{med(rows, 'exchanges_per_s'):,.0f} | {med(rows, 'trace_mb'):,.0f} | "
              f"{med(rows, 'rss_peak_mb'):.0f} | {last['rss_25_50_75_mb']} |")
    marginal = (med(long, "exchanges") - med(short, "exchanges")) / max(
        1e-9, med(long, "seconds") - med(short, "seconds"))
    print(f"\nsteady-state generation (extra exchanges / extra seconds of the long run): "
          f"{marginal:,.0f} exchanges/s; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"long/short: exchanges x{med(long, 'exchanges') / med(short, 'exchanges'):.2f}, "
          f"peak RSS x{med(long, 'rss_peak_mb') / med(short, 'rss_peak_mb'):.2f}, "
          f"exchanges/s x{med(long, 'exchanges_per_s') / med(short, 'exchanges_per_s'):.2f}")
    if par:
        print(f"{args.workers} workers / 1 (long span): exchanges/s "
              f"x{med(par, 'exchanges_per_s') / med(long, 'exchanges_per_s'):.2f}, "
              f"peak RSS (all processes) x{med(par, 'rss_peak_mb') / med(long, 'rss_peak_mb'):.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
