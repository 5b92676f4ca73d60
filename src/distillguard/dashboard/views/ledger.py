"""Ledger: latest checkpoint, verification status, inclusion proof for any exchange."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from distillguard.dashboard.urls import page_url

if TYPE_CHECKING:
    from distillguard.dashboard.app import Dashboard

log = logging.getLogger("distillguard.dashboard")

_LAST_VERIFY: dict[int, dict[str, Any]] = {}
_RUNNING: dict[int, asyncio.Task[Any]] = {}


async def page(dash: Dashboard, request: Request) -> Response:
    ledger = dash.sources.ledger
    exchange_id = request.query_params.get("exchange_id", "").strip()[:100]
    checkpoint = proof = None
    error = None
    unreadable = None
    if ledger is not None:
        try:
            checkpoint = await ledger.checkpoint()
            if exchange_id:
                try:
                    proof = await ledger.proof(exchange_id)
                except LookupError as exc:
                    error = str(exc)
        except Exception as exc:   # the store is away: say so, with what waits
            log.warning("dashboard: the ledger's store cannot be read (%s: %s)",
                        type(exc).__name__, exc)
            unreadable = type(exc).__name__
    running = id(dash) in _RUNNING and not _RUNNING[id(dash)].done()
    return dash.render(request, "ledger.html", title="Ledger", section="ledger",
                       available=ledger is not None, checkpoint=checkpoint, proof=proof,
                       exchange_id=exchange_id, error=error, unreadable=unreadable,
                       spooled=ledger.spooled if ledger is not None else 0,
                       verification=_LAST_VERIFY.get(id(dash)), running=running)


async def verify(dash: Dashboard, request: Request) -> Response:
    """Start a full verification in the background; the page shows the result when done."""
    ledger = dash.sources.ledger
    key = id(dash)
    if ledger is not None and (key not in _RUNNING or _RUNNING[key].done()):
        async def run() -> None:
            _LAST_VERIFY[key] = await ledger.verify()

        _RUNNING[key] = asyncio.create_task(run())
        await asyncio.wait({_RUNNING[key]}, timeout=2.0)
    return dash.done(request, page_url(dash.base, "ledger"), "verification started"
                     if key in _RUNNING and not _RUNNING[key].done() else
                     "verification finished")
