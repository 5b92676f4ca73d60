"""The one place where exceptions become HTTP responses (and SSE error events).

Every :class:`~distillguard.errors.APIError` becomes its OpenAI-format body and status;
a policy :class:`~distillguard.pipeline.Denied` value is turned into the matching APIError
here too, and so is a route the router cannot match (Starlette's 404 and 405, plain text
of their own) on the admin API and any other app without a catch-all, and so is an
upstream 4xx whose body is not in OpenAI's format (:func:`upstream_client_error`).
Anything else is a bug: it is logged with its traceback and the client gets a 500 in the
same format, without internal details.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

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


# The most of an upstream's own error message a wrapped error keeps.
UPSTREAM_MESSAGE_MAX = 500
# The OpenAI error type of an upstream 4xx, by status (others: invalid_request_error).
_UPSTREAM_ERROR_TYPES = {401: "authentication_error", 403: "permission_error",
                         429: "rate_limit_error"}


def is_openai_error(body: Any) -> bool:
    """Whether ``body`` is OpenAI's error object: ``{"error": {"message": <string>,
    "type", "param", "code"}}``."""
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str)
            and {"type", "param", "code"} <= error.keys())


def upstream_client_error(status: int, content_type: str, payload: bytes, parsed: Any
                          ) -> APIError:
    """An upstream 4xx whose body is not OpenAI's error object, as one that is, with the
    upstream's status: vLLM's ``{"object": "error", "message": ...}``, a text/plain
    ``Not Found``, an HTML page or nothing reached clients as it came, and the openai
    client's error then had no message or code. The upstream's message text is kept where
    there is one (cut at UPSTREAM_MESSAGE_MAX characters); the caller removes secrets
    from ``payload`` first."""
    message = _upstream_message(content_type, payload, parsed)
    if not message:
        message = f"The model server answered {_status_line(status)}."
    elif len(message) > UPSTREAM_MESSAGE_MAX:
        message = message[:UPSTREAM_MESSAGE_MAX - 1] + "\u2026"
    error = parsed.get("error") if isinstance(parsed, dict) else None
    fields = error if isinstance(error, dict) else parsed if isinstance(parsed, dict) else {}
    param = fields.get("param")
    err = APIError(message, code="upstream_client_error",
                   param=param if isinstance(param, str) else None)
    err.status = status
    err.type = _UPSTREAM_ERROR_TYPES.get(status, "invalid_request_error")
    return err


def _upstream_message(content_type: str, payload: bytes, parsed: Any) -> str:
    if isinstance(parsed, dict):
        error = parsed.get("error")
        for holder, name in ((error, "message"), (parsed, "error"), (parsed, "message"),
                             (parsed, "detail")):
            if isinstance(holder, dict) and isinstance(holder.get(name), str):
                return " ".join(holder[name].split())
        return ""
    if parsed is None and content_type.split(";")[0].strip().lower() == "text/plain":
        return " ".join(payload[:4 * UPSTREAM_MESSAGE_MAX].decode("utf-8", "replace").split())
    return ""


def _status_line(status: int) -> str:
    """``429 Too Many Requests``; the number alone for a status without a name."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


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
