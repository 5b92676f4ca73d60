"""The online path: a background pipeline stage feeding the same detector.

:class:`DetectionStage` is a background :class:`~distillguard.pipeline.Stage`: the
gateway never waits for it. For each finished exchange it computes the features (stored
as ``exchange.annotations["features"]``; for the exchanges that waited on the pipeline's
queue, in one pass, :meth:`DetectionStage.prepare`) and feeds them to
:class:`~distillguard.detect.engine.Detector`, which runs in a process of its own
(:mod:`.worker`; ``runs_in="process"``, the default), in the gateway's process,
evaluations in a worker thread (``runs_in="thread"``), or, for every replica at once, in
``distillguard detect follow``, which takes the features from a Redis stream and feeds
them to this same stage (:mod:`.stream`; ``runs_in="follower"``). What an evaluation
changed is written to the state store's database (SQLite or PostgreSQL, the engine of
:mod:`distillguard.store`) in two tables that policy and the dashboard read:

* ``campaigns(campaign_id PK, risk, detected_at, evidence JSON, accounts JSON, status,
  updated_at)``: one row per campaign, updated in place by later evaluations only
  (``status`` is set to ``open`` when the campaign is created and then left to analysts);
* ``account_verdicts(account_id, risk, flagged, campaign_id, first_flagged_at,
  exchanges_before_flag, reasons JSON, updated_at, PK (account_id, updated_at))``: a row
  each time an account's verdict changes; the latest row is current.

Timestamps are RFC 3339 UTC (:func:`distillguard.exchange.format_ts`).

The stage's metrics (:class:`DetectorMetrics`) are served at the gateway's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from distillguard.detect.calibration import Calibration
from distillguard.detect.engine import Changes, Detector
from distillguard.detect.features import ExchangeFeatures, extract, extract_many
from distillguard.detect.scoring import AccountFacts
from distillguard.detect.settings import RUNS_IN, StreamSettings
from distillguard.detect.stream import StreamPublisher
from distillguard.detect.worker import DetectorProcess
from distillguard.exchange import Exchange, format_ts, parse_ts
from distillguard.geoip import GeoIP, default_geoip
from distillguard.store.sql import async_url, in_chunks
from distillguard.verdicts import AccountVerdict, CampaignVerdict

log = logging.getLogger("distillguard.detect")

# What the detector reads of an account record (AccountFacts).
_ACCOUNT_COLUMNS = "created_at, payment_fingerprint, email_domain"

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS campaigns (
        campaign_id TEXT PRIMARY KEY, risk REAL NOT NULL, detected_at TEXT,
        evidence TEXT NOT NULL DEFAULT '[]', accounts TEXT NOT NULL DEFAULT '[]',
        status TEXT NOT NULL DEFAULT 'open', updated_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS account_verdicts (
        account_id TEXT NOT NULL, risk REAL NOT NULL, flagged INTEGER NOT NULL,
        campaign_id TEXT, first_flagged_at TEXT, exchanges_before_flag INTEGER,
        reasons TEXT NOT NULL DEFAULT '[]', updated_at TEXT NOT NULL,
        PRIMARY KEY (account_id, updated_at))""",
    "CREATE INDEX IF NOT EXISTS account_verdicts_campaign ON account_verdicts (campaign_id)",
)
_UPSERT_ACCOUNT = text(
    "INSERT INTO account_verdicts (account_id, risk, flagged, campaign_id, first_flagged_at,"
    " exchanges_before_flag, reasons, updated_at) VALUES (:account_id, :risk, :flagged,"
    " :campaign_id, :first_flagged_at, :exchanges_before_flag, :reasons, :updated_at)"
    " ON CONFLICT (account_id, updated_at) DO UPDATE SET risk = excluded.risk,"
    " flagged = excluded.flagged, campaign_id = excluded.campaign_id,"
    " first_flagged_at = excluded.first_flagged_at,"
    " exchanges_before_flag = excluded.exchanges_before_flag, reasons = excluded.reasons")
