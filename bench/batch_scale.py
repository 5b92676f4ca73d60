"""Batch detection at scale: DuckDB vs Spark local mode, and how each grows with the trace.

For each size N (ascending) the first N lines of one large simulated trace (time-ordered,
so a prefix is the trace's first days, every account in the accounts file) go through
``distillguard detect`` (DuckDB) and ``distillguard spark detect --master local[K]``,
alternately, each in its own process (start-up included: a JVM for Spark), --runs times.
With --together the two engines of one size run at the same time (each then has about
one of two cores; used for the 10M point, where one after the other did not fit the time
available). Reported per size: median seconds and exchanges/s of each engine, the ratio
Spark/DuckDB, each engine's time relative to the smallest size (the curve: linear growth
gives N/N0), and whether the two verdicts files are identical. Rows are appended to
--results as they finish (JSON Lines), so a run cut short keeps its points; --plot draws
the curve from that file.

    distillguard simulate --out /work/bench-data/large-10m --preset large --scale 1.3 --days 22 \\
        --workers 2 --quiet    # 10,384,801 exchanges (the preset's 14 days give 6.6M)
    python -m bench.batch_scale --trace /work/bench-data/large-10m/trace.jsonl \\
        --accounts /work/bench-data/large-10m/accounts.jsonl \\
        --sizes 1000000,2000000,5000000,10000000 --plot docs/images/batch_scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ENGINES = ("duck", "spark")


def prefix(trace: Path, n: int, work: Path) -> Path:
    """The first n lines of the trace (made once, reused)."""
    out = work / f"prefix-{n}.jsonl"
    if out.exists():
        return out
    tmp = out.with_suffix(".part")
    written = 0
    with trace.open("rb") as src, tmp.open("wb") as dst:
        for line in src:
            if written == n:
                break
            if not line.endswith(b"\n"):    # a trace still being written: cut line
                break
            dst.write(line)
            written += 1
    if written < n:
        tmp.unlink()
        raise SystemExit(f"{trace} has only {written} complete lines, {n} asked")
    tmp.rename(out)
    return out


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONHASHSEED": "0"}   # the same string hashing in both engines
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return elapsed


def same_verdicts(a: Path, b: Path) -> bool:
    """Every account and campaign verdict and the detector summary identical. (Both engines
    run with PYTHONHASHSEED=0: campaign numbering and the order of equally ranked evidence
    follow Python's string hashing, which otherwise differs between processes.)"""
    x, y = json.loads(a.read_bytes()), json.loads(b.read_bytes())
    return bool(x["accounts"] == y["accounts"] and x["campaigns"] == y["campaigns"]
                and x["detector"] == y["detector"])


def timed_together(cmds: list[list[str]], logs: list[Path]) -> list[float]:
    """Start every command at once (standard error of each to its log file); each one's
    seconds from the common start to its end."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    began = time.perf_counter()
    handles = [log.open("w") for log in logs]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, env=env)
             for cmd, fh in zip(cmds, handles, strict=True)]
    ended: dict[int, float] = {}
    while len(ended) < len(procs):
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.perf_counter() - began
        time.sleep(0.5)
    for fh in handles:
        fh.close()
    for cmd, proc, log in zip(cmds, procs, logs, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-2000:]}")
    return [ended[i] for i in range(len(procs))]


def measure(trace: Path, accounts: Path, work: Path, n: int, runs: int, master: str,
            extra: list[str], together: bool = False,
            engines: tuple[str, ...] = ENGINES) -> dict[str, Any]:
    cli = [sys.executable, "-m", "distillguard.cli"]
    duck_out, spark_out = work / f"duck-{n}.json", work / f"spark-{n}.json"
    common = ["--trace", str(trace), "--accounts", str(accounts), *extra]
    cmds = {
        "duck": [*cli, "detect", *common, "--out", str(duck_out),
                 "--progress-log", str(work / f"duck-{n}.progress.jsonl")],
        "spark": [*cli, "spark", "detect", *common, "--out", str(spark_out), "--master", master,
                  "--conf", "spark.ui.enabled=false",
                  "--progress-log", str(work / f"spark-{n}.progress.jsonl")],
    }
    times: dict[str, list[float]] = {e: [] for e in engines}
    for i in range(runs):
        if together:
            ended = timed_together([cmds[e] for e in engines],
                                   [work / f"{e}-{n}.stderr" for e in engines])
            for e, secs in zip(engines, ended, strict=True):
                times[e].append(secs)
            continue
        for e in engines if i % 2 == 0 else engines[::-1]:
            times[e].append(timed(cmds[e]))
    row: dict[str, Any] = {"exchanges": n, "runs": runs, "master": master}
    for e, name in (("duck", "duckdb"), ("spark", "spark")):
        if e in times:
            secs = statistics.median(times[e])
            row[f"{name}_s"] = round(secs, 1)
            row[f"{name}_per_s"] = round(n / secs)
    if len(engines) == 2:
        row["spark_over_duckdb"] = round(row["spark_s"] / row["duckdb_s"], 2)
        row["same_verdicts"] = same_verdicts(duck_out, spark_out)
    row["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return row


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["exchanges"])
    unit, div = ("millions", 1e6) if rows[-1]["exchanges"] >= 1e6 else ("thousands", 1e3)
    xs = [r["exchanges"] / div for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, mark, label in (("duckdb_s", "o-", "DuckDB (one process)"),
                             ("spark_s", "s-", f"Spark local mode ({rows[0]['master']})")):
        points = [(x, r[key]) for x, r in zip(xs, rows, strict=True) if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), mark, label=label)
    ax.set_xlabel(f"exchanges ({unit}, prefixes of one simulated trace)")
    ax.set_ylabel(f"batch detection time, s (median of {rows[0]['runs']})")
    ax.set_title("Batch detection time vs trace size (shared 2-core machine)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def plot_progress(work: Path, sizes: dict[str, int], out: Path) -> None:
    """Within one run per engine (``sizes``: engine -> exchanges of its run): seconds and
    resident memory against exchanges processed so far (each engine's --progress-log),
    i.e. how the cost of one exchange moves as the detector's state grows over the
    trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for engine, label, mark in (("duck", "DuckDB", "-"), ("spark", "Spark local mode", "--")):
        if engine not in sizes:
            continue
        log = work / f"{engine}-{sizes[engine]}.progress.jsonl"
        points = [json.loads(x) for x in log.read_text().splitlines()
                  if x.strip()] if log.exists() else []
        if not points:
            continue
        label = f"{label}, run on {sizes[engine]:,}"
        xs = [p["exchanges"] / 1e6 for p in points]
        left.plot(xs, [p["seconds"] for p in points], mark, label=label)
        where = "driver" if engine == "spark" else "process"
        right.plot(xs, [p["rss_mb"] for p in points], mark, label=f"{label} ({where})")
    left.set_xlabel("exchanges processed (millions)")
    left.set_ylabel("seconds since the start")
    right.set_xlabel("exchanges processed (millions)")
    right.set_ylabel("resident memory, MB")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Within one batch detection run per engine")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def table(rows: list[dict[str, Any]]) -> str:
    """One line per run (a row may hold one engine only: ``--engines``); each engine's
    time relative to its own smallest measured size."""
    rows = sorted(rows, key=lambda r: r["exchanges"])
    base = {k: next((r for r in rows if k in r), None) for k in ("duckdb_s", "spark_s")}

    def cell(r: dict[str, Any], key: str) -> tuple[str, str]:
        b = base[key]
        if key not in r or b is None:
            return "-", "-"
        return str(r[key]), f"{r[key] / b[key]:.2f} (size {r['exchanges'] / b['exchanges']:.0f} x)"

    lines = ["| exchanges | DuckDB s | Spark s | Spark / DuckDB | DuckDB vs its smallest | "
             "Spark vs its smallest | same verdicts |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        (d, d_rel), (sp, s_rel) = cell(r, "duckdb_s"), cell(r, "spark_s")
        same = "-" if "same_verdicts" not in r else "yes" if r["same_verdicts"] else "NO"
        lines.append(f"| {r['exchanges']:,} | {d} | {sp} | {r.get('spark_over_duckdb', '-')} | "
                     f"{d_rel} | {s_rel} | {same} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path)
    ap.add_argument("--accounts", type=Path)
    ap.add_argument("--sizes", default="1000000,2000000,5000000,10000000")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--calibration", help="passed to both engines (default: shipped)")
    ap.add_argument("--work", type=Path, default=Path("/work/bench-data/batch-scale"))
    ap.add_argument("--results", type=Path, help="JSON Lines of rows (default: WORK/rows)")
    ap.add_argument("--plot", type=Path, help="PNG of the curve")
    ap.add_argument("--plot-only", action="store_true", help="only table + plot from results")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="which engines to run: duck, spark or both (default)")
    ap.add_argument("--together", action="store_true",
                    help="run the two engines at the same time (they then share the cores)")
    ap.add_argument("--progress-sizes",
                    help="runs the progress plot shows, e.g. duck=10000000,spark=5000000")
    ap.add_argument("--progress-plot", type=Path,
                    help="PNG of time and memory within the runs on the largest size")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.results or args.work / "rows.jsonl"
    if not args.plot_only:
        if args.trace is None or args.accounts is None:
            ap.error("--trace and --accounts are required")
        extra = ["--calibration", args.calibration] if args.calibration else []
        engines = tuple(e for e in ENGINES if e in args.engines.split(","))
        if not engines:
            ap.error(f"--engines: choose from {', '.join(ENGINES)}")
        for n in sorted(int(s) for s in args.sizes.split(",")):
            part = prefix(args.trace, n, args.work)
            row = measure(part, args.accounts, args.work, n, args.runs, args.master, extra,
                          together=args.together, engines=engines)
            row["together"] = args.together
            print(json.dumps(row), flush=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    for row in rows:    # re-check from the verdicts files kept in WORK
        duck, spark = (args.work / f"{e}-{row['exchanges']}.json" for e in ("duck", "spark"))
        if duck.exists() and spark.exists():
            row["same_verdicts"] = same_verdicts(duck, spark)
    if rows:
        print(table(rows))
        if args.plot:
            plot(rows, args.plot)
        if args.progress_plot:
            largest = max(r["exchanges"] for r in rows)
            sizes = {"duck": largest, "spark": largest}
            for part in filter(None, (args.progress_sizes or "").split(",")):
                engine, _, n = part.partition("=")
                sizes[engine] = int(n)
            plot_progress(args.work, sizes, args.progress_plot)


if __name__ == "__main__":
    main()
