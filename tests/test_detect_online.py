"""The online path: the detection stage in the gateway (its detector in a process of its
own or a thread, or one follower for every replica through a Redis stream), the verdict
tables, and the detector's metrics. Each gives the batch path's verdicts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import orjson
import pytest
import redis as redis_sync
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from distillguard.cli import main
from distillguard.dashboard.sqlverdicts import SQLVerdicts, tables
from distillguard.detect import component
from distillguard.detect.calibration import Calibration
from distillguard.detect.online import DetectionStage, create_tables, write_verdicts
from distillguard.detect.reader import iter_sorted_lines
from distillguard.detect.settings import DetectSettings, StreamSettings
from distillguard.detect.stream import Follower, decode, encode
from distillguard.detect.worker import DetectorProcess
from distillguard.exchange import Exchange
from distillguard.serve import StackThread
from distillguard.store.sql import async_url
from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts
from tests.detectworld import TICK, World, batch_verdicts, import_accounts, make_world, samples
from tests.factories import ADMIN_TOKEN, StderrLines, make_features, make_settings, start_stack
from tests.tcp_proxy import CuttableProxy


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory)


@pytest.fixture(scope="module")
def batch(world: World) -> Verdicts:
    return batch_verdicts(world)


async def _online(trace: Path, accounts: Path, state_url: str, runs_in: str = "thread"
                  ) -> DetectionStage:
    """Replay the trace through the online stage, with account records in the store."""
    await import_accounts(state_url, accounts)
    stage = DetectionStage(state_url, Calibration.read(), tick_seconds=TICK, runs_in=runs_in)
    await stage.start()
    for lines in iter_sorted_lines(trace):
        for line in lines:
            await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))
    await stage.flush()
    return stage


async def _tables_verdicts(state_url: str, batch: Verdicts
                           ) -> tuple[list[AccountVerdict], list[CampaignVerdict]]:
    """The latest verdict-table row of each account of ``batch``, and its campaigns."""
    engine = create_async_engine(async_url(state_url))
    try:
        reader = SQLVerdicts(engine, await tables(engine))
        latest = []
        for a in batch.accounts:
            rows = await reader.account_history(a.account_id)
            if rows:
                latest.append(AccountVerdict.from_json(rows[0]))
        campaigns = [await reader.campaign(c.campaign_id) for c in batch.campaigns]
        return latest, [c for c in campaigns if c is not None]
    finally:
        await engine.dispose()


def _assert_batch_verdicts(latest: list[AccountVerdict], campaigns: list[CampaignVerdict],
                           batch: Verdicts) -> None:
    by_id = {a.account_id: a for a in latest}
    for expected in batch.accounts:
        got = by_id.get(expected.account_id)
        if got is None:      # never evaluated online either way: not flagged
            assert not expected.flagged
            continue
        assert got.flagged == expected.flagged
        assert got.campaign_id == expected.campaign_id
        assert got.first_flagged_at == expected.first_flagged_at
        assert got.exchanges_before_flag == expected.exchanges_before_flag
        assert got.risk == pytest.approx(expected.risk, abs=0.05)
    assert sorted((c.campaign_id, c.detected_at) for c in campaigns) == sorted(
        (c.campaign_id, c.detected_at) for c in batch.campaigns)


async def _until(check: Callable[[], bool], seconds: float = 30.0) -> None:
    """Return once ``check()`` is true (polled every 50 ms); fail after ``seconds``."""
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def _metrics_of(port: int | str) -> dict[tuple[str, tuple[str, ...]], float]:
    """The samples a metrics endpoint serves, (name, label values) -> value ({} while it
    does not answer): a port on this machine, or the endpoint's URL."""
    url = port if isinstance(port, str) else f"http://127.0.0.1:{port}/metrics"
    try:
        served = httpx.get(url)
    except httpx.TransportError:
        return {}
    return {(x.name, tuple(x.labels.values())): x.value
            for f in text_string_to_metric_families(served.text) for x in f.samples}


def _repeated_rows(url: str) -> int:
    """Account verdict rows that repeat the account's previous row (rows are written
    only when a verdict changes)."""
    async def read() -> list[tuple[object, ...]]:
        engine = create_async_engine(async_url(url))
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in (await conn.execute(text(
                    "SELECT account_id, flagged, campaign_id, risk, reasons FROM "
                    "account_verdicts ORDER BY account_id, updated_at"))).all()]
        finally:
            await engine.dispose()

    rows = asyncio.run(read())
    return sum(1 for before, row in zip(rows, rows[1:], strict=False) if before == row)


