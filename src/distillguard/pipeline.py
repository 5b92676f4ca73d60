"""The exchange pipeline: the extension point every later feature plugs into.

There are two kinds of extension, declared here and nowhere else.

**Request checks** (:class:`RequestCheck`) run on the request path, in order, after the key
is authenticated and before the request is forwarded. Each returns a *value*:
:class:`Allowed` or :class:`Denied`. The first ``Denied`` ends the request with its HTTP
status and OpenAI-format error. Checks must be fast (in-memory look-ups); anything that
needs I/O belongs in a stage. Policy (jurisdiction, tiers, actions) is a request check.

**Stages** (:class:`Stage`) receive every finished :class:`~distillguard.exchange.Exchange`,
off the request path, in order: the gateway hands the record to :meth:`Pipeline.submit`
and returns. Stages annotate the exchange (``exchange.annotations["name"] = ...``) so
later stages can read what earlier ones found. The ledger, online detectors and metrics
are stages. A stage that raises is logged and counted; the next stage still runs.

A stage whose work is an acknowledgement (the ledger: "this exchange is recorded")
declares ``inline = True``. Inline stages run first, in order, inside
:meth:`Pipeline.submit`, which the gateway awaits once the response has been sent to the
client, so the client never waits for them but the gateway knows the record is safe before
it moves on; how long that takes is the stage's own durability policy. Every other stage
runs later on the background queue. An inline stage that can take several exchanges at
once declares ``concurrent = True`` (the ledger does): :meth:`Pipeline.submit_many`, used
to replay files, then hands it a whole batch, its calls started in order.

A background stage whose per-exchange work is cheaper done for many exchanges at once
(online detection: one numpy pass over many texts, one query for many account records)
may implement ``async prepare(exchanges)``. The queue's worker takes what
waits (up to :data:`BACKGROUND_BATCH`), calls ``prepare`` with all of it, then
``on_exchange`` for each exchange in order, as ever: ``prepare`` does only work that
``on_exchange`` would otherwise do itself, so a ``prepare`` that fails is logged and the
exchanges are handled one by one as if it had not run (one bad exchange costs only
itself). Batches are as large as what waited: one exchange when the worker keeps up
(as it does in a gateway serving at full speed), more for a backlog or a replayed file.

**Response filters** (:class:`ResponseFilter`) change what the client receives (reasoning
protection, per-account fingerprinting). They run on the request path, after upstream
answered: :meth:`ResponseFilter.filter_body` on a non-streaming JSON body, and for a
stream the :class:`StreamFilter` returned by :meth:`ResponseFilter.stream_filter` sees
every parsed ``data:`` chunk. A filter that has nothing to do for an exchange returns the
body unchanged (the same object) or no stream filter, and the gateway then forwards the
upstream bytes untouched. The exchange records what the client received.

A request check may also implement ``visible_models(principal, models) -> list`` to hide,
from ``GET /v1/models`` and ``GET /v1/models/{id}``, the models (OpenAI model objects) that
it would refuse to this key's account anyway; policy uses it for tier-gated models.

Stages and checks may implement ``async start()`` and ``async close()``.
The default stages are listed in :func:`distillguard.gateway.app.build_pipeline`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from distillguard.exchange import Exchange

log = logging.getLogger("distillguard.pipeline")

# At most this many waiting exchanges go through the background stages together (see
# the module's docstring, ``prepare``).
BACKGROUND_BATCH = 64


@dataclass(frozen=True, slots=True)
class Allowed:
    """A check let the request through. ``notes`` are kept on the exchange."""

    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Denied:
    """A check refused the request.

    ``status`` is 403 (not allowed) or 429 (throttled). ``retry`` says whether the client
    may retry: a deliberate block sets it False, which the gateway turns into
    ``x-should-retry: false`` so the official clients do not hammer it.
    """

    reason: str
    code: str = "permission_denied"
    status: int = 403
    retry: bool = False
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


Decision = Allowed | Denied


@runtime_checkable
class RequestCheck(Protocol):
    name: str

    async def check(self, exchange: Exchange) -> Decision: ...


@runtime_checkable
class Stage(Protocol):
    name: str

    async def on_exchange(self, exchange: Exchange) -> None: ...


@runtime_checkable
class PreparingStage(Stage, Protocol):
    """A background stage that does part of its work for a batch at once."""

    async def prepare(self, exchanges: Sequence[Exchange]) -> None:
        """Do ahead, for all of ``exchanges``, what :meth:`on_exchange` would do for each
        (it is called next, for each in order). Must not act on any of them: if it
        raises, the exchanges are handled one by one as if it had not run."""
        ...


class StreamFilter(Protocol):
    """Rewrites one streamed response, chunk by chunk (state lives on the instance)."""

    def on_event(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Return the chunk to forward (this one, changed, or a new dict), or None to drop
        it. Called for every JSON ``data:`` chunk in order, usage-only chunks included."""
        ...

    def flush(self) -> list[dict[str, Any]]:
        """Chunks still held back when upstream sends ``[DONE]``; forwarded before it."""
        ...


