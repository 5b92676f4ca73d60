"""The admin HTTP API, on its own port, behind the admin credential.

All routes live under ``/admin/v1`` and need ``Authorization: Bearer <admin token>``
(``admin.token`` / ``DISTILLGUARD_ADMIN_TOKEN``). With no token configured the admin API
refuses every request. Errors use the same OpenAI-format bodies as the public API.

Routes (documented in docs/admin-api.md)::

    GET    /admin/v1/accounts?query=&limit=&offset=    list accounts
    POST   /admin/v1/accounts                          create an account (accounts format;
                                                       status: components.create_account)
    POST   /admin/v1/accounts/import                   import accounts JSON Lines (all or none;
                                                       status: components.import_accounts)
    GET    /admin/v1/accounts/export                   export accounts JSON Lines
    GET    /admin/v1/accounts/{id}                     one account
    PATCH  /admin/v1/accounts/{id}                     change tier, status, country, limits...
                                                       (status: components.update_account)
    GET    /admin/v1/accounts/{id}/keys                the account's keys (never secrets)
    POST   /admin/v1/accounts/{id}/keys                new key; the secret is in this answer only
    DELETE /admin/v1/keys/{key_id}                     revoke a key

An ``{id}`` is one percent-encoded path segment, ``quote(id, safe="")``: an account id may
hold ``/``, so these routes match the path as the client sent it (:mod:`.adminpaths`).
No route redirects, not even to the same path with or without a final slash.

Other components add their routes through :attr:`AdminAPI.routes` before the app is built.

A request that changes accounts (their status, an import, a component's actions) brings
what this replica holds of them in memory up to date before it answers
(:meth:`AdminAPI.accounts_changed`; a component's route calls :func:`accounts_changed`), so
the next request this replica serves is judged on the change. Other replicas learn of it
within ``state.key_cache_ttl_s`` and their components' own refresh intervals.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from distillguard.components import (
    check_tier,
    create_account,
    import_accounts,
    known_tiers,
    update_account,
)
from distillguard.errors import (
    APIError,
    InvalidRecord,
    InvalidRequest,
    NotFound,
    NotFoundError,
    StoreError,
    Unprocessable,
)
from distillguard.exchange import MAX_JSON_DEPTH, MAX_JSON_INT, nested_deeper_than
from distillguard.gateway.adminauth import FailedAuthThrottle, check_admin
from distillguard.gateway.adminpaths import IdRoute
from distillguard.gateway.clientip import ClientIPResolver
from distillguard.gateway.errors import EXCEPTION_HANDLERS
from distillguard.store import all_accounts
from distillguard.store.models import Account, AccountImport, key_expiry

# What POST /admin/v1/accounts/{id}/keys takes.
_KEY_FIELDS = frozenset({"name", "expires_at", "expires_in_days", "limits"})

if TYPE_CHECKING:
    from distillguard.gateway.app import Gateway

Handler = Callable[[Request], Awaitable[Response]]
# What a component brings up to date after accounts changed (Extension.on_accounts_changed).
AccountsChanged = Callable[[], Awaitable[None]]

log = logging.getLogger("distillguard.gateway")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if nested_deeper_than(body):    # the store writes it back with orjson (254 levels)
        raise InvalidRequest(f"The request body nests objects and arrays more than "
                             f"{MAX_JSON_DEPTH} levels deep.", code="body_too_deep")
    return body


def admin_actor(request: Request) -> str:
    """Who sent an admin request: the ``x-distillguard-actor`` header (default ``admin``),
    recorded with what it changes."""
    return (request.headers.get("x-distillguard-actor") or "admin").strip()[:100]


async def accounts_changed(request: Request) -> None:
    """For a component's admin route that changed accounts (an action applied or lifted):
    :meth:`AdminAPI.accounts_changed` of the admin app serving ``request``, before it
    answers. An app built otherwise holds nothing of accounts to bring up to date."""
    changed = getattr(request.app.state, "accounts_changed", None)
    if changed is not None:
        await changed()


def fields_only(data: Any, fields: frozenset[str]) -> dict[str, Any]:
    """A request body that is a JSON object of ``fields`` only; Unprocessable naming the
    first other field. A misspelt field was dropped without a word: ``expires_in`` made a
    key that never expires, ``expire_in`` gave an action the default expiry."""
    if not isinstance(data, dict):
        raise Unprocessable(f"Send a JSON object with {', '.join(sorted(fields))}.")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise Unprocessable(f"Unknown field(s) {unknown}; this request takes "
                            f"{', '.join(sorted(fields))}.", param=unknown[0])
    return data


def parse_jsonl(raw: bytes, parse: Callable[[Any], Any]) -> list[Any]:
    """Parse JSON Lines, naming the first bad line; blank lines are skipped."""
    out = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(parse(orjson.loads(line)))
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            raise Unprocessable(f"line {number}: {exc}", code="invalid_line") from None
    return out


class AdminAPI:
    def __init__(self, gateway: Gateway, *,
                 on_accounts_changed: Sequence[AccountsChanged] = ()) -> None:
        self.gateway = gateway
        self.on_accounts_changed = list(on_accounts_changed)
        self.routes: list[BaseRoute] = [
            Route("/admin/v1/accounts", self.guard(self.list_accounts), methods=["GET"]),
            Route("/admin/v1/accounts", self.guard(self.create_account), methods=["POST"]),
            Route("/admin/v1/accounts/import", self.guard(self.import_accounts),
                  methods=["POST"]),
            Route("/admin/v1/accounts/export", self.guard(self.export_accounts),
                  methods=["GET"]),
            IdRoute("/admin/v1/accounts/{account_id}", self.guard(self.get_account),
                    methods=["GET"]),
            IdRoute("/admin/v1/accounts/{account_id}", self.guard(self.update_account),
                    methods=["PATCH"]),
            IdRoute("/admin/v1/accounts/{account_id}/keys", self.guard(self.list_keys),
                    methods=["GET"]),
            IdRoute("/admin/v1/accounts/{account_id}/keys", self.guard(self.create_key),
                    methods=["POST"]),
            IdRoute("/admin/v1/keys/{key_id}", self.guard(self.revoke_key),
                    methods=["DELETE"]),
        ]

    def guard(self, handler: Handler) -> Handler:
        """Require the admin credential; map store errors to API errors."""

        async def guarded(request: Request) -> Response:
            await self.authenticate(request)
            try:
                return await handler(request)
            except NotFound as exc:
                raise NotFoundError(str(exc)) from None
            except InvalidRecord as exc:      # a field that cannot be right, named
                raise Unprocessable(str(exc), param=exc.field) from None
            except StoreError as exc:
                raise Unprocessable(str(exc), code="conflict") from None

        return guarded

    async def authenticate(self, request: Request) -> None:
        await check_admin(request, self.gateway.settings.admin.token)

    async def accounts_changed(self) -> None:
        """After an admin request changed accounts, before it answers: drop this replica's
        cached key look-ups (which hold the accounts' status) and have every component
        bring what it holds of accounts up to date (``Extension.on_accounts_changed``: the
        policy component's mirror of active actions). The change is stored already: a
        component that fails here is logged and catches up at its next refresh."""
        self.gateway.auth.forget()
        for hook in self.on_accounts_changed:
            try:
                await hook()
            except Exception:
                log.exception("admin: an account change is not in memory until the next "
                              "refresh")

    def app(self, extra_routes: list[BaseRoute] | None = None) -> Starlette:
        app = Starlette(routes=[*self.routes, *(extra_routes or [])],
                        exception_handlers=EXCEPTION_HANDLERS)  # type: ignore[arg-type]
        # No redirect to the path with or without a final slash: Starlette builds its
        # address from the request's Host header, so a forged Host redirected to another
        # site. Such a path is an unknown one (404, unknown_url), as on the public API.
        app.router.redirect_slashes = False
        # one count of failed authentications for every route of this app (check_admin)
        app.state.failed_auth = FailedAuthThrottle(
            self.gateway.settings.admin.failed_auth_per_minute, self.gateway.counters,
            "admin-auth")
        app.state.accounts_changed = self.accounts_changed
        app.state.client_ip = ClientIPResolver(self.gateway.settings.server.trusted_proxies)
        # An app a component mounts here (the dashboard) is the request's app in its
        # routes, so it is given the same hook.
        for route in app.routes:
            if isinstance(route, Mount) and isinstance(route.app, Starlette):
                route.app.state.accounts_changed = self.accounts_changed
        return app

    # -- accounts -----------------------------------------------------------------------

    async def list_accounts(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = max(1, min(1000, int(q.get("limit", 100))))
            offset = int(q.get("offset", 0))
        except ValueError:
            raise InvalidRequest("limit and offset must be integers.") from None
        if not 0 <= offset <= MAX_JSON_INT:  # PostgreSQL refuses a negative OFFSET (SQLite
            # ignores it), and both fail on one past 64 bits
            raise InvalidRequest(f"offset must be from 0 to {MAX_JSON_INT}.", param="offset")
        accounts = await self.gateway.store.list_accounts(query=q.get("query"), limit=limit,
                                                          offset=offset)
        return json_response({"object": "list",
                              "data": [a.to_public() for a in accounts],
                              "total": await self.gateway.store.count_accounts()})

    async def create_account(self, request: Request) -> Response:
        data = await json_body(request)
        try:
            account = Account.from_public(data)
        except (ValueError, TypeError) as exc:
            raise Unprocessable(str(exc), code="invalid_account",
                                param=getattr(exc, "field", None)) from None
        self._check_tier(account.tier, account.account_id)
        await create_account(self.gateway.settings, self.gateway.store, account,
                             actor=admin_actor(request), reason=None, channel="admin")
        return json_response(account.to_public(), 201)

    async def import_accounts(self, request: Request) -> Response:
        batch = AccountImport.of(parse_jsonl(await request.body(), AccountImport.line))
        known = known_tiers(self.gateway.settings)
        for account in batch.accounts:
            self._check_tier(account.tier, account.account_id, known=known)
        done = await import_accounts(self.gateway.settings, self.gateway.store, batch,
                                     actor=admin_actor(request), reason=None)
        await self.accounts_changed()
        return json_response(done)

    async def export_accounts(self, request: Request) -> Response:
        lines = [orjson.dumps(a.to_public())
                 for a in await all_accounts(self.gateway.store)]
        return Response(b"\n".join(lines) + (b"\n" if lines else b""),
                        media_type="application/x-ndjson")

    def _check_tier(self, tier: Any, account_id: str, *,
                    known: frozenset[str] | None = None) -> None:
        """The account's tier must be one of :func:`~distillguard.components.known_tiers`
        (given as ``known`` when several accounts are checked)."""
        try:
            check_tier(tier, known_tiers(self.gateway.settings) if known is None else known,
                       account_id)
        except InvalidRecord as exc:
            raise Unprocessable(str(exc), param="tier", code="invalid_account") from None

    async def get_account(self, request: Request) -> Response:
        account = await self.gateway.store.get_account(request.path_params["account_id"])
        return json_response(account.to_public())

    async def update_account(self, request: Request) -> Response:
        data = await json_body(request)
        if not isinstance(data, dict) or not data:
            raise Unprocessable("Send a JSON object with the fields to change.")
        account_id = request.path_params["account_id"]
        if data.get("account_id", account_id) != account_id:
            # A PATCH that named another id was applied to this account as if it had not.
            raise Unprocessable("An account's id cannot be changed: create the account "
                                "under the new id.", param="account_id")
        data.pop("account_id", None)
        reason = data.pop("reason", None)
        if reason is not None and (not isinstance(reason, str) or "status" not in data):
            raise Unprocessable("'reason' is a string, given with a change of 'status'.",
                                param="reason")
        if "tier" in data:
            self._check_tier(data["tier"], account_id)
        try:
            account = await update_account(
                self.gateway.settings, self.gateway.store, account_id, data,
                actor=admin_actor(request), reason=reason, channel="admin")
        except ValueError as exc:     # InvalidRecord names its field
            raise Unprocessable(str(exc), param=getattr(exc, "field", None)) from None
        await self.accounts_changed()
        return json_response(account.to_public())

    # -- keys ---------------------------------------------------------------------------

    async def list_keys(self, request: Request) -> Response:
        account_id = request.path_params["account_id"]
        await self.gateway.store.get_account(account_id)
        keys = await self.gateway.store.list_keys(account_id)
        return json_response({"object": "list", "data": [k.to_public() for k in keys]})

    async def create_key(self, request: Request) -> Response:
        data = fields_only(await json_body(request) if (await request.body()).strip()
                           else {}, _KEY_FIELDS)
        if data.get("name") is not None and not isinstance(data["name"], str):
            raise Unprocessable("'name' must be a string.", param="name")
        expires_at = key_expiry(data.get("expires_at"), data.get("expires_in_days"),
                                now=datetime.now(UTC))
        limits = data.get("limits") or {}
        if not isinstance(limits, dict):
            raise Unprocessable("'limits' must be an object.", param="limits")
        key, secret = await self.gateway.store.create_key(
            request.path_params["account_id"], name=data.get("name"), expires_at=expires_at,
            limits=limits)
        return json_response({**key.to_public(), "key": secret}, 201)

    async def revoke_key(self, request: Request) -> Response:
        key = await self.gateway.store.revoke_key(request.path_params["key_id"])
        self.gateway.auth.forget(key.key_id)
        return json_response(key.to_public())


__all__ = ["AccountsChanged", "AdminAPI", "APIError", "accounts_changed", "admin_actor",
           "fields_only", "json_response", "json_body", "parse_jsonl"]
