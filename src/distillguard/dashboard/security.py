"""Log-in sessions, CSRF tokens and response headers for the dashboard.

A session is a cookie holding ``{"sid", "csrf"}`` signed with itsdangerous (HMAC-SHA1
over a key derived from the session secret and the admin token; see
:meth:`DashboardSettings.signing_key`). The cookie is ``HttpOnly``, ``SameSite=Strict``,
``Secure`` (configurable) and scoped to ``/dashboard``. Every state-changing form carries
the session's CSRF token; the log-in form carries a short-lived signed token of its own.
The status banner after an action (``?done=``) shows only a message the dashboard signed
for the session whose action it reports, never text from the address.
POSTs whose ``Origin`` names another site are refused whatever the token.
:class:`SecurityHeaders` puts :data:`HEADERS` on every response the dashboard sends.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "dg_session"
COOKIE_PATH = "/dashboard"
LOGIN_TOKEN_MAX_AGE_S = 3600
DONE_MAX_AGE_S = 600

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    csrf: str


class Sessions:
    """Issues and checks session cookies and CSRF tokens."""

    def __init__(self, key: bytes, *, max_age_s: int, secure: bool) -> None:
        self._cookies = URLSafeTimedSerializer(key, salt="dashboard-session")
        self._login = URLSafeTimedSerializer(key, salt="dashboard-login")
        self._done = URLSafeTimedSerializer(key, salt="dashboard-done")
        self.max_age_s = max_age_s
        self.secure = secure

    def new(self) -> Session:
        return Session(sid=secrets.token_urlsafe(16), csrf=secrets.token_urlsafe(24))

    def load(self, request: Request) -> Session | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self._cookies.loads(raw, max_age=self.max_age_s)
        except (BadSignature, SignatureExpired):
            return None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str)
                                                 for k in ("sid", "csrf")):
            return None
        return Session(sid=data["sid"], csrf=data["csrf"])

    def set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, self._cookies.dumps({"sid": session.sid,
                                                         "csrf": session.csrf}),
                            max_age=self.max_age_s, path=COOKIE_PATH, secure=self.secure,
                            httponly=True, samesite="strict")

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


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


class SecurityHeaders:
    """Pure ASGI middleware: :data:`HEADERS` on every response of the app it wraps (pages,
    redirects, JSON, static files, error pages), unless the response set one itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, sending)
