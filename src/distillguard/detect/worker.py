"""The online detector in a process of its own.

An evaluation is Python work (links, the graph, scores) that takes from milliseconds to
a good part of a second on a large state. Run in a thread of the gateway's process it
holds the interpreter lock, and each wake-up of the event loop (a request read, an
upstream reply, a response written) waits for the lock, up to the interpreter's switch
interval each time (``bench/online_stall.py`` measures it). In a process of its own the
detector runs on another core, and the event loop waits for none of it.

:class:`DetectorProcess` is the online stage's handle on that process
(``python -m distillguard.detect.worker``). It sends account records and each exchange's
features, in order, over a pipe (length-prefixed pickles, as the trace reader's), and
hands each evaluation's changes, read back in order with the detector's counts, to a
callback (the stage writes them to the verdict tables). The detector sees the same
sequence it would see in the gateway's process, so the verdicts are the same.

If the process ends unexpectedly, the error is logged and the next exchange starts a
new one, which is sent the account records seen so far; its links and sketches start
empty, and verdicts already written stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sys
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from typing import BinaryIO

from distillguard.detect.calibration import Calibration
from distillguard.detect.engine import Changes, Detector
from distillguard.detect.features import ExchangeFeatures
from distillguard.detect.reader import MESSAGE_HEADER, framed, receive, send
from distillguard.detect.scoring import AccountFacts

log = logging.getLogger("distillguard.detect")

# How long close() waits for the process to finish what it was sent.
CLOSE_TIMEOUT_S = 30.0


class DetectorGone(RuntimeError):
    """The detector process ended before answering."""


class DetectorProcess:
    """The parent's side: start, feed in order, collect changes (see the module text)."""

    needs_accounts = True
    dropped = 0

    def __init__(self, calibration: Calibration, tick_seconds: float,
                 on_changes: Callable[[Changes], Awaitable[None]]) -> None:
        self.calibration = calibration
        self.tick_seconds = tick_seconds
        self.on_changes = on_changes
        self.starts = 0
        # the detector's counts (Detector.stats) at its last evaluation or finish()
        self.stats: dict[str, int] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._facts: dict[str, AccountFacts] = {}

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and (
            self._pump is not None and not self._pump.done())

    @property
    def restarts(self) -> int:
        """How many times the process ended and a new one was started."""
        return max(0, self.starts - 1)

    @property
    def queued_bytes(self) -> int:
        """Bytes written for the process that the pipe has not taken yet (it is behind)."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.transport.is_closing():
            return 0
        return int(proc.stdin.transport.get_write_buffer_size())

    async def _start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "distillguard.detect.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.starts += 1
        self._write("init", (self.calibration, self.tick_seconds))
        for item in self._facts.items():
            self._write("account", item)
        self._pump = asyncio.create_task(self._read(self._proc))

    def _write(self, kind: str, payload: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(framed(kind, payload))

    async def _put(self, kind: str, payload: object) -> None:
        if not self.running:
            if self._proc is not None:
                if self._proc.returncode is None:     # alive, but its replies are lost
                    self._proc.kill()
                    await self._proc.wait()
                if self._pump is not None:
                    # what it wrote before it ended is handed over, and whoever waits on
                    # it is answered, before the new one's first reply can come
                    await self._pump
                log.error("the detector process ended (exit code %s); starting a new one "
                          "(its links and sketches start empty)", self._proc.returncode)
            await self._start()
        self._write(kind, payload)
        assert self._proc is not None and self._proc.stdin is not None
        # drain() waits only while the detector is behind; a broken pipe means it ended,
        # and the next call starts another
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self._proc.stdin.drain()

    async def add_account(self, account_id: str, facts: AccountFacts) -> None:
        self._facts[account_id] = facts
        await self._put("account", (account_id, facts))

    async def observe(self, features: ExchangeFeatures) -> None:
        await self._put("features", features)

    async def finish(self) -> None:
        """Evaluate what arrived since the last evaluation (Detector.finish), and return
        once its changes, and every earlier one, have been handed to ``on_changes``."""
        if self._proc is None:
            return
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        await self._put("finish", None)
        await done

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                header = await proc.stdout.readexactly(MESSAGE_HEADER.size)
                (size,) = MESSAGE_HEADER.unpack(header)
                kind, payload = pickle.loads(await proc.stdout.readexactly(size))
                if kind in ("evaluated", "finished"):
                    changes, self.stats = payload
                    if changes:
                        await self._hand_over(changes)
                    if kind == "finished" and self._waiting:
                        self._waiting.popleft().set_result(None)
                elif kind == "crash":
                    log.error("the detector process failed:\n%s", payload)
        except asyncio.IncompleteReadError:
            pass                              # it ended
        except Exception:
            log.exception("reading from the detector process failed")
        finally:
            while self._waiting:
                self._waiting.popleft().set_exception(
                    DetectorGone("the detector process ended before answering"))

    async def _hand_over(self, changes: Changes) -> None:
        """Give the changes to the callback. The stage keeps what it could not write; any
        other error is logged and does not end the reading of the process's answers."""
        try:
            await self.on_changes(changes)
        except Exception:
            log.exception("handing over the detector's changes failed")

    async def close(self) -> None:
        """Finish, then end the process (killed if it does not end in time)."""
        proc = self._proc
        if proc is None:
            return
        try:
            if self.running:
                await self.finish()
        except DetectorGone:
            pass
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            if self._pump is not None:
                await self._pump
            self._proc = None


def worker_main(inp: BinaryIO, out: BinaryIO) -> None:
    """The process (``python -m distillguard.detect.worker``): read messages until the
    pipe closes; write each evaluation's changes as they come."""
    from distillguard.detect.batch import fewer_gc_passes

    detector: Detector | None = None
    with fewer_gc_passes():
        while (message := receive(inp)) is not None:
            kind, payload = message
            try:
                if kind == "init":
                    calibration, tick_seconds = payload
                    detector = Detector(calibration, tick_seconds=tick_seconds)
                    continue
                assert detector is not None, "init comes first"
                if kind == "features":
                    changes = detector.observe(payload)
                    if changes is not None:       # it evaluated
                        send(out, "evaluated", (changes, detector.stats()))
                        out.flush()
                elif kind == "account":
                    detector.add_account(*payload)
                elif kind == "finish":
                    send(out, "finished", (detector.finish(), detector.stats()))
                    out.flush()
            except Exception:
                send(out, "crash", traceback.format_exc())
                out.flush()
                raise SystemExit(1) from None


if __name__ == "__main__":
    # The gateway stops it by closing the pipe; Ctrl-C in a terminal reaches the whole
    # process group, and the gateway's own shutdown then does that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The pipe to the gateway is kept for messages; anything else printed goes to stderr.
    messages = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker_main(sys.stdin.buffer, messages)