# A campaign has one row: a write of an earlier evaluation's (a follower whose lease ran
# out while it wrote, a standby still behind the stream when it takes over) leaves a
# later one as it is. Timestamps of one format compare as text.
_UPSERT_CAMPAIGN = text(
    "INSERT INTO campaigns (campaign_id, risk, detected_at, evidence, accounts, status,"
    " updated_at) VALUES (:campaign_id, :risk, :detected_at, :evidence, :accounts, 'open',"
    " :updated_at) ON CONFLICT (campaign_id) DO UPDATE SET risk = excluded.risk,"
    " evidence = excluded.evidence, accounts = excluded.accounts,"
    " updated_at = excluded.updated_at WHERE campaigns.updated_at <= excluded.updated_at")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        for statement in SCHEMA:
            await conn.execute(text(statement))


async def write_verdicts(engine: AsyncEngine,
                         accounts: Iterable[tuple[AccountVerdict, float]],
                         campaigns: Iterable[tuple[CampaignVerdict, float]]) -> None:
    """Write verdicts, each with the time of the evaluation that gave it (its row's
    ``updated_at``), in one transaction."""
    times: dict[float, str] = {}

    def ts(at: float) -> str:
        if at not in times:
            times[at] = format_ts(datetime.fromtimestamp(at, UTC))
        return times[at]

    account_rows = [{**{k: v for k, v in a.to_json().items()
                        if k in ("account_id", "risk", "campaign_id", "first_flagged_at",
                                 "exchanges_before_flag")},
                     "flagged": int(a.flagged), "reasons": _json(a.reasons),
                     "updated_at": ts(at)} for a, at in accounts]
    campaign_rows = [{"campaign_id": c.campaign_id, "risk": round(c.risk, 6),
                      "detected_at": format_ts(c.detected_at) if c.detected_at else None,
                      "evidence": _json(c.evidence), "accounts": _json(c.accounts),
                      "updated_at": ts(at)} for c, at in campaigns]
    async with engine.begin() as conn:
        if account_rows:
            await conn.execute(_UPSERT_ACCOUNT, account_rows)
        if campaign_rows:
            await conn.execute(_UPSERT_CAMPAIGN, campaign_rows)


class WaitingChanges:
    """Verdicts not written yet (a failed write, a follower standing by): each account's
    and campaign's latest, with the time of the evaluation that gave it. Written late, a
    row keeps that time, so it is the row a follower that did write it wrote (the same
    key, upserted), not a copy under a later time. Adding an evaluation's changes costs
    what they hold, not what waits; what waits is bounded by the accounts and campaigns
    the detector knows."""

    def __init__(self) -> None:
        self.accounts: dict[str, tuple[AccountVerdict, float]] = {}
        self.campaigns: dict[str, tuple[CampaignVerdict, float]] = {}

    def __len__(self) -> int:
        return len(self.accounts) + len(self.campaigns)

    def add(self, changes: Changes) -> None:
        for a in changes.accounts:
            self.accounts[a.account_id] = (a, changes.at)
        for c in changes.campaigns:
            self.campaigns[c.campaign_id] = (c, changes.at)

    def take(self) -> WaitingChanges:
        """Everything waiting, leaving this empty."""
        taken = WaitingChanges()
        taken.accounts, self.accounts = self.accounts, {}
        taken.campaigns, self.campaigns = self.campaigns, {}
        return taken

    def put_back(self, older: WaitingChanges) -> None:
        """Give back what a failed write took: what came in since is later, and stays."""
        for aid, entry in older.accounts.items():
            self.accounts.setdefault(aid, entry)
        for cid, centry in older.campaigns.items():
            self.campaigns.setdefault(cid, centry)

    @property
    def latest(self) -> float:
        """The time of the latest evaluation whose verdicts wait."""
        return max((at for _, at in (*self.accounts.values(), *self.campaigns.values())),
                   default=0.0)


class DetectorRunner(Protocol):
    """Where the stage's detector runs, behind the same calls: :class:`DetectorThread`,
    :class:`~distillguard.detect.worker.DetectorProcess` or, when one detector serves
    every replica, :class:`~distillguard.detect.stream.StreamPublisher`."""

    @property
    def needs_accounts(self) -> bool:
        """Whether the stage should send it account records (add_account)."""
        ...

    @property
    def stats(self) -> dict[str, int]:
        """The detector's counts (Detector.stats) as last reported; empty if elsewhere."""
        ...

    @property
    def restarts(self) -> int: ...

    @property
    def queued_bytes(self) -> int: ...

    @property
    def dropped(self) -> int:
        """Exchanges that could not be handed to the detector."""
        ...

    async def add_account(self, account_id: str, facts: AccountFacts) -> None: ...

    async def observe(self, features: ExchangeFeatures) -> None: ...

    async def finish(self) -> None: ...

    async def close(self) -> None: ...


