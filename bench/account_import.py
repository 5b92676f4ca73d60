"""``accounts import`` with its statuses on the action ladder, next to writing the column.

For each store (SQLite in a temporary file; PostgreSQL when --pg names a server, in a
database of its own), a fresh store per round and per way, the same sequence of imports
of --accounts accounts, timed one by one:

* ``new``: accounts new to the store, lines without ``status``;
* ``again``: the same file again;
* ``suspend``: every line ``suspended`` (the ladder records a suspension for each);
* ``suspend again``: the same file again (nothing to change);
* ``reinstate``: every line ``active`` (the ladder lifts every suspension).

``column`` is :meth:`~distillguard.store.StateStore.import_accounts`, which writes the
status column alone (the import before its statuses went through the ladder, and still
with the policy component off); ``ladder`` is :func:`distillguard.components.import_accounts`
with the policy component on. Medians of --rounds.

    python -m bench.account_import --accounts 10000 --rounds 3 \\
        --pg postgresql://postgres@127.0.0.1:5432
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from distillguard.components import import_accounts
from distillguard.config import load_settings
from distillguard.store import StateStore, open_state_store
from distillguard.store.models import AccountImport

STEPS = ("new", "again", "suspend", "suspend again", "reinstate")


def lines(count: int, status: str | None) -> AccountImport:
    return AccountImport.of(AccountImport.line(
        {"account_id": f"acct_{i:06d}", "org": f"Org {i}", "country": "DE",
         **({"status": status} if status else {})}) for i in range(count))


@asynccontextmanager
async def _opened(url: str) -> AsyncIterator[StateStore]:
    store = open_state_store(url)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def fresh_store(kind: str, pg: str | None) -> AsyncIterator[StateStore]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            async with _opened(f"sqlite:///{Path(folder) / 'state.sqlite'}") as store:
                yield store
        return
    import psycopg

    assert pg is not None
    name = "dgbench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        async with _opened(f"{pg}/{name}") as store:
            yield store
    finally:
        with psycopg.connect(pg + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def one_round(kind: str, way: str, count: int, pg: str | None) -> dict[str, float]:
    settings = load_settings(overrides={"policy": {"enabled": way == "ladder"}}, environ={})
    files = {"new": lines(count, None), "again": lines(count, None),
             "suspend": lines(count, "suspended"), "suspend again": lines(count, "suspended"),
             "reinstate": lines(count, "active")}
    timings = {}
    async with fresh_store(kind, pg) as store:
        do: Callable[[AccountImport], Awaitable[Any]]
        if way == "ladder":
            async def do(batch: AccountImport) -> Any:
                return await import_accounts(settings, store, batch, actor="bench",
                                             reason=None)
        else:
            async def do(batch: AccountImport) -> Any:
                return await store.import_accounts(batch.accounts)
        for step in STEPS:
            started = time.perf_counter()
            await do(files[step])
            timings[step] = time.perf_counter() - started
    return timings


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", help="a PostgreSQL server URL without database, "
                                     "e.g. postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    kinds = ["sqlite"] + (["postgres"] if args.pg else [])
    print(f"{args.accounts} accounts, medians of {args.rounds} rounds (seconds)")
    print(f"| store | way | {' | '.join(STEPS)} |")
    print("|---|---|" + "---|" * len(STEPS))
    for kind in kinds:
        runs: dict[str, list[dict[str, float]]] = {"column": [], "ladder": []}
        for _ in range(args.rounds):
            for way in runs:     # alternating, so load on the machine falls on both
                runs[way].append(await one_round(kind, way, args.accounts, args.pg))
        for way, timings in runs.items():
            cells = [f"{statistics.median(t[step] for t in timings):.2f}" for step in STEPS]
            print(f"| {kind} | {way} | {' | '.join(cells)} |")


if __name__ == "__main__":
    asyncio.run(main())
