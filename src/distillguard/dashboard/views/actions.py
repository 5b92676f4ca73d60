"""Action-ladder forms (every action needs a reason and is audited) and the audit trail."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from distillguard.dashboard.security import safe_next
from distillguard.dashboard.views.common import actor
from distillguard.gateway.admin import accounts_changed

if TYPE_CHECKING:
    from distillguard.dashboard.app import Dashboard


async def apply(dash: Dashboard, request: Request) -> Response:
    form = await request.form()
    kind = str(form.get("kind") or "")
    target = str(form.get("target") or "").strip()
    action = str(form.get("action") or "")
    reason = str(form.get("reason") or "").strip()
    nxt = safe_next(str(form.get("next") or ""), dash.base)
    policy = dash.sources.policy
    if kind not in ("account", "campaign") or not target:
        raise HTTPException(400, "The form names no account or campaign.")
    if action not in policy.ladder:
        raise HTTPException(400, f"Unknown action {action!r}; the ladder is "
                                 f"{', '.join(policy.ladder)}.")
    if len(reason) < 3:
        raise HTTPException(400, "Give a reason (at least 3 characters); it goes into the "
                                 "audit trail.")
    if kind == "campaign":
        campaign = await dash.sources.verdicts.campaign(target)
        if campaign is None:
            raise HTTPException(404, f"There is no campaign {target!r}.")
        accounts = list(campaign.accounts)
    else:
        accounts = [target]
    try:
        message = await policy.apply(kind, target, action, reason[:500], actor(request),
                                     accounts)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    except LookupError as exc:          # an account the state store does not know
        raise HTTPException(404, f"There is {exc.args[0]}.") from None
    await accounts_changed(request)     # this replica judges the next request on it
    return dash.done(request, nxt, message)


async def audit_page(dash: Dashboard, request: Request) -> Response:
    subject = request.query_params.get("subject") or None
    events = await dash.sources.policy.audit(subject, limit=200)
    return dash.render(request, "audit.html", title="Audit trail", section="review",
                       events=events, subject=subject)
