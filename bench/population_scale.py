"""Detector memory and pace as the population grows: one simulated day of the ``large``
preset at several ``--scale`` values (accounts and campaigns multiplied, each account
behaving as before), each detected in a child process.

The child runs :func:`distillguard.detect.batch.run_batch` (what ``distillguard detect``
runs, reader process included) and reports the detector's counts
(:meth:`~distillguard.detect.engine.Detector.stats`), among them ``costart_pairs``: the
pairs of accounts whose co-started sessions it counts. The parent samples the RSS of the
child and its reader every 0.2 s with psutil. Reported per scale: accounts, exchanges,
co-start pairs, peak RSS of the two processes together, CPU seconds of both per
exchange and wall exchanges/s; then each as a ratio to the smallest scale. Linear growth
gives the scale's ratio; pairs that grow with the square of the active accounts give its
square.

    python -m bench.population_scale --scales 1,2,4 --days 1 --seed 5 --work /tmp/popscale
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


def child(trace: str, accounts: str) -> None:
    """In the child: detect over the trace and print what the detector holds, as JSON."""
    from distillguard.detect.batch import run_batch
    from distillguard.detect.calibration import Calibration

    result, detector = run_batch(trace, Calibration.read(), accounts=accounts,
                                 memory_limit="2GB")
    print(json.dumps({**detector.stats(), "exchanges": result.exchanges,
                      "flagged": sum(v.flagged for v in result.verdicts.accounts)}))


def measure(trace: Path, accounts: Path) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.population_scale", "--child",
                             str(trace), str(accounts)], stdout=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak, cpu = 0, {}
    while proc.poll() is None:
        # one walk of the process tree per sample: each process's RSS and CPU time
        tree: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            tree = [watched, *watched.children(recursive=True)]
        rss = 0
        for p in tree:
            with contextlib.suppress(psutil.Error), p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
        peak = max(peak, rss)
        time.sleep(0.2)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"the detection child failed ({proc.returncode})")
    wall = time.perf_counter() - started
    stats = json.loads(out.strip().splitlines()[-1])
    return {**stats, "peak_rss_mb": peak / 2**20, "wall_s": wall,
            "cpu_us_per_exchange": 1e6 * sum(cpu.values()) / stats["exchanges"],
            "exchanges_per_s": stats["exchanges"] / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--days", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/population-scale"))
    ap.add_argument("--child", nargs=2, metavar=("TRACE", "ACCOUNTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        out = args.work / f"scale-{scale:g}"
        if not (out / "trace.jsonl").exists():
            subprocess.run(["distillguard", "simulate", "--out", str(out), "--preset", "large",
                            "--days", str(args.days), "--scale", str(scale),
                            "--seed", str(args.seed), "--quiet"], check=True)
        row = {"scale": scale, **measure(out / "trace.jsonl", out / "accounts.jsonl")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\n{'scale':>6} {'accounts':>9} {'exchanges':>10} {'pairs':>10} {'RSS MB':>8} "
          f"{'CPU us/ex':>10} {'ex/s':>7} | ratios to scale {base['scale']:g}: accounts, "
          "pairs, RSS, CPU per exchange")
    for r in rows:
        print(f"{r['scale']:>6g} {r['accounts']:>9,} {r['exchanges']:>10,} "
              f"{r['costart_pairs']:>10,} {r['peak_rss_mb']:>8.0f} "
              f"{r['cpu_us_per_exchange']:>10.0f} {r['exchanges_per_s']:>7,.0f} | "
              f"{r['accounts'] / base['accounts']:.2f} "
              f"{r['costart_pairs'] / base['costart_pairs']:.2f} "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} "
              f"{r['cpu_us_per_exchange'] / base['cpu_us_per_exchange']:.2f}")


if __name__ == "__main__":
    main()