@runtime_checkable
class ResponseFilter(Protocol):
    """Changes responses before they reach the client; see the module docstring.

    ``filter_body`` must not modify ``body`` in place: it returns ``body`` itself when it
    changes nothing (the gateway then forwards the upstream bytes as they came) or a new
    dict. ``stream_filter`` returns None when this exchange's stream passes untouched.
    Both run on the request path: in-memory work only, no I/O.
    """

    name: str

    def filter_body(self, exchange: Exchange, body: dict[str, Any]) -> dict[str, Any]: ...

    def stream_filter(self, exchange: Exchange) -> StreamFilter | None: ...


class Pipeline:
    """Runs request checks inline and stages on a bounded background queue."""

    def __init__(
        self,
        stages: Sequence[Stage] = (),
        checks: Sequence[RequestCheck] = (),
        *,
        queue_size: int = 10_000,
    ) -> None:
        self.stages = list(stages)
        self.checks = list(checks)
        self._inline = [s for s in self.stages if getattr(s, "inline", False)]
        self._background = [s for s in self.stages if not getattr(s, "inline", False)]
        self._queue: asyncio.Queue[Exchange | None] = asyncio.Queue(maxsize=queue_size)
        self._worker: asyncio.Task[None] | None = None
        self.processed = 0
        self.stage_errors: dict[str, int] = {}

    async def start(self) -> None:
        for part in [*self.checks, *self.stages]:
            start = getattr(part, "start", None)
            if start is not None:
                await start()
        self._worker = asyncio.create_task(self._run(), name="distillguard-pipeline")

    async def close(self) -> None:
        """Drain the queue, then close stages. Nothing submitted is dropped."""
        if self._worker is not None:
            await self._queue.put(None)
            await self._worker
            self._worker = None
        for part in [*self.checks, *self.stages]:
            close = getattr(part, "close", None)
            if close is not None:
                await close()

    def visible_models(self, principal: Any, models: list[dict[str, Any]]
                       ) -> list[dict[str, Any]]:
        """The models this principal may see, after every check that filters listings."""
        for check in self.checks:
            visible = getattr(check, "visible_models", None)
            if visible is not None:
                models = visible(principal, models)
        return models

    async def check(self, exchange: Exchange) -> Decision:
        for check in self.checks:
            decision = await check.check(exchange)
            if isinstance(decision, Denied):
                exchange.annotations["denied_by"] = check.name
                return decision
            if decision.notes:
                exchange.annotations.setdefault("notes", []).extend(decision.notes)
        return Allowed()

    async def submit(self, exchange: Exchange) -> None:
        """Queue a finished exchange. Waits only when the queue is full (back-pressure)."""
        await self.submit_many([exchange])

    async def submit_many(self, exchanges: Sequence[Exchange]) -> None:
        """:meth:`submit` for a batch read from a file (``traces import``), in order. An
        inline stage that declares ``concurrent = True`` sees the batch's exchanges at
        once, its calls started in order: the ledger then writes the batch in one group
        commit instead of one commit (one fsync) per exchange. Other inline stages see
        them one by one; background stages receive them in order as ever."""
        for exchange in exchanges:
            exchange.seal_bodies()
            if "bodies_dropped" in exchange.annotations:
                log.warning("exchange %s is recorded without a body that cannot be "
                            "written as JSON: %s", exchange.id,
                            exchange.annotations["bodies_dropped"])
        for stage in self._inline:
            if len(exchanges) > 1 and getattr(stage, "concurrent", False):
                await asyncio.gather(*(self._run_stage(stage, ex) for ex in exchanges))
            else:
                for exchange in exchanges:
                    await self._run_stage(stage, exchange)
        if self._worker is None:
            for start in range(0, len(exchanges), BACKGROUND_BATCH):
                await self._process_many(list(exchanges[start:start + BACKGROUND_BATCH]))
            return
        for exchange in exchanges:
            await self._queue.put(exchange)

    async def drain(self) -> None:
        """Wait until everything submitted so far has gone through every stage."""
        await self._queue.join()

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < BACKGROUND_BATCH and batch[-1] is not None and not queue.empty():
                batch.append(queue.get_nowait())
            exchanges = [ex for ex in batch if ex is not None]
            try:
                if exchanges:
                    await self._process_many(exchanges)
            finally:
                for _ in batch:
                    queue.task_done()
            if batch[-1] is None:
                return

    async def _process_many(self, exchanges: list[Exchange]) -> None:
        for stage in self._background:
            if isinstance(stage, PreparingStage):
                try:
                    await stage.prepare(exchanges)
                except Exception:  # each exchange is then handled (and fails) alone
                    log.warning("stage %s could not prepare a batch of %d exchanges; "
                                "handling them one by one", stage.name, len(exchanges),
                                exc_info=True)
            for exchange in exchanges:
                await self._run_stage(stage, exchange)
        self.processed += len(exchanges)

    async def _run_stage(self, stage: Stage, exchange: Exchange) -> None:
        try:
            await stage.on_exchange(exchange)
        except Exception:  # a faulty stage must not stop the others
            self.stage_errors[stage.name] = self.stage_errors.get(stage.name, 0) + 1
            log.exception("stage %s failed on exchange %s", stage.name, exchange.id)
