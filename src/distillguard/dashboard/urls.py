"""Addresses of the dashboard's pages, built from ids that traces, the admin API or
detection chose.

An account id may be almost any text (``a/b``, ``a?x=1``, ``a#b``, ``a b``, ``..``), and
so may a campaign's, an exchange's or a review item's. Every link and redirect to a page
is made by :func:`page_url`: the id is one percent-encoded path segment
(``quote(id, safe="")``: ``a/b`` is ``a%2Fb``) and every query value is encoded, so the
link leads to that object's page and to no other. The server decodes ``%2F`` before
routing, so the detail routes take their id with Starlette's ``path`` converter
(``/accounts/{account_id:path}``), and :func:`object_id` reads it back.

A browser resolves the path segments ``.`` and ``..`` (``%2e`` is a dot to it) before it
sends a request, so no segment can carry those two ids (nor the empty one): they go in
``?id=`` after an empty segment instead (``/dashboard/accounts/?id=..``).
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from starlette.requests import Request

# ids that a path segment cannot carry: a browser drops or resolves the segment
NOT_A_SEGMENT = frozenset({"", ".", ".."})


def id_fields(ident: object) -> dict[str, str]:
    """The query fields that carry ``ident`` on the address of its page: ``{"id": ident}``
    for an id no path segment can carry, else none. A GET form on that page (whose
    submission replaces the address's query) sends them as hidden fields."""
    text = str(ident)
    return {"id": text} if text in NOT_A_SEGMENT else {}


def page_url(base: str, page: str, ident: object = None, /, **query: object) -> str:
    """``{base}/{page}``, then ``/{ident}`` as one encoded path segment when ``ident`` is
    given, then ``query`` (values encoded, None left out). ``page`` is the dashboard's own
    path (``"accounts"``, ``"api/traffic"``), never data."""
    path = f"{base}/{page}"
    params: dict[str, str] = {}
    if ident is not None:
        params = id_fields(ident)
        path += "/" + ("" if params else quote(str(ident), safe=""))
    params.update((k, str(v)) for k, v in query.items() if v is not None)
    # a query value keeps its "/" (as RFC 3986 allows there); all else is encoded
    return path + ("?" + urlencode(params, safe="/", quote_via=quote) if params else "")


def object_id(request: Request, name: str) -> str | None:
    """The id a detail page's address names: the path parameter ``name`` (decoded), or
    ``?id=`` when that segment is empty; None when neither names one."""
    value = str(request.path_params.get(name) or "")
    if value:
        return value
    return request.query_params.get("id")


def request_target(request: Request) -> str:
    """The path and query of ``request`` as the client sent them (still encoded), so a
    link back to it names the same object: the decoded path would turn an id's ``%2F``
    or ``%3F`` into a real ``/`` or ``?``."""
    raw = request.scope.get("raw_path")
    try:
        path = raw.decode("ascii") if isinstance(raw, bytes) else None
    except UnicodeDecodeError:
        path = None
    if not path:
        path = quote(request.scope["path"], safe="/")
    query = request.scope.get("query_string", b"").decode("latin-1")
    return path + (f"?{query}" if query else "")
