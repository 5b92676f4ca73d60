"""The dashboard's read model: a compact index of exchanges and per-minute roll-ups.

The ledger is the record of every exchange, optimised for appending and proving. The
dashboard needs other access paths (by account, key or address, in time order, counted
per minute), so a background stage, :class:`IndexStage`, writes one narrow row per
exchange (no bodies) and keeps per-minute counters, in the state store's database. Pages
then read only the rows they show (keyset pagination) and the overview reads at most a
few hundred roll-up rows whatever the size of the ledger. Bodies are fetched from the
ledger by exchange id when a page shows one exchange.

The tables are created by the dashboard at start-up (``CREATE ... IF NOT EXISTS``), not
by the shared migrations, and belong to the dashboard only::

    dashboard_exchanges (exchange_id PK, ts, account_id, key_id, client_ip, status,
                         model, endpoint, capability, prompt_tokens, completion_tokens,
                         latency_ms, error_code, denied_by)
        indexes: (account_id, ts), (key_id, ts), (client_ip, ts), (ts)
    dashboard_minutes   (minute PK, total, ok, denied, limited, errors, tokens)
    dashboard_account_hours (account_id, hour) PK: total, errors, tokens; index (hour)
    dashboard_account_mix   (account_id, capability, model) PK: n
    dashboard_account_ips   (account_id, client_ip) PK: n, last_ts; index (client_ip)

The per-account roll-ups make a campaign page cost one row per account and active hour
(and per capability, model and address), not one per exchange: a harvesting account
sends thousands of requests an hour.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Column, Float, Integer, MetaData, Table, Text, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from distillguard.exchange import Exchange, format_ts

log = logging.getLogger("distillguard.dashboard")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS dashboard_exchanges (
        exchange_id TEXT PRIMARY KEY, ts TEXT NOT NULL, account_id TEXT, key_id TEXT,
        client_ip TEXT, status INTEGER NOT NULL, model TEXT, endpoint TEXT,
        capability TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
        latency_ms REAL, error_code TEXT, denied_by TEXT)""",
    "CREATE INDEX IF NOT EXISTS dashboard_exchanges_account ON dashboard_exchanges "
    "(account_id, ts)",
    "CREATE INDEX IF NOT EXISTS dashboard_exchanges_key ON dashboard_exchanges (key_id, ts)",
    "CREATE INDEX IF NOT EXISTS dashboard_exchanges_ip ON dashboard_exchanges (client_ip, ts)",
    "CREATE INDEX IF NOT EXISTS dashboard_exchanges_ts ON dashboard_exchanges (ts)",
    """CREATE TABLE IF NOT EXISTS dashboard_minutes (
        minute TEXT PRIMARY KEY, total INTEGER NOT NULL, ok INTEGER NOT NULL,
        denied INTEGER NOT NULL, limited INTEGER NOT NULL, errors INTEGER NOT NULL,
        tokens INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dashboard_account_hours (
        account_id TEXT NOT NULL, hour TEXT NOT NULL, total INTEGER NOT NULL,
        errors INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (account_id, hour))""",
    """CREATE TABLE IF NOT EXISTS dashboard_account_mix (
        account_id TEXT NOT NULL, capability TEXT NOT NULL, model TEXT NOT NULL,
        n INTEGER NOT NULL, PRIMARY KEY (account_id, capability, model))""",
    """CREATE TABLE IF NOT EXISTS dashboard_account_ips (
        account_id TEXT NOT NULL, client_ip TEXT NOT NULL, n INTEGER NOT NULL,
        last_ts TEXT NOT NULL, PRIMARY KEY (account_id, client_ip))""",
    "CREATE INDEX IF NOT EXISTS dashboard_account_ips_ip ON dashboard_account_ips (client_ip)",
    "CREATE INDEX IF NOT EXISTS dashboard_account_hours_hour ON dashboard_account_hours (hour)",
]

