"""The admin credential, checked in one place for every admin route (accounts and keys,
policy, the ledger): ``Authorization: Bearer <admin.token>``, compared in constant time.
The token is at least 16 characters (:class:`~distillguard.config.AdminSettings`); the
dashboard's log-in form takes the same token and slows down guessing on its own."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from distillguard.errors import AuthenticationFailed, PermissionDenied


def check_admin(request: Request, token: str | None) -> None:
    """Return if ``request`` carries the admin token; otherwise PermissionDenied (no
    token is configured: the admin API is off) or AuthenticationFailed."""
    if not token:
        raise PermissionDenied("The admin API is disabled: no admin token is configured.",
                               code="admin_disabled")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                             token.encode()):
        raise AuthenticationFailed("Invalid admin credential.", code="invalid_admin_token")
