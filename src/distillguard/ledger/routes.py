"""Admin API routes of the ledger (``/admin/v1/ledger/...``, admin token required).

=======================================  ==============================================
``GET  /admin/v1/ledger/checkpoint``     latest signed checkpoint (``?sign=1`` signs one)
``POST /admin/v1/ledger/checkpoint``     sign a checkpoint of the current tree now
``GET  /admin/v1/ledger/key``            the verifier (public) key, signed-note encoding
``GET  /admin/v1/ledger/key/retired``    the retired keys, as a retired-keys file (what
                                         ``ledger verify --retired-keys`` reads)
``GET  /admin/v1/ledger/keys``           the current and the retired keys, JSON
``GET  /admin/v1/ledger/proof/{ref}``    inclusion proof of an entry (id or index) with
                                         a checkpoint that covers it (signed now if
                                         needed); ``?tree_size=N`` for an older tree
``GET  /admin/v1/ledger/consistency``    ``?old=M&new=N`` consistency proof
``GET  /admin/v1/ledger/entries/{ref}``  the stored entry (trace format for exchanges)
=======================================  ==============================================
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from distillguard.config import Settings
from distillguard.errors import (
    APIError,
    InvalidRequest,
    NotFoundError,
)
from distillguard.gateway.adminauth import check_admin
from distillguard.gateway.adminpaths import IdRoute
from distillguard.ledger import entry
from distillguard.ledger.checkpoint import CheckpointError, VerifierKey
from distillguard.ledger.core import Ledger
from distillguard.ledger.keyring import RetiredKey, format_retired_keys
from distillguard.ledger.merkle import ProofError
from distillguard.ledger.writer import LedgerWriter

PREFIX = "/admin/v1/ledger"


def checkpoint_json(cp: Any) -> dict[str, Any]:
    return {"tree_size": cp.tree_size, "root_hash": cp.root_hash.hex(), "ts": cp.ts,
            "note": cp.note}


def entry_json(row: Any) -> dict[str, Any]:
    if row.kind == entry.KIND_EXCHANGE:
        return {"kind": row.kind, "index": row.idx, "entry": entry.to_trace(row)}
    return {"kind": row.kind, "index": row.idx, "entry": entry.decode_leaf(row.leaf)}


def key_json(key: VerifierKey) -> dict[str, Any]:
    return {"key": key.encode(), "name": key.name, "key_id": key.key_id.hex()}


def retired_key_json(retired: RetiredKey) -> dict[str, Any]:
    return {**key_json(retired.key), "tree_size": retired.tree_size,
            "retired_at": retired.retired_at or None}


def _retired_keys(lg: Ledger) -> list[RetiredKey]:
    """The retired keys the ledger's checkpoints are checked with (:attr:`Ledger.
    retired_keys`); a file that cannot be read is the server's fault, named."""
    try:
        return lg.retired_keys
    except (OSError, CheckpointError) as exc:
        raise APIError(f"The ledger's retired keys cannot be read: {exc}",
                       code="retired_keys_unreadable") from None


def _int(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer.", param=name) from None


def ledger_routes(writer: LedgerWriter, settings: Settings) -> list[BaseRoute]:
    async def authenticate(request: Request) -> None:
        await check_admin(request, settings.admin.token)

    async def ledger() -> Ledger:
        return writer.ledger or await writer.start()

    async def get_checkpoint(request: Request) -> Response:
        await authenticate(request)
        lg = await ledger()
        if request.method == "POST" or request.query_params.get("sign") in ("1", "true"):
            cp = await asyncio.to_thread(lg.checkpoint)
        else:
            cp = await asyncio.to_thread(lg.store.latest_checkpoint)
        if cp is None:
            raise NotFoundError("The ledger has no checkpoint yet.", code="no_checkpoint")
        return JSONResponse(checkpoint_json(cp))

    async def get_key(request: Request) -> Response:
        await authenticate(request)
        key = (await ledger()).verifier
        if key is None:
            raise NotFoundError("The ledger has no key.", code="no_key")
        return PlainTextResponse(key.encode() + "\n")

    async def get_retired(request: Request) -> Response:
        await authenticate(request)
        retired = await asyncio.to_thread(_retired_keys, await ledger())
        return PlainTextResponse(format_retired_keys(retired))

    async def get_keys(request: Request) -> Response:
        await authenticate(request)
        lg = await ledger()
        current = await asyncio.to_thread(lambda: lg.verifier)
        retired = await asyncio.to_thread(_retired_keys, lg)
        return JSONResponse({"current": None if current is None else key_json(current),
                             "retired": [retired_key_json(r) for r in retired]})

    async def get_proof(request: Request) -> Response:
        await authenticate(request)
        lg = await ledger()
        ref = request.path_params["ref"]
        try:
            proof = await asyncio.to_thread(partial(lg.inclusion, ref,
                                                    _int(request, "tree_size"),
                                                    sign_if_needed=True))
        except LookupError:
            raise NotFoundError(f"No ledger entry {ref}.", code="entry_not_found") from None
        except ProofError as exc:
            raise InvalidRequest(str(exc), param="tree_size") from None
        return JSONResponse(proof)

    async def get_consistency(request: Request) -> Response:
        await authenticate(request)
        old = _int(request, "old")
        if old is None:
            raise InvalidRequest("old (a tree size) is required.", param="old")
        lg = await ledger()
        try:
            proof = await asyncio.to_thread(lg.consistency, old, _int(request, "new"))
        except ProofError as exc:
            raise InvalidRequest(str(exc), param="old") from None
        proof["old_checkpoint"] = await asyncio.to_thread(lg.note_at, proof["old_size"])
        proof["new_checkpoint"] = await asyncio.to_thread(lg.note_at, proof["new_size"])
        return JSONResponse(proof)

    async def get_entry(request: Request) -> Response:
        await authenticate(request)
        lg = await ledger()
        ref = request.path_params["ref"]
        row = await asyncio.to_thread(lg.find, ref)
        if row is None:
            raise NotFoundError(f"No ledger entry {ref}.", code="entry_not_found")
        return JSONResponse(entry_json(row))

    return [
        Route(f"{PREFIX}/checkpoint", get_checkpoint, methods=["GET", "POST"]),
        Route(f"{PREFIX}/key", get_key, methods=["GET"]),
        Route(f"{PREFIX}/key/retired", get_retired, methods=["GET"]),
        Route(f"{PREFIX}/keys", get_keys, methods=["GET"]),
        IdRoute(f"{PREFIX}/proof/{{ref}}", get_proof, methods=["GET"]),
        Route(f"{PREFIX}/consistency", get_consistency, methods=["GET"]),
        IdRoute(f"{PREFIX}/entries/{{ref}}", get_entry, methods=["GET"]),
    ]
