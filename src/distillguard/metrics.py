"""Prometheus metrics of the gateway, served at ``/metrics``.

``distillguard_requests_total{endpoint,status}``, ``distillguard_request_duration_seconds``
(histogram, whole request), ``distillguard_upstream_duration_seconds``,
``distillguard_upstream_errors_total{kind}``, ``distillguard_rate_limited_total{limit}``,
``distillguard_denied_total{check}``, ``distillguard_tokens_total{kind}`` and
``distillguard_pipeline_backlog``. A stage with metrics of its own (:class:`HasMetrics`:
the online detector's, ``distillguard_detector_*``; the ledger's, ``distillguard_ledger_*``;
the dashboard index's, ``distillguard_dashboard_index_*``) is served beside them. Each gateway app
has its own registry, so several apps (replicas in one test process) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from distillguard.exchange import Exchange

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
