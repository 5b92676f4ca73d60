"""Log-in sessions, CSRF tokens and response headers for the dashboard.

A session is a cookie holding ``{"sid", "csrf", "iat"}`` (a random session id, the CSRF
token, the log-in time) signed with itsdangerous (HMAC-SHA1 over a key derived from the
session secret and the admin token; see :meth:`DashboardSettings.signing_key`). The
cookie is ``HttpOnly``, ``SameSite=Strict``, ``Secure`` (configurable) and scoped to
``/dashboard``. A session ends ``session_max_age_s`` after log-in, after
``session_idle_s`` without a request (the cookie is signed again, at most once a minute,
as it is used), or at log-out: the session id goes into :class:`EndedSessions`, a table
in the state store that every replica reads before it accepts a cookie. Every
state-changing form carries
the session's CSRF token; the log-in form carries a short-lived signed token of its own.
The status banner after an action (``?done=``) shows only a message the dashboard signed
for the session whose action it reports, never text from the address.
POSTs whose ``Origin`` names another origin than the dashboard's own (:class:`OwnOrigin`:
scheme, host and port) are refused whatever the token.
:class:`SecurityHeaders` puts :data:`HEADERS` on every response the dashboard sends;
:class:`FormSizeLimit` refuses a request body longer than :data:`MAX_FORM_BYTES`.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distillguard.gateway.clientip import ClientIPResolver

COOKIE = "dg_session"
COOKIE_PATH = "/dashboard"
LOGIN_TOKEN_MAX_AGE_S = 3600
DONE_MAX_AGE_S = 600
# a session's cookie is signed again (its idle clock reset) at most this often
RESIGN_AFTER_S = 60
# the longest body a dashboard form sends (its longest field, a reason, is 500 characters)
MAX_FORM_BYTES = 64 * 1024

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
# Sent only on responses that went out over TLS (a browser ignores it over plain HTTP):
# once a browser has seen the dashboard over HTTPS it will not send the session cookie
# over plain HTTP to this host for a year, whatever link it is given. Subdomains are not
# included: other services may live under the same name.
HSTS = {"strict-transport-security": "max-age=31536000"}


SESSION_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS dashboard_sessions_ended (
        sid TEXT PRIMARY KEY, expires_at BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS dashboard_sessions_ended_expires ON dashboard_sessions_ended "
    "(expires_at)",
]


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    csrf: str
    issued: int          # log-in time (Unix seconds): the session ends max_age_s after it
    signed: float = 0.0  # when its cookie was last signed (Unix seconds)


class EndedSessions:
    """Sessions logged out before their time, in the state store's
    ``dashboard_sessions_ended (sid, expires_at)`` so that every replica refuses them. A
    row is kept until the session would have expired anyway, then pruned at a later
    log-out. Each check is one primary-key lookup, made for every request with a valid
    cookie, so a logged-out session stops working on every replica at once."""

    def __init__(self, engine: Callable[[], Awaitable[AsyncEngine]]) -> None:
        self._engine = engine

    async def end(self, sid: str, expires_at: int) -> None:
        engine = await self._engine()
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM dashboard_sessions_ended "
                                    "WHERE expires_at < :now"), {"now": int(time.time())})
            await conn.execute(text(
                "INSERT INTO dashboard_sessions_ended (sid, expires_at) VALUES (:sid, :exp) "
                "ON CONFLICT (sid) DO NOTHING"), {"sid": sid, "exp": expires_at})

    async def ended(self, sid: str) -> bool:
        engine = await self._engine()
        async with engine.connect() as conn:
            row = (await conn.execute(text(
                "SELECT 1 FROM dashboard_sessions_ended WHERE sid = :sid"), {"sid": sid})
                   ).first()
        return row is not None


class Sessions:
    """Issues and checks session cookies and CSRF tokens; ends sessions at log-out."""

    def __init__(self, key: bytes, *, max_age_s: int, idle_s: int, secure: bool,
                 ended: EndedSessions) -> None:
        self._cookies = URLSafeTimedSerializer(key, salt="dashboard-session")
        self._login = URLSafeTimedSerializer(key, salt="dashboard-login")
        self._done = URLSafeTimedSerializer(key, salt="dashboard-done")
        self.max_age_s = max_age_s
        self.idle_s = idle_s
        self.secure = secure
        self.ended = ended

    def new(self) -> Session:
        return Session(sid=secrets.token_urlsafe(16), csrf=secrets.token_urlsafe(24),
                       issued=int(time.time()))

    async def load(self, request: Request) -> Session | None:
        """The request's session, or None: no cookie, a bad signature, idle for more than
        ``idle_s``, older than ``max_age_s``, or logged out (on any replica)."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data, signed = self._cookies.loads(raw, max_age=self.idle_s, return_timestamp=True)
        except (BadSignature, SignatureExpired):
            return None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str)
                                                 for k in ("sid", "csrf")):
            return None
        issued = data.get("iat")
        if type(issued) is not int or time.time() - issued > self.max_age_s:
            return None
        if await self.ended.ended(data["sid"]):
            return None
        return Session(sid=data["sid"], csrf=data["csrf"], issued=issued,
                       signed=signed.timestamp())

    async def end(self, session: Session) -> None:
        """Log ``session`` out on every replica."""
        await self.ended.end(session.sid, session.issued + self.max_age_s + 1)

    def set_cookie(self, response: Response, session: Session) -> None:
        left = session.issued + self.max_age_s - int(time.time())
        response.set_cookie(COOKIE, self._cookies.dumps({"sid": session.sid,
                                                         "csrf": session.csrf,
                                                         "iat": session.issued}),
                            max_age=max(left, 1), path=COOKIE_PATH, secure=self.secure,
                            httponly=True, samesite="strict")

    def keep_alive(self, response: Response, session: Session) -> None:
        """Sign the cookie again (so ``idle_s`` counts from now) unless it was signed in
        the last minute."""
        if time.time() - session.signed >= RESIGN_AFTER_S:
            self.set_cookie(response, session)

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=self.secure, httponly=True,
                               samesite="strict")

    @staticmethod
    def csrf_ok(session: Session | None, presented: str | None) -> bool:
        if session is None or not presented:
            return False
        return hmac.compare_digest(session.csrf.encode(), presented.encode())

    def done_token(self, session: Session, message: str) -> str:
        """``message`` signed for ``session``: the value of ``?done=`` after an action."""
        return str(self._done.dumps([session.sid, message[:200]]))

    def done_message(self, session: Session | None, presented: str | None) -> str | None:
        """The message of a ``?done=`` value signed for ``session`` in the last ten
        minutes; None for anything else (text, another session's, no session)."""
        if session is None or not presented:
            return None
        try:
            data = self._done.loads(presented, max_age=DONE_MAX_AGE_S)
        except (BadSignature, SignatureExpired):
            return None
        if not (isinstance(data, list) and len(data) == 2 and data[0] == session.sid
                and isinstance(data[1], str)):
            return None
        return data[1]

    def login_token(self) -> str:
        return str(self._login.dumps(secrets.token_urlsafe(8)))

    def login_token_ok(self, presented: str | None) -> bool:
        if not presented:
            return False
        try:
            self._login.loads(presented, max_age=LOGIN_TOKEN_MAX_AGE_S)
        except (BadSignature, SignatureExpired):
            return False
        return True