_UPSERTS = {
    "minutes": (
        "INSERT INTO dashboard_minutes (minute, total, ok, denied, limited, errors, tokens)"
        " VALUES (:minute, :total, :ok, :denied, :limited, :errors, :tokens)"
        " ON CONFLICT (minute) DO UPDATE SET total = dashboard_minutes.total + excluded.total,"
        " ok = dashboard_minutes.ok + excluded.ok,"
        " denied = dashboard_minutes.denied + excluded.denied,"
        " limited = dashboard_minutes.limited + excluded.limited,"
        " errors = dashboard_minutes.errors + excluded.errors,"
        " tokens = dashboard_minutes.tokens + excluded.tokens"),
    "hours": (
        "INSERT INTO dashboard_account_hours (account_id, hour, total, errors, tokens)"
        " VALUES (:account_id, :hour, :total, :errors, :tokens)"
        " ON CONFLICT (account_id, hour) DO UPDATE SET"
        " total = dashboard_account_hours.total + excluded.total,"
        " errors = dashboard_account_hours.errors + excluded.errors,"
        " tokens = dashboard_account_hours.tokens + excluded.tokens"),
    "mix": (
        "INSERT INTO dashboard_account_mix (account_id, capability, model, n)"
        " VALUES (:account_id, :capability, :model, :n)"
        " ON CONFLICT (account_id, capability, model) DO UPDATE SET"
        " n = dashboard_account_mix.n + excluded.n"),
    "ips": (
        "INSERT INTO dashboard_account_ips (account_id, client_ip, n, last_ts)"
        " VALUES (:account_id, :client_ip, :n, :last_ts)"
        " ON CONFLICT (account_id, client_ip) DO UPDATE SET"
        " n = dashboard_account_ips.n + excluded.n, last_ts = CASE WHEN"
        " excluded.last_ts > dashboard_account_ips.last_ts THEN excluded.last_ts"
        " ELSE dashboard_account_ips.last_ts END"),
}

COLUMNS = ("exchange_id", "ts", "account_id", "key_id", "client_ip", "status", "model",
           "endpoint", "capability", "prompt_tokens", "completion_tokens", "latency_ms",
           "error_code", "denied_by")
_INTEGER_COLUMNS = ("status", "prompt_tokens", "completion_tokens")

# A coarse label of what a prompt asks for, used when detection did not annotate one.
_CAPABILITIES = [
    ("code", re.compile(r"\b(python|function|code|program|sql|javascript|class|bug|"
                        r"compile|regex|algorithm)\b", re.I)),
    ("math", re.compile(r"\b(solve|equation|integral|prove|probability|calculate|"
                        r"derivative|theorem|\d+\s*[-+*/^]\s*\d+)", re.I)),
    ("reasoning", re.compile(r"\b(step by step|think|reason|explain why|chain of thought|"
                             r"logic|puzzle)\b", re.I)),
    ("translation", re.compile(r"\b(translate|translation|in french|in german|"
                               r"in spanish)\b", re.I)),
    ("summarise", re.compile(r"\b(summar|tl;?dr|abstract)", re.I)),
    ("writing", re.compile(r"\b(write|essay|story|poem|email|letter)\b", re.I)),
]


def capability_of(exchange: Exchange) -> str:
    features = exchange.annotations.get("features")
    if isinstance(features, dict):
        for key in ("capability", "task", "category"):
            value = features.get(key)
            if isinstance(value, str) and value:
                return value[:40]
    if exchange.endpoint.endswith("/embeddings"):
        return "embedding"
    prompt = exchange.prompt_text()[:2000]
    for name, pattern in _CAPABILITIES:
        if pattern.search(prompt):
            return name
    return "chat" if prompt else "other"


# An index text field is cut to this many characters: a client names the model it asks
# for, and a name of megabytes (refused, but recorded) would be kept in every row.
INDEX_TEXT_MAX = 256


def index_text(value: str | None) -> str | None:
    """A text field as the index keeps it: NUL characters, which PostgreSQL cannot
    store in text (a request naming the model ``"a\\u0000b"`` made the insert of its
    whole batch fail), become U+FFFD; at most :data:`INDEX_TEXT_MAX` characters. The
    ledger keeps the request as sent."""
    if value is None:
        return None
    return value[:INDEX_TEXT_MAX].replace("\x00", "\ufffd")


def row_of(exchange: Exchange) -> dict[str, Any]:
    usage = exchange.usage
    return {
        "exchange_id": exchange.id, "ts": format_ts(exchange.ts),
        "account_id": index_text(exchange.account_id), "key_id": index_text(exchange.key_id),
        "client_ip": index_text(exchange.client_ip), "status": int(exchange.status),
        "model": index_text(exchange.model), "endpoint": index_text(exchange.endpoint),
        "capability": capability_of(exchange),
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "latency_ms": exchange.latency_ms, "error_code": index_text(exchange.error_code),
        "denied_by": index_text(exchange.annotations.get("denied_by")),
    }


