"""The ledger against a plain append-only SQLite table without proofs, side by side.

Exchanges: real prompts (Chatbot Arena hard questions and CodeAlpaca instructions, see
/work/shared/data/README.md) answered by the demo upstream's generator, sealed (body
hashes computed) as the pipeline does before any stage sees them.

Measured in one process, ledger and baseline alternately, medians of --runs:

* appends/s: --n-append exchanges from --producers concurrent tasks, each awaiting its
  append, as the gateway's inline stage does. The ledger runs with its default settings
  (``durability: fsync``, group commit). The baseline is the same group-commit writer
  (a thread, a queue, one transaction per batch, WAL, ``synchronous=FULL``) inserting
  id, time, account, status, model and the two JSON bodies into a plain table indexed by
  id, with the ledger's SQLite settings (16 KiB pages): everything a log needs, nothing a
  proof needs.
* inclusion proof: median time of ``Ledger.inclusion(exchange_id)`` (look-up by id,
  leaf hashes of one chunk from the store, audit path) for --proofs random entries of
  the --n-verify ledger, against the baseline's look-up of the same row by id.
* full verification: ``verify_ledger`` over --n-verify entries (every leaf hash, body
  hash, index and checkpoint), against one full scan of the baseline table decoding each
  row's bodies.

    python -m bench.ledger_bench --n-append 200000 --n-verify 1000000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import random
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from distillguard.datasets import benign_prompts, data_dir
from distillguard.demo_upstream import answer_tokens
from distillguard.exchange import Exchange, Retention
from distillguard.ledger import entry
from distillguard.ledger.core import Ledger
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.store import PAGE_SIZE
from distillguard.ledger.verify import verify_ledger
from distillguard.ledger.writer import LedgerWriter


def prompt_pool() -> list[str]:
    prompts = benign_prompts()
    code = orjson.loads((data_dir() / "attack" / "codealpaca_2k.json").read_bytes())
    prompts += [c["instruction"] for c in code if isinstance(c, dict) and c.get("instruction")]
    return prompts


def make_exchanges(n: int, pool: list[tuple[dict[str, Any], dict[str, Any]]],
                   seed: int) -> list[Exchange]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        request, response = pool[rng.randrange(len(pool))]
        ex = Exchange.start("/v1/chat/completions")
        ex.account_id, ex.key_id = f"acct_{i % 5000}", f"key_{i % 7000:012d}"
        ex.client_ip, ex.user_agent = f"203.0.{i % 256}.{i % 199}", "OpenAI/Python 1.40.0"
        ex.model, ex.status, ex.latency_ms_override = "demo-chat-1", 200, 800.0 + i % 300
        ex.request, ex.response = request, response
        ex.seal_bodies()
        out.append(ex)
    return out


def body_pool(size: int = 2000) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    prompts = prompt_pool()
    rng = random.Random(3)
    out = []
    for prompt in rng.sample(prompts, min(size, len(prompts))):
        answer = " ".join(answer_tokens(prompt, "demo-chat-1", None))
        out.append(({"model": "demo-chat-1", "messages": [{"role": "user", "content": prompt}]},
                    {"id": "chatcmpl-1", "object": "chat.completion", "model": "demo-chat-1",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": answer}}],
                     "usage": {"prompt_tokens": len(prompt) // 4,
                               "completion_tokens": len(answer) // 4}}))
    return out


# -- the baseline: a plain table behind the same group commit -------------------------------

PLAIN = """CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, id TEXT NOT NULL,
    ts TEXT NOT NULL, account_id TEXT, status INTEGER, model TEXT, request BLOB,
    response BLOB)"""


class PlainWriter:
    def __init__(self, path: Path, max_batch: int = 8192) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # the ledger's SQLite settings
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(PLAIN)
        self.conn.execute("CREATE INDEX IF NOT EXISTS log_id ON log (id)")
        self.max_batch = max_batch
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    async def append(self, ex: Exchange) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self.q.put((ex, fut, loop))
        return await fut

    def _run(self) -> None:
        while True:
            first = self.q.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            rows = [(e.id, e.ts.isoformat(), e.account_id, e.status, e.model,
                     orjson.dumps(e.request), orjson.dumps(e.response)) for e, _, _ in batch]
            self.conn.execute("BEGIN IMMEDIATE")
            cur = self.conn.executemany(
                "INSERT INTO log (id, ts, account_id, status, model, request, response) "
                "VALUES (?,?,?,?,?,?,?)", rows)
            self.conn.execute("COMMIT")
            last = cur.lastrowid or 0
            done = [(fut, last - len(batch) + 1 + i) for i, (_, fut, _) in enumerate(batch)]
            batch[0][2].call_soon_threadsafe(_resolve, done)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self.conn.close()


def _resolve(done: list[tuple[asyncio.Future[int], int]]) -> None:
    for fut, value in done:
        fut.set_result(value)


async def _drive(append: Any, exchanges: list[Exchange], producers: int) -> float:
    it = iter(exchanges)

    async def produce() -> None:
        for ex in it:
            await append(ex)

    t = time.perf_counter()
    await asyncio.gather(*(produce() for _ in range(producers)))
    return len(exchanges) / (time.perf_counter() - t)


async def appends_ledger(directory: Path, exchanges: list[Exchange], producers: int) -> float:
    writer = LedgerWriter(LedgerConfig(url=f"sqlite:///{directory / 'ledger.sqlite'}",
                                       key_path=directory / "ledger.key",
                                       spool_dir=directory / "spool"))  # as the gateway
    await writer.start()
    try:
        return await _drive(writer.append_exchange, exchanges, producers)
    finally:
        await writer.close()


async def appends_plain(directory: Path, exchanges: list[Exchange], producers: int) -> float:
    writer = PlainWriter(directory / "plain.sqlite")
    try:
        return await _drive(writer.append, exchanges, producers)
    finally:
        await asyncio.to_thread(writer.close)


# -- 1,000,000 entries: proofs and verification ---------------------------------------------

def build_large(directory: Path, exchanges: list[Exchange], n: int) -> tuple[Ledger, Path]:
    lg = Ledger(LedgerConfig(url=f"sqlite:///{directory / 'big.sqlite'}",
                             key_path=directory / "big.key"))
    plain = PlainWriter(directory / "bigplain.sqlite")
    plain.q.put(None)
    plain.thread.join()
    batch = 10_000
    ids = [ex.id for ex in exchanges]
    for start in range(0, n, batch):
        pending = []
        for i in range(start, min(n, start + batch)):
            ex = exchanges[i % len(exchanges)]
            ex.id = f"{ids[i % len(exchanges)]}-{i}"
            pending.append(entry.from_exchange(ex, Retention.FULL))
        lg.append(pending)
        plain.conn.execute("BEGIN")
        plain.conn.executemany(
            "INSERT INTO log (id, ts, account_id, status, model, request, response) "
            "VALUES (?,?,?,?,?,?,?)",
            [(p.entry_id, p.ts, p.account_id, 200, "demo-chat-1", p.request, p.response)
             for p in pending])
        plain.conn.execute("COMMIT")
        if (start // batch) % 20 == 19:
            lg.checkpoint()
    lg.checkpoint()
    plain.conn.close()
    return lg, directory / "bigplain.sqlite"


def proof_times(lg: Ledger, plain: Path, n: int, samples: int) -> tuple[float, float]:
    rng = random.Random(5)
    picks = [rng.randrange(n) for _ in range(samples)]
    ids = [r.entry_id for r in (next(iter(lg.store.iter_rows(i, i + 1, bodies=False)))
                                for i in picks)]
    conn = sqlite3.connect(plain)
    ledger_t, plain_t = [], []
    for entry_id in ids:
        t = time.perf_counter()
        conn.execute("SELECT * FROM log WHERE id = ?", (entry_id,)).fetchone()
        plain_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        lg.inclusion(entry_id)
        ledger_t.append(time.perf_counter() - t)
    conn.close()
    return statistics.median(ledger_t), statistics.median(plain_t)


def scan_plain(path: Path) -> float:
    conn = sqlite3.connect(path)
    t = time.perf_counter()
    for row in conn.execute("SELECT * FROM log ORDER BY seq"):
        orjson.loads(row[6])
        orjson.loads(row[7])
    conn.close()
    return time.perf_counter() - t


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-append", type=int, default=200_000)
    parser.add_argument("--n-verify", type=int, default=1_000_000)
    parser.add_argument("--producers", type=int, default=512)
    parser.add_argument("--proofs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="Scratch directory, kept (default: a temp "
                        "dir, removed); a 1,000,000-entry store built there is reused.")
    parser.add_argument("--skip-append", action="store_true",
                        help="Only the proof and verification measurements.")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="ledger-bench-"))
    pool = body_pool()
    print(f"scratch: {base}; {len(pool)} distinct exchanges, mean body "
          f"{statistics.mean(len(orjson.dumps(r)) + len(orjson.dumps(q)) for q, r in pool):.0f}"
          f" bytes ({load()})")
    ours: list[float] = []
    theirs: list[float] = []
    for run in range(0 if args.skip_append else args.runs):
        exchanges = make_exchanges(args.n_append, pool, seed=run)
        for name in ("ledger", "plain"):
            directory = base / f"append-{run}-{name}"
            directory.mkdir(parents=True)
            if name == "ledger":
                ours.append(asyncio.run(appends_ledger(directory, exchanges, args.producers)))
            else:
                theirs.append(asyncio.run(appends_plain(directory, exchanges,
                                                        args.producers)))
            shutil.rmtree(directory)
        print(f"run {run + 1}: ledger {ours[-1]:,.0f}/s, plain {theirs[-1]:,.0f}/s ({load()})")
    if ours:
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"appends/s (median of {args.runs}): ledger {a:,.0f}  plain {b:,.0f}  "
              f"ratio {a / b:.2f}")

    big = base / "big"
    if (big / "bigplain.sqlite").exists():  # --dir given and built by an earlier run
        lg = Ledger(LedgerConfig(url=f"sqlite:///{big / 'big.sqlite'}",
                                 key_path=big / "big.key"))
        plain = big / "bigplain.sqlite"
        assert lg.size == args.n_verify, f"{big} holds {lg.size} entries"
        print(f"reusing the {lg.size:,} entries in {big}")
    else:
        exchanges = make_exchanges(min(args.n_verify, 50_000), pool, seed=99)
        big.mkdir()
        t = time.perf_counter()
        lg, plain = build_large(big, exchanges, args.n_verify)
        print(f"built {args.n_verify:,} entries in both stores in "
              f"{time.perf_counter() - t:.0f} s")
    p_ours, p_theirs = proof_times(lg, plain, args.n_verify, args.proofs)
    print(f"inclusion proof (median of {args.proofs}): {p_ours * 1e6:.0f} us  "
          f"plain look-up {p_theirs * 1e6:.0f} us  ratio {p_ours / p_theirs:.1f} ({load()})")
    v_ours, v_theirs = [], []
    for _ in range(2):
        t = time.perf_counter()
        report = verify_ledger(lg.store, lg.verifier)
        v_ours.append(time.perf_counter() - t)
        assert report.ok and report.entries == args.n_verify, report.to_json()
        v_theirs.append(scan_plain(plain))
        print(f"verification {v_ours[-1]:.1f} s, plain full scan {v_theirs[-1]:.1f} s "
              f"({load()})")
    v, s = statistics.median(v_ours), statistics.median(v_theirs)
    print(f"full verification of {args.n_verify:,}: {v:.1f} s  plain full scan {s:.1f} s  "
          f"ratio {v / s:.2f}")
    lg.close()
    if args.dir is None:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
