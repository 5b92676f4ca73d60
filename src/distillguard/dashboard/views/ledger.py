"""Ledger: latest checkpoint, verification status, inclusion proof for any exchange."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from distillguard.dashboard.urls import page_url
from distillguard.exchange import MAX_ID_CHARS

if TYPE_CHECKING:
    from distillguard.dashboard.app import Dashboard

log = logging.getLogger("distillguard.dashboard")

_LAST_VERIFY: dict[int, dict[str, Any]] = {}
_RUNNING: dict[int, asyncio.Task[Any]] = {}


async def page(dash: Dashboard, request: Request) -> Response:
    ledger = dash.sources.ledger
    # looked up exactly as given: an id may hold spaces, and cutting or trimming it could
    # name another exchange ("ex_a " is not "ex_a", nor " 42" entry 42)
    exchange_id = request.query_params.get("exchange_id", "")
    checkpoint = proof = None
    error = None
    unreadable = None
    if len(exchange_id) > MAX_ID_CHARS:
        error = (f"This exchange id is {len(exchange_id)} characters long; exchange ids are "
                 f"at most {MAX_ID_CHARS}, so no exchange has it.")
    if ledger is not None:
        try:
            checkpoint = await ledger.checkpoint()
            if exchange_id and error is None:
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
