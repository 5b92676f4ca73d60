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
from distillguard.ledger.spool import Spool

log = logging.getLogger("distillguard.ledger")

# An entry, its waiter, the waiter's loop, and whether it may be spooled (exchanges; an
# audit event's caller keeps its own outbox and needs the index, see append_event).
_Item = tuple[entry.Pending, "asyncio.Future[int | None]", asyncio.AbstractEventLoop, bool]
_STOP = object()
# While the spool holds entries, how soon the writer tries the store again (seconds):
# the first wait, doubled after each failure up to the last.
RETRY_FIRST_S = 0.5
RETRY_MOST_S = 5.0


class LedgerClosed(RuntimeError):
    """The writer was closed while an entry waited."""


def _resolve(done: list[tuple[asyncio.Future[int | None], int | None | BaseException]]
             ) -> None:
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
        self.spool = Spool(config.spool_dir, sync=config.durability == "fsync") \
            if config.spool_dir is not None else None
        self._retry_at = 0.0
        self._retry_wait = RETRY_FIRST_S

    @property
    def spooled(self) -> int:
        """Exchanges waiting in the spool for the store to answer (0 without a spool)."""
        return self.spool.held if self.spool is not None else 0

    # -- life cycle -----------------------------------------------------------------------

    def open(self) -> Ledger:
        """Open the store and load the tree (blocking); start the writer thread."""
        with self._start_lock:
            if self.ledger is None:
                self.ledger = Ledger(self.config)
                problem = self.spool.usable() if self.spool is not None else None
                if problem and self.spool is not None:
                    log.error("the ledger's spool folder %s cannot be used (%s): exchanges "
                              "served while the store cannot be written would be in no "
                              "record; set ledger.spool_path", self.spool.folder, problem)
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
            if self.spooled and self.ledger is not None:
                self._drain_spool()      # the store may be back by now: one last try
            if self.spool is not None and self.spooled:
                log.warning("%d ledger entries remain spooled in %s: the ledger's store "
                            "could not be written; they are written when it next starts",
                            self.spool.held, self.spool.folder)
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    # -- appending ------------------------------------------------------------------------

    async def append_exchange(self, exchange: Exchange, retention: Retention | None = None
                              ) -> int | None:
        """Append an exchange; returns its leaf index once it is durable, or None once
        it is durable in the spool (the store cannot be written now; it gets its index
        when the store answers again, see :mod:`~distillguard.ledger.spool`)."""
        return await self._submit(entry.from_exchange(exchange,
                                                      retention or self.config.retention),
                                  spoolable=True)

    async def append_event(self, name: str, subject: str, actor: str | None,
                           reason: str | None, detail: dict[str, Any]) -> int:
        """Append a typed audit event (``source:subject:action``); returns its leaf index
        once it is durable. Events are not spooled: when the store fails this raises,
        and the caller keeps the event to try again (policy's audit table does)."""
        index = await self._submit(entry.from_event(name, subject, actor, reason, detail),
                                   spoolable=False)
        assert index is not None
        return index

    async def _submit(self, pending: entry.Pending, *, spoolable: bool) -> int | None:
        if self._thread is None or self.ledger is None:
            await self.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int | None] = loop.create_future()
        self._queue.put((pending, fut, loop, spoolable and self.spool is not None))
        return await fut

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.checkpoint_interval_s
        next_checkpoint = time.monotonic() + interval if interval > 0 else None
        stopping = False
        while not stopping:
            if self.spooled and time.monotonic() >= self._retry_at:
                self._drain_spool()
            timeout = None
            if next_checkpoint is not None:
                timeout = max(0.0, next_checkpoint - time.monotonic())
            if self.spooled:
                wait = max(0.0, self._retry_at - time.monotonic())
                timeout = wait if timeout is None else min(timeout, wait)
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
        """Append ``batch`` in one transaction. While the spool holds entries, or when
        the store fails, the entries that may be spooled are spooled instead (resolved
        with None), so they keep their order behind the ones spooled before; the others
        go to the store, and learn its error."""
        assert self.ledger is not None
        results: dict[int, int | None | BaseException] = {}
        spooling = self.spooled > 0
        direct = [i for i, item in enumerate(batch) if not (spooling and item[3])]
        to_spool = [i for i in range(len(batch)) if spooling and batch[i][3]]
        if direct:
            try:
                rows = self.ledger.append([batch[i][0] for i in direct])
                results.update(zip(direct, (r.idx for r in rows), strict=True))
                self.batches += 1
                self.appended += len(rows)
            except Exception as exc:  # the store failed
                self.errors += 1
                spoolable = [i for i in direct if batch[i][3]]
                if spoolable:
                    log.error("ledger append of %d entries failed (%s: %s); spooling "
                              "exchanges to %s until the store answers", len(direct),
                              type(exc).__name__, exc, self.spool and self.spool.folder)
                else:
                    log.exception("ledger append of %d entries failed", len(direct))
                results.update((i, exc) for i in direct if not batch[i][3])
                to_spool = sorted([*to_spool, *spoolable])
                self._retry_at = time.monotonic() + self._retry_wait
        if to_spool:
            assert self.spool is not None
            try:
                self.spool.add([batch[i][0] for i in to_spool])
                results.update((i, None) for i in to_spool)
            except OSError as exc:   # nowhere to keep them: the waiters learn it
                log.exception("spooling %d ledger entries to %s failed", len(to_spool),
                              self.spool.folder)
                results.update((i, exc) for i in to_spool)
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for i, (_, fut, loop, _) in enumerate(batch):
            by_loop.setdefault(loop, []).append((fut, results[i]))
        for loop, done in by_loop.items():
            # a closed loop has nobody waiting any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, done)

    def _drain_spool(self) -> None:
        """Write what the spool holds to the store, oldest first; on a failure try again
        later, waiting longer each time (up to RETRY_MOST_S)."""
        assert self.spool is not None and self.ledger is not None
        ledger = self.ledger

        def committed(entries: int) -> None:
            # counted as each segment is done, before the spool's count drops, so the
            # two never add up to less than what was served: a segment written before a
            # later one failed counts, and so does an entry whose first commit went
            # through but whose answer was lost (the store went away mid-commit)
            self.appended += entries

        try:
            written = self.spool.drain(ledger.append,
                                       lambda entry_id: ledger.store.find(entry_id) is not None,
                                       committed)
        except Exception as exc:
            self._retry_wait = min(RETRY_MOST_S, self._retry_wait * 2)
            self._retry_at = time.monotonic() + self._retry_wait
            log.warning("the ledger's store still cannot be written (%s); %d entries wait "
                        "in %s", type(exc).__name__, self.spool.held, self.spool.folder)
            return
        self._retry_wait = RETRY_FIRST_S
        if self.spool.blocked:   # another process drains the rest: look again soon
            self._retry_at = time.monotonic() + RETRY_FIRST_S
        if written:
            log.warning("the ledger's store answers again: %d spooled entries written",
                        written)

    def _checkpoint(self) -> None:
        assert self.ledger is not None
        try:
            # a ledger that refuses to sign said why when it was opened
            if self.ledger.key is not None and self.ledger.refusal is None:
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
