"""The dashboard's Starlette application: routing, log-in, rendering, errors.

Page handlers live in :mod:`distillguard.dashboard.views`; they receive the
:class:`Dashboard` (settings, data sources, templates) and the request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distillguard.config import Settings
from distillguard.dashboard.security import (
    HEADERS,
    EndedSessions,
    FormSizeLimit,
    OwnOrigin,
    SecurityHeaders,
    Sessions,
    safe_next,
)
from distillguard.dashboard.settings import DashboardSettings
from distillguard.dashboard.sources import Sources
from distillguard.dashboard.urls import id_fields, page_url, request_target
from distillguard.gateway.adminauth import FailedAuthThrottle, failing_client, token_matches
from distillguard.gateway.clientip import ClientIPResolver
from distillguard.ratelimit import CounterStore, open_counter_store

log = logging.getLogger("distillguard.dashboard")
HERE = Path(__file__).parent
NAV = [("overview", "/", "Overview", "o"), ("campaigns", "/campaigns", "Campaigns", "c"),
       ("accounts", "/accounts", "Accounts", "a"), ("review", "/review", "Review queue", "r"),
       ("ledger", "/ledger", "Ledger", "l")]
Page = Callable[["Dashboard", Request], Awaitable[Response]]


class Lifecycle:
    """A do-nothing pipeline stage whose start/close open and close the data sources
    (and the shared counters of the log-in throttle)."""

    name = "dashboard"

    def __init__(self, sources: Sources, counters: CounterStore | None = None) -> None:
        self.sources = sources
        self.counters = counters

    async def start(self) -> None:
        try:
            await self.sources.open()
        except Exception:  # the gateway serves without its dashboard; pages retry
            log.exception("dashboard: could not open its data sources; pages will retry")

    async def on_exchange(self, exchange: Any) -> None:
        return None

    async def close(self) -> None:
        await self.sources.close()
        if self.counters is not None:
            await self.counters.close()


class Dashboard:
    def __init__(self, settings: Settings, options: DashboardSettings) -> None:
        self.settings = settings
        self.options = options
        token = settings.admin.token or ""
        self.sources = Sources(settings)
        self.sessions = Sessions(options.signing_key(token), max_age_s=options.session_max_age_s,
                                 idle_s=options.session_idle_s, secure=options.cookie_secure,
                                 ended=EndedSessions(self._engine))
        # failed log-ins are counted across replicas where the rate limits are
        counters = (open_counter_store(settings.counters)
                    if settings.counters.backend == "redis" else None)
        self.throttle = FailedAuthThrottle(options.login_attempts_per_minute, counters,
                                           "dashboard-login")
        self.lifecycle = Lifecycle(self.sources, counters)
        self.origin = OwnOrigin(settings.server.trusted_proxies)
        # failed log-ins count against the browser's address, read through the trusted
        # proxies as the gateway reads it (not against the proxy, shared by everyone)
        self.client_ip = ClientIPResolver(settings.server.trusted_proxies)
        self.base = "/dashboard"
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(["html"]), trim_blocks=True,
                               lstrip_blocks=True)
        # every link to a page is made by page_url, which encodes the ids it holds
        self.env.globals.update(page_url=partial(page_url, self.base), id_fields=id_fields)

    async def _engine(self) -> AsyncEngine:
        await self.sources.open()
        return self.sources.engine

    # -- rendering -------------------------------------------------------------------

    def render(self, request: Request, template: str, status_code: int = 200,
               **context: Any) -> HTMLResponse:
        session = request.scope.get("dg_session")
        done = self.sessions.done_message(session, request.query_params.get("done"))
        flashes = [("ok", done)] if done else []
        html = self.env.get_template(template).render(
            base=self.base, session=session, nav=NAV, flashes=flashes, **context)
        return HTMLResponse(html, status_code=status_code)

    def redirect(self, url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303)

    def done(self, request: Request, url: str, message: str) -> RedirectResponse:
        """Redirect to ``url``, which shows ``message`` as its status banner to this
        session only (signed into ``?done=``; text put there by anyone else is not shown)."""
        session = request.scope.get("dg_session")
        if session is not None:
            url += (("&" if "?" in url else "?") + "done="
                    + quote(self.sessions.done_token(session, message), safe=""))
        return self.redirect(url)

    # -- guards ------------------------------------------------------------------------

    def page(self, handler: Page) -> Callable[[Request], Awaitable[Response]]:
        """Require a session; for POST also the CSRF token and a same-origin request."""

        async def endpoint(request: Request) -> Response:
            # without an admin token nobody can log in, and the cookies' signing key
            # (derived from the token) is one anyone can compute: no cookie is a session
            session = (await self.sessions.load(request) if self.settings.admin.token
                       else None)
            if session is None:
                if request.method != "GET":
                    raise HTTPException(403, "Your session has expired; log in again.")
                return self.redirect(page_url(self.base, "login",
                                              next=request_target(request)))
            request.scope["dg_session"] = session
            values = [*request.path_params.values(), *request.query_params.values()]
            if request.method == "POST":
                form = await request.form()
                token = form.get("csrf")
                if not self.origin.same(request) or not self.sessions.csrf_ok(
                        session, token if isinstance(token, str) else None):
                    raise HTTPException(403, "The form token is missing or stale; reload the "
                                             "page and try again.")
                values += form.values()
            if any(isinstance(v, str) and "\x00" in v for v in values):
                # nothing kept can hold NUL, and PostgreSQL fails on it in a query
                raise HTTPException(400, "A value in this address or form holds the NUL "
                                         "character; no account, campaign or reason can.")
            await self.sources.open()
            await self.sources.refresh()
            await self.sources.index.flush()  # show what the gateway has just served
            response = await handler(self, request)
            self.sessions.keep_alive(response, session)
            return response

        return endpoint

    # -- log-in ------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        nxt = safe_next(request.query_params.get("next"), self.base)
        return self.render(request, "login.html", title="Log in", next=nxt,
                           login_token=self.sessions.login_token(), error=None)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        who = failing_client(request, self.client_ip)
        nxt = safe_next(str(form.get("next") or ""), self.base)

        def again(message: str, status: int) -> Response:
            return self.render(request, "login.html", status_code=status, title="Log in", next=nxt,
                               login_token=self.sessions.login_token(), error=message)

        if not self.origin.same(request) or not self.sessions.login_token_ok(
                str(form.get("login_token") or "")):
            return again("The log-in form expired; try again.", 403)
        if not self.settings.admin.token:
            return again("The dashboard is disabled: no admin token is configured.", 403)
        matches = token_matches(str(form.get("token") or ""), self.settings.admin.token)
        if await self.throttle.refusal(who, succeeded=matches):
            return again("Too many failed attempts; wait a minute.", 429)
        if not matches:
            log.warning("dashboard: failed log-in from %s", who)
            return again("That is not the admin token.", 401)
        self.throttle.succeeded(who)
        response = self.redirect(nxt)
        self.sessions.set_cookie(response, self.sessions.new())
        return response

    async def logout(self, request: Request) -> Response:
        session = await self.sessions.load(request)
        form = await request.form()
        token = form.get("csrf")
        if session is not None and not self.sessions.csrf_ok(
                session, token if isinstance(token, str) else None):
            raise HTTPException(403, "The form token is missing or stale.")
        if session is not None:         # ended for every copy of the cookie, everywhere
            await self.sessions.end(session)
        response = self.redirect(page_url(self.base, "login"))
        self.sessions.clear_cookie(response)
        return response

    # -- application -------------------------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.render(request, "error.html", status_code=exc.status_code, title="Error",
                           message=exc.detail, status=exc.status_code)

    def server_error(self, request: Request) -> Response:
        return self.render(request, "error.html", status_code=500, title="Error", status=500,
                           message="This page failed; the error is in the gateway log.")

    def routes(self) -> list[BaseRoute]:
        """The dashboard's routes on the admin app: its pages under ``/dashboard/``, and
        ``/dashboard`` itself, sent there."""
        return [Route(self.base, self.to_home, methods=["GET"]),
                Mount(self.base, app=self.app())]

    async def to_home(self, request: Request) -> Response:
        """``/dashboard`` to ``/dashboard/``, by a relative address. (Starlette's own
        redirect to the path with a slash is absolute, with the host taken from the
        request's Host header: a forged Host made it send the browser, or a cache in
        between, to another site.)"""
        query = request.scope.get("query_string", b"").decode("latin-1")
        return RedirectResponse(self.base + "/" + (f"?{query}" if query else ""),
                                status_code=307, headers=HEADERS)

    def app(self) -> Starlette:
        from distillguard.dashboard import views

        routes = [
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]
        for path, handler, methods in views.ROUTES:
            routes.append(Route(path, self.page(handler), methods=methods))
        app = Starlette(routes=routes,
                        middleware=[Middleware(SecurityHeaders),
                                    Middleware(ServerErrors, dashboard=self),
                                    Middleware(FormSizeLimit)],
                        exception_handlers={HTTPException: self._http_error})
        # No redirect to the address with or without a final slash: Starlette builds
        # it from the Host header (see to_home). A detail page's address without an id
        # (/dashboard/accounts/) sends the browser to its list itself.
        app.router.redirect_slashes = False
        return app


class ServerErrors:
    """A page's unexpected exception, logged once and answered with the dashboard's 500
    page, here. (A handler for Exception on the Starlette app answers and then raises
    again; the gateway's app around the dashboard, finding the answer already sent, made
    the server drop the connection, so a keep-alive client's next request failed.)"""

    def __init__(self, app: ASGIApp, dashboard: Dashboard) -> None:
        self.app = app
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if started:        # nothing can be said any more: the server ends the answer
                raise
            log.exception("dashboard page %s failed", scope.get("path"))
            await self.dashboard.server_error(Request(scope))(scope, receive, send)

