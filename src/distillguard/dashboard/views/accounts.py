"""Accounts: search by id, org, key or address; one account; one exchange."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from distillguard.dashboard import charts, queries
from distillguard.dashboard.urls import object_id, page_url
from distillguard.dashboard.views.common import links
from distillguard.errors import NotFound

if TYPE_CHECKING:
    from distillguard.dashboard.app import Dashboard

log = logging.getLogger("distillguard.dashboard")


async def search_page(dash: Dashboard, request: Request) -> Response:
    q = request.query_params.get("q", "").strip()[:200]
    limit = dash.options.page_size
    rows = await queries.search_accounts(dash.sources.engine, q,
                                         after=request.query_params.get("after"), limit=limit)
    cursor = {"after": rows[-1]["account_id"]} if rows else None
    return dash.render(request, "accounts.html", title="Accounts", section="accounts", q=q,
                       rows=rows, page=links(request, rows, limit, cursor))


def _before(request: Request) -> tuple[str, str] | None:
    ts, ident = request.query_params.get("before_ts"), request.query_params.get("before_id")
    return (ts, ident) if ts and ident else None


async def detail_page(dash: Dashboard, request: Request) -> Response:
    account_id = object_id(request, "account_id")
    if account_id is None:              # /dashboard/accounts/: the search page
        return dash.redirect(page_url(dash.base, "accounts"))
    state = dash.sources.state
    assert state is not None
    try:
        account = await state.get_account(account_id)
    except NotFound:
        raise HTTPException(404, f"There is no account {account_id!r}.") from None
    engine = dash.sources.engine
    profile = await queries.account_profile(engine, account_id)
    limit = dash.options.page_size
    rows = await queries.exchanges_page(engine, column="account_id", values=[account_id],
                                        before=_before(request), limit=limit)
    cursor = {"before_ts": rows[-1]["ts"], "before_id": rows[-1]["exchange_id"]} if rows else None
    policy, verdicts = dash.sources.policy, dash.sources.verdicts
    hours = [f"{h:02d}" for h in range(24)]
    campaigns = await verdicts.campaigns_of(account_id)
    # the account's own actions and those taken on its campaigns, newest first
    audit = await policy.actions(f"account:{account_id}")
    for campaign_id in campaigns:
        audit += await policy.actions(f"campaign:{campaign_id}")
    audit.sort(key=lambda e: str(e.get("ts") or ""), reverse=True)
    return dash.render(
        request, "account.html", title=f"Account {account_id}", section="accounts",
        a=account.to_public(), keys=[k.to_public() for k in await state.list_keys(account_id)],
        profile=profile, rows=rows, page=links(request, rows, limit, cursor),
        by_hour=charts.stacked_bars([charts.Series("requests", profile["by_hour"], "s0")],
                                    hours, title="Requests by hour of day (UTC)",
                                    ident="hours"),
        capabilities=charts.hbars(profile["capabilities"], title="Capability mix",
                                  ident="caps"),
        history=await verdicts.account_history(account_id),
        campaigns=campaigns, ladder=policy.ladder, audit=audit,
        next=page_url(dash.base, "accounts", account_id))


def _pretty(body: Any) -> str:
    return orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()


async def exchange_page(dash: Dashboard, request: Request) -> Response:
    exchange_id = object_id(request, "exchange_id")
    if exchange_id is None:
        raise HTTPException(404, "This address names no exchange.")
    row = await queries.exchange_row(dash.sources.engine, exchange_id)
    record = None
    unreadable = None
    ledger = dash.sources.ledger
    if ledger is not None:
        try:
            record = await ledger.exchange(exchange_id)
        except Exception as exc:   # the store is away and the spool does not hold it
            log.warning("dashboard: the ledger's store cannot be read (%s: %s)",
                        type(exc).__name__, exc)
            unreadable = type(exc).__name__
    if row is None and record is None and unreadable is None:
        raise HTTPException(404, f"There is no exchange {exchange_id!r}.")
    bodies = None
    if record is not None and (record.get("request") is not None
                               or record.get("response") is not None):
        bodies = {"request": _pretty(record.get("request")),
                  "response": _pretty(record.get("response"))}
    return dash.render(request, "exchange.html", title=f"Exchange {exchange_id}",
                       section="accounts", x=row or record, record=record, bodies=bodies,
                       exchange_id=exchange_id, ledger=ledger is not None,
                       unreadable=unreadable)
