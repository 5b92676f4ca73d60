"""State store: accounts and API keys (and, through migrations, what later parts add).

:class:`StateStore` is the interface; :class:`~distillguard.store.sql.SQLStateStore`
implements it on SQLite (default) and PostgreSQL through SQLAlchemy Core. Open one with
:func:`open_state_store` from a ``state.url``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any, Protocol

from distillguard.store.models import Account, AccountStatus, ApiKey

__all__ = ["Account", "AccountStatus", "ApiKey", "StateStore", "all_accounts", "open_state_store"]


class StateStore(Protocol):
    """What the gateway and the admin surfaces need from persistent state."""

    async def migrate(self) -> list[int]: ...

    async def close(self) -> None: ...

    async def put_account(self, account: Account, *, replace: bool = False) -> Account: ...

    async def get_account(self, account_id: str) -> Account: ...

    async def list_accounts(
        self, *, query: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Account]: ...

    async def update_account(self, account_id: str, **changes: Any) -> Account: ...

    async def merge_limits(self, account_id: str, limits: dict[str, Any]) -> Account:
        """Set the named limits of the account, keeping the others."""
        ...

    async def count_accounts(self) -> int: ...

    async def create_key(
        self,
        account_id: str,
        *,
        name: str | None = None,
        expires_at: datetime | None = None,
        limits: dict[str, int | None] | None = None,
    ) -> tuple[ApiKey, str]: ...

    async def get_key(self, key_id: str) -> ApiKey | None: ...

    async def list_keys(self, account_id: str | None = None) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str) -> ApiKey: ...

    async def import_accounts(self, accounts: Iterable[Account], *,
                              keep_status: Collection[str] = ()) -> int:
        """Insert or replace accounts, all or nothing; those of ``keep_status`` that exist
        keep their stored status."""
        ...


async def all_accounts(store: StateStore, *, page: int = 1000) -> list[Account]:
    """Every account of the store, read a page at a time."""
    out: list[Account] = []
    while True:
        batch = await store.list_accounts(limit=page, offset=len(out))
        out.extend(batch)
        if len(batch) < page:
            return out


def open_state_store(url: str) -> StateStore:
    from distillguard.store.sql import SQLStateStore

    return SQLStateStore(url)