class DetectorThread:
    """The detector in the gateway's process (``runs_in="thread"``): each exchange is
    observed on the event loop, an evaluation in a worker thread. The same calls as
    :class:`~distillguard.detect.worker.DetectorProcess`, so the stage has one path."""

    needs_accounts = True
    restarts = 0         # it ends only with the gateway
    queued_bytes = 0     # each exchange is observed before the next is taken
    dropped = 0

    def __init__(self, calibration: Calibration, tick_seconds: float,
                 on_changes: Callable[[Changes], Awaitable[None]]) -> None:
        self.detector = Detector(calibration, tick_seconds=tick_seconds)
        self.on_changes = on_changes

    @property
    def stats(self) -> dict[str, int]:
        return self.detector.stats()

    async def add_account(self, account_id: str, facts: AccountFacts) -> None:
        self.detector.add_account(account_id, facts)

    async def observe(self, features: ExchangeFeatures) -> None:
        detector = self.detector
        if detector.next_tick is not None and features.ts >= detector.next_tick:
            changes = await asyncio.to_thread(detector.observe, features)   # evaluates
        else:
            changes = detector.observe(features)
        if changes:
            await self.on_changes(changes)

    async def finish(self) -> None:
        changes = await asyncio.to_thread(self.detector.finish)
        if changes:
            await self.on_changes(changes)

    async def close(self) -> None:
        await self.finish()


# Seconds from an exchange that set off an evaluation to its changes being written.
_DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class DetectorMetrics(Collector):
    """The online detector's metrics, read from the stage when ``/metrics`` is scraped.

    The detector's own counts (evaluations, accounts) are those it reported with its last
    evaluation; a detector process started again counts from zero, as any restarted
    process's counters do."""

    def __init__(self, stage: DetectionStage) -> None:
        self.stage = stage
        self.delay = Histogram(
            "distillguard_detector_verdict_delay_seconds",
            "From the exchange that set off an evaluation to its changes written to the "
            "verdict tables (for policy to read)", buckets=_DELAY_BUCKETS, registry=None)

    def collect(self) -> Iterator[Metric]:
        stage = self.stage
        runner = stage.runner
        stats = runner.stats
        yield CounterMetricFamily("distillguard_detector_exchanges",
                                  "Exchanges sent to the online detector", value=stage.fed)
        yield CounterMetricFamily("distillguard_detector_evaluations",
                                  "Evaluations the detector has run",
                                  value=stats.get("evaluations", 0))
        yield GaugeMetricFamily("distillguard_detector_accounts",
                                "Accounts whose behaviour the detector keeps",
                                value=stats.get("accounts", 0))
        yield GaugeMetricFamily("distillguard_detector_costart_pairs",
                                "Pairs of accounts whose co-started sessions the detector "
                                "counts (grows with the square of the accounts active at "
                                "once)",
                                value=stats.get("costart_pairs", 0))
        rows = CounterMetricFamily("distillguard_detector_verdict_rows",
                                   "Verdict rows written, by table", labels=["table"])
        rows.add_metric(["account_verdicts"], stage.written_accounts)
        rows.add_metric(["campaigns"], stage.written_campaigns)
        yield rows
        yield CounterMetricFamily("distillguard_detector_write_errors",
                                  "Failed writes of the detector's changes (they wait for "
                                  "the next write)", value=stage.write_errors)
        yield GaugeMetricFamily("distillguard_detector_unwritten_rows",
                                "Account and campaign verdicts waiting to be written (the "
                                "state store failed, or a follower stands by)",
                                value=stage.unwritten_rows)
        yield CounterMetricFamily("distillguard_detector_restarts",
                                  "Times the detector process ended and another was started",
                                  value=runner.restarts)
        yield CounterMetricFamily("distillguard_detector_dropped",
                                  "Exchanges that could not be handed to the detector (its "
                                  "stream unreachable)", value=runner.dropped)
        yield GaugeMetricFamily("distillguard_detector_queued_bytes",
                                "Bytes sent to the detector that it has not taken yet (its "
                                "process is behind, or its stream unreachable)",
                                value=runner.queued_bytes)
        yield from self.delay.collect()


