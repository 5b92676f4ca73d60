"""The one place where exceptions become HTTP responses (and SSE error events).

Every :class:`~distillguard.errors.APIError` becomes its OpenAI-format body and status;
a policy :class:`~distillguard.pipeline.Denied` value is turned into the matching APIError
here too, and so is a route the router cannot match (Starlette's 404 and 405, plain text
of their own) on the admin API and any other app without a catch-all. Anything else is
a bug: it is logged with its traceback and the client gets a 500 in the same format,
without internal details.
"""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from distillguard.errors import (
    APIError,
    InvalidRequest,
    MethodNotAllowed,
    NotFoundError,
    PermissionDenied,
    RateLimited,
)
from distillguard.pipeline import Denied

log = logging.getLogger("distillguard.gateway")


def error_response(exc: APIError, extra_headers: dict[str, str] | None = None) -> Response:
    headers = dict(extra_headers or {})
    headers.update(exc.headers)
    return Response(orjson.dumps(exc.body()), status_code=exc.status,
                    media_type="application/json", headers=headers)


def denied_error(decision: Denied) -> APIError:
    """The APIError for a policy denial; blocks tell clients not to retry."""
    headers = dict(decision.headers)
    if not decision.retry:
        headers["x-should-retry"] = "false"
    if decision.retry_after_s is not None and decision.retry:
        headers["retry-after"] = str(int(max(1, decision.retry_after_s)))
    cls = RateLimited if decision.status == 429 else PermissionDenied
    err = cls(decision.reason, code=decision.code, headers=headers)
    err.status = decision.status
    return err


def sse_error_event(exc: APIError) -> bytes:
    """A mid-stream failure as one SSE event in the OpenAI error shape."""
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def handle_http_error(request: Request, exc: Exception) -> Response:
    """The router's own errors in the API's format: an unknown route, a method the route
    does not take (with its ``Allow`` header)."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    headers = dict(exc.headers or {})
    err: APIError
    if exc.status_code == 404:
        err = NotFoundError(f"Unknown endpoint {where}.", code="unknown_url")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"Method not allowed: {where}.", headers=headers)
    else:
        err = InvalidRequest(str(exc.detail), headers=headers)
        err.status = exc.status_code
    return error_response(err)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = {"error": {"message": "The gateway hit an internal error.", "type": "api_error",
                      "param": None, "code": "internal_error"}}
    return Response(orjson.dumps(body), status_code=500, media_type="application/json")


EXCEPTION_HANDLERS = {APIError: handle_api_error, HTTPException: handle_http_error,
                      Exception: handle_unexpected}
