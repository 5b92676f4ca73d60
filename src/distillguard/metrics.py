"""Prometheus metrics of the gateway, served at ``/metrics``.

``distillguard_requests_total{endpoint,status}``, ``distillguard_request_duration_seconds``
(histogram, whole request), ``distillguard_upstream_duration_seconds``,
``distillguard_upstream_errors_total{kind}``, ``distillguard_rate_limited_total{limit}``,
``distillguard_denied_total{check}``, ``distillguard_tokens_total{kind}``,
``distillguard_pipeline_backlog`` and ``distillguard_event_loop_lag_seconds`` (histogram:
how late the event loop ran a timer, :class:`LoopLag`). A stage with metrics of its own (:class:`HasMetrics`:
the online detector's, ``distillguard_detector_*``; the ledger's, ``distillguard_ledger_*``;
the dashboard index's, ``distillguard_dashboard_index_*``) is served beside them. Each gateway app
has its own registry, so several apps (replicas in one test process) do not collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from distillguard.exchange import Exchange

log = logging.getLogger("distillguard.gateway")

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
            120)


@runtime_checkable
class HasMetrics(Protocol):
    """A pipeline stage whose own metrics are served at the gateway's ``/metrics``."""

    @property
    def metrics(self) -> Collector: ...


class GatewayMetrics:
    """Metrics stage: counts every finished exchange."""

    name = "metrics"
    inline = True  # cheap, and /metrics should be current as soon as a response is sent

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("distillguard_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.duration = Histogram("distillguard_request_duration_seconds",
                                  "Time from request received to response finished",
                                  ["endpoint"], buckets=_BUCKETS, registry=r)
        self.upstream_duration = Histogram("distillguard_upstream_duration_seconds",
                                           "Time spent waiting on the upstream",
                                           buckets=_BUCKETS, registry=r)
        self.upstream_errors = Counter("distillguard_upstream_errors",
                                       "Upstream failures by kind", ["kind"], registry=r)
        self.rate_limited = Counter("distillguard_rate_limited",
                                    "Requests refused by a rate limit or quota", ["limit"],
                                    registry=r)
        self.denied = Counter("distillguard_denied", "Requests denied by a check",
                              ["check"], registry=r)
        self.tokens = Counter("distillguard_tokens", "Tokens metered", ["kind"], registry=r)
        self.backlog = Gauge("distillguard_pipeline_backlog",
                             "Exchanges waiting for background stages", registry=r)
        self.loop_lag = LoopLag(r)

    async def on_exchange(self, exchange: Exchange) -> None:
        self.requests.labels(exchange.endpoint, str(exchange.status)).inc()
        latency = exchange.timings.latency_ms
        if latency is not None:
            self.duration.labels(exchange.endpoint).observe(latency / 1000.0)
        upstream = exchange.timings.upstream_ms
        if upstream is not None:
            self.upstream_duration.observe(upstream / 1000.0)
        if exchange.error_code and exchange.error_code.startswith("upstream"):
            self.upstream_errors.labels(exchange.error_code).inc()
        limited = exchange.annotations.get("ratelimited")
        if limited:
            self.rate_limited.labels(limited).inc()
        elif exchange.annotations.get("denied_by"):
            self.denied.labels(exchange.annotations["denied_by"]).inc()
        if exchange.usage is not None:
            self.tokens.labels("prompt").inc(exchange.usage.prompt_tokens)
            self.tokens.labels("completion").inc(exchange.usage.completion_tokens)

    def serve_stage_metrics(self, stages: Iterable[object]) -> None:
        """Serve the metrics of every stage in ``stages`` that has its own."""
        for stage in stages:
            if isinstance(stage, HasMetrics):
                self.registry.register(stage.metrics)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# How often LoopLag's timer fires, the lag it logs a warning at, and at most how often.
LOOP_LAG_INTERVAL_S = 0.05
LOOP_STALL_WARN_S = 0.5
LOOP_STALL_WARN_EVERY_S = 60.0
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LoopLag:
    """How late the gateway's event loop runs a timer: while anything holds the loop
    (a computation or a blocking call on it), no request in the process moves, so a
    stall shows in every request's latency and nowhere in the request's own code. A
    timer every LOOP_LAG_INTERVAL_S observes how late it fired into
    ``distillguard_event_loop_lag_seconds``; a stall of LOOP_STALL_WARN_S or more is
    logged (at most once a minute, with how many there were), naming the way to find
    what held the loop (``py-spy dump`` of the process)."""

    def __init__(self, registry: CollectorRegistry,
                 interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.histogram = Histogram("distillguard_event_loop_lag_seconds",
                                   "How late the event loop ran a timer (every request "
                                   "waits while it is held)", buckets=_LAG_BUCKETS,
                                   registry=registry)
        self._stalls = 0
        self._warned_at = -LOOP_STALL_WARN_EVERY_S
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def observe(self, lag: float) -> None:
        self.histogram.observe(lag)
        if lag < LOOP_STALL_WARN_S:
            return
        self._stalls += 1
        now = time.monotonic()
        if now - self._warned_at >= LOOP_STALL_WARN_EVERY_S:
            log.warning("the event loop was held for %.2f s (%d stall(s) of %.1f s or more "
                        "since the last warning); every request waited behind it. `py-spy "
                        "dump --pid PID` during a stall shows what holds it", lag,
                        self._stalls, LOOP_STALL_WARN_S)
            self._warned_at, self._stalls = now, 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(max(0.0, loop.time() - due))
