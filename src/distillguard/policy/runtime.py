"""The policy component at run time: the state it keeps in memory and the background loop
that refreshes it.

Every ``refresh_s`` (default 1 s) the loop, off the request path:

* reads changed rows of ``policy_actions`` into :class:`ActiveActions` (what the request
  check consults), and marks expired actions;
* polls detection's verdict tables and turns new verdicts into actions (the action is
  then in memory on the next pass, so a verdict changes what an account can do within
  about two poll intervals);
* every ``audit.flush_interval_s`` writes the aggregated request denials and forwards
  unsent audit events to the ledger when the ledger component is installed;
* every ``screening.interval_s`` screens accounts not yet screened against the lists.

An admin request that changes actions or statuses on this replica does not wait for the
next pass: it reads them into :class:`ActiveActions` before it answers
(:meth:`PolicyRuntime.refresh_actions`).

A failing pass is logged and retried on the next one; requests keep being judged on the
last good state. ``reload`` swaps the compiled policy (admin endpoint, SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.config import Settings
from distillguard.errors import ConfigError
from distillguard.policy import audit
from distillguard.policy.actions import ActiveActions, expire_due
from distillguard.policy.audit import AuditEvent, DenialAggregator, LedgerForwarder
from distillguard.policy.compiled import CompiledPolicy, PolicyHolder
from distillguard.policy.ops import PolicyOps
from distillguard.policy.schema import ensure_schema
from distillguard.policy.verdictfeed import VerdictActions, VerdictFeed
from distillguard.store import StateStore, open_state_store

log = logging.getLogger("distillguard.policy")


class PolicyRuntime:
    def __init__(self, settings: Settings, holder: PolicyHolder) -> None:
        self.settings = settings
        self.holder = holder
        self.actions = ActiveActions()
        self.denials = DenialAggregator()
        self.store: StateStore | None = None
        self.feed: VerdictFeed | None = None
        self.forwarder: LedgerForwarder | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_flush = 0.0
        self._last_screen = 0.0
        self._sighup = False
        self.passes = 0
        self.errors = 0
        self.started = False
        self.ready = asyncio.Event()

    @property
    def engine(self) -> AsyncEngine:
        if self.store is None:
            raise RuntimeError("the policy runtime is not started")
        return self.store.engine  # type: ignore[attr-defined,no-any-return]

    @property
    def policy(self) -> CompiledPolicy:
        return self.holder.current

    def ops(self) -> PolicyOps:
        return PolicyOps(self.engine, lambda: self.holder.current)

    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        self.store = open_state_store(self.settings.state.url)
        await self.store.migrate()
        await ensure_schema(self.engine)
        self.feed = VerdictFeed(self.engine)
        writer = audit.ledger_writer(self.settings)
        if writer is not None:
            self.forwarder = LedgerForwarder(self.engine, writer)
        await self.actions.refresh(self.engine)
        # Open the geo-IP database now (about a second), off the event loop.
        await asyncio.to_thread(self.policy.networks.lookup, "8.8.8.8")
        self._install_sighup()
        self._task = asyncio.create_task(self._loop(), name="distillguard-policy")

    def _install_sighup(self) -> None:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (RuntimeError, ValueError, NotImplementedError, AttributeError):
            log.debug("policy: SIGHUP reload unavailable (not the main thread)")

    def _on_sighup(self) -> None:
        self._sighup = True

    async def close(self) -> None:
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(RuntimeError, ValueError, NotImplementedError, AttributeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush_audit(force=True)
        except Exception:
            log.exception("policy: final audit flush failed")
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def reload(self, actor: str = "operator", channel: str = "policy") -> CompiledPolicy:
        """Re-read the policy file; on error the running policy stays and the error is
        recorded (``policy:file:reload_failed``) and raised."""
        try:
            fresh = await asyncio.to_thread(self.holder.reload)
        except ConfigError as exc:
            await audit.record(self.engine, AuditEvent(
                name="policy:file:reload_failed", subject=f"file:{self.holder.path}",
                actor=actor, reason=str(exc)[:500], detail={"channel": channel}))
            raise
        await audit.record(self.engine, AuditEvent(
            name="policy:file:reload", subject=f"file:{self.holder.path}", actor=actor,
            reason="policy file reloaded",
            detail={"generation": self.holder.generation, "rules": len(fresh.rules),
                    "screening_entries": len(fresh.screening), "channel": channel}))
        self._last_screen = 0.0
        return fresh

    async def refresh_actions(self) -> None:
        """Read changed actions into the mirror now, not at the next pass: an admin
        request that changed accounts' actions or status does before it answers
        (``Extension.on_accounts_changed``). Before start-up has read the mirror there is
        nothing to bring up to date: that first read sees the change."""
        if self.store is not None and self.actions.loaded:
            await self.actions.refresh(self.engine)

    async def flush_audit(self, *, force: bool = False) -> None:
        now = time.monotonic()
        interval = self.policy.document.audit.flush_interval_s
        if not force and now - self._last_flush < interval:
            return
        self._last_flush = now
        events = self.denials.drain()
        if events:
            await audit.record(self.engine, *events)
        if self.forwarder is not None:
            await self.forwarder.forward()

    async def run_once(self) -> None:
        """One pass of the background work (the loop calls it; tests may too)."""
        policy = self.policy
        if self._sighup:
            self._sighup = False
            try:
                await self.reload(actor="SIGHUP")
                log.info("policy: reloaded %s on SIGHUP", self.holder.path)
            except ConfigError as exc:
                log.error("policy: reload on SIGHUP refused, keeping the running policy: %s",
                          exc)
        # One connection serves every read of the pass (most passes only read); writes
        # happen only when there is something to change.
        applier = VerdictActions(self.engine, policy)
        async with self.engine.connect() as conn:
            expired = await expire_due(
                self.engine, conn=conn,
                set_status=policy.document.actions.suspend_sets_account_status)
            if policy.document.verdicts.enabled and self.feed is not None:
                await self.feed.poll(applier, conn=conn)
            if not expired and not applier.changed:
                await self.actions.refresh(conn)
        if expired or applier.changed:   # read what was just written, on a new snapshot
            await self.actions.refresh(self.engine)
        await self.flush_audit()
        now = time.monotonic()
        if len(policy.screening) and now - self._last_screen >= \
                policy.document.screening.interval_s:
            self._last_screen = now
            stats = await self.ops().screen_accounts()
            if stats["items"]:
                log.info("policy: screening opened %d review item(s)", stats["items"])
        self.passes += 1
        self.ready.set()

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("policy: background pass failed; retrying")
            interval = min(self.policy.document.refresh_s,
                           self.policy.document.verdicts.poll_interval_s)
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))

    def status(self) -> dict[str, Any]:
        p = self.policy
        return {"source": p.source, "generation": self.holder.generation,
                "rules": [r.name for r in p.rules], "tiers": list(p.tiers),
                "screening_entries": len(p.screening), "active_actions": len(self.actions),
                "passes": self.passes, "errors": self.errors,
                "pending_denial_groups": len(self.denials),
                "ledger": self.forwarder is not None}
