"""Dashboard page times on a large exchange index, side by side with the naive queries.

Builds a state database with ``--rows`` indexed exchanges (default 1,000,000) over 30 days,
20,000 accounts, one heavy account (20,000 exchanges) and a 200-account campaign, starts
the gateway on it, logs in to the dashboard and times each page over HTTP (median of
``--repeat``). It also times, on the same database and in the same run, what the pages
would cost without the dashboard's read model:

* overview: per-minute roll-ups  vs  GROUP BY over the raw exchange rows of the window
* account exchanges, page 200:  keyset (ts, id)  vs  LIMIT/OFFSET

and, with ``--small`` rows (default 10,000), the same pages on a small database, so the
report shows how page time grows with the ledger.

    python bench/dashboard_pages.py --rows 1000000 --out bench/results/dashboard
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillguard.dashboard.index import (  # noqa: E402
    _UPSERTS,
    COLUMNS,
    SCHEMA,
    _account_rows,
    _minute_rows,
)
from distillguard.exchange import format_ts  # noqa: E402
from distillguard.verdicts import CampaignVerdict, Verdicts  # noqa: E402

TOKEN = "bench-admin-token-0123456789"
T0 = datetime(2026, 2, 1, tzinfo=UTC)
CAPS = ["code", "math", "chat", "writing", "reasoning", "summarise"]


def build(db: Path, rows: int, seed: int = 7) -> None:
    """Fill the state store's tables and the dashboard's index directly (bulk)."""
    from distillguard.store import open_state_store

    store = open_state_store(f"sqlite:///{db}")
    asyncio.run(store.migrate())
    asyncio.run(store.close())
    rng = random.Random(seed)
    eng = create_engine(f"sqlite:///{db}")
    n_accounts = 20_000
    with eng.begin() as conn:
        for statement in SCHEMA:
            conn.execute(text(statement))
        conn.execute(text(
            "INSERT INTO accounts (account_id, created_at, org, payment_fingerprint, tier,"
            " status) VALUES (:a, :c, :o, :p, 'standard', 'active')"),
            [{"a": f"acct_{i:05d}", "c": format_ts(T0 - timedelta(days=i % 90)),
              "o": f"Org {i % 3000}", "p": "pf_camp" if i < 200 else f"pf_{i}"}
             for i in range(n_accounts)])
    cols = ", ".join(COLUMNS)
    params = ", ".join(":" + c for c in COLUMNS)
    minutes: dict[str, dict[str, Any]] = {}
    span_s = 30 * 86400
    with eng.begin() as conn, tqdm(total=rows, desc="index rows", unit="row") as bar:
        for start in range(0, rows, 50_000):
            batch = []
            for i in range(start, min(rows, start + 50_000)):
                if i % 50 == 0:
                    account = "acct_19999"  # the heavy account
                elif i % 5 == 0:
                    account = f"acct_{rng.randrange(200):05d}"  # the campaign
                else:
                    account = f"acct_{rng.randrange(n_accounts):05d}"
                ts = T0 + timedelta(seconds=span_s * i / rows + rng.random())
                status = 429 if rng.random() < 0.03 else 403 if rng.random() < 0.01 else 200
                batch.append({
                    "exchange_id": f"ex_{i:016x}", "ts": format_ts(ts), "account_id": account,
                    "key_id": f"key_{account[5:]}", "status": status,
                    "client_ip": f"198.51.{int(account[5:]) % 250}.{rng.randrange(250)}",
                    "model": "demo-chat-1", "endpoint": "/v1/chat/completions",
                    "capability": rng.choice(CAPS), "prompt_tokens": rng.randrange(10, 400),
                    "completion_tokens": rng.randrange(10, 900), "latency_ms": 500.0,
                    "error_code": None, "denied_by": None})
            conn.execute(text(f"INSERT INTO dashboard_exchanges ({cols}) VALUES ({params})"),
                         batch)
            for name, values in _account_rows(batch).items():
                conn.execute(text(_UPSERTS[name]), values)
            for m in _minute_rows(batch):
                cur = minutes.setdefault(m["minute"], dict.fromkeys(m, 0) | {"minute": m["minute"]})
                for k, v in m.items():
                    if k != "minute":
                        cur[k] += v
            bar.update(len(batch))
        conn.execute(text(
            "INSERT INTO dashboard_minutes (minute, total, ok, denied, limited, errors, tokens)"
            " VALUES (:minute, :total, :ok, :denied, :limited, :errors, :tokens)"),
            list(minutes.values()))
    eng.dispose()


def _login(client: httpx.Client) -> None:
    form = client.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    r = client.post("/login", data={"token": TOKEN, "login_token": token,
                                    "next": "/dashboard/"})
    client.headers["cookie"] = "dg_session=" + r.cookies["dg_session"]


def time_pages(db: Path, verdicts: Path, repeat: int) -> dict[str, float]:
    from distillguard.config import load_settings
    from distillguard.serve import Stack, StackThread

    settings = load_settings(overrides={
        "server": {"port": 0, "admin_port": 0}, "admin": {"token": TOKEN},
        "state": {"url": f"sqlite:///{db}"},
        "dashboard": {"verdicts_path": str(verdicts)}}, environ={})
    stack = StackThread(Stack(settings)).start()
    pages = {"overview 24h": "/?range=24h", "overview 30d": "/?range=30d",
             "campaign (200 accounts), 7d timeline": "/campaigns/c-bench",
             "campaign (200 accounts), 30d timeline": "/campaigns/c-bench?range=30d",
             "account search by IP prefix": "/accounts?q=198.51.7.",
             "heavy account, first page": "/accounts/acct_19999",
             "exchange": "/exchanges/ex_0000000000000064"}
    out: dict[str, float] = {}
    try:
        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard", timeout=120) as c:
            _login(c)
            for name, path in pages.items():
                c.get(path).raise_for_status()  # warm
                samples = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    c.get(path).raise_for_status()
                    samples.append((time.perf_counter() - t) * 1000)
                out[name] = statistics.median(samples)
    finally:
        stack.stop()
    return out


def time_sql(db: Path, repeat: int) -> dict[str, float]:
    eng = create_engine(f"sqlite:///{db}")
    lo = format_ts(T0 + timedelta(days=29))[:16]
    with eng.connect() as conn:
        heavy = conn.execute(text("SELECT COUNT(*) FROM dashboard_exchanges"
                                  " WHERE account_id = 'acct_19999'")).scalar_one()
    offset = max(1, min(9950, heavy - 50))  # page 200, or the last page of a small account
    last = "SELECT ts, exchange_id FROM dashboard_exchanges WHERE account_id = 'acct_19999'" \
           f" ORDER BY ts DESC, exchange_id DESC LIMIT 1 OFFSET {offset - 1}"
    queries = {
        "overview 24h, roll-ups": ("SELECT minute, SUM(total) FROM dashboard_minutes"
                                   f" WHERE minute >= '{lo}' GROUP BY minute", {}),
        "overview 24h, raw rows": ("SELECT substr(ts, 1, 16), COUNT(*), SUM(CASE WHEN status"
                                   " = 429 THEN 1 ELSE 0 END) FROM dashboard_exchanges"
                                   f" WHERE ts >= '{lo}' GROUP BY 1", {}),
        "page 200 of an account, keyset": (
            "SELECT * FROM dashboard_exchanges WHERE account_id = 'acct_19999' AND"
            " (ts < :t OR (ts = :t AND exchange_id < :i)) ORDER BY ts DESC, exchange_id DESC"
            " LIMIT 50", "cursor"),
        "page 200 of an account, OFFSET": (
            "SELECT * FROM dashboard_exchanges WHERE account_id = 'acct_19999'"
            f" ORDER BY ts DESC, exchange_id DESC LIMIT 50 OFFSET {offset}", {}),
    }
    out = {}
    with eng.connect() as conn:
        cursor_row = conn.execute(text(last)).one()
        for name, (sql, params) in queries.items():
            p = {"t": cursor_row[0], "i": cursor_row[1]} if params == "cursor" else params
            samples = []
            for _ in range(repeat):
                t = time.perf_counter()
                conn.execute(text(sql), p).all()
                samples.append((time.perf_counter() - t) * 1000)
            out[name] = statistics.median(samples)
    eng.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="bench/results/dashboard")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        verdicts = Path(tmp) / "verdicts.json"
        Verdicts(campaigns=[CampaignVerdict(
            "c-bench", accounts=[f"acct_{i:05d}" for i in range(200)], risk=0.95,
            detected_at=T0 + timedelta(days=3), evidence=["shared payment fingerprint"])]
        ).write(verdicts)
        results = {}
        for label, rows in (("small", args.small), ("large", args.rows)):
            db = Path(tmp) / f"{label}.sqlite"
            t = time.perf_counter()
            build(db, rows)
            print(f"built {rows:,} rows in {time.perf_counter() - t:.0f} s", flush=True)
            results[label] = (time_pages(db, verdicts, args.repeat),
                              time_sql(db, args.repeat))
    lines = [f"# dashboard pages: {args.small:,} vs {args.rows:,} indexed exchanges",
             "", f"`python bench/dashboard_pages.py --rows {args.rows} --small {args.small}"
             f" --repeat {args.repeat}` (medians of {args.repeat}, SQLite, loopback HTTP)", "",
             "| page (HTTP, logged in) | large / small |", "|---|---|"]
    small_p, small_q = results["small"]
    large_p, large_q = results["large"]
    for name in large_p:
        lines.append(f"| {name} | {large_p[name] / small_p[name]:.2f} |")
    lines += ["", "| same query, read model vs naive (large database) | naive / read model |",
              "|---|---|",
              f"| overview 24h: raw GROUP BY / roll-ups | "
              f"{large_q['overview 24h, raw rows'] / large_q['overview 24h, roll-ups']:.1f} |",
              f"| page 200 of an account: OFFSET / keyset | "
              f"{large_q['page 200 of an account, OFFSET'] / large_q['page 200 of an account, keyset']:.1f} |",
              "", "Medians in ms on this run (for orientation only; the machine is shared):", ""]
    for label, (pages, sql) in results.items():
        lines.append(f"- {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in {**pages, **sql}.items()))
    report = "\n".join(lines) + "\n"
    (out / "dashboard.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
