"""Reading exchanges (and inclusion proofs) from the ledger for the provenance look-up.

The ledger named by the settings is scanned once (exchanges whose bodies were redacted
have no answer text and cannot match). Every match in the report then gets
``ledger_proof``: an inclusion proof bundle (docs/ledger.md) against a signed checkpoint
that covers it, checkable with ``distillguard ledger verify-proof --key``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

from distillguard.provenance.lookup import Match, ProvenanceIndex


def _public_location(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)


def scan_ledger(ctx: click.Context, index: ProvenanceIndex, *, progress: bool,
                workers: int = 1
                ) -> tuple[dict[str, Any], list[Match], Callable[[dict[str, Any]], None] | None]:
    from distillguard.ledger.core import Ledger
    from distillguard.ledger.settings import parse_settings
    from distillguard.ledger.source import iter_exchanges

    config = parse_settings(ctx.find_root().obj.settings)
    if config.url.startswith("sqlite:///") and not _sqlite_exists(config.url):
        raise click.UsageError(f"no ledger at {config.url}: pass --trace FILE or configure "
                               "ledger.path / ledger.url")
    ledger = Ledger(config, create_key=False)
    ledger.refresh()
    try:
        matches = index.scan(iter_exchanges(ledger), total=ledger.size, progress=progress,
                             workers=workers)
    except BaseException:
        ledger.close()
        raise
    cp = ledger.store.latest_checkpoint()
    if ledger.key is not None and (cp is None or cp.tree_size < ledger.size
                                   or not ledger.signed_by_key(cp)):
        cp = ledger.checkpoint()
    source: dict[str, Any] = {"kind": "ledger", "location": _public_location(config.url),
                              "entries": ledger.size,
                              "checkpoint": cp.note if cp is not None else None}

    def attach(report: dict[str, Any]) -> None:
        cache: dict[str, dict[str, Any] | None] = {}

        def proof_for(exchange_id: str) -> dict[str, Any] | None:
            if exchange_id not in cache:
                try:
                    size = cp.tree_size if cp is not None else None
                    cache[exchange_id] = ledger.inclusion(exchange_id, size)
                except (LookupError, ValueError):
                    cache[exchange_id] = None
            return cache[exchange_id]

        try:
            groups = [a.get("evidence", []) for a in report.get("accounts", [])]
            groups += [i.get("matches", []) for i in report.get("items", [])]
            for group in groups:
                for match in group:
                    match["ledger_proof"] = proof_for(match["exchange_id"])
        finally:
            ledger.close()

    return source, matches, attach


def _sqlite_exists(url: str) -> bool:
    from pathlib import Path

    return Path(url[len("sqlite:///"):]).exists()