def _minute_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        minute = row["ts"][:16]
        m = out.setdefault(minute, {"minute": minute, "total": 0, "ok": 0, "denied": 0,
                                    "limited": 0, "errors": 0, "tokens": 0})
        status = row["status"]
        m["total"] += 1
        m["ok"] += status < 400
        m["denied"] += status in (401, 403)
        m["limited"] += status == 429
        m["errors"] += status >= 400 and status not in (401, 403, 429)
        m["tokens"] += (row["prompt_tokens"] or 0) + (row["completion_tokens"] or 0)
    return [out[k] for k in sorted(out)]


def _account_rows(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    hours: dict[tuple[str, str], dict[str, Any]] = {}
    mix: dict[tuple[str, str, str], dict[str, Any]] = {}
    ips: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        account = row["account_id"]
        if account is None:
            continue
        h = hours.setdefault((account, row["ts"][:13]), {
            "account_id": account, "hour": row["ts"][:13], "total": 0, "errors": 0,
            "tokens": 0})
        h["total"] += 1
        h["errors"] += row["status"] >= 400
        h["tokens"] += (row["prompt_tokens"] or 0) + (row["completion_tokens"] or 0)
        cap, model = row["capability"] or "?", row["model"] or "?"
        m = mix.setdefault((account, cap, model), {"account_id": account, "capability": cap,
                                                   "model": model, "n": 0})
        m["n"] += 1
        if row["client_ip"]:
            i = ips.setdefault((account, row["client_ip"]), {
                "account_id": account, "client_ip": row["client_ip"], "n": 0,
                "last_ts": row["ts"]})
            i["n"] += 1
            i["last_ts"] = max(i["last_ts"], row["ts"])
    return {"hours": [hours[k] for k in sorted(hours)], "mix": [mix[k] for k in sorted(mix)],
            "ips": [ips[k] for k in sorted(ips)]}


async def create_schema(engine: AsyncEngine, statements: Sequence[str] = SCHEMA) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # replicas starting together: CREATE ... IF NOT EXISTS is not atomic there
            await conn.execute(text("SELECT pg_advisory_xact_lock(72707370)"))
        for statement in statements:
            await conn.execute(text(statement))


# The index table's columns as SQLAlchemy Core sees them, for the one insert that needs
# Core: :func:`_insert_new` (the schema itself is SCHEMA's).
_EXCHANGES = Table(
    "dashboard_exchanges", MetaData(), Column("exchange_id", Text, primary_key=True),
    *(Column(c, Integer if c in _INTEGER_COLUMNS else Float if c == "latency_ms" else Text)
      for c in COLUMNS[1:]))


@functools.cache
def _insert_statement(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(_EXCHANGES).on_conflict_do_nothing(
        index_elements=["exchange_id"]).returning(_EXCHANGES.c.exchange_id)


async def _insert_new(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert the rows not indexed yet; returns the ids of those this transaction
    inserted. A row another writer holds (committed, or inserted by a transaction still
    open: this one waits for it) is skipped, so a writer beside another on the same
    exchanges neither fails nor counts them again.

    One statement for all rows, which SQLAlchemy sends as multi-row INSERTs ("insert
    many values") from a statement it compiled once. A ``text()`` of 200 rows' bind
    parameters built anew for each batch took about 20 ms of the event loop per 200 rows
    and held every request behind it: a 2,000-row flush stalled the gateway for 200 ms
    or more (p99 at 500 requests/s went from about 7 ms to 260 ms)."""
    found = await conn.execute(_insert_statement(conn.dialect.name), list(rows))
    return {r[0] for r in found}


async def write_rows(engine: AsyncEngine, rows: Sequence[dict[str, Any]]) -> int:
    """Insert index rows (skipping ones already indexed, by this writer or another at
    the same time) and add those inserted to the roll-ups; returns how many were.

    Rows, and then each roll-up's rows, are written in the order of their keys, so that
    writers at once on PostgreSQL wait for each other and never deadlock."""
    if not rows:
        return 0
    unique = {r["exchange_id"]: r for r in rows}
    ordered = [unique[i] for i in sorted(unique)]
    async with engine.begin() as conn:
        inserted = await _insert_new(conn, ordered)
        fresh = [r for r in ordered if r["exchange_id"] in inserted]
        if not fresh:
            return 0
        batches = {"minutes": _minute_rows(fresh), **_account_rows(fresh)}
        for name, values in batches.items():
            if values:
                await conn.execute(text(_UPSERTS[name]), values)
    return len(fresh)


# Rows the index keeps while the database cannot be reached, at most; beyond that the
# oldest are dropped, counted and logged (``distillguard dashboard index`` of the trace
# or a ledger export fills the gap later).
MAX_WAITING_ROWS = 100_000


def unreachable(error: BaseException) -> bool:
    """Whether a failed write says the database could not be reached or was busy
    (connection refused or lost, SQLite locked), rather than refusing the rows."""
    return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError
                      | sa_exc.DisconnectionError | OSError | TimeoutError)


class IndexMetrics(Collector):
    """The index stage's counts at the gateway's ``/metrics``."""

    def __init__(self, stage: IndexStage) -> None:
        self.stage = stage

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("distillguard_dashboard_index_waiting",
                                "Exchanges waiting to be indexed (many: the database "
                                "cannot be reached)", value=len(self.stage._rows))
        yield CounterMetricFamily("distillguard_dashboard_index_dropped",
                                  "Exchanges not indexed: the database was away too long",
                                  value=self.stage.dropped)


class IndexStage:
    """Background stage: index each exchange, written in batches of up to ``batch``.

    While the database cannot be reached, rows wait in memory (up to
    :data:`MAX_WAITING_ROWS`) and go with the next flush; a row the database refuses
    is retried alone, so it loses only itself."""

    name = "dashboard_index"

    def __init__(self, engine_provider: Any, *, batch: int = 500, flush_s: float = 0.5) -> None:
        self._engine = engine_provider
        self.batch = batch
        self.flush_s = flush_s
        self._rows: list[dict[str, Any]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.waiting_since: float | None = None   # the database away since (monotonic)
        self.dropped = 0
        self.metrics = IndexMetrics(self)

    async def on_exchange(self, exchange: Exchange) -> None:
        if exchange.status == 0:
            return
        self._rows.append(row_of(exchange))
        if len(self._rows) >= self.batch:
            await self.flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._later())

    async def _later(self) -> None:
        await asyncio.sleep(self.flush_s)
        await asyncio.shield(self.flush())
        wait = self.flush_s
        while self.waiting_since is not None and self._rows:   # the database is away
            wait = min(5.0, wait * 2)
            await asyncio.sleep(wait)
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        async with self._lock:
            rows, self._rows = self._rows, []
            if not rows:
                return
            try:
                await write_rows(self._engine(), rows)
            except Exception as exc:
                if unreachable(exc):
                    self._keep(rows, exc)
                    return
                await self._write_one_by_one(rows)
            if self.waiting_since is not None:
                log.warning("dashboard: the database answers again after %.0f s; the "
                            "exchanges that waited are indexed",
                            time.monotonic() - self.waiting_since)
                self.waiting_since = None

    def _keep(self, rows: list[dict[str, Any]], error: BaseException) -> None:
        """The database could not be reached: the rows wait, ahead of newer ones, and
        the next exchange (or the flush timer) tries again."""
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
            log.error("dashboard: cannot write the index (%s); exchanges wait in memory "
                      "(up to %d) until the database answers", type(error).__name__,
                      MAX_WAITING_ROWS)
        self._rows = rows + self._rows
        over = len(self._rows) - MAX_WAITING_ROWS
        if over > 0:
            del self._rows[:over]
            self.dropped += over
            log.error("dashboard: %d exchanges not indexed (the database has been away "
                      "too long; `distillguard dashboard index` of a trace fills the gap)",
                      over)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._later())

    async def _write_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        """After a batch failed: each row in a transaction of its own, so that a row the
        database refuses loses only itself, not the exchanges batched with it."""
        lost = 0
        for row in rows:
            try:
                await write_rows(self._engine(), [row])
            except Exception:
                lost += 1
                if lost == 1:
                    log.exception("dashboard: could not index exchange %s",
                                  row["exchange_id"])
        if lost:
            log.error("dashboard: could not index %d of %d exchanges", lost, len(rows))

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()  # a flush under way is shielded and finishes
        await self.flush()
        if self._rows:
            log.error("dashboard: %d exchanges not indexed: the database could not be "
                      "reached before the gateway stopped (`distillguard dashboard index` "
                      "of a trace fills the gap)", len(self._rows))
