"""SQL the pages run against the dashboard index, roll-ups and the accounts table.

Every list is keyset-paginated (``WHERE (ts, id) < (:ts, :id) ORDER BY ts DESC, id DESC``)
and every aggregate is either over the per-minute roll-ups or over one account's / one
campaign's rows through an index, so page time does not grow with the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.exchange import parse_ts
from distillguard.store.sql import containing, in_chunks, like_pattern

# range name -> (span, bucket width, characters of the RFC 3339 minute kept as bucket key)
RANGES: dict[str, tuple[timedelta, timedelta, int]] = {
    "1h": (timedelta(hours=1), timedelta(minutes=1), 16),
    "6h": (timedelta(hours=6), timedelta(minutes=10), 15),
    "24h": (timedelta(hours=24), timedelta(hours=1), 13),
    "7d": (timedelta(days=7), timedelta(hours=6), 13),
    "30d": (timedelta(days=30), timedelta(days=1), 10),
}


@dataclass(frozen=True, slots=True)
class Bucketing:
    labels: list[str]      # display labels
    keys: list[str]        # bucket keys as produced by the SQL (prefix of the minute)
    starts: list[datetime]


def _key(dt: datetime, chars: int, width: timedelta) -> str:
    iso = dt.strftime("%Y-%m-%dT%H:%M")
    if width == timedelta(hours=6):
        return iso[:11] + f"{dt.hour // 6 * 6:02d}"
    return iso[:chars]


def bucketing(end: datetime, range_name: str) -> Bucketing:
    span, width, chars = RANGES[range_name]
    start = end - span
    # align to the bucket width
    epoch = datetime(2000, 1, 1, tzinfo=end.tzinfo)
    start = epoch + ((start - epoch) // width + 1) * width
    starts, keys, labels = [], [], []
    t = start
    while t <= end:
        starts.append(t)
        keys.append(_key(t, chars, width))
        labels.append(t.strftime("%H:%M") if width < timedelta(days=1) and span <= timedelta(
            days=1) else t.strftime("%m-%d %H:%M") if width < timedelta(days=1)
            else t.strftime("%m-%d"))
        t += width
    return Bucketing(labels, keys, starts)


async def latest_minute(engine: AsyncEngine) -> datetime | None:
    async with engine.connect() as conn:
        value = (await conn.execute(text("SELECT MAX(minute) FROM dashboard_minutes"))).scalar()
    return None if value is None else parse_ts(value + ":00Z")


def _bucket_sql(column: str, range_name: str) -> str:
    """SQL for the bucket key of an RFC 3339 text column (see :func:`_key`)."""
    _span, width, chars = RANGES[range_name]
    if width == timedelta(hours=6):
        return (f"substr({column}, 1, 11) || CASE WHEN substr({column}, 12, 2) < '06' THEN '00'"
                f" WHEN substr({column}, 12, 2) < '12' THEN '06' WHEN substr({column}, 12, 2)"
                f" < '18' THEN '12' ELSE '18' END")
    return f"substr({column}, 1, {chars})"


async def traffic(engine: AsyncEngine, b: Bucketing, range_name: str) -> dict[str, list[int]]:
    """Per-bucket totals of the roll-ups: total, ok, denied, limited, errors, tokens."""
    fields = ("total", "ok", "denied", "limited", "errors", "tokens")
    out = {f: [0] * len(b.keys) for f in fields}
    if not b.keys:
        return out
    where = {k: i for i, k in enumerate(b.keys)}
    sums = ", ".join(f"SUM({f})" for f in fields)
    bucket = _bucket_sql("minute", range_name)
    async with engine.connect() as conn:
        rows = await conn.execute(text(
            f"SELECT {bucket}, {sums} FROM dashboard_minutes WHERE minute >= :lo "
            f"GROUP BY 1"), {"lo": b.starts[0].strftime("%Y-%m-%dT%H:%M")})
        for row in rows:
            i = where.get(row[0])
            if i is None:
                continue
            for j, f in enumerate(fields):
                out[f][i] += int(row[j + 1] or 0)
    return out


async def totals(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT COALESCE(SUM(total),0), COALESCE(SUM(denied),0), COALESCE(SUM(limited),0),"
            " COALESCE(SUM(errors),0), COALESCE(SUM(tokens),0) FROM dashboard_minutes"))).one()
        accounts = (await conn.execute(text("SELECT COUNT(*) FROM accounts"))).scalar_one()
    return {"exchanges": int(row[0]), "denied": int(row[1]), "limited": int(row[2]),
            "errors": int(row[3]), "tokens": int(row[4]), "accounts": int(accounts)}


async def busiest_accounts(engine: AsyncEngine, since: datetime,
                           limit: int = 10) -> list[dict[str, Any]]:
    """Accounts with the most exchanges since ``since`` (hour resolution)."""
    async with engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT account_id, SUM(total) AS total, SUM(errors) AS errors,"
            " SUM(tokens) AS tokens FROM dashboard_account_hours WHERE hour >= :lo"
            " GROUP BY account_id ORDER BY 2 DESC, 1 LIMIT :limit"),
            {"lo": since.strftime("%Y-%m-%dT%H"), "limit": limit})
        return [dict(r._mapping) for r in rows]


def open_over_time(intervals: Sequence[tuple[datetime, datetime | None]],
                   b: Bucketing) -> list[int]:
    """How many intervals are open at the end of each bucket."""
    out = []
    for i, _ in enumerate(b.starts):
        end = b.starts[i + 1] if i + 1 < len(b.starts) else b.starts[i] + (
            b.starts[i] - b.starts[i - 1] if i else timedelta(minutes=1))
        out.append(sum(1 for lo, hi in intervals if lo < end and (hi is None or hi >= end)))
    return out


# -- accounts ------------------------------------------------------------------------------

async def search_accounts(engine: AsyncEngine, q: str, *, after: str | None,
                          limit: int) -> list[dict[str, Any]]:
    """Accounts whose id, org, e-mail domain or payment fingerprint contain ``q``, whose
    key is ``q``, or that sent traffic from address ``q`` (or a prefix ending in '.' or
    ':'). Ordered by account id, keyset by ``after``."""
    params: dict[str, Any] = {"after": after or "", "limit": limit}
    where = ["a.account_id > :after"]
    if q:
        params.update(q=q, like=like_pattern(q))
        ip_match = "client_ip = :q"
        if q.endswith((".", ":")):
            params["hi"] = q + "\uffff"
            ip_match = "client_ip >= :q AND client_ip < :hi"
        where.append(
            "(" + " OR ".join(containing(f"a.{column}", "like") for column in (
                "account_id", "org", "email_domain", "payment_fingerprint")) +
            " OR a.account_id IN (SELECT account_id FROM api_keys WHERE key_id = :q)"
            f" OR a.account_id IN (SELECT account_id FROM dashboard_account_ips"
            f" WHERE {ip_match}))")
    sql = (f"SELECT a.account_id, a.org, a.email_domain, a.country, a.tier, a.status,"
           f" a.created_at, a.payment_fingerprint FROM accounts a WHERE {' AND '.join(where)}"
           f" ORDER BY a.account_id LIMIT :limit")
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(text(sql), params)]


async def account_profile(engine: AsyncEngine, account_id: str) -> dict[str, Any]:
    """One account's behaviour from its roll-ups (rows per active hour, capability and
    model, address), plus its first and last exchange through the (account_id, ts) index."""
    p = {"a": account_id}
    async with engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT COALESCE(SUM(total),0), COALESCE(SUM(errors),0), COALESCE(SUM(tokens),0)"
            " FROM dashboard_account_hours WHERE account_id = :a"), p)).one()
        first = (await conn.execute(text(
            "SELECT MIN(ts) FROM dashboard_exchanges WHERE account_id = :a"), p)).scalar()
        last = (await conn.execute(text(
            "SELECT MAX(ts) FROM dashboard_exchanges WHERE account_id = :a"), p)).scalar()
        models = (await conn.execute(text(
            "SELECT model, SUM(n) FROM dashboard_account_mix WHERE account_id = :a"
            " GROUP BY 1 ORDER BY 2 DESC LIMIT 8"), p)).all()
        caps = (await conn.execute(text(
            "SELECT capability, SUM(n) FROM dashboard_account_mix WHERE account_id = :a"
            " GROUP BY 1 ORDER BY 2 DESC LIMIT 8"), p)).all()
        ips = (await conn.execute(text(
            "SELECT client_ip, n FROM dashboard_account_ips WHERE account_id = :a"
            " ORDER BY 2 DESC LIMIT 8"), p)).all()
        n_ips = (await conn.execute(text(
            "SELECT COUNT(*) FROM dashboard_account_ips WHERE account_id = :a"), p)).scalar()
        hours = (await conn.execute(text(
            "SELECT substr(hour, 12, 2), SUM(total) FROM dashboard_account_hours"
            " WHERE account_id = :a GROUP BY 1"), p)).all()
    by_hour = [0] * 24
    for h, n in hours:
        by_hour[int(h)] = int(n)
    return {"exchanges": int(row[0]), "errors": int(row[1]), "tokens": int(row[2]),
            "first": first, "last": last, "ips": int(n_ips or 0),
            "models": [(m, int(n)) for m, n in models],
            "capabilities": [(c, int(n)) for c, n in caps],
            "top_ips": [(ip, int(n)) for ip, n in ips], "by_hour": by_hour}


async def exchanges_page(engine: AsyncEngine, *, column: str, values: Sequence[str],
                         before: tuple[str, str] | None, limit: int) -> list[dict[str, Any]]:
    """Newest first, for rows whose ``column`` is one of ``values`` (or all rows)."""
    assert column in ("account_id", "key_id", "client_ip", "")
    params: dict[str, Any] = {"limit": limit}
    where = []
    if column:
        marks = ", ".join(f":v{i}" for i in range(len(values)))
        params.update({f"v{i}": v for i, v in enumerate(values)})
        where.append(f"{column} IN ({marks})")
    if before is not None:
        where.append("(ts < :bts OR (ts = :bts AND exchange_id < :bid))")
        params.update(bts=before[0], bid=before[1])
    sql = ("SELECT * FROM dashboard_exchanges" + (" WHERE " + " AND ".join(where) if where
                                                    else "")
           + " ORDER BY ts DESC, exchange_id DESC LIMIT :limit")
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(text(sql), params)]


async def exchange_row(engine: AsyncEngine, exchange_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT * FROM dashboard_exchanges WHERE exchange_id = :e"),
            {"e": exchange_id})).first()
    return None if row is None else dict(row._mapping)


async def group_stats(engine: AsyncEngine, account_ids: Sequence[str], b: Bucketing,
                      range_name: str) -> dict[str, Any]:
    """Traffic per bucket, capability and model mix for a set of accounts (a campaign).

    Buckets of an hour or more come from the per-account hourly roll-ups; finer ones (the
    1h and 6h windows) from the exchange rows of that window only."""
    _span, width, _chars = RANGES[range_name]
    series = [0] * len(b.keys)
    where = {k: i for i, k in enumerate(b.keys)}
    caps: dict[str, int] = {}
    models: dict[str, int] = {}
    lo = b.starts[0].strftime("%Y-%m-%dT%H:%M") if b.starts else ""
    if width >= timedelta(hours=1):
        sql = (f"SELECT {_bucket_sql('hour', range_name)}, SUM(total) FROM "
               f"dashboard_account_hours WHERE account_id IN ({{marks}}) AND hour >= :lo "
               f"GROUP BY 1")
        lo = lo[:13]
    else:
        sql = (f"SELECT {_bucket_sql('ts', range_name)}, COUNT(*) FROM dashboard_exchanges "
               f"WHERE account_id IN ({{marks}}) AND ts >= :lo GROUP BY 1")
    async with engine.connect() as conn:
        for marks, p in in_chunks(account_ids):
            for key, n in await conn.execute(text(sql.format(marks=marks)), {**p, "lo": lo}):
                i = where.get(key)
                if i is not None:
                    series[i] += int(n)
            for cap, model, n in await conn.execute(text(
                    f"SELECT capability, model, SUM(n) FROM dashboard_account_mix "
                    f"WHERE account_id IN ({marks}) GROUP BY 1, 2"), p):
                caps[cap] = caps.get(cap, 0) + int(n)
                models[model] = models.get(model, 0) + int(n)
    return {"series": series,
            "capabilities": sorted(caps.items(), key=lambda kv: -kv[1])[:10],
            "models": sorted(models.items(), key=lambda kv: -kv[1])[:10]}


async def group_examples(engine: AsyncEngine, account_ids: Sequence[str], last: datetime,
                         limit: int = 10) -> list[dict[str, Any]]:
    """The newest exchanges of a set of accounts, from the last day of their traffic
    (bounded by the (account_id, ts) index instead of sorting all their rows)."""
    since = (last - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    rows: list[dict[str, Any]] = []
    async with engine.connect() as conn:
        for marks, p in in_chunks(account_ids):
            rows += [dict(r._mapping) for r in await conn.execute(text(
                f"SELECT * FROM dashboard_exchanges WHERE account_id IN ({marks})"
                f" AND ts >= :since ORDER BY ts DESC LIMIT :limit"),
                {**p, "since": since, "limit": limit})]
    rows.sort(key=lambda r: (r["ts"], r["exchange_id"]), reverse=True)
    return rows[:limit]


async def group_ips(engine: AsyncEngine, account_ids: Sequence[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    async with engine.connect() as conn:
        for marks, p in in_chunks(account_ids):
            for a, ip in await conn.execute(text(
                    f"SELECT account_id, client_ip FROM dashboard_account_ips"
                    f" WHERE account_id IN ({marks})"), p):
                out.setdefault(a, set()).add(ip)
    return out


async def group_seconds(engine: AsyncEngine, account_ids: Sequence[str],
                        since: str) -> dict[str, set[str]]:
    """The seconds each account had traffic in since ``since`` (lockstep comparison)."""
    out: dict[str, set[str]] = {}
    async with engine.connect() as conn:
        for marks, p in in_chunks(account_ids):
            for a, sec in await conn.execute(text(
                    f"SELECT DISTINCT account_id, substr(ts, 1, 19) FROM dashboard_exchanges"
                    f" WHERE account_id IN ({marks}) AND ts >= :since"), {**p, "since": since}):
                out.setdefault(a, set()).add(sec)
    return out


async def group_last_hour(engine: AsyncEngine, account_ids: Sequence[str]) -> datetime | None:
    """The end of the last hour in which any of the accounts had traffic."""
    best: str | None = None
    async with engine.connect() as conn:
        for marks, p in in_chunks(account_ids):
            value = (await conn.execute(text(
                f"SELECT MAX(hour) FROM dashboard_account_hours WHERE account_id IN ({marks})"),
                p)).scalar()
            if value and (best is None or value > best):
                best = value
    return None if best is None else parse_ts(best + ":59:59Z")


async def accounts_by_id(engine: AsyncEngine, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    async with engine.connect() as conn:
        for marks, params in in_chunks(ids):
            for r in await conn.execute(text(
                    f"SELECT account_id, created_at, org, email_domain, payment_fingerprint,"
                    f" country, tier, status FROM accounts WHERE account_id IN ({marks})"),
                    params):
                out[r[0]] = dict(r._mapping)
    return out
