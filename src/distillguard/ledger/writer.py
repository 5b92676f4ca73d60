"""Appending with group commit, and the process-wide writer per ledger location.

:class:`LedgerWriter` owns one thread. Callers on any event loop put entries on a queue
and await a future; the thread takes everything queued (up to ``max_batch``), writes it
in one transaction, commits with the configured durability and only then resolves the
futures with the entries' indices. So an ``await`` returns exactly when the entry is
durable, and under load one commit (one fsync) covers thousands of entries.

The same thread signs a checkpoint every ``checkpoint_interval_s`` when the tree has
grown. :func:`writer_for` returns the one writer of a ledger location in this process;
the gateway's stage, the policy and sharing components all append through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any

from distillguard.config import Settings
from distillguard.exchange import Exchange, Retention
from distillguard.ledger import entry
from distillguard.ledger.core import Ledger
from distillguard.ledger.settings import LedgerConfig, parse_settings

log = logging.getLogger("distillguard.ledger")

_Item = tuple[entry.Pending, "asyncio.Future[int]", asyncio.AbstractEventLoop]
_STOP = object()


class LedgerClosed(RuntimeError):
    """The writer was closed while an entry waited."""


def _resolve(done: list[tuple[asyncio.Future[int], int | BaseException]]) -> None:
    for fut, value in done:
        if fut.done():
            continue
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


class LedgerWriter:
    """Group-committing appender for one ledger; see the module docstring."""

    def __init__(self, config: LedgerConfig) -> None:
        self.config = config
        self.ledger: Ledger | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0
        self.appended = 0
        self.errors = 0

    # -- life cycle -----------------------------------------------------------------------

    def open(self) -> Ledger:
        """Open the store and load the tree (blocking); start the writer thread."""
        with self._start_lock:
            if self.ledger is None:
                self.ledger = Ledger(self.config)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="distillguard-ledger")
                self._thread.start()
            return self.ledger

    async def start(self) -> Ledger:
        return await asyncio.to_thread(self.open)

    def close_sync(self) -> None:
        with self._start_lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(_STOP)
                thread.join()
            leftovers = []  # appends that raced with the stop: written, not dropped
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    leftovers.append(item)
            if leftovers and self.ledger is not None:
                self._write(leftovers)
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    # -- appending ------------------------------------------------------------------------

    async def append_exchange(self, exchange: Exchange, retention: Retention | None = None
                              ) -> int:
        """Append an exchange; returns its leaf index once it is durable."""
        return await self._submit(entry.from_exchange(exchange,
                                                      retention or self.config.retention))

    async def append_event(self, name: str, subject: str, actor: str | None,
                           reason: str | None, detail: dict[str, Any]) -> int:
        """Append a typed audit event (``source:subject:action``); returns its leaf index
        once it is durable."""
        return await self._submit(entry.from_event(name, subject, actor, reason, detail))

    async def _submit(self, pending: entry.Pending) -> int:
        if self._thread is None or self.ledger is None:
            await self.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._queue.put((pending, fut, loop))
        return await fut

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.checkpoint_interval_s
        next_checkpoint = time.monotonic() + interval if interval > 0 else None
        stopping = False
        while not stopping:
            timeout = None
            if next_checkpoint is not None:
                timeout = max(0.0, next_checkpoint - time.monotonic())
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = None
            batch: list[_Item] = []
            if first is _STOP:
                stopping = True
            elif first is not None:
                batch.append(first)
            while len(batch) < self.config.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                batch.append(item)
            if batch:
                self._write(batch)
            if next_checkpoint is not None and (stopping or time.monotonic() >= next_checkpoint):
                self._checkpoint()
                next_checkpoint = time.monotonic() + interval

    def _write(self, batch: list[_Item]) -> None:
        assert self.ledger is not None
        results: list[int | BaseException]
        try:
            rows = self.ledger.append([p for p, _, _ in batch])
            results = [r.idx for r in rows]
            self.batches += 1
            self.appended += len(rows)
        except Exception as exc:  # the store failed: every waiter learns it
            log.exception("ledger append of %d entries failed", len(batch))
            self.errors += 1
            results = [exc] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for (_, fut, loop), value in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((fut, value))
        for loop, done in by_loop.items():
            # a closed loop has nobody waiting any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, done)

    def _checkpoint(self) -> None:
        assert self.ledger is not None
        try:
            if self.ledger.key is not None:
                self.ledger.checkpoint(only_if_grown=True)
        except Exception:
            log.exception("ledger checkpoint failed")


_writers: dict[str, LedgerWriter] = {}
_writers_lock = threading.Lock()


def writer_for(settings: Settings | LedgerConfig) -> LedgerWriter:
    """The one :class:`LedgerWriter` of this process for the ledger the settings name.

    Cheap to call; the writer opens its store on first use (or ``await writer.start()``).
    """
    config = settings if isinstance(settings, LedgerConfig) else parse_settings(settings)
    with _writers_lock:
        writer = _writers.get(config.url)
        if writer is None:
            writer = _writers[config.url] = LedgerWriter(config)
        return writer


async def close_writers() -> None:
    with _writers_lock:
        writers = list(_writers.values())
    for writer in writers:
        await writer.close()
