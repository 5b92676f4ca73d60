"""The ledger as a gateway component: the inline stage and the component factory.

The stage is inline: :meth:`LedgerStage.on_exchange` returns once the exchange is durable
(group commit, see :mod:`distillguard.ledger.writer`), after the client already has its
response. It annotates the exchange with ``annotations["ledger"] = {"index": N}``, or
``{"spooled": True}`` while the store cannot be written (:mod:`~distillguard.ledger.spool`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from distillguard.config import Settings
from distillguard.exchange import Exchange
from distillguard.ledger.settings import parse_settings
from distillguard.ledger.writer import LedgerWriter, writer_for

if TYPE_CHECKING:
    from distillguard.serve import Extension


class LedgerMetrics(Collector):
    """The writer's counts at the gateway's ``/metrics``."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    def collect(self) -> Iterator[Metric]:
        w = self.writer
        yield CounterMetricFamily("distillguard_ledger_appended",
                                  "Entries committed to the ledger's store", value=w.appended)
        yield CounterMetricFamily("distillguard_ledger_write_errors",
                                  "Failed writes to the ledger's store (their exchanges go "
                                  "to the spool)", value=w.errors)
        yield GaugeMetricFamily("distillguard_ledger_spooled",
                                "Exchanges waiting in the spool for the store to answer "
                                "(above zero: the store cannot be written)",
                                value=w.spooled)


class LedgerStage:
    name = "ledger"
    inline = True
    # several exchanges at once share a group commit (Pipeline.submit_many); the writer
    # numbers them in the order their appends started
    concurrent = True

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer
        self.metrics = LedgerMetrics(writer)

    async def start(self) -> None:
        await self.writer.start()

    async def close(self) -> None:
        await self.writer.close()

    async def on_exchange(self, exchange: Exchange) -> None:
        index = await self.writer.append_exchange(exchange)
        # None: the store could not be written and the entry waits in the spool
        exchange.annotations["ledger"] = {"index": index} if index is not None \
            else {"spooled": True}


def component(settings: Settings) -> Extension | None:
    """The ledger component (on unless ``ledger.enabled: false``)."""
    from distillguard.ledger.routes import ledger_routes
    from distillguard.serve import Extension

    config = parse_settings(settings)
    if not config.enabled:
        return None
    writer = writer_for(config)
    return Extension(stages=[LedgerStage(writer)],
                     admin_routes=ledger_routes(writer, settings))