def _rows(url: str) -> int:
    """Rows in the account verdict table."""
    async def count() -> int:
        engine = create_async_engine(async_url(url))
        try:
            async with engine.connect() as conn:
                return int((await conn.execute(
                    text("SELECT count(*) FROM account_verdicts"))).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(count())


@pytest.mark.parametrize("runs_in", ["thread", "process"])
def test_online_stage_gives_the_batch_verdicts(tmp_path: Path, world: World,
                                               batch: Verdicts, runs_in: str) -> None:
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"

    async def go() -> tuple[list[AccountVerdict], list[CampaignVerdict]]:
        stage = await _online(world[0], world[1], url, runs_in)
        await stage.close()
        return await _tables_verdicts(url, batch)

    _assert_batch_verdicts(*asyncio.run(go()), batch)


@pytest.mark.redis
def test_one_follower_detects_over_every_replica(
        tmp_path: Path, world: World, batch: Verdicts, redis_url: str,
        redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two replicas' stages (runs_in: follower) take alternate exchanges and add their
    features to the Redis stream; `distillguard detect follow` reads it and writes the
    verdicts the batch path gives on the whole trace. An entry that is not one of theirs
    (here a pickle) is skipped and logged, not run; so are entries with a time the
    detector must not take: before 1970 (it ended the detector process, whose sketches
    started again empty), or an hour ahead of when Redis added them (the detector's
    clock would have jumped, and no evaluation come until the end)."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    stream = StreamSettings(url=redis_url, name=f"{redis_prefix}:features")
    lines = [x for block in iter_sorted_lines(world[0]) for x in block]

    async def publish() -> list[DetectionStage]:
        await import_accounts(url, world[1])
        replicas = [DetectionStage(url, Calibration.read(), tick_seconds=TICK,
                                   runs_in="follower", stream=stream) for _ in range(2)]
        for n, line in enumerate(lines):
            await replicas[n % 2].on_exchange(Exchange.from_trace(orjson.loads(line)))
            if n == len(lines) // 2:
                redis = replicas[0].runner.redis    # type: ignore[attr-defined]
                await redis.xadd(stream.name,
                                 {"v": b"1", "f": __import__("pickle").dumps(object)})
                for ts in (time.time() + 3_600, -60.0):
                    await redis.xadd(stream.name, encode(make_features("acct_forged", ts)))
        for replica in replicas:
            await replica.close()
        return replicas

    replicas = asyncio.run(publish())
    client = redis_sync.Redis.from_url(redis_url)
    try:
        assert client.xlen(stream.name) == sum(r.fed for r in replicas) + 3
        assert all(r.fed > 0 and r.runner.dropped == 0 for r in replicas)
        assert all(r.runner.stats == {} and r.written == 0 for r in replicas)
        config = tmp_path / "follower.yaml"
        config.write_text(orjson.dumps({
            "state": {"url": url},
            "detect": {"runs_in": "follower", "tick_seconds": TICK,
                       "stream": {"url": redis_url, "name": stream.name}}}).decode())
        with caplog.at_level("WARNING", logger="distillguard.detect"):
            result = CliRunner().invoke(main, ["-c", str(config), "detect", "follow",
                                               "--idle-exit", "1"])
        assert result.exit_code == 0, result.output
        assert f"followed {sum(r.fed for r in replicas):,} exchanges (3 bad" in result.output
        assert any("skipped detector stream entry" in r.getMessage() for r in caplog.records)
    finally:
        client.delete(stream.name)
        client.close()
    _assert_batch_verdicts(*asyncio.run(_tables_verdicts(url, batch)), batch)


@pytest.mark.redis
def test_a_gateway_with_a_follower_adds_features_to_the_stream(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    """With detect.runs_in: follower the gateway starts no detector of its own: each
    exchange's features go to the stream."""
    name = f"{redis_prefix}:features"
    running = start_stack(make_settings(tmp_path, detect={
        "runs_in": "follower", "stream": {"url": redis_url, "name": name}}))
    client = redis_sync.Redis.from_url(redis_url)
    try:
        admin = httpx.Client(base_url=running.stack.admin_url,
                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        admin.post("/admin/v1/accounts", json={"account_id": "acct_f"}).raise_for_status()
        key = admin.post("/admin/v1/accounts/acct_f/keys", json={"name": "t"}).json()["key"]
        openai.OpenAI(base_url=running.stack.base_url, api_key=key).chat.completions.create(
            model="demo-chat-1", messages=[{"role": "user", "content": "Explain recursion."}])
        stage = next(s for s in running.stack.gateway.pipeline.stages
                     if isinstance(s, DetectionStage))
        assert stage.detector is None and not isinstance(stage.runner, DetectorProcess)
        for _ in range(100):     # the gateway hands exchanges over after responding
            running.call(running.stack.gateway.pipeline.drain())
            if client.xlen(name):
                break
            time.sleep(0.05)
        entries = client.xrange(name)
        assert len(entries) == 1
        assert decode(entries[0][1]).account_id == "acct_f"
    finally:
        running.stop()
        client.delete(name)
        client.close()


@pytest.mark.redis
def test_a_follower_serves_metrics_and_stops_on_sigterm(
        tmp_path: Path, world: World, redis_url: str,
        redis_prefix: str) -> None:
    """`detect follow` as a service: it takes what replicas add while it runs, serves
    its metrics, and on SIGTERM evaluates what is left, writes it and exits cleanly."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    stream = StreamSettings(url=redis_url, name=f"{redis_prefix}:features")
    lines = [x for block in iter_sorted_lines(world[0]) for x in block][:1500]
    config = tmp_path / "follower.yaml"
    config.write_text(orjson.dumps({
        "state": {"url": url},
        "detect": {"runs_in": "follower", "tick_seconds": TICK,
                   "stream": {"url": redis_url, "name": stream.name}}}).decode())
    # The store is set up before the follower starts, as in a deployment (two processes
    # creating one SQLite file at the same moment can find it locked).
    asyncio.run(import_accounts(url, world[1]))
    follower = subprocess.Popen(
        [sys.executable, "-m", "distillguard.cli", "-c", str(config), "detect", "follow",
         "--metrics-port", "0"], stderr=subprocess.PIPE, text=True)
    output = StderrLines(follower)

    async def publish() -> int:
        replica = DetectionStage(url, Calibration.read(), runs_in="follower", stream=stream)
        for line in lines:
            await replica.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await replica.close()
        return replica.fed

    client = redis_sync.Redis.from_url(redis_url)
    try:
        metrics = output.wait_for(r"metrics on (http://\S+)")[1]
        fed = asyncio.run(publish())
        value: dict[tuple[str, tuple[str, ...]], float] = {}
        for _ in range(300):
            value = _metrics_of(metrics)
            if value.get(("distillguard_detector_exchanges_total", ())) == fed:
                break
            time.sleep(0.1)
        assert value["distillguard_detector_exchanges_total", ()] == fed
        assert value["distillguard_detector_stream_read_total", ()] == fed
        assert value["distillguard_detector_stream_bad_entries_total", ()] == 0
        assert value["distillguard_detector_stream_lag_seconds", ()] == 0
        assert value["distillguard_detector_evaluations_total", ()] > 0
        assert value["distillguard_detector_follower_leading", ()] == 1
        follower.send_signal(signal.SIGTERM)
        err = output.text(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            output.text()
        client.delete(stream.name)
        client.close()
    assert follower.returncode == 0, err
    assert f"followed {fed:,} exchanges" in err
    assert "this follower writes the verdicts" in err and "not writing" not in err

    assert _rows(url) > 0


@pytest.mark.redis
def test_a_standby_follower_takes_over_when_the_leader_dies(
        tmp_path: Path, world: World, batch: Verdicts, redis_url: str,
        redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two followers on one stream: the first (a `detect follow` process) holds the lease
    and writes; the second follows the same entries without writing. The first is
    killed (SIGKILL: it cannot give the lease back); within the lease the second takes
    over, writes what it held, and follows the rest: the tables end up with the batch
    verdicts of the whole trace."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    stream = StreamSettings(url=redis_url, name=f"{redis_prefix}:features", lease_seconds=2)
    lines = [x for block in iter_sorted_lines(world[0]) for x in block]
    half = len(lines) // 2
    config = tmp_path / "follower.yaml"
    config.write_text(orjson.dumps({
        "state": {"url": url},
        "detect": {"runs_in": "follower", "tick_seconds": TICK,
                   "stream": stream.model_dump()}}).decode())
    client = redis_sync.Redis.from_url(redis_url)

    async def go(metrics: str) -> tuple[Follower, int, int, int]:
        replica = DetectionStage(url, Calibration.read(), runs_in="follower", stream=stream)
        for line in lines[:half]:
            await replica.on_exchange(Exchange.from_trace(orjson.loads(line)))
        first = replica.fed
        await _until(lambda: _metrics_of(metrics).get(
            ("distillguard_detector_stream_read_total", ())) == first)
        assert _metrics_of(metrics)["distillguard_detector_follower_leading", ()] == 1
        standby = Follower(url, DetectSettings(runs_in="follower", tick_seconds=TICK,
                                               stream=stream))
        following = asyncio.create_task(standby.run())
        await _until(lambda: standby.read == first)
        await asyncio.sleep(1.5)                    # several of its lease attempts
        assert not standby.leading and standby.stage.written == 0
        assert standby.stage.unwritten_rows > 0
        written_by_leader = await asyncio.to_thread(_rows, url)
        leader.kill()
        leader.wait(timeout=10)
        for line in lines[half:]:
            await replica.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await replica.close()
        await _until(lambda: standby.read == replica.fed)
        await _until(lambda: standby.leading, seconds=10)
        # It writes what it held as it takes over, not at its next evaluation.
        await _until(lambda: standby.stage.unwritten_rows == 0, seconds=10)
        standby.stop.set()
        await following
        return standby, replica.fed, written_by_leader, standby.stage.written

    asyncio.run(import_accounts(url, world[1]))      # the store first, as in a deployment
    leader = subprocess.Popen(
        [sys.executable, "-m", "distillguard.cli", "-c", str(config), "detect", "follow",
         "--metrics-port", "0"], stderr=subprocess.PIPE, text=True)
    output = StderrLines(leader)
    try:
        metrics = output.wait_for(r"metrics on (http://\S+)")[1]
        with caplog.at_level("INFO", logger="distillguard.detect"):
            standby, fed, by_leader, by_standby = asyncio.run(go(metrics))
    finally:
        if leader.poll() is None:
            leader.kill()
        output.text(timeout=10)
        client.delete(stream.name, f"{stream.name}:leader")
        client.close()
    assert standby.read == fed and by_leader > 0 and by_standby > 0
    assert standby.stage.unwritten_rows == 0
    # The standby's rows carry the times of the evaluations that gave them: a verdict the
    # leader wrote is upserted, not copied under the takeover's time.
    assert _repeated_rows(url) == 0
    assert any("follows without writing" in r.getMessage() for r in caplog.records)
    assert any("holds the lease" in r.getMessage() for r in caplog.records)
    _assert_batch_verdicts(*asyncio.run(_tables_verdicts(url, batch)), batch)


@pytest.mark.redis
def test_a_leading_follower_writes_what_waits_without_a_new_evaluation(
        tmp_path: Path, world: World, batch: Verdicts, redis_url: str,
        redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """The verdict table is gone while the follower evaluates the whole stream: its
    writes fail (logged once) and the changes wait. Once the table is back they are
    written at the follower's next lease renewal, with no exchange or evaluation to set
    it off, and the tables hold the batch verdicts."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    stream = StreamSettings(url=redis_url, name=f"{redis_prefix}:features", lease_seconds=2)
    lines = [x for block in iter_sorted_lines(world[0]) for x in block]

    async def go() -> Follower:
        await import_accounts(url, world[1])
        follower = Follower(url, DetectSettings(runs_in="follower", tick_seconds=TICK,
                                                stream=stream))
        following = asyncio.create_task(follower.run())
        await _until(lambda: follower.leading)
        replica = DetectionStage(url, Calibration.read(), runs_in="follower", stream=stream)
        await replica.start()           # it creates the tables too
        assert follower.stage.engine is not None
        async with follower.stage.engine.begin() as conn:
            await conn.execute(text("DROP TABLE account_verdicts"))
        for line in lines:
            await replica.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await replica.close()
        await _until(lambda: follower.read == replica.fed)
        await _until(lambda: follower.stage.runner.queued_bytes == 0)
        evaluations = None
        while evaluations != follower.stage.runner.stats.get("evaluations"):
            evaluations = follower.stage.runner.stats.get("evaluations")
            await asyncio.sleep(1.0)     # the detector has taken everything: settled
        await _until(lambda: follower.stage.write_errors >= 2)
        assert follower.stage.unwritten_rows > 0
        await create_tables(follower.stage.engine)
        await _until(lambda: follower.stage.unwritten_rows == 0)
        assert follower.stage.runner.stats.get("evaluations") == evaluations
        follower.stop.set()
        await following
        return follower

    client = redis_sync.Redis.from_url(redis_url)
    try:
        with caplog.at_level("WARNING", logger="distillguard.detect"):
            asyncio.run(go())
    finally:
        client.delete(stream.name, f"{stream.name}:leader")
        client.close()
    failed = [r for r in caplog.records if "wait for the next write" in r.getMessage()]
    assert len(failed) == 1
    assert any("written again" in r.getMessage() for r in caplog.records)
    _assert_batch_verdicts(*asyncio.run(_tables_verdicts(url, batch)), batch)


@pytest.mark.redis
def test_a_follower_waits_out_a_redis_outage(
        tmp_path: Path, world: World, redis_url: str, redis_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The follower reaches Redis through a connection that is cut: it logs once, waits,
    and once Redis is back goes on from the last entry it read, so nothing the replicas
    added meanwhile is missed."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    name = f"{redis_prefix}:features"
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = CuttableProxy(port).start()
    lines = [x for block in iter_sorted_lines(world[0]) for x in block][:600]

    async def go() -> tuple[Follower, int]:
        await import_accounts(url, world[1])
        follower = Follower(url, DetectSettings(runs_in="follower", tick_seconds=TICK,
                                                stream=StreamSettings(
                                                    url=f"redis://127.0.0.1:{proxy.port}/0",
                                                    name=name)))
        following = asyncio.create_task(follower.run())
        replica = DetectionStage(url, Calibration.read(), runs_in="follower",
                                 stream=StreamSettings(url=redis_url, name=name))
        for line in lines[:300]:
            await replica.on_exchange(Exchange.from_trace(orjson.loads(line)))
        first = replica.fed
        await _until(lambda: follower.read == first)
        await asyncio.to_thread(proxy.cut)
        for line in lines[300:]:
            await replica.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await asyncio.sleep(1.5)
        assert follower.read == first        # it cannot reach Redis
        await asyncio.to_thread(proxy.restore)
        await _until(lambda: follower.read == replica.fed)
        follower.stop.set()
        await following
        await replica.close()
        return follower, replica.fed

    client = redis_sync.Redis.from_url(redis_url)
    try:
        with caplog.at_level("ERROR", logger="distillguard.detect"):
            follower, fed = asyncio.run(go())
    finally:
        proxy.close()
        client.delete(name)
        client.close()
    assert follower.read == fed and follower.bad == 0
    assert sum("cannot read the detector stream" in r.getMessage()
               for r in caplog.records) == 1


@pytest.mark.redis
def test_a_failed_lag_look_up_keeps_the_last_lag(tmp_path: Path, redis_url: str,
                                                 redis_prefix: str) -> None:
    """The stream's lag is read after a full read; Redis failing at that moment leaves
    the last lag as it was instead of ending the follower (the next read reports it)."""
    from distillguard.detect.stream import _client

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = CuttableProxy(port).start()
    follower = Follower(f"sqlite:///{tmp_path / 'state.sqlite'}", DetectSettings(
        runs_in="follower", stream=StreamSettings(url=redis_url, name=f"{redis_prefix}:f")))
    follower.lag_s = 12.5

    async def go() -> float:
        client = _client(f"redis://127.0.0.1:{proxy.port}/0")
        try:
            await asyncio.to_thread(proxy.cut)
            return await follower._lag(client)
        finally:
            await client.aclose()

    try:
        assert asyncio.run(go()) == 12.5
    finally:
        proxy.close()


def test_a_follower_started_while_redis_is_down_waits_for_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Started with nothing listening at the stream's address (and --from-now, which
    asks Redis where the stream ends), the follower logs once and waits; stopped, it
    ends cleanly."""
    follower = Follower(f"sqlite:///{tmp_path / 'state.sqlite'}", DetectSettings(
        runs_in="follower", stream=StreamSettings(url="redis://127.0.0.1:1/0")),
        from_start=False)

    async def go() -> bool:
        following = asyncio.create_task(follower.run())
        await asyncio.sleep(1.5)
        waiting = not following.done()
        follower.stop.set()
        await following
        return waiting

    with caplog.at_level("ERROR", logger="distillguard.detect"):
        assert asyncio.run(go())
    assert sum("cannot read the detector stream" in r.getMessage()
               for r in caplog.records) == 1


@pytest.mark.redis
def test_a_replica_holds_its_features_while_redis_is_away(
        tmp_path: Path, world: World, redis_url: str, redis_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The replica reaches Redis through a connection that is cut: what it takes meanwhile
    waits in memory and is added, in order, once Redis answers again, so the stream holds
    every exchange. With room for five, the oldest beyond that are dropped and counted."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    lines = [x for block in iter_sorted_lines(world[0]) for x in block][:90]
    exchanges = [Exchange.from_trace(orjson.loads(line)) for line in lines]
    client = redis_sync.Redis.from_url(redis_url)

    async def run(name: str, buffer: int) -> DetectionStage:
        proxy = CuttableProxy(port).start()
        try:
            stage = DetectionStage(f"sqlite:///{tmp_path / 'state.sqlite'}",
                                   Calibration.read(), runs_in="follower",
                                   stream=StreamSettings(
                                       url=f"redis://127.0.0.1:{proxy.port}/0", name=name,
                                       buffer=buffer))
            for ex in exchanges[:30]:
                await stage.on_exchange(ex)
            await asyncio.to_thread(proxy.cut)
            for ex in exchanges[30:60]:
                await stage.on_exchange(ex)
            # what waits for Redis shows as queued
            assert samples(stage.metrics)["distillguard_detector_queued_bytes", ()] > 0
            await asyncio.to_thread(proxy.restore)
            await asyncio.sleep(1.1)          # past the retry pause
            for ex in exchanges[60:]:
                await stage.on_exchange(ex)
            assert samples(stage.metrics)["distillguard_detector_queued_bytes", ()] == 0
            await stage.close()
            return stage
        finally:
            proxy.close()

    names = [f"{redis_prefix}:all", f"{redis_prefix}:five"]
    try:
        with caplog.at_level("ERROR", logger="distillguard.detect"):
            whole = asyncio.run(run(names[0], 100))
        assert whole.runner.dropped == 0
        ids = [decode(fields).exchange_id for _, fields in client.xrange(names[0])]
        assert ids == [ex.id for ex in exchanges if ex.account_id]
        assert sum("cannot add features" in r.getMessage() for r in caplog.records) == 1
        small = asyncio.run(run(names[1], 5))
        ids = [decode(fields).exchange_id for _, fields in client.xrange(names[1])]
        kept = [ex.id for ex in exchanges if ex.account_id]
        # the outage's thirty did not fit in five; the first exchange after it, added to
        # a full buffer, pushed out one more
        assert small.runner.dropped == 26 and ids == kept[:30] + kept[56:]
        assert samples(small.metrics)["distillguard_detector_dropped_total", ()] == 26
    finally:
        client.delete(*names)
        client.close()


def test_a_replica_goes_on_when_the_stream_is_unreachable(
        tmp_path: Path, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens on the stream's port: each exchange is counted as dropped, the
    failure is logged once, and the stage raises nothing into the gateway."""
    lines = [x for block in iter_sorted_lines(world[0]) for x in block][:20]
    stage = DetectionStage(f"sqlite:///{tmp_path / 'state.sqlite'}", Calibration.read(),
                           runs_in="follower",
                           stream=StreamSettings(url="redis://127.0.0.1:1/0"))

    async def go() -> None:
        for line in lines:
            await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await stage.close()

    with caplog.at_level("ERROR", logger="distillguard.detect"):
        asyncio.run(go())
    assert stage.runner.dropped == stage.fed == len(lines)
    assert samples(stage.metrics)["distillguard_detector_dropped_total", ()] == len(lines)
    assert sum("cannot add features" in r.getMessage() for r in caplog.records) == 1


def test_a_detector_process_that_ends_is_started_again(
        tmp_path: Path, world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Killed mid-stream, the detector process is started again at the next exchange,
    with the account records seen so far; the stage keeps taking exchanges, and the
    error is logged. close() ends the process."""
    lines = [x for block in iter_sorted_lines(world[0]) for x in block][:400]
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"

    async def go() -> tuple[DetectionStage, int | None]:
        await import_accounts(url, world[1])
        stage = DetectionStage(url, Calibration.read(), tick_seconds=TICK, runs_in="process")
        await stage.start()
        worker = stage.runner
        assert isinstance(worker, DetectorProcess)
        for line in lines[:200]:
            await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await stage.flush()
        first = dict(worker.stats)
        assert worker._proc is not None
        worker._proc.kill()
        await worker._proc.wait()
        for line in lines[200:]:
            await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await stage.flush()
        assert worker.starts == 2
        assert worker.stats["exchanges"] == sum(
            1 for x in lines[200:] if orjson.loads(x).get("account_id"))
        assert worker.stats["records"] >= first["records"]
        proc = worker._proc
        await stage.close()
        return stage, proc.returncode if proc is not None else None

    with caplog.at_level("ERROR", logger="distillguard.detect"):
        stage, code = asyncio.run(go())
    assert code is not None, "close() leaves no process behind"
    assert any("detector process ended" in r.getMessage() for r in caplog.records)
    assert stage.written > 0
    served = samples(stage.metrics)
    assert served["distillguard_detector_restarts_total", ()] == 1
    assert served["distillguard_detector_exchanges_total", ()] == sum(
        1 for x in lines if orjson.loads(x).get("account_id"))


def test_queued_bytes_show_a_detector_process_that_is_behind(
        tmp_path: Path, world: World) -> None:
    """While the detector process takes nothing (stopped), what the stage sends it waits
    in the gateway, and the queued-bytes gauge shows it; once it runs again the queue
    empties and every exchange arrives."""
    lines = [x for block in iter_sorted_lines(world[0]) for x in block]
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"

    async def go() -> tuple[float, float, DetectionStage]:
        stage = DetectionStage(url, Calibration.read(), tick_seconds=TICK, runs_in="process")
        await stage.start()
        await stage.on_exchange(Exchange.from_trace(orjson.loads(lines[0])))
        worker = stage.runner
        assert isinstance(worker, DetectorProcess) and worker._proc is not None
        pid = worker._proc.pid

        async def feed() -> None:
            for line in lines[1:]:
                await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))

        os.kill(pid, signal.SIGSTOP)
        try:
            feeding = asyncio.create_task(feed())
            while worker.queued_bytes == 0 and not feeding.done():
                await asyncio.sleep(0.01)
            behind = samples(stage.metrics)["distillguard_detector_queued_bytes", ()]
        finally:
            os.kill(pid, signal.SIGCONT)
        await feeding
        await stage.flush()
        caught_up = samples(stage.metrics)["distillguard_detector_queued_bytes", ()]
        await stage.close()
        return behind, caught_up, stage

    behind, caught_up, stage = asyncio.run(go())
    assert behind > 0 and caught_up == 0
    assert isinstance(stage.runner, DetectorProcess)
    assert stage.runner.stats["exchanges"] == stage.fed == sum(
        1 for x in lines if orjson.loads(x).get("account_id"))


def test_changes_that_could_not_be_written_wait_for_the_next_write(
        tmp_path: Path, world: World, batch: Verdicts,
        caplog: pytest.LogCaptureFixture) -> None:
    """With the verdict tables gone, an evaluation's changes cannot be written: that is
    logged and counted, the exchange that set it off is taken as usual, and the changes
    wait. Once the tables are back, the next write carries them too: the tables end up
    with the batch path's verdicts, as if nothing had failed."""
    lines = [x for block in iter_sorted_lines(world[0]) for x in block]
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"

    async def go() -> tuple[DetectionStage, float, float]:
        await import_accounts(url, world[1])
        stage = DetectionStage(url, Calibration.read(), tick_seconds=TICK, runs_in="thread")
        await stage.start()
        assert stage.engine is not None
        async with stage.engine.begin() as conn:
            await conn.execute(text("DROP TABLE account_verdicts"))
        half = len(lines) // 2
        for line in lines[:half]:
            await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))
        assert stage.write_errors > 0 and stage.written_accounts == 0
        waiting = samples(stage.metrics)["distillguard_detector_unwritten_rows", ()]
        await create_tables(stage.engine)
        for line in lines[half:]:
            await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await stage.flush()
        after = samples(stage.metrics)["distillguard_detector_unwritten_rows", ()]
        await stage.close()
        return stage, waiting, after

    with caplog.at_level("ERROR", logger="distillguard.detect"):
        stage, waiting, after = asyncio.run(go())
    assert waiting > 0 and after == 0
    assert stage.detector is not None and stage.detector.exchanges == sum(
        1 for x in lines if orjson.loads(x).get("account_id"))
    served = samples(stage.metrics)
    assert served["distillguard_detector_write_errors_total", ()] == stage.write_errors
    assert any("wait for the next write" in r.getMessage() for r in caplog.records)
    _assert_batch_verdicts(*asyncio.run(_tables_verdicts(url, batch)), batch)


async def _a_stale_campaign_write(url: str) -> tuple[float, str]:
    """A campaign written at one evaluation, then its row of an earlier evaluation (a
    follower whose lease ran out during its write, or a standby behind the stream that
    takes over): the risk and time the table keeps."""
    stage = DetectionStage(url, Calibration.read())
    await stage.start()
    assert stage.engine is not None
    at = 1_772_000_000.0
    campaign = CampaignVerdict("c-1", accounts=["acct_a", "acct_b"], risk=0.9,
                               evidence=["2 linked accounts"],
                               detected_at=datetime.fromtimestamp(at, UTC))
    older = CampaignVerdict("c-1", accounts=["acct_a"], risk=0.6, evidence=["earlier"],
                            detected_at=datetime.fromtimestamp(at, UTC))
    await write_verdicts(stage.engine, [], [(campaign, at + 600)])
    await write_verdicts(stage.engine, [], [(older, at)])
    async with stage.engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT risk, updated_at FROM campaigns WHERE campaign_id = 'c-1'"))).one()
    await stage.close()
    return round(float(row[0]), 6), str(row[1])


def test_a_campaign_row_is_not_set_back_by_an_older_evaluation(tmp_path: Path) -> None:
    risk, updated_at = asyncio.run(_a_stale_campaign_write(
        f"sqlite:///{tmp_path / 'state.sqlite'}"))
    assert (risk, updated_at) == (0.9, "2026-02-25T06:23:20.000Z")


@pytest.mark.postgres
def test_verdict_tables_on_postgres(pg_url: str) -> None:
    async def go() -> None:
        stage = DetectionStage(pg_url, Calibration.read())
        await stage.start()
        assert stage.engine is not None
        at = 1_772_000_000.0
        account = AccountVerdict("acct_a", risk=0.97, flagged=True, campaign_id="c-1",
                                 reasons=["reasoning elicitation in 90% of prompts"],
                                 exchanges_before_flag=12,
                                 first_flagged_at=datetime.fromtimestamp(at, UTC))
        campaign = CampaignVerdict("c-1", accounts=["acct_a"], risk=0.9,
                                   evidence=["2 linked accounts"],
                                   detected_at=datetime.fromtimestamp(at, UTC))
        await write_verdicts(stage.engine, [(account, at)], [(campaign, at)])
        # The same evaluation again: upserted.
        await write_verdicts(stage.engine, [(account, at)], [(campaign, at)])
        account.risk = 0.5
        await write_verdicts(stage.engine, [(account, at + 60)], [(campaign, at + 60)])
        reader = SQLVerdicts(stage.engine, await tables(stage.engine))
        history = await reader.account_history("acct_a")
        assert [h["risk"] for h in history] == [0.5, 0.97]
        campaign = await reader.campaign("c-1")
        assert campaign is not None and campaign.accounts == ["acct_a"]
        assert campaign.extra.get("status") == "open"
        assert (await reader.campaigns(after=None, limit=10))[0]["campaign_id"] == "c-1"
        async with stage.engine.begin() as conn:
            await conn.execute(text("DELETE FROM campaigns WHERE campaign_id = 'c-1'"))
        await stage.close()

    asyncio.run(go())
    assert asyncio.run(_a_stale_campaign_write(pg_url)) == (0.9, "2026-02-25T06:23:20.000Z")


def test_gateway_runs_the_detection_stage(stack: StackThread,
                                          account_key: tuple[str, str]) -> None:
    """The default components include the online stage, its detector in a process of its
    own: the account record is read from the state store and sent there with the
    exchanges' features, the tables exist, and the gateway's /metrics serves the
    detector's counts."""
    account_id, key = account_key
    stages = [s for s in stack.stack.gateway.pipeline.stages if isinstance(s, DetectionStage)]
    assert len(stages) == 1
    stage = stages[0]
    worker = stage.runner
    assert isinstance(worker, DetectorProcess) and stage.detector is None
    client = openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)
    for q in ("Think step by step: what is 17 * 23?", "Explain recursion."):
        reply = client.chat.completions.create(
            model="demo-chat-1", messages=[{"role": "user", "content": q}])
        assert reply.choices[0].message.content
    pipeline = stack.stack.gateway.pipeline
    for _ in range(100):      # the gateway hands exchanges over after responding
        stack.call(pipeline.drain())
        stack.call(stage.flush())
        if worker.stats.get("exchanges") == 2:
            break
        time.sleep(0.05)
    assert not pipeline.stage_errors
    assert worker.stats["exchanges"] == 2 and worker.stats["records"] >= 1
    assert worker.starts == 1
    stack.call(stage.flush())
    engine = stage.engine
    assert engine is not None

    async def names() -> dict[str, list[str]]:
        return await tables(engine)

    found = stack.call(names())
    assert set(found) == {"campaigns", "account_verdicts"}
    assert "updated_at" in found["account_verdicts"]
    value = _metrics_of(stack.stack.base_url.removesuffix("/v1") + "/metrics")
    assert value["distillguard_detector_exchanges_total", ()] == 2
    assert value["distillguard_detector_evaluations_total", ()] >= 1
    assert value["distillguard_detector_accounts", ()] == 1
    assert value["distillguard_detector_costart_pairs", ()] == 0   # one account alone
    assert value["distillguard_detector_restarts_total", ()] == 0
    assert value["distillguard_detector_write_errors_total", ()] == 0
    assert value["distillguard_detector_queued_bytes", ()] == 0
    rows = sum(value["distillguard_detector_verdict_rows_total", (t,)]
               for t in ("account_verdicts", "campaigns"))
    assert rows == stage.written
    # each evaluation's changes that were written took seconds, not minutes, to land
    delays = value["distillguard_detector_verdict_delay_seconds_count", ()]
    assert (delays > 0) == (stage.written > 0)
    assert value["distillguard_detector_verdict_delay_seconds_sum", ()] < 60
    assert samples(stage.metrics) == {k: v for k, v in value.items()
                                       if k[0].startswith("distillguard_detector_")}


@pytest.mark.parametrize(("runs_in", "warned"), [("process", True), ("follower", False)])
def test_a_replica_with_a_detector_of_its_own_is_warned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, runs_in: str, warned: bool) -> None:
    detect = {"runs_in": runs_in, "stream": {"url": "redis://127.0.0.1:6379/0"}}
    with caplog.at_level("WARNING", logger="distillguard.detect"):
        extension = component(make_settings(tmp_path, server={"replica_id": "r1"},
                                            detect=detect))
    assert extension is not None and len(extension.stages) == 1
    assert any("sees only the traffic it serves" in r.getMessage()
               for r in caplog.records) == warned


def test_verdicts_of_a_write_under_way_count_as_unwritten_and_wait_again_if_it_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a write is under way its verdicts are not written yet: the unwritten count
    (and its metric) keeps them. A write that fails, or is cancelled at shutdown, gives
    them back to wait for the next one."""
    import distillguard.detect.online as online
    from distillguard.detect.engine import Changes

    release = asyncio.Event()
    outcome: list[BaseException | None] = [RuntimeError("the store went away")]

    async def held_write(*_args: object) -> None:
        await release.wait()
        if outcome[0] is not None:
            raise outcome[0]

    async def go() -> None:
        stage = DetectionStage(f"sqlite:///{tmp_path / 'state.sqlite'}", Calibration.read())
        await stage.start()
        monkeypatch.setattr(online, "write_verdicts", held_write)
        changes = Changes(1_772_000_000.0, [AccountVerdict("a", 0.99, True),
                                            AccountVerdict("b", 0.10, False)])
        writing = asyncio.create_task(stage._write(changes))
        await _until(lambda: stage._write_lock.locked())
        assert stage.unwritten_rows == 2, "a write under way counted as written"
        stage._waiting.add(Changes(1_772_000_300.0, [AccountVerdict("b", 0.2, False)]))
        assert stage.unwritten_rows == 2, "one account counted twice"
        release.set()
        await writing
        assert stage.write_errors == 1 and stage.unwritten_rows == 2
        release.clear()
        writing = asyncio.create_task(stage.write_unwritten())
        await _until(lambda: stage._write_lock.locked())
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
        assert stage.unwritten_rows == 2 and stage.write_errors == 1
        outcome[0] = None
        release.set()
        await stage.write_unwritten()
        assert stage.unwritten_rows == 0 and stage.written_accounts == 2
        monkeypatch.undo()
        await stage.close()

    asyncio.run(go())
