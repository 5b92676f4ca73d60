"""Helpers shared by the page handlers: paging links and query parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request

from distillguard.dashboard.queries import RANGES
from distillguard.dashboard.urls import request_target


@dataclass(frozen=True, slots=True)
class PageLinks:
    first_url: str | None
    next_url: str | None


def links(request: Request, rows: list[dict[str, Any]], limit: int,
          cursor: dict[str, str] | None) -> PageLinks:
    """Keyset links: ``next`` carries the last row's key, ``first`` drops it."""
    params = {k: v for k, v in request.query_params.items()
              if k not in ("after", "before_ts", "before_id", "done")}
    path = request_target(request).split("?", 1)[0]   # as sent: an id's %2F stays one
    current = set(request.query_params) & {"after", "before_ts", "before_id"}
    first = f"{path}?{urlencode(params)}" if current else None
    nxt = None
    if len(rows) >= limit and cursor:
        nxt = f"{path}?{urlencode({**params, **cursor})}"
    return PageLinks(first, nxt)


def range_param(request: Request, default: str = "24h") -> str:
    value = request.query_params.get("range", default)
    return value if value in RANGES else default


def actor(request: Request) -> str:
    session = request.scope.get("dg_session")
    return f"dashboard:{session.sid[:8]}" if session is not None else "dashboard"
