"""The ledger on the real PostgreSQL server: appends through the writer, two writers on
one ledger, proofs, checkpoints and tamper detection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from distillguard.exchange import Retention
from distillguard.ledger import entry
from distillguard.ledger.core import Ledger
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.verifier import verify_inclusion_bundle
from distillguard.ledger.verify import verify_ledger
from distillguard.ledger.writer import LedgerWriter
from tests.factories import make_exchange, make_settings


def _config(pg_url: str, tmp_path: Path) -> LedgerConfig:
    return LedgerConfig(url=pg_url, key_path=tmp_path / "ledger.key",
                        checkpoint_interval_s=0)


def test_settings_select_postgres(pg_url: str, tmp_path: Path) -> None:
    from distillguard.ledger.settings import parse_settings

    config = parse_settings(make_settings(tmp_path, ledger={"url": pg_url}))
    assert config.url == pg_url and config.key_path == tmp_path / "ledger" / "ledger.key"


def test_postgres_ledger(pg_url: str, tmp_path: Path) -> None:
    config = _config(pg_url, tmp_path)

    async def write() -> list[int]:
        writer = LedgerWriter(config)
        await writer.start()
        try:
            exs = [make_exchange(f"pg {i}", account_id=f"acct_{i % 3}") for i in range(300)]
            got = await asyncio.gather(*(writer.append_exchange(e) for e in exs))
            got.append(await writer.append_event("policy:account:suspend", "account:acct_1",
                                                 "ana", "test", {"n": 1}))
            return got
        finally:
            await writer.close()

    indices = asyncio.run(write())
    assert sorted(indices) == list(range(301))
    # a second writer (another replica) appends to the same ledger, interleaved
    one, two = Ledger(config), Ledger(config)
    try:
        for i in range(10):
            lg = one if i % 2 else two
            (row,) = lg.append([entry.from_exchange(make_exchange(f"r{i}"), Retention.HASH)])
            assert row.idx == 301 + i
        one.refresh()
        assert one.size == 311
        cp = one.checkpoint()
        assert cp is not None and cp.tree_size == 311
        assert two.refresh() == 311 and two.root() == one.root()
        proof = two.inclusion("305")
        assert verify_inclusion_bundle(proof, one.verifier)["leaf_index"] == 305  # type: ignore[arg-type]
        report = verify_ledger(one.store, one.verifier)
        assert report.ok and report.entries == 311, report.to_json()
        # tampering on the server is caught
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE ledger_entries SET leaf = convert_to(replace(convert_from("
                         "leaf, 'UTF8'), '\"status\":200', '\"status\":201'), 'UTF8') "
                         "WHERE idx = 5")
        report = verify_ledger(one.store, one.verifier)
        assert report.first_bad == 5 and report.problems[0].kind == "modified"
    finally:
        one.close()
        two.close()
