"""The exchange pipeline's background queue: stages see every exchange in order, a stage
that prepares work for a batch gets what waited, and a failed preparation costs no
exchange anything."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import event

from distillguard.detect import online
from distillguard.detect.calibration import Calibration
from distillguard.detect.features import extract
from distillguard.detect.online import DetectionStage
from distillguard.exchange import Exchange
from distillguard.pipeline import BACKGROUND_BATCH, Pipeline
from tests.factories import make_exchange


class Recording:
    """A background stage that records what it was handed, and fails where told."""

    name = "recording"

    def __init__(self, *, fail_on: str | None = None) -> None:
        self.seen: list[str] = []
        self.fail_on = fail_on

    async def on_exchange(self, exchange: Exchange) -> None:
        if exchange.id == self.fail_on:
            raise RuntimeError("this exchange breaks the stage")
        self.seen.append(exchange.id)


class Preparing(Recording):
    def __init__(self, *, fail_on: str | None = None, prepare_fails: bool = False) -> None:
        super().__init__(fail_on=fail_on)
        self.batches: list[list[str]] = []
        self.prepare_fails = prepare_fails

    async def prepare(self, exchanges: Sequence[Exchange]) -> None:
        self.batches.append([ex.id for ex in exchanges])
        if self.prepare_fails:
            raise ValueError("cannot prepare this batch")


def _exchanges(n: int) -> list[Exchange]:
    return [make_exchange(f"question {i}") for i in range(n)]


def _through_the_queue(stages: list[Recording], exchanges: list[Exchange]) -> Pipeline:
    """Queue ``exchanges`` while the worker is busy (as under load), then drain."""
    async def go() -> Pipeline:
        pipeline = Pipeline(stages)
        await pipeline.start()
        for ex in exchanges:
            await pipeline.submit(ex)   # the worker runs only once this task waits
        await pipeline.drain()
        await pipeline.close()
        return pipeline
    return asyncio.run(go())


def test_a_preparing_stage_gets_what_waited_in_batches_and_every_exchange_in_order() -> None:
    exchanges = _exchanges(BACKGROUND_BATCH + 10)
    plain, preparing = Recording(), Preparing()
    pipeline = _through_the_queue([plain, preparing], exchanges)
    ids = [ex.id for ex in exchanges]
    assert plain.seen == ids and preparing.seen == ids
    assert [len(b) for b in preparing.batches] == [BACKGROUND_BATCH, 10]
    assert [i for b in preparing.batches for i in b] == ids
    assert pipeline.processed == len(ids) and not pipeline.stage_errors


def test_an_idle_pipeline_hands_over_one_exchange_at_a_time() -> None:
    async def go() -> Preparing:
        stage = Preparing()
        pipeline = Pipeline([stage])
        await pipeline.start()
        for ex in _exchanges(3):
            await pipeline.submit(ex)
            await pipeline.drain()
        await pipeline.close()
        return stage
    assert [len(b) for b in asyncio.run(go()).batches] == [1, 1, 1]


def test_a_failed_preparation_costs_no_exchange_anything(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    exchanges = _exchanges(5)
    stage = Preparing(fail_on=exchanges[2].id, prepare_fails=True)
    after = Recording()
    with caplog.at_level(logging.WARNING, logger="distillguard.pipeline"):
        pipeline = _through_the_queue([stage, after], exchanges)
    ids = [ex.id for ex in exchanges]
    assert stage.seen == ids[:2] + ids[3:]          # only the bad one is lost, to it
    assert after.seen == ids                        # later stages see every exchange
    assert pipeline.stage_errors == {"recording": 1}
    assert "could not prepare a batch of 5 exchanges" in caplog.text


def test_submit_many_without_a_worker_prepares_in_batches() -> None:
    exchanges = _exchanges(BACKGROUND_BATCH + 1)
    stage = Preparing()

    async def go() -> None:
        await Pipeline([stage]).submit_many(exchanges)
    asyncio.run(go())
    assert [len(b) for b in stage.batches] == [BACKGROUND_BATCH, 1]
    assert stage.seen == [ex.id for ex in exchanges]


def _detection_stage(tmp_path: Path) -> DetectionStage:
    return DetectionStage(f"sqlite:///{tmp_path / 'state.sqlite'}", Calibration.read(),
                          runs_in="thread")


def test_the_detection_stage_extracts_a_batch_once_with_the_same_features(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Features prepared for a batch are those of one exchange at a time, and an exchange
    of a prepared batch is not extracted again."""
    exchanges = [make_exchange(p, account_id=f"acct_{i % 3}")
                 for i, p in enumerate(["Think step by step: 2 + 2?", "Explain recursion.",
                                        "Grade this answer from 1 to 10: ...",
                                        "Explain recursion."])]
    exchanges.append(make_exchange("no account", account_id=""))
    one_by_one = [extract(ex).to_json() for ex in exchanges[:4]]
    single: list[str] = []
    real_extract = online.extract

    def counted(ex: Exchange, *args: object) -> object:
        single.append(ex.id)
        return real_extract(ex, *args)  # type: ignore[arg-type]
    monkeypatch.setattr(online, "extract", counted)
    stage = _detection_stage(tmp_path)

    async def go() -> None:
        await Pipeline([stage]).submit_many(exchanges)
        await stage.close()
    asyncio.run(go())
    assert single == []
    assert [ex.annotations["features"] for ex in exchanges[:4]] == one_by_one
    assert "features" not in exchanges[4].annotations
    assert stage.fed == 4 and not stage._prepared