class DetectionStage:
    """Background stage: features, detector, verdict tables."""

    name = "detect"
    inline = False

    def __init__(self, state_url: str, calibration: Calibration, *,
                 tick_seconds: float = 300.0, geoip: GeoIP | None = None,
                 runs_in: str = "process", stream: StreamSettings | None = None) -> None:
        if runs_in not in RUNS_IN:
            raise ValueError(f"runs_in must be one of {', '.join(RUNS_IN)}")
        self.runner: DetectorRunner
        if runs_in == "follower":
            if stream is None or not stream.url:
                raise ValueError("runs_in='follower' needs the stream's settings")
            self.runner = StreamPublisher(stream)
        else:
            self.runner = (DetectorThread if runs_in == "thread" else DetectorProcess)(
                calibration, tick_seconds, self._write)
        self.state_url = state_url
        self.geoip = geoip
        self.engine: AsyncEngine | None = None
        self._known: set[str] = set()
        # Features computed ahead for the batch on its way through (see prepare), by
        # the exchange's identity.
        self._prepared: dict[int, tuple[Exchange, ExchangeFeatures]] = {}
        self._prepared_facts: dict[str, Any] = {}    # account -> its record (None: none)
        self.fed = 0
        self.written_accounts = 0
        self.written_campaigns = 0
        self.write_errors = 0
        # Changes not written yet (a failed write, a follower standing by), and whether
        # this stage may write them (see write_unwritten).
        self._waiting = WaitingChanges()
        # What the write under way took from _waiting (still unwritten until it succeeds).
        self._in_flight = WaitingChanges()
        self._write_lock = asyncio.Lock()
        self._write_failing = False
        self.may_write: Callable[[], bool] = lambda: True
        self._metrics = DetectorMetrics(self)

    @property
    def metrics(self) -> DetectorMetrics:
        """Served at the gateway's ``/metrics`` (:class:`distillguard.metrics.HasMetrics`)."""
        return self._metrics

    @property
    def written(self) -> int:
        """Verdict rows written (accounts and campaigns)."""
        return self.written_accounts + self.written_campaigns

    @property
    def detector(self) -> Detector | None:
        """The detector, when it runs in this process."""
        return self.runner.detector if isinstance(self.runner, DetectorThread) else None

    async def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.state_url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        self.engine = create_async_engine(async_url(self.state_url), **kwargs)
        await create_tables(self.engine)

    async def _facts(self, account_id: str) -> None:
        self._known.add(account_id)
        if account_id in self._prepared_facts:        # looked up with its batch
            row = self._prepared_facts.pop(account_id)
        else:
            assert self.engine is not None
            try:
                async with self.engine.connect() as conn:
                    row = (await conn.execute(text(
                        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account_id = :a"),
                        {"a": account_id})).mappings().first()
            except Exception:  # no accounts table (a bare database): behaviour only
                log.debug("no account record for %s", account_id, exc_info=True)
                return
        if row is not None:
            created = row["created_at"]
            facts = AccountFacts(created_at=parse_ts(created).timestamp() if created else None,
                                 payment=row["payment_fingerprint"],
                                 email_domain=row["email_domain"])
            await self.runner.add_account(account_id, facts)

    async def _look_up_accounts(self, account_ids: set[str]) -> None:
        """The account records of a batch's accounts not seen before, in one query per 500
        (:meth:`_facts` takes them from here); one that fails leaves them to be looked up
        one by one."""
        if self.engine is None:
            await self.start()
        assert self.engine is not None
        found: dict[str, Any] = dict.fromkeys(account_ids)
        try:
            async with self.engine.connect() as conn:
                for marks, params in in_chunks(sorted(account_ids)):
                    rows = await conn.execute(text(
                        f"SELECT account_id, {_ACCOUNT_COLUMNS} FROM accounts"
                        f" WHERE account_id IN ({marks})"), params)
                    found.update((r["account_id"], r) for r in rows.mappings())
        except Exception:
            log.debug("account records of a batch not read; one by one", exc_info=True)
            return
        self._prepared_facts = found

    @staticmethod
    def _detectable(exchange: Exchange) -> bool:
        return bool(exchange.account_id) and exchange.status != 0

    async def _geoip(self) -> GeoIP:
        if self.geoip is None:
            # Loaded off the event loop, and only where exchanges are extracted (not in
            # `detect follow`): extract() would hold the loop for the database's load
            # (about 150 ms) unless policy had loaded it already.
            self.geoip = await asyncio.to_thread(default_geoip)
        return self.geoip

    async def prepare(self, exchanges: Sequence[Exchange]) -> None:
        """The features of a batch of exchanges in one pass (:func:`extract_many`: each
        distinct text once, SimHashes in one numpy pass, about half the work of one
        exchange at a time), and the records of its new accounts in one query;
        :meth:`on_exchange` takes them from here."""
        todo = [ex for ex in exchanges if self._detectable(ex)]
        self._prepared, self._prepared_facts = {}, {}
        if len(todo) > 1:
            features = extract_many(todo, await self._geoip())
            self._prepared = {id(ex): (ex, f) for ex, f in zip(todo, features, strict=True)}
            unknown = {f.account_id for f in features} - self._known
            if self.runner.needs_accounts and len(unknown) > 1:
                await self._look_up_accounts(unknown)

    async def on_exchange(self, exchange: Exchange) -> None:
        if not self._detectable(exchange):
            return
        prepared = self._prepared.pop(id(exchange), None)
        if prepared is not None and prepared[0] is exchange:
            features = prepared[1]
        else:
            features = extract(exchange, await self._geoip())
        exchange.annotations["features"] = features.to_json()
        await self.on_features(features)

    async def on_features(self, features: ExchangeFeatures) -> None:
        """Hand one exchange's features to the detector (the account's record first, the
        first time it is seen). ``distillguard detect follow`` feeds the stream's here."""
        if self.engine is None:
            await self.start()
        if self.runner.needs_accounts and features.account_id not in self._known:
            await self._facts(features.account_id)
        self.fed += 1
        await self.runner.observe(features)     # what it changes goes to _write

    async def flush(self) -> None:
        """Evaluate what arrived since the last evaluation now, and return once every
        change so far is written (shutdown, tests)."""
        await self.runner.finish()
        await self.write_unwritten()

    async def _write(self, changes: Changes) -> None:
        """Take one evaluation's changes and write what waits (see
        :meth:`write_unwritten`)."""
        self._waiting.add(changes)
        await self.write_unwritten()

    async def write_unwritten(self) -> None:
        """Write the verdicts that wait (:class:`WaitingChanges`). A failed write is
        counted and logged (once per outage) and what it held waits for the next one: the
        verdict tables end up with every current verdict once the store answers again.
        While :attr:`may_write` says no (a follower standing by) verdicts only wait."""
        async with self._write_lock:
            if not self._waiting or not self.may_write():
                return
            assert self.engine is not None
            taken = self._in_flight = self._waiting.take()
            try:
                await write_verdicts(self.engine, taken.accounts.values(),
                                     taken.campaigns.values())
            except BaseException as exc:
                # Failed or cancelled (shutdown): what it took waits again.
                self._waiting.put_back(taken)
                if not isinstance(exc, Exception):
                    raise
                self.write_errors += 1
                if not self._write_failing:      # once per outage, not at every retry
                    log.exception("writing the detector's changes failed: %d account and "
                                  "%d campaign verdicts up to the evaluation at %s wait "
                                  "for the next write", len(taken.accounts),
                                  len(taken.campaigns),
                                  format_ts(datetime.fromtimestamp(taken.latest, UTC)))
                self._write_failing = True
                return
            finally:
                self._in_flight = WaitingChanges()
            if self._write_failing:
                log.warning("the detector's changes are written again (%d failed writes "
                            "so far)", self.write_errors)
                self._write_failing = False
            self.written_accounts += len(taken.accounts)
            self.written_campaigns += len(taken.campaigns)
            self._metrics.delay.observe(max(0.0, time.time() - taken.latest))

    @property
    def unwritten_rows(self) -> int:
        """Account and campaign verdicts waiting to be written, those of a write under
        way included (it may fail and give them back)."""
        waiting, flying = self._waiting, self._in_flight
        if not flying:
            return len(waiting)
        return (len(waiting.accounts.keys() | flying.accounts.keys())
                + len(waiting.campaigns.keys() | flying.campaigns.keys()))

    async def close(self) -> None:
        if self.engine is not None:
            await self.runner.close()
            await self.write_unwritten()
            if self.unwritten_rows and self.may_write():
                log.error("%d verdicts of the detector were never written: the state store "
                          "did not take them", self.unwritten_rows)
            await self.engine.dispose()
            self.engine = None
