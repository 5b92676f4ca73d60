"""Soak test: several gateway replicas under a steady request rate for a fixed time.

Starts a demo upstream and N ``distillguard serve`` replicas as separate processes (state
in PostgreSQL and counters in Redis by default, or SQLite + in-process counters with
``--single``), sends chat completions round-robin at a fixed rate from an asyncio client
scheduled on a clock (loopback only; every ``--stream-every``-th request streams), and every
interval records: resident memory of every process (the load client included), requests
sent, errors, and latency percentiles. Writes ``soak.csv``, ``soak.png``
and ``soak.md`` into the output folder. With ``--follower`` the replicas run
``detect.runs_in: follower`` and one ``detect follow`` process detects over all of them
(its memory tracked too); at the end the soak waits for it to catch up and reports how
many of the answered exchanges it took.

    python bench/soak.py --minutes 30 --rate 200 --out bench/results/soak

The run is bounded: it stops after ``--minutes`` and terminates every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import yaml

from bench.proxy_bench import wait_http
from distillguard.serve import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Window:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


def start_processes(args: argparse.Namespace, workdir: Path,
                    procs: list[subprocess.Popen[bytes]]) -> tuple[list[str], str]:
    up_port = free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "distillguard.cli", "demo-upstream", "--port", str(up_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_http(f"http://127.0.0.1:{up_port}/v1/models", timeout=60)
    admin_token = "adm-soak-" + uuid.uuid4().hex
    replicas = 1 if args.single else args.replicas
    db_name = None
    if not args.single:
        db_name = args.db_name
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc",
                        f'CREATE DATABASE "{db_name}"'], check=True)
    urls = []
    config_path = workdir / "replica-0.yaml"
    for i in range(replicas):
        port, admin_port = free_port(), free_port()
        cfg = {
            "server": {"port": port, "admin_port": admin_port, "replica_id": f"r{i}"},
            "admin": {"token": admin_token},
            "upstream": {"base_url": f"http://127.0.0.1:{up_port}/v1"},
            "limits": {"tiers": {"standard": {"requests_per_minute": 10_000_000,
                                              "tokens_per_minute": None,
                                              "tokens_per_day": None}}},
            "ledger": {"path": str(workdir / f"ledger-{i}")},
        }
        if args.single:
            cfg["state"] = {"url": f"sqlite:///{workdir / 'state.sqlite'}"}
        else:
            cfg["state"] = {"url": f"postgresql://postgres@127.0.0.1:5432/{db_name}"}
            cfg["counters"] = {"backend": "redis", "prefix": "soak-" + uuid.uuid4().hex[:6]}
        if args.follower:
            cfg["detect"] = {"runs_in": "follower", "stream": {
                "url": "redis://127.0.0.1:6379/0", "name": args.stream_name}}
        path = workdir / f"replica-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if i == 0:
            config_path = path
            subprocess.run([sys.executable, "-m", "distillguard.cli", "-c", str(path),
                            "migrate"], check=True, stdout=subprocess.DEVNULL)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distillguard.cli", "-c", str(path), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / f"replica-{i}.log", "wb")))  # noqa: SIM115 - lives with the process
        urls.append(f"http://127.0.0.1:{port}/v1")
    for url in urls:
        wait_http(url.removesuffix("/v1") + "/ready", timeout=60)
    args.names = ["upstream", *(f"replica{i}" for i in range(replicas))]
    if args.follower:
        args.follower_port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distillguard.cli", "-c", str(config_path), "detect",
             "follow", "--metrics-port", str(args.follower_port)],
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / "follower.log", "wb")))  # noqa: SIM115 - lives with the process
        args.names.append("follower")
        wait_http(f"http://127.0.0.1:{args.follower_port}/metrics", timeout=60)
    out = subprocess.run([sys.executable, "-m", "distillguard.cli", "-c", str(config_path),
                          "accounts", "create", "soak"], capture_output=True, check=True)
    del out
    created = subprocess.run([sys.executable, "-m", "distillguard.cli", "-c",
                              str(config_path), "keys", "create", "soak"],
                             capture_output=True, check=True, text=True)
    key = yaml.safe_load(created.stdout.splitlines()[0])["key"]
    return urls, key


async def load(urls: list[str], key: str, rate: float, seconds: float, interval: float,
               procs: list[subprocess.Popen[bytes]], rows: list[dict[str, float]],
               stream_every: int = 5, error_kinds: dict[str, int] | None = None,
               names: list[str] | None = None) -> None:
    error_kinds = {} if error_kinds is None else error_kinds
    body = {"model": "demo-chat-1", "max_tokens": 64,
            "messages": [{"role": "user", "content": "Summarise the plot of Hamlet."}]}
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {key}"}
    window = Window()
    ps = [psutil.Process(p.pid) for p in procs] + [psutil.Process()]
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=30)  # a request slower than this counts as an error
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(url: str, stream: bool) -> None:
            start = time.perf_counter()
            try:
                async with session.post(url + "/chat/completions",
                                        json=stream_body if stream else body,
                                        headers=headers) as r:
                    data = await r.read()
                    kind = "" if r.status == 200 else f"http_{r.status}"
                    if not kind and stream and not data.endswith(b"data: [DONE]\n\n"):
                        kind = "stream_error"
            except (aiohttp.ClientError, TimeoutError) as exc:
                kind = exc.__class__.__name__
            window.latencies.append((time.perf_counter() - start) * 1000)
            if not kind:
                window.ok += 1
            else:
                window.errors += 1
                error_kinds[kind] = error_kinds.get(kind, 0) + 1

        t0 = time.perf_counter()
        next_report = t0 + interval
        n = 0
        while True:
            now = time.perf_counter()
            if now - t0 >= seconds:
                break
            due = t0 + n / rate
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(
                one(urls[n % len(urls)], stream_every > 0 and n % stream_every == 0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            window.sent += 1
            n += 1
            if time.perf_counter() >= next_report:
                rows.append(snapshot(time.perf_counter() - t0, window, ps, names))
                print(format_row(rows[-1]), flush=True)
                window = Window()
                next_report += interval
        await asyncio.gather(*tasks)
        rows.append(snapshot(time.perf_counter() - t0, window, ps, names))


def follower_metrics(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {x.name: x.value for f in text_string_to_metric_families(text) for x in f.samples
            if not x.labels}


def follower_caught_up(port: int, wait_s: float = 60.0) -> dict[str, float]:
    """The follower's counts once it has taken everything the replicas added (its stream
    lag 0 and its exchange count steady for two seconds), and how long that took after
    the load stopped."""
    began = time.perf_counter()
    last = follower_metrics(port)
    while time.perf_counter() - began < wait_s:
        time.sleep(2.0)
        now = follower_metrics(port)
        if (now["distillguard_detector_exchanges_total"]
                == last["distillguard_detector_exchanges_total"]
                and now["distillguard_detector_stream_lag_seconds"] == 0):
            break
        last = now
    return {**now, "seconds_after_load": time.perf_counter() - began}


def snapshot(elapsed: float, w: Window, ps: list[psutil.Process],
             names: list[str] | None = None) -> dict[str, float]:
    lat = sorted(w.latencies) or [0.0]
    row: dict[str, float] = {
        "elapsed_s": round(elapsed, 1), "sent": w.sent, "ok": w.ok, "errors": w.errors,
        "loadavg_1m": os.getloadavg()[0],
        "error_rate": (w.errors / max(1, w.ok + w.errors)),
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }
    for i, p in enumerate(ps):
        name = ("client" if i == len(ps) - 1 else names[i] if names
                else "upstream" if i == 0 else f"replica{i - 1}")
        try:
            row[f"rss_mb_{name}"] = p.memory_info().rss / 2**20
        except psutil.Error:
            row[f"rss_mb_{name}"] = float("nan")
    return row


def format_row(row: dict[str, float]) -> str:
    mem = " ".join(f"{k[7:]}={v:.0f}MB" for k, v in row.items() if k.startswith("rss_mb_"))
    return (f"t={row['elapsed_s']:>7.0f}s sent={row['sent']:.0f} errors={row['errors']:.0f} "
            f"p50={row['p50_ms']:.1f}ms p99={row['p99_ms']:.1f}ms {mem}")


def write_outputs(rows: list[dict[str, float]], out: Path, args: argparse.Namespace,
                  error_kinds: dict[str, int] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "soak.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    t = [r["elapsed_s"] / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for key in rows[0]:
        if key.startswith("rss_mb_"):
            axes[0].plot(t, [r[key] for r in rows], label=key[7:])
    axes[0].set_ylabel("RSS (MB)")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[1].plot(t, [r["p50_ms"] for r in rows], label="p50")
    axes[1].plot(t, [r["p99_ms"] for r in rows], label="p99")
    axes[1].set_ylabel("latency (ms, log scale)")
    axes[1].set_yscale("log")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].plot(t, [100 * r["error_rate"] for r in rows], label="errors (%)")
    if "loadavg_1m" in rows[0]:  # the machine's load: other work competing for the CPUs
        axes[2].plot(t, [r["loadavg_1m"] for r in rows], label="load average (1 min)")
    axes[2].set_ylabel("errors (%)")
    axes[2].legend(loc="upper left", fontsize=8)
    axes[2].set_xlabel("minutes")
    fig.suptitle(f"soak: {args.rate:.0f} req/s for {args.minutes:g} min, "
                 f"{'1 replica (SQLite)' if args.single else f'{args.replicas} replicas (PostgreSQL + Redis)'}")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=100)
    import numpy as np

    # Memory after warm-up (the first third of the run: caches, pools and the allocator
    # fill up) against the end, and the fitted growth over the rest of the run.
    elapsed = np.array([r["elapsed_s"] for r in rows])
    settled = elapsed >= elapsed[-1] / 3

    def at(values: np.ndarray, seconds: float) -> float:
        return float(values[int(np.argmin(abs(elapsed - seconds)))])

    lines = ["| process | RSS at 1 min (MB) | after warm-up (MB) | at the end (MB) | "
             "growth after warm-up (MB/hour) |", "|---|---|---|---|---|"]
    for key in rows[0]:
        if key.startswith("rss_mb_"):
            values = np.array([r[key] for r in rows])
            slope = (float(np.polyfit(elapsed[settled] / 3600, values[settled], 1)[0])
                     if settled.sum() > 2 else float("nan"))
            lines.append(f"| {key[7:]} | {at(values, 60):.1f} | "
                         f"{at(values, elapsed[-1] / 3):.1f} | {values[-1]:.1f} | "
                         f"{slope:+.2f} |")
    total_sent = sum(r["sent"] for r in rows)
    total_err = sum(r["errors"] for r in rows)
    lines += ["", f"requests: {total_sent:.0f}, errors: {total_err:.0f} "
                  f"({100 * total_err / max(1, total_sent):.3f}%), "
                  f"median of per-interval p50: {statistics.median(r['p50_ms'] for r in rows):.1f} ms, "
                  f"median of per-interval p99: {statistics.median(r['p99_ms'] for r in rows):.1f} ms"]
    if error_kinds:
        lines.append("errors by kind: " + ", ".join(f"{k}: {v}" for k, v in
                                                     sorted(error_kinds.items())))
    caught = getattr(args, "follower_caught_up", None)
    if caught:
        total_ok = sum(r["ok"] for r in rows)
        lines.append(
            f"follower: {caught['distillguard_detector_exchanges_total']:.0f} exchanges "
            f"detected of {total_ok:.0f} answered, "
            f"{caught['distillguard_detector_evaluations_total']:.0f} evaluations, "
            f"{caught['distillguard_detector_stream_bad_entries_total']:.0f} bad entries; "
            f"caught up {caught['seconds_after_load']:.0f} s after the load stopped")
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--single", action="store_true",
                        help="one replica on SQLite and in-process counters")
    parser.add_argument("--interval", type=float, default=10, help="seconds per sample")
    parser.add_argument("--stream-every", type=int, default=5,
                        help="every n-th request streams (0: none)")
    parser.add_argument("--follower", action="store_true",
                        help="detection by one 'detect follow' process fed by every replica "
                             "through a Redis stream (detect.runs_in: follower)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/soak")
    parser.add_argument("--from-csv", type=Path,
                        help="only redraw the plot and summary from an earlier soak.csv")
    args = parser.parse_args()
    if args.from_csv:
        with open(args.from_csv, newline="") as fh:
            old_rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
        write_outputs(old_rows, args.out, args)
        return
    args.db_name = "dgsoak_" + uuid.uuid4().hex[:8]
    args.stream_name = f"dgsoak-{uuid.uuid4().hex[:8]}:features"
    if args.follower and args.single:
        parser.error("--follower needs the replicas' Redis (not --single)")
    workdir = Path(tempfile.mkdtemp(prefix="dgsoak-"))
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, float]] = []
    error_kinds: dict[str, int] = {}
    try:
        urls, key = start_processes(args, workdir, procs)
        asyncio.run(load(urls, key, args.rate, args.minutes * 60, args.interval, procs, rows,
                         args.stream_every, error_kinds, args.names))
        if args.follower:
            args.follower_caught_up = follower_caught_up(args.follower_port)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if rows:
            write_outputs(rows, args.out, args, error_kinds)
            args.out.mkdir(parents=True, exist_ok=True)
            for log in [*workdir.glob("replica-*.log"), *workdir.glob("follower.log")]:
                shutil.copy(log, args.out / log.name)    # kept: warnings behind any error
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.single:
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres",
                            "-qc", f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)'],
                           check=False, stdout=subprocess.DEVNULL)
        if args.follower:
            subprocess.run(["redis-cli", "-h", "127.0.0.1", "DEL", args.stream_name],
                           check=False, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
