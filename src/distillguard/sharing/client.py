"""Pushing to and polling a partner's TAXII 2.1 server with the ``taxii2-client`` library.

``push`` adds a bundle's objects to a remote collection and returns the TAXII status.
``poll`` reads a remote collection page by page from where the previous poll stopped
(the last ``date_added`` of the remote manifest, kept in ``sharing_cursors``), validates
everything like a bundle import and imports it as the named partner's indicators, in one
transaction with the new cursor.

A partner's server is not trusted to be well-behaved: every request has a timeout
(TIMEOUT_S), no answer is read past ``sharing.max_bundle_bytes``, a poll takes in at most
that many bytes of objects and MAX_PAGES pages of each listing, and a server that sends
the same ``next`` token twice is refused. Redirects to another host or from https to
http lose the credential (``requests`` drops the Authorization header).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from taxii2client.common import TokenAuth, _HTTPConnection
from taxii2client.exceptions import TAXIIServiceException
from taxii2client.v21 import ApiRoot, Collection, Server, as_pages

from distillguard.errors import DistillguardError
from distillguard.sharing.store import ImportSummary, SharingStore
from distillguard.sharing.validate import check_objects


class TaxiiClientError(DistillguardError):
    """The remote TAXII server refused or answered something unusable."""


TIMEOUT_S = 60.0   # to connect, and between two reads of an answer
MAX_PAGES = 1000


class _Bounded(HTTPAdapter):
    """Every request with a timeout; no answer read past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def send(self, request: PreparedRequest, **kwargs: Any  # type: ignore[override]
             ) -> Response:
        kwargs["timeout"] = kwargs.get("timeout") or TIMEOUT_S
        kwargs["stream"] = True
        response = super().send(request, **kwargs)
        body = response.raw.read(self.max_bytes + 1, decode_content=True)
        response.close()
        if len(body) > self.max_bytes:
            raise TaxiiClientError(f"an answer of more than {self.max_bytes} bytes "
                                   "(sharing.max_bundle_bytes)")
        response._content = body   # what requests would have read, now read
        response._content_consumed = True
        return response


def _origin(url: str) -> str:
    """scheme://host:port of ``url`` (the port spelt out), what a credential is bound to."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


@dataclass(frozen=True, slots=True)
class Remote:
    url: str
    collection: str
    user: str | None = None
    password: str | None = None
    token: str | None = None
    max_bytes: int = 10_000_000

    def _auth(self) -> dict[str, Any]:
        auth: dict[str, Any] = {"auth": TokenAuth(self.token)} if self.token else {
            "user": self.user, "password": self.password}
        conn = _HTTPConnection(**auth, version="2.1")
        for scheme in ("http://", "https://"):
            conn.session.mount(scheme, _Bounded(self.max_bytes))
        return {"conn": conn}

    def open(self) -> Collection:
        """The remote collection; ``url`` is a discovery URL or an API root URL."""
        try:
            root_url = self.url if self.url.endswith("/") else self.url + "/"
            if root_url.rstrip("/").endswith("/taxii2"):
                server = Server(root_url, **self._auth())
                api_root = server.default or (server.api_roots[0] if server.api_roots
                                              else None)
                if api_root is None:
                    raise TaxiiClientError(f"{self.url} lists no API root")
                if _origin(api_root.url) != _origin(root_url):
                    # Our credentials go with every request to the API root: a discovery
                    # answer (a partner's server, or anyone in the way of a plain-HTTP
                    # URL) could send them anywhere.
                    raise TaxiiClientError(
                        f"{self.url}: its discovery names an API root on another origin, "
                        f"{_origin(api_root.url)}; give that API root's URL to trust it")
                root_url = api_root.url
            root = ApiRoot(root_url, **self._auth())
            return Collection(f"{root.url}collections/{self.collection}/",
                              conn=root._conn)
        except TaxiiClientError:
            raise
        except (TAXIIServiceException, OSError) as exc:
            raise TaxiiClientError(f"{self.url}: {exc}") from None
        except Exception as exc:  # requests' HTTPError and friends
            raise TaxiiClientError(f"{self.url}: {exc}") from None


def push_objects(remote: Remote, objects: list[dict[str, Any]]) -> dict[str, Any]:
    collection = remote.open()
    try:
        status = collection.add_objects({"objects": objects}, wait_for_completion=True,
                                        poll_interval=0.2, timeout=30)
    except Exception as exc:
        raise TaxiiClientError(f"push to {remote.url}: {exc}") from None
    return {"id": status.id, "status": status.status, "total_count": status.total_count,
            "success_count": status.success_count, "failure_count": status.failure_count,
            "pending_count": status.pending_count}


def fetch(remote: Remote, added_after: str | None, page_size: int
          ) -> tuple[list[dict[str, Any]], str | None]:
    """(objects added after ``added_after``, the newest date_added seen)."""
    collection = remote.open()
    filters: dict[str, Any] = {"added_after": added_after} if added_after else {}
    try:
        newest = added_after
        for page in _pages(collection.get_manifest, page_size, filters):
            for item in page.get("objects", []):
                if newest is None or item["date_added"] > newest:
                    newest = item["date_added"]
        objects: list[dict[str, Any]] = []
        size = 0
        for page in _pages(collection.get_objects, page_size, filters):
            found = page.get("objects", [])
            size += len(orjson.dumps(found))
            if size > remote.max_bytes:
                raise TaxiiClientError(
                    f"the collection holds more than {remote.max_bytes} bytes of objects "
                    "since the last poll (sharing.max_bundle_bytes)")
            objects.extend(found)
    except Exception as exc:
        raise TaxiiClientError(f"poll {remote.url}: {exc}") from None
    return objects, newest


def _pages(method: Callable[..., Any], page_size: int, filters: dict[str, Any]
           ) -> Iterator[dict[str, Any]]:
    """The pages of a listing; at most MAX_PAGES, and no ``next`` token twice (a server
    answering ``more`` without end would keep a poll reading)."""
    seen: set[str] = set()
    for number, page in enumerate(as_pages(method, per_request=page_size, **filters)):
        yield page
        token = str(page.get("next", ""))
        if not page.get("more"):
            return
        if token in seen:
            raise TaxiiClientError(f"the server sent the next token {token[:40]!r} twice")
        if number + 1 >= MAX_PAGES:
            raise TaxiiClientError(f"more than {MAX_PAGES} pages")
        seen.add(token)


async def poll(remote: Remote, store: SharingStore, *, partner: str, page_size: int = 100,
               reset: bool = False) -> ImportSummary:
    key = remote.url.rstrip("/")
    since = None if reset else await store.cursor(key, remote.collection)
    objects, newest = await asyncio.to_thread(fetch, remote, since, page_size)
    check_objects(objects)
    bundle_id = f"taxii-poll--{uuid.uuid4()}"
    summary = ImportSummary(partner=partner, bundle_id=bundle_id)
    async with store.engine.begin() as conn:
        if objects:  # an empty poll leaves no provenance record
            summary = await store.import_objects(
                conn, partner=partner, bundle_id=bundle_id, objects=objects,
                source=f"poll:{key}/collections/{remote.collection}", sha256=None)
        if newest:
            await store.set_cursor(conn, key, remote.collection, newest)
    return summary
