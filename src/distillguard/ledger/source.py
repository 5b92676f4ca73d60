"""The ledger as the dashboard reads it (the ``LedgerSource`` interface of
:mod:`distillguard.dashboard.adapters`), as the provenance look-up scans it, and as batch
detection reads it (:func:`write_trace`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from distillguard.config import Settings
from distillguard.exchange import Exchange, format_ts
from distillguard.ledger import entry
from distillguard.ledger.checkpoint import CheckpointError, parse_checkpoint
from distillguard.ledger.core import Ledger
from distillguard.ledger.keyring import describe
from distillguard.ledger.settings import parse_settings
from distillguard.ledger.verifier import VerificationFailed, verify_inclusion_bundle
from distillguard.ledger.verify import verify_ledger
from distillguard.ledger.writer import LedgerWriter, writer_for


def _signature_names(note: str) -> str:
    """The keys a checkpoint's signature lines name (name and key id), whether or not
    they verify."""
    try:
        signatures = parse_checkpoint(note)[1]
    except CheckpointError:
        return "unreadable signature lines"
    return ", ".join(describe(name, key_id) for name, key_id, _ in signatures)


class LedgerView:
    """Read side of the process's shared writer (opened on first use)."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    async def _ledger(self) -> Ledger:
        return self.writer.ledger or await self.writer.start()

    @property
    def spooled(self) -> int:
        """Exchanges waiting in this process's spool for the store to answer."""
        return self.writer.spooled

    async def checkpoint(self) -> dict[str, Any] | None:
        lg = await self._ledger()
        cp = await asyncio.to_thread(lg.store.latest_checkpoint)
        if cp is None:
            return None
        key = lg.verifier
        current = describe(key.name, key.key_id) if key else "none (no public key)"
        signed_by = _signature_names(cp.note)
        status = "no public key"
        try:
            ring = lg.keyring
            if ring is not None:
                _, signer = ring.open(cp.note)
                if signer.retired:
                    signed_by = (f"{signer.describe()} (a retired key, its checkpoints "
                                 f"count up to tree size {signer.retired_at_size})")
                    status = f"valid (retired key {signer.describe()})"
                else:
                    signed_by, status = f"{signer.describe()} (the current key)", "valid"
        except CheckpointError as exc:
            status = f"INVALID: {exc}"
        return {"tree_size": cp.tree_size, "root_hash": cp.root_hash.hex(),
                "time": cp.ts, "origin": lg.config.origin, "signed_by": signed_by,
                "signature": status, "current_key": current, "entries_now": lg.size}

    async def verify(self) -> dict[str, Any]:
        lg = await self._ledger()
        report = await asyncio.to_thread(verify_ledger, lg.store, lg.keyring)
        doc = report.to_json()
        out: dict[str, Any] = {
            "ok": report.ok, "checked_at": format_ts(datetime.now(UTC)),
            "entries": report.entries, "checkpoints": report.checkpoints,
            "checkpoints_matched": report.checkpoints_matched,
            "uncovered": doc["uncovered"], "redacted_bodies": report.redacted_bodies,
            "problems": len(report.problems) + report.more_problems,
        }
        if not report.ok:
            out["first_bad"] = report.first_bad
            out["first_problem"] = doc.get("first_bad_problem", doc["problems"][0])["message"]
        return out

    async def proof(self, exchange_id: str) -> dict[str, Any]:
        lg = await self._ledger()
        proof = await asyncio.to_thread(partial(lg.inclusion, exchange_id,
                                                sign_if_needed=True))
        valid = False
        key = lg.keyring
        if key is not None and proof.get("checkpoint"):
            try:
                verify_inclusion_bundle(proof, key)
                valid = True
            except VerificationFailed:
                valid = False
        return {"leaf_index": proof["leaf_index"], "tree_size": proof["tree_size"],
                "root_hash": proof["root_hash"], "leaf_hash": proof["leaf_hash"],
                "path": proof["path"], "valid": valid,
                "signed": bool(proof.get("checkpoint"))}

    async def exchange(self, exchange_id: str) -> dict[str, Any] | None:
        """The stored exchange in the trace format; one still waiting in the spool (the
        store away, or not written yet) with ``ledger_index`` None and ``spooled`` true.
        Raises what the store raised when it cannot be read and the spool has no such
        exchange."""
        failure: Exception | None = None
        try:
            lg = await self._ledger()
            row = await asyncio.to_thread(lg.store.find, exchange_id)
        except Exception as exc:
            failure, row = exc, None
        if row is not None:
            return entry.to_trace(row) if row.kind == entry.KIND_EXCHANGE else None
        spool = self.writer.spool
        waiting = None if spool is None else await asyncio.to_thread(spool.find, exchange_id)
        if waiting is not None and waiting.kind == entry.KIND_EXCHANGE:
            out = entry.trace_of(waiting.leaf(0), waiting.request, waiting.response, 0)
            out["ledger_index"] = None
            out["spooled"] = True
            return out
        if failure is not None:
            raise failure
        return None


def open_source(settings: Settings) -> LedgerView | None:
    config = parse_settings(settings)
    if not config.enabled:
        return None
    return LedgerView(writer_for(config))


@dataclass(frozen=True, slots=True)
class TraceWritten:
    exchanges: int
    without_bodies: int      # retained as hashes only, or redacted


def write_trace(ledger: Ledger, path: str | Path, *,
                on_progress: Callable[[int], None] | None = None) -> TraceWritten:
    """Every exchange entry of the ledger, in index order, as a trace file (JSON Lines, the
    trace format of :func:`entry.to_trace`, with each line's ``ledger_index``): what
    ``distillguard detect --ledger`` reads. ``on_progress`` gets the entries read so far
    every 10,000 entries and at the end."""
    exchanges = without_bodies = read = 0
    with open(path, "wb") as out:
        for row in ledger.store.iter_rows():
            read += 1
            if row.kind == entry.KIND_EXCHANGE:
                line = entry.to_trace(row)
                without_bodies += line["request"] is None
                out.write(orjson.dumps(line) + b"\n")
                exchanges += 1
            if on_progress is not None and not read % 10_000:
                on_progress(read)
    if on_progress is not None:
        on_progress(read)
    return TraceWritten(exchanges, without_bodies)


def iter_exchanges(ledger: Ledger) -> Iterator[Exchange]:
    """Every exchange entry as an :class:`Exchange` (bodies when still retained)."""
    for row in ledger.store.iter_rows():
        if row.kind == entry.KIND_EXCHANGE:
            ex = Exchange.from_trace(entry.to_trace(row))
            ex.extra.pop("ledger_index", None)
            yield ex
