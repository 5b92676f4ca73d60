"""The gateway application: its parts, their start-up, and the public routes.

:class:`Gateway` holds the injected services (state store, counter store, upstream
transport, pipeline); :meth:`Gateway.create` builds the defaults from settings. Nothing
else in the package reads state from here: components receive what they need.

The default pipeline is one explicit ordered list in :func:`build_pipeline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from distillguard.auth import Authenticator
from distillguard.config import Settings
from distillguard.errors import ConfigError, NotFoundError, UpstreamError
from distillguard.exchange import Exchange
from distillguard.gateway.clientip import ClientIPResolver, forwarded_for
from distillguard.gateway.errors import EXCEPTION_HANDLERS
from distillguard.gateway.proxy import proxy_endpoint
from distillguard.gateway.tracelog import TraceLog, trace_path_for
from distillguard.metrics import GatewayMetrics
from distillguard.pipeline import Pipeline, RequestCheck, ResponseFilter, Stage
from distillguard.ratelimit import CounterStore, RateLimiter, open_counter_store
from distillguard.store import StateStore, open_state_store
from distillguard.upstream import HttpUpstream, UpstreamTransport

log = logging.getLogger("distillguard.gateway")


class ModelCatalog:
    """The models clients may call: ``upstream.models`` if set, else what upstream lists."""

    def __init__(self, upstream: UpstreamTransport, configured: Sequence[str],
                 refresh_s: float = 60.0) -> None:
        self.upstream = upstream
        self.configured = list(configured)
        self.refresh_s = refresh_s
        self._models: dict[str, dict[str, Any]] = {
            m: {"id": m, "object": "model", "created": 0, "owned_by": "distillguard"}
            for m in self.configured
        }
        self._loaded_at = 0.0 if not self.configured else float("inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            listed = await self.upstream.list_models()
            self._models = {m["id"]: m for m in listed}
            self._loaded_at = time.monotonic()

    async def _ensure(self) -> None:
        if time.monotonic() - self._loaded_at > self.refresh_s:
            try:
                await self.refresh()
            except UpstreamError:
                if not self._models:
                    raise
                log.warning("could not refresh the model list; keeping the last one")
                self._loaded_at = time.monotonic()

    async def has(self, model: str) -> bool:
        if model in self._models:
            return True
        await self._ensure()
        return model in self._models

    async def list(self) -> list[dict[str, Any]]:
        await self._ensure()
        return list(self._models.values())

    @property
    def loaded(self) -> bool:
        return bool(self._models)


def build_pipeline(
    settings: Settings,
    counters: CounterStore,
    metrics: GatewayMetrics,
    extra_stages: Sequence[Stage] = (),
    extra_checks: Sequence[RequestCheck] = (),
) -> Pipeline:
    """The default pipeline, in order.

    Checks: rate limits and quotas, then ``extra_checks`` (policy).
    Stages: token accounting (rate limiter), metrics, the trace log (when
    ``pipeline.trace_path`` is set), then ``extra_stages`` (ledger, online detection, ...).
    """
    limiter = RateLimiter(settings, counters)
    checks: list[RequestCheck] = [limiter, *extra_checks]
    stages: list[Stage] = [limiter, metrics]
    if settings.pipeline.trace_path:
        stages.append(TraceLog(trace_path_for(settings.pipeline.trace_path,
                                              settings.server.replica_id),
                               settings.pipeline.retention,
                               flush_s=settings.pipeline.trace_flush_s))
    stages.extend(extra_stages)
    return Pipeline(stages, checks, queue_size=settings.pipeline.queue_size)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        store: StateStore,
        counters: CounterStore,
        upstream: UpstreamTransport,
        stages: Sequence[Stage] = (),
        checks: Sequence[RequestCheck] = (),
        response_filters: Sequence[ResponseFilter] = (),
    ) -> None:
        self.settings = settings
        self.response_filters = list(response_filters)
        self.store = store
        self.counters = counters
        self.upstream = upstream
        self.metrics = GatewayMetrics()
        self.metrics.serve_stage_metrics(stages)
        self.pipeline = build_pipeline(settings, counters, self.metrics, stages, checks)
        self.auth = Authenticator(store, settings.state.key_cache_ttl_s,
                                  fail_open=settings.state.on_failure == "open",
                                  stale_grace_s=settings.state.stale_grace_s)
        self.models = ModelCatalog(upstream, settings.upstream.models)
        self._client_ip = ClientIPResolver(settings.server.trusted_proxies)
        self._pending: set[asyncio.Task[None]] = set()
        self.started = False

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        upstream_url: str | None = None,
        stages: Sequence[Stage] = (),
        checks: Sequence[RequestCheck] = (),
        response_filters: Sequence[ResponseFilter] = (),
    ) -> Gateway:
        if settings.upstream.is_demo and upstream_url is None:
            raise ConfigError("upstream.base_url is 'demo': start the demo upstream first "
                              "(distillguard serve does this) or set a real base URL")
        return cls(
            settings,
            store=open_state_store(settings.state.url),
            counters=open_counter_store(settings.counters),
            upstream=HttpUpstream(settings.upstream, upstream_url),
            stages=stages,
            checks=checks,
            response_filters=response_filters,
        )

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.migrate()
        await self.upstream.start()
        await self.pipeline.start()
        try:
            await self.models.refresh() if not self.settings.upstream.models else None
        except UpstreamError as exc:
            log.warning("model list not available yet: %s", exc.message)
        self.started = True
        self.metrics.loop_lag.start()

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.pipeline.close()
        await self.upstream.close()
        await self.counters.close()
        await self.store.close()
        await self.metrics.loop_lag.stop()
        self.started = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.close()

    # -- helpers used by the request handlers ---------------------------------------------

    def client_ip(self, request: Request) -> str | None:
        peer = request.client.host if request.client else None
        return self._client_ip.resolve(
            peer, forwarded_for(request.headers.getlist("x-forwarded-for")))

    def record(self, exchange: Exchange) -> None:
        """Hand a finished exchange to the pipeline without delaying the response."""
        task = asyncio.get_running_loop().create_task(self.pipeline.submit(exchange))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settle(self) -> None:
        """Wait until every exchange recorded so far has passed every stage (for tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        await self.pipeline.drain()

    # -- application ----------------------------------------------------------------------

    def app(self) -> Starlette:
        async def proxy(request: Request) -> Response:
            return await proxy_endpoint(self, request)

        async def visible_models(request: Request) -> list[dict[str, Any]]:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            return self.pipeline.visible_models(principal, await self.models.list())

        async def list_models(request: Request) -> Response:
            return _json({"object": "list", "data": await visible_models(request)})

        async def get_model(request: Request) -> Response:
            model_id = request.path_params["model"]
            for model in await visible_models(request):
                if model["id"] == model_id:
                    return _json(model)
            raise NotFoundError(f"The model '{model_id}' does not exist.",
                                code="model_not_found", param="model")

        async def health(request: Request) -> Response:
            return _json({"status": "ok"})

        async def ready(request: Request) -> Response:
            checks = {"started": self.started, "models": self.models.loaded}
            ok = all(checks.values())
            try:
                await self.store.get_key("key_readiness")
                checks["state_store"] = True
            except Exception:
                checks["state_store"] = False
            # state store away: ``closed`` refuses every request, ``open`` serves the keys
            # this replica looked up lately. Every replica shares the store, so were they
            # all to say not ready, a load balancer would send the traffic ``open``
            # serves nowhere.
            ok = ok and (checks["state_store"] or self.settings.state.on_failure == "open")
            if self.settings.counters.backend == "redis":
                try:
                    await self.counters.ping()
                    checks["counters"] = True
                except Exception:
                    checks["counters"] = False
                # counters away: ``closed`` refuses every request, ``open`` serves them
                # unlimited, so only the first makes this replica unable to serve
                ok = ok and (checks["counters"]
                             or self.settings.counters.on_failure == "open")
            return _json({"status": "ready" if ok else "not_ready", "checks": checks},
                         200 if ok else 503)

        async def metrics(request: Request) -> Response:
            self.metrics.backlog.set(self.pipeline.backlog)
            return Response(self.metrics.render(), headers=NOSNIFF,
                            media_type="text/plain; version=0.0.4; charset=utf-8")

        async def not_found(request: Request) -> Response:
            raise NotFoundError(f"Unknown endpoint {request.method} {request.url.path}.",
                                code="unknown_url")

        routes = [
            Route("/v1/chat/completions", proxy, methods=["POST"]),
            Route("/v1/completions", proxy, methods=["POST"]),
            Route("/v1/embeddings", proxy, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/{path:path}", not_found,
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
        return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
                         lifespan=self.lifespan)


# A browser that opens the operational endpoints must render them as what they are.
NOSNIFF = {"x-content-type-options": "nosniff"}


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=NOSNIFF,
                    media_type="application/json")
