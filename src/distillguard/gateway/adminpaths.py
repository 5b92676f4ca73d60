"""Ids in the admin API's paths.

An account id may be almost any text (``a/b``, ``a?x=1``, ``a#b``, ``a b``, ``ü``,
``..``): the store refuses only NUL, a blank id and one over 256 characters. In a path
the id is one percent-encoded segment, ``quote(id, safe="")`` (``a/b`` is ``a%2Fb``), as
:func:`id_segment` makes it.

The server decodes the path before routing (``scope["path"]`` holds ``a/b``), so a route
that matched it could not tell the account ``a/b`` from ``a`` with ``b`` after it, nor
the keys of ``a/b`` (``a%2Fb/keys``) from the account ``a/b/keys``. An :class:`IdRoute`
matches its template against the path as the client sent it (``scope["raw_path"]``),
one segment to each ``{parameter}``, and only then decodes each parameter's segment.

Most clients resolve the segments ``.`` and ``..`` before sending a request, so those
two ids are sent encoded, ``%2E`` and ``%2E%2E`` (:func:`id_segment` does). curl, httpx
(and the openai client) send them as they are; requests turns them back into ``.`` and
``..`` but sends those as they are, which reaches the same route. A browser or another
WHATWG URL parser (Node's ``fetch``) resolves even the encoded forms: such a client
cannot name these two ids in a path.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote_to_bytes

from starlette.routing import Match, Route, get_route_path
from starlette.types import Scope

# ids that clients resolve as path segments unless they are encoded
DOT_SEGMENTS = frozenset({".", ".."})


def id_segment(ident: str) -> str:
    """``ident`` as one path segment of an admin API address: every character but
    letters, digits and ``_.-~`` percent-encoded, and the ids ``.`` and ``..`` as
    ``%2E`` and ``%2E%2E``."""
    segment = quote(ident, safe="")
    return segment.replace(".", "%2E") if segment in DOT_SEGMENTS else segment


def raw_route_path(scope: Scope) -> str:
    """The path the router matches (without the app's ``root_path``), still encoded as
    the client sent it. Without ``raw_path`` in the scope (not every ASGI server sets
    it), the decoded path encoded again: an encoded ``/`` in an id is a ``/`` there."""
    route_path = get_route_path(scope)
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes) or not raw.startswith(b"/"):
        return quote(route_path, safe="/")
    # raw_path has no query from a server; some test transports leave it on
    text = raw.split(b"?", 1)[0].decode("latin-1")
    root_path = scope.get("root_path", "")
    if root_path and scope["path"].startswith(root_path):
        # the root path's segments (a server's --root-path, a Mount) hold no encoded "/"
        text = "/" + "/".join(text.split("/")[1 + root_path.rstrip("/").count("/"):])
    return text


def decode_segment(segment: str) -> str:
    """A matched segment of :func:`raw_route_path` decoded (UTF-8, whether the client
    sent a character percent-encoded or as its bytes)."""
    return unquote_to_bytes(segment.encode("latin-1")).decode("utf-8", "replace")


class IdRoute(Route):
    """A :class:`~starlette.routing.Route` whose ``{parameters}`` are each one encoded
    path segment, decoded after matching (see the module's docstring). A parameter with
    a convertor (``{id:path}``, ``{n:int}``) is refused: each is one segment of text."""

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        typed = [name for name, convertor in self.param_convertors.items()
                 if convertor.regex != "[^/]+"]
        if typed:
            raise ValueError(f"IdRoute {path}: {', '.join(typed)} must be plain "
                             f"{{name}} parameters, one path segment each")

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return Match.NONE, {}
        match = self.path_regex.match(raw_route_path(scope))
        if match is None:
            return Match.NONE, {}
        path_params = dict(scope.get("path_params", {}))
        path_params.update((name, decode_segment(value))
                           for name, value in match.groupdict().items())
        child_scope = {"endpoint": self.endpoint, "path_params": path_params}
        if self.methods and scope["method"] not in self.methods:
            return Match.PARTIAL, child_scope
        return Match.FULL, child_scope


__all__ = ["IdRoute", "id_segment", "raw_route_path"]