def test_the_detection_stage_extracts_one_by_one_when_a_batch_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exchanges = _exchanges(4)

    def broken(*args: object, **kwargs: object) -> object:
        raise UnicodeError("a text no batch can take")
    monkeypatch.setattr(online, "extract_many", broken)
    stage = _detection_stage(tmp_path)

    async def go() -> Pipeline:
        pipeline = Pipeline([stage])
        await pipeline.submit_many(exchanges)
        await stage.close()
        return pipeline
    pipeline = asyncio.run(go())
    assert not pipeline.stage_errors and stage.fed == 4
    assert all("features" in ex.annotations for ex in exchanges)


def test_the_detection_stage_reads_a_batch_of_new_accounts_in_one_query(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distillguard.detect.scoring import AccountFacts
    from tests.detectworld import import_accounts

    accounts = tmp_path / "accounts.jsonl"
    accounts.write_text(
        '{"account_id": "acct_a", "created_at": "2026-02-01T00:00:00Z", "org": "Org A",'
        ' "payment_fingerprint": "pay_1", "email_domain": "a.example"}\n'
        '{"account_id": "acct_b", "created_at": null, "org": null,'
        ' "payment_fingerprint": "pay_2", "email_domain": null}\n')
    stage = _detection_stage(tmp_path)
    asyncio.run(import_accounts(stage.state_url, accounts))
    looked_up: list[set[str]] = []
    real = DetectionStage._look_up_accounts

    async def counted(self: DetectionStage, ids: set[str]) -> None:
        looked_up.append(set(ids))
        await real(self, ids)
    monkeypatch.setattr(DetectionStage, "_look_up_accounts", counted)
    queries: list[str] = []
    exchanges = [make_exchange(f"q{i}", account_id=a)
                 for i, a in enumerate(["acct_a", "acct_b", "acct_none", "acct_a"])]

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "FROM accounts" in statement:
            queries.append(statement)

    async def go() -> None:
        await stage.start()
        assert stage.engine is not None
        event.listen(stage.engine.sync_engine, "before_cursor_execute", seen)
        await Pipeline([stage]).submit_many(exchanges)
        await stage.close()
    asyncio.run(go())
    assert looked_up == [{"acct_a", "acct_b", "acct_none"}]
    assert len(queries) == 1 and " IN (" in queries[0]   # no look-up per account
    detector = stage.detector
    assert detector is not None
    assert detector.facts["acct_a"] == AccountFacts(
        created_at=1769904000.0, payment="pay_1", email_domain="a.example")
    assert detector.facts["acct_b"].payment == "pay_2" and "acct_none" not in detector.facts
