"""Exceptions raised by distillguard, and their OpenAI-format error bodies.

Policy outcomes are values (``Allowed`` / ``Denied``), not exceptions; exceptions are for
requests the gateway cannot serve and for infrastructure faults. The tree::

    DistillguardError
     ├── ConfigError                 bad configuration, raised at start-up only
     ├── StoreError                  state store failure (database down, constraint)
     │    └── NotFound               an account, key or object that does not exist
     └── APIError                    anything that becomes an HTTP error for a client
          ├── InvalidRequest         400 malformed JSON, bad parameter
          ├── Unprocessable          422 well-formed JSON that is not a valid request
          ├── AuthenticationFailed   401 missing, unknown, revoked or expired key
          ├── PermissionDenied       403 policy denial, suspended account
          ├── NotFoundError          404 unknown model or route
          ├── MethodNotAllowed       405 a route that does not take this method
          ├── PayloadTooLarge        413 request body over the configured limit
          ├── ClientClosedRequest    499 the client left before its request was read
          │                              (nginx's code; recorded, nothing is sent)
          ├── RateLimited            429 rate limit or quota (carries Retry-After)
          ├── UpstreamError          502 upstream 5xx, refused or dropped connection
          ├── ServiceUnavailable     503 a shared service (Redis, database) is down and
          │                              the configured failure mode is fail-closed
          └── UpstreamTimeout        504 upstream did not answer in time

``APIError.body()`` renders ``{"error": {"message", "type", "param", "code"}}``. Exactly one
place turns exceptions into HTTP responses: :mod:`distillguard.gateway.errors`.
Messages never contain secrets: keys are referred to by their public key id only.
"""

from __future__ import annotations

from typing import Any


class DistillguardError(Exception):
    """Base of every distillguard exception."""


class ConfigError(DistillguardError):
    """Configuration is invalid; raised when a component starts, never per request."""


class StoreError(DistillguardError):
    """The state store failed or refused an operation."""


class NotFound(StoreError):
    """The requested object does not exist."""


class InvalidRecord(StoreError, ValueError):
    """The state store will not keep this account or key as given; the message names the
    field and what it takes, and ``field`` names it for an API's error (None where the
    check that refused it does not know one). A ValueError too, for callers that parse
    records."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def message_of(exc: BaseException) -> str:
    """An exception's message as a person reads it: ``str()`` of a KeyError quotes its
    message (other messages may end in a quote of their own, so none is stripped)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


class APIError(DistillguardError):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unprocessable(APIError):
    status = 422
    type = "invalid_request_error"
    code = "unprocessable_request"


class AuthenticationFailed(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status = 403
    type = "permission_denied"
    code = "permission_denied"


class NotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ClientClosedRequest(APIError):
    """The client closed the connection before its request body arrived. No one reads the
    answer; the status (nginx's 499) is for the record, which an authenticated attempt
    must not be missing from."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"  # OpenAI uses "requests" / "tokens"; the code says which
    code = "rate_limit_exceeded"


class UpstreamError(APIError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamTimeout(APIError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