def safe_next(value: str | None, base: str) -> str:
    """Where to send the browser after log-in or an action: ``value`` when it is a path
    under ``base + "/"`` once its dot segments are resolved as a browser resolves them
    (``%2e`` is a dot there too), else ``base + "/"``, so neither is an open redirect.
    The query is kept; the fragment is dropped."""
    home = base + "/"
    if not value or not value.startswith("/") or any(ord(c) < 0x20 or ord(c) == 0x7F
                                                     for c in value):
        return home             # browsers drop tabs and newlines
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or "\\" in parts.path:   # a path's \ is a / to them
        return home
    segments: list[str] = []
    raw = parts.path.split("/")[1:]
    for n, segment in enumerate(raw):
        dots = unquote(segment)
        if dots in (".", ".."):
            if dots == ".." and segments:
                segments.pop()
            if n == len(raw) - 1:
                segments.append("")
        else:
            segments.append(segment)
    path = "/" + "/".join(segments)
    if not path.startswith(home) or "//" in path:
        return home
    return path + (f"?{parts.query}" if parts.query else "")


DEFAULT_PORTS = {"http": 80, "https": 443}
Origin = tuple[str, str, int]       # scheme, host (lower case, IPv6 without brackets), port


def parse_origin(value: str) -> Origin | None:
    """``scheme://host[:port]`` (an ``Origin`` header, as browsers write it) as
    ``(scheme, host, port)``, the port filled in from the scheme; None for ``null``, another
    scheme, a path, a user name or anything else."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if (scheme not in DEFAULT_PORTS or not host or "@" in parts.netloc or "\\" in value
            or parts.path or parts.query or parts.fragment or value.endswith(("?", "#"))):
        return None
    return scheme, host, DEFAULT_PORTS[scheme] if port is None else port


class OwnOrigin:
    """The origin (scheme, host, port) a request reached the dashboard at, as the browser
    names it, and whether the request's ``Origin`` is that one.

    Host and port are the request's ``Host``. The scheme is the connection's (``https``
    when the admin port serves TLS, ``server.tls_cert_file``), or, when the TCP peer is
    one of ``server.trusted_proxies``, the first value of its ``X-Forwarded-Proto``: a
    TLS-terminating proxy that speaks HTTP to the admin port says ``https`` there. A
    browser cannot add that header to a cross-site form, and it is not believed from any
    other client."""

    def __init__(self, trusted_proxies: Sequence[str]) -> None:
        self._proxies = ClientIPResolver(trusted_proxies)

    def of(self, request: Request) -> Origin | None:
        scheme = str(request.scope.get("scheme") or "http")
        forwarded = request.headers.get("x-forwarded-proto")
        if forwarded and self._proxies.trusts(request.client.host if request.client else None):
            proto = forwarded.split(",", 1)[0].strip().lower()
            if proto in DEFAULT_PORTS:
                scheme = proto
        host = request.headers.get("host")
        if not host or any(c in host for c in "/?#@\\"):
            return None
        return parse_origin(f"{scheme}://{host}")

    def same(self, request: Request) -> bool:
        """False when the browser says the request comes from another origin than the
        dashboard's: another site, or the same host by another scheme or port (``null``,
        from a sandboxed frame or a redirect across sites, is another origin too). A
        request without ``Origin`` (a script, an older browser) is not refused here; its
        CSRF token still has to match."""
        origin = request.headers.get("origin")
        if origin is None:
            return True
        own = self.of(request)
        return own is not None and parse_origin(origin) == own


class SecurityHeaders:
    """Pure ASGI middleware: :data:`HEADERS` on every response of the app it wraps (pages,
    redirects, JSON, static files, error pages), unless the response set one itself, and
    :data:`HSTS` too when the connection is HTTPS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        extra = HSTS if scope.get("scheme") == "https" else {}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in (*HEADERS.items(), *extra.items()):
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, sending)


class FormSizeLimit:
    """Pure ASGI middleware: a request body longer than :data:`MAX_FORM_BYTES` is refused
    with a 413 as soon as the app reads past the limit (at once when ``Content-Length``
    says so), before it is held. Starlette's form parser takes up to a thousand fields
    of 1 MB each into memory, and a multipart file of any size to disk; the log-in form
    reads its body before anything is checked, for anyone who reaches the admin port."""

    def __init__(self, app: ASGIApp, limit: int = MAX_FORM_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        declared = int(length) if length.isascii() and length.isdigit() else 0
        seen = 0

        async def receiving() -> Message:
            nonlocal seen
            if declared <= self.limit and seen <= self.limit:
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                if seen <= self.limit:
                    return message
            raise HTTPException(413, "This form is larger than any the dashboard sends.")

        await self.app(scope, receiving, send)
