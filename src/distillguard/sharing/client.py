"""Pushing to and polling a partner's TAXII 2.1 server with the ``taxii2-client`` library.

``push`` adds a bundle's objects to a remote collection and returns the TAXII status.
``poll`` reads a remote collection page by page from where the previous poll stopped
(the last ``date_added`` of the remote manifest, kept in ``sharing_cursors``), validates
everything like a bundle import and imports it as the named partner's indicators, in one
transaction with the new cursor.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from taxii2client.common import TokenAuth
from taxii2client.exceptions import TAXIIServiceException
from taxii2client.v21 import ApiRoot, Collection, Server, as_pages

from distillguard.errors import DistillguardError
from distillguard.sharing.store import ImportSummary, SharingStore
from distillguard.sharing.validate import check_objects


class TaxiiClientError(DistillguardError):
    """The remote TAXII server refused or answered something unusable."""


@dataclass(frozen=True, slots=True)
class Remote:
    url: str
    collection: str
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def _auth(self) -> dict[str, Any]:
        if self.token:
            return {"auth": TokenAuth(self.token)}
        return {"user": self.user, "password": self.password}

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
                root_url = api_root.url
            root = ApiRoot(root_url, **self._auth())
            return Collection(f"{root.url}collections/{self.collection}/",
                              conn=root._conn)
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
        for page in as_pages(collection.get_manifest, per_request=page_size, **filters):
            for item in page.get("objects", []):
                if newest is None or item["date_added"] > newest:
                    newest = item["date_added"]
        objects: list[dict[str, Any]] = []
        for page in as_pages(collection.get_objects, per_request=page_size, **filters):
            objects.extend(page.get("objects", []))
    except Exception as exc:
        raise TaxiiClientError(f"poll {remote.url}: {exc}") from None
    return objects, newest


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
