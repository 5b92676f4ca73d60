"""The policy component's admin API routes (behind the admin token, on the admin port).

Documented in docs/policy.md ("Admin API")::

    GET  /admin/v1/policy                          the running policy: file, rules, state
    POST /admin/v1/policy/reload                   re-read the policy file (422 if invalid)
    GET  /admin/v1/policy/actions?account=&active=  actions, newest first
    POST /admin/v1/policy/actions                  {account_ids, action, reason, expires_in,
                                                    limits}: apply (or extend) an action
    POST /admin/v1/policy/actions/revoke           {account_ids, actions?, reason}: lift
    POST /admin/v1/policy/verdicts                 apply a verdicts document's rules
    POST /admin/v1/policy/screen                   screen accounts now {force?}
    GET  /admin/v1/policy/audit?subject=&limit=    audit events, newest first
    GET  /admin/v1/review?status=&after=&limit=    the review queue
    GET  /admin/v1/review/{item_id}                one item
    POST /admin/v1/review/{item_id}                {decision, reason}: confirm/dismiss/escalate

The analyst is named by the ``x-distillguard-actor`` header (default ``admin``); it is
recorded with every action and decision. A route that applies or lifts actions has this
replica hold the change before it answers
(:func:`distillguard.gateway.admin.accounts_changed`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from distillguard.config import Settings
from distillguard.errors import NotFoundError, Unprocessable, message_of
from distillguard.gateway.admin import (
    accounts_changed,
    admin_actor,
    fields_only,
    json_body,
    json_response,
)
from distillguard.gateway.adminauth import check_admin
from distillguard.gateway.adminpaths import IdRoute
from distillguard.policy import audit
from distillguard.policy.actions import list_actions
from distillguard.policy.review import list_items
from distillguard.policy.runtime import PolicyRuntime
from distillguard.policy.verdictfeed import VerdictActions
from distillguard.verdicts import Verdicts

Handler = Callable[[Request], Awaitable[Response]]


def _accounts(data: dict[str, Any]) -> list[str]:
    ids = data.get("account_ids") or ([data["account_id"]] if data.get("account_id") else [])
    if not isinstance(ids, list) or not ids or not all(isinstance(a, str) for a in ids):
        raise Unprocessable("Name the accounts: 'account_ids' (a list) or 'account_id'.",
                            param="account_ids")
    return ids


def _object(data: Any, fields: frozenset[str]) -> dict[str, Any]:
    """A request body of ``fields`` only (:func:`fields_only`), naming its accounts one
    way."""
    data = fields_only(data, fields)
    if "account_id" in data and "account_ids" in data:
        raise Unprocessable("Name the accounts one way: 'account_ids' or 'account_id'.",
                            param="account_id")
    return data


_APPLY_FIELDS = frozenset({"account_id", "account_ids", "action", "reason", "expires_in",
                           "limits"})
_REVOKE_FIELDS = frozenset({"account_id", "account_ids", "actions", "reason"})
_DECIDE_FIELDS = frozenset({"decision", "reason"})
_SCREEN_FIELDS = frozenset({"force"})


def _int(request: Request, name: str, default: int, top: int = 1000) -> int:
    try:
        return max(1, min(top, int(request.query_params.get(name, default))))
    except ValueError:
        raise Unprocessable(f"'{name}' must be an integer.", param=name) from None


class PolicyAdmin:
    def __init__(self, settings: Settings, runtime: PolicyRuntime) -> None:
        self.settings = settings
        self.runtime = runtime

    def guard(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            await check_admin(request, self.settings.admin.token)
            try:
                return await handler(request)
            except ValueError as exc:
                raise Unprocessable(str(exc)) from None
            except LookupError as exc:
                raise NotFoundError(message_of(exc)) from None
        return guarded

    def routes(self) -> list[BaseRoute]:
        g = self.guard
        return [
            Route("/admin/v1/policy", g(self.status), methods=["GET"]),
            Route("/admin/v1/policy/reload", g(self.reload), methods=["POST"]),
            Route("/admin/v1/policy/actions", g(self.actions), methods=["GET"]),
            Route("/admin/v1/policy/actions", g(self.apply), methods=["POST"]),
            Route("/admin/v1/policy/actions/revoke", g(self.revoke), methods=["POST"]),
            Route("/admin/v1/policy/verdicts", g(self.verdicts), methods=["POST"]),
            Route("/admin/v1/policy/screen", g(self.screen), methods=["POST"]),
            Route("/admin/v1/policy/audit", g(self.audit), methods=["GET"]),
            Route("/admin/v1/review", g(self.review_list), methods=["GET"]),
            IdRoute("/admin/v1/review/{item_id}", g(self.review_get), methods=["GET"]),
            IdRoute("/admin/v1/review/{item_id}", g(self.review_decide), methods=["POST"]),
        ]

    @staticmethod
    def actor(request: Request) -> str:
        return admin_actor(request)

    async def status(self, request: Request) -> Response:
        return json_response(self.runtime.status())

    async def reload(self, request: Request) -> Response:
        from distillguard.errors import ConfigError

        try:
            await self.runtime.reload(actor=self.actor(request), channel="admin")
        except ConfigError as exc:
            raise Unprocessable(f"The policy file was not reloaded; the running policy "
                                f"stays. {exc}", code="invalid_policy") from None
        return json_response({"reloaded": True, **self.runtime.status()})

    async def actions(self, request: Request) -> Response:
        q = request.query_params
        rows = await list_actions(self.runtime.engine, q.get("account") or None,
                                  active_only=q.get("active") in ("1", "true"),
                                  limit=_int(request, "limit", 200))
        return json_response({"object": "list", "data": [a.to_json() for a in rows]})

    async def apply(self, request: Request) -> Response:
        data = _object(await json_body(request), _APPLY_FIELDS)
        limits = data.get("limits")
        if limits is not None and not isinstance(limits, dict):
            raise Unprocessable("'limits' must be an object of limit names and numbers.",
                                param="limits")
        detail = {"limits": limits} if limits is not None else None
        accounts = _accounts(data)
        done = await self.runtime.ops().apply(
            accounts, str(data.get("action") or ""), reason=str(data.get("reason") or ""),
            actor=self.actor(request), channel="admin",
            expires_in=data.get("expires_in", "default"), detail=detail)
        await accounts_changed(request)
        acted = {a.action.account_id for a in done}
        return json_response({"object": "list", "data": [a.to_json() for a in done],
                              "unchanged": [a for a in dict.fromkeys(accounts)
                                            if a not in acted]}, 201)

    async def revoke(self, request: Request) -> Response:
        data = _object(await json_body(request), _REVOKE_FIELDS)
        reason = str(data.get("reason") or "").strip()
        if len(reason) < 3:
            raise Unprocessable("Give a reason (at least 3 characters).", param="reason")
        names = data.get("actions")
        done = await self.runtime.ops().lift(_accounts(data), actions=names, reason=reason,
                                             actor=self.actor(request), channel="admin")
        await accounts_changed(request)
        return json_response({"object": "list", "data": [a.to_json() for a in done]})

    async def verdicts(self, request: Request) -> Response:
        doc = Verdicts.from_json(await json_body(request))
        applier = VerdictActions(self.runtime.engine, self.runtime.policy)
        await applier.apply_document(doc)
        await accounts_changed(request)
        return json_response({"actions": applier.applied, "extended": applier.extended,
                              "review_items": applier.reviews})

    async def screen(self, request: Request) -> Response:
        raw = await request.body()
        data = _object(await json_body(request), _SCREEN_FIELDS) if raw.strip() else {}
        stats = await self.runtime.ops().screen_accounts(force=bool(data.get("force")))
        return json_response(stats)

    async def audit(self, request: Request) -> Response:
        rows = await audit.query(self.runtime.engine, request.query_params.get("subject"),
                                 limit=_int(request, "limit", 50))
        return json_response({"object": "list", "data": rows})

    async def review_list(self, request: Request) -> Response:
        q = request.query_params
        rows = await list_items(self.runtime.engine, status=q.get("status", "open"),
                                after=q.get("after"), limit=_int(request, "limit", 50),
                                subject=q.get("subject"))
        return json_response({"object": "list", "data": [r.to_json() for r in rows]})

    async def review_get(self, request: Request) -> Response:
        item = await self.runtime.ops().get_item(request.path_params["item_id"])
        if item is None:
            raise NotFoundError(f"No review item {request.path_params['item_id']}.")
        return json_response(item.to_json())

    async def review_decide(self, request: Request) -> Response:
        data = _object(await json_body(request), _DECIDE_FIELDS)
        item, applied = await self.runtime.ops().decide(
            request.path_params["item_id"], str(data.get("decision") or ""),
            str(data.get("reason") or ""), self.actor(request), channel="admin")
        await accounts_changed(request)
        return json_response({**item.to_json(), "applied": [a.to_json() for a in applied]})
