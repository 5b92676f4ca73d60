"""Where the dashboard reads from, opened once when the gateway starts.

* the state store (accounts, keys) through its own :class:`StateStore` on ``state.url``;
* the dashboard's exchange index and roll-ups (:mod:`distillguard.dashboard.index`), and
  the sessions ended at log-out (:mod:`distillguard.dashboard.security`), in the same
  database;
* detection verdicts and campaigns, policy actions and the review queue, the ledger: each
  through an adapter in :mod:`distillguard.dashboard.adapters`, present only when that
  component is installed and enabled; pages say so when one is missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.config import Settings
from distillguard.dashboard.index import SCHEMA, IndexStage, create_schema
from distillguard.dashboard.security import SESSION_SCHEMA
from distillguard.store import StateStore, open_state_store

log = logging.getLogger("distillguard.dashboard")


class Sources:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state: StateStore | None = None
        self.index = IndexStage(lambda: self.engine)
        self.verdicts: Any = None   # adapters.VerdictsAdapter
        self.policy: Any = None     # adapters.PolicyAdapter
        self.ledger: Any = None     # adapters.LedgerAdapter
        self._opened = False
        self._probed = time.monotonic()
        self._lock = asyncio.Lock()

    @property
    def engine(self) -> AsyncEngine:
        if self.state is None:
            raise RuntimeError("dashboard sources are not open")
        return self.state.engine  # type: ignore[attr-defined,no-any-return]

    async def open(self) -> None:
        if self._opened:
            return
        async with self._lock:
            if self._opened:
                return
            self.state = open_state_store(self.settings.state.url)
            await self.state.migrate()
            await create_schema(self.engine, [*SCHEMA, *SESSION_SCHEMA])
            from distillguard.dashboard import adapters

            self.verdicts = await adapters.open_verdicts(self.settings, self.engine)
            self.policy = await adapters.open_policy(self.settings, self.engine)
            self.ledger = await adapters.open_ledger(self.settings)
            self._opened = True

    async def refresh(self) -> None:
        """Look again for detection's tables if they were missing (at most every 30 s):
        detection may create them after the dashboard started."""
        from distillguard.dashboard import adapters

        verdicts = self.verdicts
        if not isinstance(verdicts, adapters.FileVerdicts) or verdicts.path is not None:
            return
        now = time.monotonic()
        if now - self._probed < 30.0:
            return
        self._probed = now
        self.verdicts = await adapters.open_verdicts(self.settings, self.engine)

    async def close(self) -> None:
        await self.index.close()
        for part in (self.ledger, self.policy, self.verdicts):
            closer = getattr(part, "close", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:
                    log.exception("dashboard: closing a source failed")
        if self.state is not None:
            await self.state.close()
            self.state = None
        self._opened = False
