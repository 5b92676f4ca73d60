"""Review queue: flagged items with their evidence; confirm, dismiss or escalate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from distillguard.dashboard.urls import object_id, page_url
from distillguard.dashboard.views.common import actor, links
from distillguard.gateway.admin import accounts_changed

if TYPE_CHECKING:
    from distillguard.dashboard.app import Dashboard

DECISIONS = ("confirm", "dismiss", "escalate")
STATUSES = ("open", "escalated", "confirmed", "dismissed", "all")


async def page(dash: Dashboard, request: Request) -> Response:
    status = request.query_params.get("status", "open")
    if status not in STATUSES:
        status = "open"
    limit = dash.options.page_size
    policy = dash.sources.policy
    rows = await policy.review_items(status=status, after=request.query_params.get("after"),
                                     limit=limit)
    cursor = {"after": str(rows[-1]["item_id"])} if rows else None
    return dash.render(request, "review.html", title="Review queue", section="review",
                       rows=rows, status=status, statuses=STATUSES, decisions=DECISIONS,
                       page=links(request, rows, limit, cursor),
                       available=getattr(policy, "review_available", False))


async def decide(dash: Dashboard, request: Request) -> Response:
    form = await request.form()
    decision = str(form.get("decision") or "")
    reason = str(form.get("reason") or "").strip()
    item_id = object_id(request, "item_id")
    if item_id is None:
        raise HTTPException(404, "This address names no review item.")
    if decision not in DECISIONS:
        raise HTTPException(400, f"Unknown decision {decision!r}.")
    if len(reason) < 3:
        raise HTTPException(400, "Give a reason (at least 3 characters).")
    try:
        message = await dash.sources.policy.decide(item_id, decision, reason[:500],
                                                   actor(request))
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    await accounts_changed(request)     # a confirmed item may have applied an action
    return dash.done(request, page_url(dash.base, "review"), message)
