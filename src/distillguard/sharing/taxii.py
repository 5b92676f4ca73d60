"""A TAXII 2.1 server for partners: discovery, API root, collections, objects, manifest
and status, under ``/taxii2/`` on the admin port (or its own port with
``distillguard share serve``).

Every request needs a partner's credential: HTTP Basic (partner name and secret), or the
secret as a ``Bearer`` / ``Token`` credential. A partner sees the collections it may read
or write (others answer 404), reads only where it may read and adds only where it may
write (403). Objects a partner adds are validated like an imported bundle, stored in the
collection and imported as that partner's indicators, all in one transaction; the answer
is a status resource (202).

TAXII answers with its own error bodies (``{"title", "description", "http_status",
"error_code"}``, media type ``application/taxii+json;version=2.1``), so this server maps
its errors in one place, :func:`_error_response`, rather than through the gateway's
OpenAI-format handler.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Mount, Route, Router
from starlette.types import Lifespan

from distillguard.errors import InvalidRequest, PayloadTooLarge
from distillguard.exchange import parse_ts
from distillguard.gateway.adminauth import FailedAuthThrottle, throttle_of
from distillguard.gateway.clientip import ClientIPResolver
from distillguard.gateway.proxy import read_body
from distillguard.sharing import taxiistore
from distillguard.sharing.settings import CollectionSettings, PartnerSettings, SharingSettings
from distillguard.sharing.store import SharingStore, ts
from distillguard.sharing.validate import BundleError, parse_envelope
from distillguard.store.sql import lock_for_change

MEDIA_TAXII = "application/taxii+json;version=2.1"
Handler = Callable[[Request], Awaitable[Response]]
log = logging.getLogger("distillguard.sharing")


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class TaxiiError(Exception):
    def __init__(self, status: int, title: str, description: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.status, self.title, self.description = status, title, description
        self.headers = headers or {}


def taxii_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                   ) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=MEDIA_TAXII,
                    headers=headers)


def _error_response(exc: TaxiiError) -> Response:
    body = {"title": exc.title, "description": exc.description,
            "http_status": str(exc.status), "error_code": exc.title.lower().replace(" ", "_")}
    return taxii_response(body, exc.status, exc.headers)


def _accepts(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    if not accept:
        return True
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", "application/taxii+json"):
            version = [p.strip() for p in part.split(";")[1:] if p.strip().startswith("version")]
            if not version or version[0].replace(" ", "") == "version=2.1":
                return True
    return False


class TaxiiServer:
    def __init__(self, options: SharingSettings, engine: Callable[[], AsyncEngine]) -> None:
        self.options = options
        self._engine = engine
        self.taxii = options.taxii
        self.store = lambda: SharingStore(
            engine(), ttl=timedelta(days=options.indicator_ttl_days))

    # -- plumbing -------------------------------------------------------------------------

    def routes(self) -> list[Mount]:
        """The server under ``/taxii2``. Every TAXII address ends with "/"; one without
        it is not redirected there, as Starlette would by an address built from the
        request's Host header (a forged Host redirected to another site)."""
        root = "/{api_root}"
        col = root + "/collections/{collection_id}"
        self._served = [
            Route("/", self._wrap(self.discovery)),
            Route(root + "/", self._wrap(self.api_root)),
            Route(root + "/status/{status_id}/", self._wrap(self.status)),
            Route(root + "/collections/", self._wrap(self.collections)),
            Route(col + "/", self._wrap(self.collection)),
            Route(col + "/manifest/", self._wrap(self.manifest)),
            Route(col + "/objects/", self._wrap(self.get_objects), methods=["GET"]),
            Route(col + "/objects/", self._wrap(self.add_objects), methods=["POST"]),
            Route(col + "/objects/{object_id}/", self._wrap(self.get_object)),
            Route(col + "/objects/{object_id}/versions/", self._wrap(self.versions)),
        ]
        # Anything else under /taxii2 gets a TAXII error too (Starlette's own 404 and 405
        # were plain text, which a TAXII client cannot read), after authentication.
        unknown = Route("/{rest:path}", self._wrap(self.unknown), methods=list(_METHODS))
        return [Mount("/taxii2", app=Router(redirect_slashes=False,
                                            routes=[*self._served, unknown]))]

    async def unknown(self, request: Request, partner: str) -> Response:
        allowed = sorted({method for route in self._served
                          if route.matches(request.scope)[0] is not Match.NONE
                          for method in route.methods or ()})
        if allowed:
            raise TaxiiError(405, "Method Not Allowed",
                             f"{request.method} is not served here; {', '.join(allowed)} is",
                             headers={"allow": ", ".join(allowed)})
        raise TaxiiError(404, "Not Found", "there is no TAXII resource at this address")

    def app(self, lifespan: Lifespan[Starlette] | None = None, *,
            failed_auth_per_minute: int = 10,
            trusted_proxies: Sequence[str] = ()) -> Starlette:
        """The TAXII server alone (``distillguard share serve``). Without the admin app
        it keeps its own count of failed authentications (in this process), else
        partner secrets could be guessed without limit."""
        app = Starlette(routes=list(self.routes()), lifespan=lifespan)
        app.router.redirect_slashes = False  # /taxii2 is not sent to <Host>/taxii2/
        app.state.failed_auth = FailedAuthThrottle(failed_auth_per_minute,
                                                   name="taxii-auth")
        app.state.client_ip = ClientIPResolver(trusted_proxies)   # see throttle_of
        return app

    def _wrap(self, handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                partner = await self.authenticate(request)
                if not _accepts(request):
                    raise TaxiiError(406, "Not Acceptable",
                                     f"this server answers in {MEDIA_TAXII}")
                if any("\x00" in v for v in (*request.path_params.values(),
                                               *request.query_params.values())):
                    # no id or type holds NUL, and PostgreSQL fails on it in a query
                    raise TaxiiError(400, "Bad Request",
                                     "a path or query parameter holds the NUL character")
                api_root = request.path_params.get("api_root")
                if api_root is not None and api_root != self.taxii.api_root:
                    raise TaxiiError(404, "Not Found", f"no API root {api_root!r}")
                return await handler(request, partner)
            except TaxiiError as exc:
                return _error_response(exc)
            except Exception:   # a TAXII client reads TAXII errors, not the admin API's
                log.exception("TAXII %s %s failed", request.method, request.url.path)
                return _error_response(TaxiiError(500, "Internal Server Error",
                                                  "the server hit an internal error"))
        return endpoint

    async def authenticate(self, request: Request) -> str:
        """The partner a request's credential names; a client that failed too often of
        late is refused first (the admin port's one throttle, gateway/adminauth.py)."""
        throttle, who = throttle_of(request)
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        name: str | None = None
        secret = credential.strip()
        if scheme.lower() == "basic":
            try:
                name, _, secret = base64.b64decode(secret).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                secret = ""
        found: str | None = None
        if secret and scheme.lower() in ("basic", "bearer", "token"):
            for partner_name, partner in self.options.partners.items():
                if (name is None or name == partner_name) and partner.accepts(secret):
                    found = partner_name
                    break
        if throttle is not None and (
                wait := await throttle.refusal(who, succeeded=found is not None)):
            raise TaxiiError(429, "Too Many Requests", "too many failed authentications "
                             f"from this address; try again in {wait} s",
                             {"Retry-After": str(wait)})
        if found is not None:
            return found
        raise TaxiiError(401, "Unauthorized", "a partner credential is required",
                         {"WWW-Authenticate": 'Basic realm="distillguard TAXII"'})

    def _partner(self, name: str) -> PartnerSettings:
        return self.options.partners[name]

    def _collection(self, request: Request, partner: str, *, need: str | None = None
                    ) -> CollectionSettings:
        ref = request.path_params["collection_id"]
        found = self.options.collection(ref)
        rights = self._partner(partner)
        if found is None or not ({found.id, found.alias} & {*rights.read, *rights.write}):
            raise TaxiiError(404, "Not Found", f"no collection {ref!r}")
        if need == "read" and not self._may(partner, found, "read"):
            raise TaxiiError(403, "Forbidden", "this collection is not readable for you")
        if need == "write" and not self._may(partner, found, "write"):
            raise TaxiiError(403, "Forbidden", "this collection is not writable for you")
        return found

    def _may(self, partner: str, collection: CollectionSettings, right: str) -> bool:
        allowed = getattr(self._partner(partner), right)
        return collection.id in allowed or (collection.alias is not None
                                            and collection.alias in allowed)

    def _root_url(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}/taxii2/{self.taxii.api_root}/"

    # -- resources ------------------------------------------------------------------------

    async def discovery(self, request: Request, partner: str) -> Response:
        root = self._root_url(request)
        body: dict[str, Any] = {"title": self.taxii.title, "description": self.taxii.description,
                                "default": root, "api_roots": [root]}
        if self.taxii.contact:
            body["contact"] = self.taxii.contact
        return taxii_response(body)

    async def api_root(self, request: Request, partner: str) -> Response:
        return taxii_response({"title": self.taxii.title,
                               "description": self.taxii.description,
                               "versions": [MEDIA_TAXII],
                               "max_content_length": self.options.max_bundle_bytes})

    def _collection_resource(self, c: CollectionSettings, partner: str) -> dict[str, Any]:
        out: dict[str, Any] = {"id": c.id, "title": c.title or c.alias or c.id,
                               "can_read": self._may(partner, c, "read"),
                               "can_write": self._may(partner, c, "write"),
                               "media_types": [taxiistore.MEDIA_STIX]}
        if c.description:
            out["description"] = c.description
        if c.alias:
            out["alias"] = c.alias
        return out

    async def collections(self, request: Request, partner: str) -> Response:
        visible = [self._collection_resource(c, partner) for c in self.taxii.collections
                   if self._may(partner, c, "read") or self._may(partner, c, "write")]
        return taxii_response({"collections": visible} if visible else {})

    async def collection(self, request: Request, partner: str) -> Response:
        return taxii_response(self._collection_resource(
            self._collection(request, partner), partner))

    async def status(self, request: Request, partner: str) -> Response:
        found = await taxiistore.get_status(self._engine(), request.path_params["status_id"])
        if found is None or found[0] != partner:
            raise TaxiiError(404, "Not Found", "no such status resource")
        return taxii_response(found[1])

    def _filters(self, request: Request) -> dict[str, Any]:
        q = request.query_params

        def many(name: str) -> list[str] | None:
            value = q.get(f"match[{name}]")
            return [v.strip() for v in value.split(",") if v.strip()] if value else None

        try:
            limit = int(q.get("limit", self.taxii.max_page_size))
            if limit < 1:
                raise ValueError
            added_after = q.get("added_after")
            if added_after:   # parse_ts: also a time out of range once in UTC
                ts(parse_ts(added_after))
            for v in many("version") or []:
                if v not in ("first", "last", "all"):
                    ts(parse_ts(v))
            if q.get("next"):
                taxiistore.decode_next(q["next"])
        except ValueError as exc:
            raise TaxiiError(400, "Bad Request", f"invalid filter or paging parameter: {exc}"
                             if str(exc) else "invalid filter or paging parameter") from None
        return {"added_after": added_after, "ids": many("id"), "types": many("type"),
                "versions": many("version"), "spec_versions": many("spec_version"),
                "limit": min(limit, self.taxii.max_page_size), "after": q.get("next")}

    @staticmethod
    def _page_headers(page: taxiistore.Page) -> dict[str, str]:
        if not page.rows:
            return {}
        return {"X-TAXII-Date-Added-First": page.rows[0]["date_added"],
                "X-TAXII-Date-Added-Last": page.rows[-1]["date_added"]}

    @staticmethod
    def _envelope(page: taxiistore.Page, key: str, items: list[Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"more": page.more}
        if page.next:
            body["next"] = page.next
        if items:
            body[key] = items
        return body

    async def get_objects(self, request: Request, partner: str) -> Response:
        c = self._collection(request, partner, need="read")
        page = await taxiistore.query(self._engine(), c.id, **self._filters(request))
        return taxii_response(self._envelope(page, "objects", [r["body"] for r in page.rows]),
                              headers=self._page_headers(page))

    async def manifest(self, request: Request, partner: str) -> Response:
        c = self._collection(request, partner, need="read")
        page = await taxiistore.query(self._engine(), c.id, bodies=False,
                                      **self._filters(request))
        items = [{"id": r["id"], "date_added": r["date_added"], "version": r["version"],
                  "media_type": f"application/stix+json;version={r['spec_version']}"}
                 for r in page.rows]
        return taxii_response(self._envelope(page, "objects", items),
                              headers=self._page_headers(page))

    async def get_object(self, request: Request, partner: str) -> Response:
        c = self._collection(request, partner, need="read")
        filters = {**self._filters(request), "ids": [request.path_params["object_id"]]}
        page = await taxiistore.query(self._engine(), c.id, **filters)
        if not page.rows:
            raise TaxiiError(404, "Not Found", "no such object in this collection")
        return taxii_response(self._envelope(page, "objects", [r["body"] for r in page.rows]),
                              headers=self._page_headers(page))

    async def versions(self, request: Request, partner: str) -> Response:
        c = self._collection(request, partner, need="read")
        filters = {**self._filters(request), "ids": [request.path_params["object_id"]],
                   "versions": ["all"]}
        page = await taxiistore.query(self._engine(), c.id, bodies=False, **filters)
        if not page.rows:
            raise TaxiiError(404, "Not Found", "no such object in this collection")
        return taxii_response(self._envelope(page, "versions",
                                             [r["version"] for r in page.rows]),
                              headers=self._page_headers(page))

    async def add_objects(self, request: Request, partner: str) -> Response:
        c = self._collection(request, partner, need="write")
        content_type = request.headers.get("content-type", "").replace(" ", "").lower()
        if not content_type.startswith("application/taxii+json") or (
                "version=" in content_type and "version=2.1" not in content_type):
            raise TaxiiError(415, "Unsupported Media Type",
                             f"send the envelope as {MEDIA_TAXII}")
        limit = self.options.max_bundle_bytes
        try:    # refused by Content-Length, or once past the limit: never held whole
            raw = await read_body(request, limit)
        except PayloadTooLarge as exc:
            raise TaxiiError(413, "Payload Too Large", str(exc)) from None
        except InvalidRequest as exc:
            raise TaxiiError(400, "Bad Request", str(exc)) from None
        try:   # seconds for megabytes (stix2, the pattern parser): not on the event loop
            objects = await asyncio.to_thread(parse_envelope, raw, max_bytes=limit)
        except BundleError as exc:
            titles = {400: "Bad Request", 413: "Payload Too Large"}
            raise TaxiiError(exc.status, titles.get(exc.status, "Unprocessable Entity"),
                             str(exc)) from None
        now = datetime.now(UTC)
        status_id = str(uuid.uuid4())
        engine = self._engine()
        async with engine.begin() as conn:
            # One envelope per collection at a time: objects are stamped date_added as
            # they are added, and stamped outside this order they would commit behind
            # a later stamp that a client polling added_after has already passed.
            await lock_for_change(conn, "taxii-collection:" + c.id)
            ok, failed = await taxiistore.add_objects(conn, c.id, objects, partner)
            await self.store().import_objects(
                conn, partner=partner, bundle_id=f"taxii-status--{status_id}",
                objects=objects, source=f"taxii:{c.alias or c.id}", sha256=None, now=now)
            status = {"id": status_id, "status": "complete",
                      "request_timestamp": ts(now), "total_count": len(objects),
                      "success_count": len(ok), "failure_count": len(failed),
                      "pending_count": 0, "successes": ok, "failures": failed}
            await taxiistore.save_status(conn, status, partner)
        return taxii_response(status, 202)
