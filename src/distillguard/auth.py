"""Authentication: turn a presented API key into a :class:`Principal` (account + key).

Keys are looked up by the public key id embedded in them and compared by hash; the secret
itself is never stored or logged. Look-ups are cached in the process for at most
``state.key_cache_ttl_s`` (default 0.5 s, capped at 1 s by configuration), so a key revoked
or an account suspended in the shared store stops working on every replica within one
second without a round trip per request.

When the state store cannot be reached, ``state.on_failure`` decides: ``open`` keeps
serving keys this replica looked up within the last ``state.stale_grace_s`` seconds (a
revocation made during the outage then takes effect when the store is back), ``closed``
refuses every request with 503. Unknown keys are refused either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from distillguard.errors import (
    AuthenticationFailed,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from distillguard.store import StateStore
from distillguard.store.models import Account, AccountStatus, ApiKey, key_id_of, key_matches

log = logging.getLogger("distillguard.auth")


@dataclass(frozen=True, slots=True)
class Principal:
    account: Account
    key: ApiKey


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(self, store: StateStore, cache_ttl_s: float = 0.5, *,
                 fail_open: bool = True, stale_grace_s: float = 300.0) -> None:
        self.store = store
        self.cache_ttl_s = cache_ttl_s
        self.fail_open = fail_open
        self.stale_grace_s = stale_grace_s
        self.store_failures = 0
        self._cache: dict[str, tuple[float, ApiKey | None, Account | None]] = {}
        self._inflight: dict[str, asyncio.Future[tuple[ApiKey | None, Account | None]]] = {}

    async def _lookup(self, key_id: str) -> tuple[ApiKey | None, Account | None]:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < self.cache_ttl_s:
            return hit[1], hit[2]
        # One store round trip per key at a time: concurrent requests for the same key
        # share the look-up already under way instead of each starting their own (under
        # load, a cache expiry would otherwise fan out into one query per waiting request).
        # The look-up is its own task, so a client that goes away does not cancel it for
        # the others.
        task = self._inflight.get(key_id)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key_id, now, hit))
            self._inflight[key_id] = task
            task.add_done_callback(lambda t: self._lookup_done(key_id, t))
        return await asyncio.shield(task)

    def _lookup_done(self, key_id: str, task: asyncio.Future[Any]) -> None:
        if self._inflight.get(key_id) is task:
            del self._inflight[key_id]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter went away

    async def _fetch(self, key_id: str, now: float,
                     hit: tuple[float, ApiKey | None, Account | None] | None
                     ) -> tuple[ApiKey | None, Account | None]:
        try:
            key = await self.store.get_key(key_id)
            account = None
            if key is not None:
                try:
                    account = await self.store.get_account(key.account_id)
                except NotFound:
                    account = None
        except NotFound:
            raise
        except Exception as exc:  # the store is unreachable: degrade per state.on_failure
            self.store_failures += 1
            log.warning("state store unavailable for key look-up: %s", exc.__class__.__name__)
            if self.fail_open and hit is not None and now - hit[0] < self.stale_grace_s:
                return hit[1], hit[2]
            raise ServiceUnavailable(
                "Account data is temporarily unavailable; please retry shortly.") from None
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key_id] = (now, key, account)
        return key, account

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached look-ups (one key, or all) so the next request re-reads the store."""
        if key_id is None:
            self._cache.clear()
        else:
            self._cache.pop(key_id, None)

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        key_id = key_id_of(token)
        if key_id is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        key, account = await self._lookup(key_id)
        if key is None or account is None or not key_matches(token, key.key_hash):
            raise AuthenticationFailed("Incorrect API key provided.")
        now = datetime.now(UTC)
        if key.revoked_at is not None:
            raise AuthenticationFailed(f"API key {key.key_id} has been revoked.",
                                       code="revoked_api_key")
        if key.expires_at is not None and now >= key.expires_at:
            raise AuthenticationFailed(f"API key {key.key_id} has expired.",
                                       code="expired_api_key")
        if account.status is AccountStatus.SUSPENDED:
            raise PermissionDenied(
                f"Account {account.account_id} is suspended. Contact support to restore access.",
                code="account_suspended",
                headers={"x-should-retry": "false"},
            )
        return Principal(account=account, key=key)
