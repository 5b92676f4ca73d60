"""Trace log: every finished exchange appended to a file in the public trace format.

Switched on by ``pipeline.trace_path``. It is a background stage, so it never delays a
response; lines are written in the order exchanges finish, with the bodies kept or
replaced by their hashes per ``pipeline.retention``. The file is opened in append mode and
flushed at least every ``pipeline.trace_flush_s`` seconds and on shutdown. A path ending in
``.gz`` is written gzipped (one gzip member per flush, which every gzip reader
concatenates). Each replica needs its own file: ``{replica}`` in the path is replaced by
``server.replica_id`` (or the process id when none is set).

Reading the file back (``distillguard traces import``) replays it into the pipeline's
stages; see ``docs/formats.md`` for the format.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import time
from pathlib import Path
from typing import IO

import orjson

from distillguard.exchange import Exchange, Retention

log = logging.getLogger("distillguard.tracelog")


def trace_path_for(template: str, replica_id: str | None) -> Path:
    return Path(template.replace("{replica}", replica_id or f"pid{os.getpid()}"))


class TraceLog:
    """Background stage writing one trace line per exchange."""

    name = "tracelog"

    def __init__(self, path: str | Path, retention: Retention = Retention.FULL, *,
                 flush_s: float = 1.0, buffer_lines: int = 512) -> None:
        self.path = Path(path)
        self.retention = retention
        self.flush_s = flush_s
        self.buffer_lines = buffer_lines
        self.written = 0
        self.dropped = 0
        self._buffer: list[bytes] = []
        self._last_flush = time.monotonic()
        self._fh: IO[bytes] | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")  # noqa: SIM115 - held open for the stage's life
        self._ticker = asyncio.create_task(self._tick(), name="distillguard-tracelog")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            if time.monotonic() - self._last_flush >= self.flush_s:
                self.flush()

    async def on_exchange(self, exchange: Exchange) -> None:
        self._buffer.append(orjson.dumps(exchange.to_trace(self.retention)) + b"\n")
        now = time.monotonic()
        if len(self._buffer) >= self.buffer_lines or now - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer or self._fh is None:
            return
        data = b"".join(self._buffer)
        if self.path.suffix == ".gz":
            data = gzip.compress(data, compresslevel=6)
        try:
            self._fh.write(data)
            self._fh.flush()
            self.written += len(self._buffer)
        except OSError as exc:  # a full disk must not stall the pipeline or grow memory
            self.dropped += len(self._buffer)
            log.error("could not write %d lines to the trace log %s: %s",
                      len(self._buffer), self.path, exc)
        finally:
            self._buffer.clear()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        self.flush()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
