"""Campaign detection end to end on a simulated trace: the batch command, the online stage
(same verdicts), the verdict tables on SQLite and PostgreSQL, calibration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import openai
import orjson
import pytest
import redis as redis_sync
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from distillguard.cli import main
from distillguard.dashboard.sqlverdicts import SQLVerdicts, tables
from distillguard.detect.batch import read_labels, run_batch
from distillguard.detect.calibration import Calibration, threshold_for
from distillguard.detect.engine import Changes
from distillguard.detect.online import DetectionStage, create_tables, write_changes
from distillguard.detect.reader import _sorted_by_duckdb, in_time_order, iter_sorted_lines
from distillguard.detect.settings import DetectSettings, StreamSettings
from distillguard.detect.stream import Follower, decode
from distillguard.detect.worker import DetectorProcess
from distillguard.exchange import Exchange
from distillguard.serve import StackThread
from distillguard.simulate import simulate
from distillguard.store.sql import async_url
from distillguard.traceio import FormatError
from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts
from tests.factories import ADMIN_TOKEN, make_settings, start_stack
from tests.tcp_proxy import CuttableProxy

TICK = 600.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return simulate(tmp_path_factory.mktemp("detect"), preset="smoke", seed=5, days=0.5)


@pytest.fixture(scope="module")
def batch(world: tuple[Path, Path, Path]) -> Verdicts:
    trace, accounts, _ = world
    result, _detector = run_batch(trace, Calibration.read(), accounts=accounts,
                                  tick_seconds=TICK)
    return result.verdicts


def test_trace_is_read_in_time_order(tmp_path: Path, world: tuple[Path, Path, Path]) -> None:
    lines = world[0].read_bytes().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_bytes(b"\n".join(reversed(lines)) + b"\n")
    out = [orjson.loads(x)["ts"] for block in iter_sorted_lines(shuffled, batch_rows=100)
           for x in block]
    assert len(out) == len(lines) and out == sorted(out)


def test_a_trace_in_time_order_is_read_as_it_lies(tmp_path: Path,
                                                   world: tuple[Path, Path, Path]) -> None:
    """The simulator writes its trace in time order: it is read without the sort, and
    gives the lines the sort gives."""
    trace = world[0]
    assert in_time_order(trace)
    lines = [x for block in iter_sorted_lines(trace, batch_rows=100) for x in block]
    assert lines == trace.read_bytes().splitlines(keepends=True)
    by_sort = [x for block in _sorted_by_duckdb(str(trace), "1GB", None, 100) for x in block]
    assert [orjson.loads(x) for x in lines] == [orjson.loads(x) for x in by_sort]


def _stamps(tmp_path: Path, *stamps: str, first_key: str = "ts") -> Path:
    """A trace of one line per timestamp (``first_key`` opens each line)."""
    path = tmp_path / "stamps.jsonl"
    rows = [orjson.dumps({first_key: n, "ts": ts} if first_key != "ts" else {"ts": ts, "n": n})
            for n, ts in enumerate(stamps)]
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


@pytest.mark.parametrize(("stamps", "order"), [
    (("2026-03-02T00:00:01.000Z", "2026-03-02T00:00:01.000Z", "2026-03-02T00:00:02.500Z"),
     None),
    (("2026-03-02T00:00:02.000Z", "2026-03-02T00:00:01.999Z"), [1, 0]),
    # 1.5 s, then 1.25 s: of other lengths, so compared as times, not as text
    (("2026-03-02T00:00:01.5Z", "2026-03-02T00:00:01.25Z"), [1, 0]),
    (("2026-03-02T00:00:01.25Z", "2026-03-02T00:00:01.5Z", "2026-03-02T00:00:02Z"), None),
    # offsets: 01:00+01:00 is 00:00Z
    (("2026-03-02T01:00:00+01:00", "2026-03-02T00:00:00Z", "2026-03-02T00:30:00Z"), None),
    (("2026-03-02T02:00:00+01:00", "2026-03-02T00:30:00Z"), [1, 0]),
    # a date that does not exist: the sort decides (no time: first)
    (("2026-03-02T00:00:00.000Z", "2026-02-30T00:00:00+00:00"), [1, 0]),
    (("2026-03-02 00:00:00Z", "2026-03-01T00:00:00Z"), [1, 0]),   # not the form read
])
def test_time_order_check(tmp_path: Path, stamps: tuple[str, ...], order: list[int] | None
                          ) -> None:
    """``order``: the lines' time order when the file is not in it (None: it is)."""
    path = _stamps(tmp_path, *stamps)
    assert in_time_order(path) is (order is None)
    out = [orjson.loads(x)["n"] for block in iter_sorted_lines(path) for x in block]
    assert out == (order or list(range(len(stamps))))


def test_lines_that_do_not_open_with_their_time_are_sorted(tmp_path: Path) -> None:
    path = _stamps(tmp_path, "2026-03-02T00:00:02Z", "2026-03-02T00:00:01Z",
                   first_key="exchange_id")
    assert not in_time_order(path)
    assert [orjson.loads(x)["exchange_id"] for block in iter_sorted_lines(path)
            for x in block] == [1, 0]
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b'{"ts": "2026-03-02T00:00:01Z"}\n\n{"ts": "2026-03-02T00:00:02Z"}\n')
    assert not in_time_order(blank)


def test_batch_verdicts_cover_every_account(world: tuple[Path, Path, Path],
                                            batch: Verdicts) -> None:
    labels = read_labels(world[2])
    ids = [a.account_id for a in batch.accounts]
    assert sorted(ids) == sorted(labels) and len(ids) == len(set(ids))
    flagged = [a for a in batch.accounts if a.flagged]
    assert flagged, "the smoke world has campaigns; some account must be flagged"
    for a in flagged:
        assert a.reasons and a.first_flagged_at is not None and a.exchanges_before_flag
    # the detector finds attackers rather than benign users
    hits = sum(labels[a.account_id] for a in flagged)
    assert hits >= 0.8 * len(flagged)
    members = {m for c in batch.campaigns for m in c.accounts}
    assert all(c.evidence and c.detected_at for c in batch.campaigns)
    assert members == {a.account_id for a in flagged if a.campaign_id}


def test_cli_writes_the_verdicts_format(tmp_path: Path, world: tuple[Path, Path, Path]
                                        ) -> None:
    out = tmp_path / "verdicts.json"
    log = tmp_path / "progress.jsonl"
    result = CliRunner().invoke(main, ["detect", "--trace", str(world[0]), "--accounts",
                                       str(world[1]), "--out", str(out),
                                       "--tick-seconds", str(TICK), "--progress-log", str(log)])
    assert result.exit_code == 0, result.output
    doc = orjson.loads(out.read_bytes())
    assert doc["version"] == 1
    assert len(Verdicts.read(out).accounts) == len(read_labels(world[2]))
    # progress: every 10,000 exchanges and at the end, in order, with time and memory
    points = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    total = len(world[0].read_bytes().splitlines())
    assert [p["exchanges"] for p in points] == [*range(10_000, total, 10_000), total]
    assert all(a["seconds"] <= b["seconds"] for a, b in zip(points, points[1:], strict=False))
    assert all(p["rss_mb"] > 0 for p in points)
    bad = CliRunner().invoke(main, ["detect", "--trace", str(world[0])])
    assert bad.exit_code != 0 and "--out" in bad.output



def test_reader_process_gives_the_same_verdicts(world: tuple[Path, Path, Path],
                                                batch: Verdicts) -> None:
    """Reading and features in a second process change nothing but speed."""
    trace, accounts, _ = world
    blocks: list[int] = []
    result, _detector = run_batch(trace, Calibration.read(), accounts=accounts,
                                  tick_seconds=TICK, reader="process",
                                  on_block=blocks.append)
    assert result.verdicts.to_json() == batch.to_json()
    assert blocks and blocks[-1] == result.exchanges == len(trace.read_bytes().splitlines())
    assert blocks == sorted(blocks)


def test_auto_reader_uses_a_process_for_large_traces_only(
        monkeypatch: pytest.MonkeyPatch, world: tuple[Path, Path, Path]) -> None:
    from distillguard.detect import batch as batch_module

    monkeypatch.setattr(batch_module.os, "cpu_count", lambda: 2)
    assert not batch_module._use_reader_process(world[0], "auto")   # a few MB
    monkeypatch.setattr(batch_module, "READER_PROCESS_MIN_BYTES", 1)
    assert batch_module._use_reader_process(world[0], "auto")
    assert not batch_module._use_reader_process(world[0], "inline")
    monkeypatch.setattr(batch_module.os, "cpu_count", lambda: 1)
    assert not batch_module._use_reader_process(world[0], "auto")
    assert batch_module._use_reader_process(world[0], "process")


@pytest.mark.parametrize("reader", ["process", "inline"])
def test_bad_trace_line_is_reported_by_either_reader(tmp_path: Path, reader: str,
                                                     world: tuple[Path, Path, Path]) -> None:
    lines = world[0].read_bytes().splitlines()
    broken = tmp_path / "broken.jsonl"
    # a line that parses as JSON but is not an exchange (no timestamp: sorted first)
    broken.write_bytes(b"\n".join([*lines[:50], b'{"id": "x", "request": {}}', *lines[50:]]))
    with pytest.raises(FormatError, match="bad trace line near exchange 1:"):
        run_batch(broken, Calibration.read(), reader=reader)
    with pytest.raises(ValueError, match="reader must be one of"):
        run_batch(broken, Calibration.read(), reader="threads")


def test_verdicts_do_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    """The same trace gives byte-identical verdicts whatever the process's string-hash
    seed: no set or dict iteration order may reach campaign ids, evidence or risks."""
    trace, accounts, _ = simulate(tmp_path / "sim", preset="smoke", seed=0)
    seeds = ("1", "2", "3")
    runs = [subprocess.Popen([sys.executable, "-m", "distillguard.cli", "detect",
                              "--trace", str(trace), "--accounts", str(accounts),
                              "--out", str(tmp_path / f"verdicts{seed}.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONHASHSEED": seed})
            for seed in seeds]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err.decode()
    outs = [(tmp_path / f"verdicts{seed}.json").read_bytes() for seed in seeds]
    assert outs[0] == outs[1] == outs[2]
    assert Verdicts.read(tmp_path / "verdicts1.json").campaigns

@pytest.mark.parametrize("reader", ["inline", "process"])
def test_detect_leaves_no_spill_directory(world: tuple[Path, Path, Path],
                                          tmp_path: Path, reader: str) -> None:
    """The sort's temporary directory is removed after a run, and after a run stopped
    with SIGTERM (on a 10M-exchange trace it holds gigabytes), with either reader. The
    trace is out of time order, so that it is sorted."""
    import signal
    import time

    _, accounts, _ = world
    trace = tmp_path / "unsorted.jsonl"
    trace.write_bytes(b"\n".join(reversed(world[0].read_bytes().splitlines())) + b"\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "distillguard.cli", "detect", "--trace", str(trace),
           "--accounts", str(accounts), "--out", str(tmp_path / "v.json"), "--reader", reader]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert not list(tmp_path.glob("distillguard-detect-*"))
    run = subprocess.Popen([*cmd, "--progress-log", str(tmp_path / "progress.jsonl")],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("distillguard-detect-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob("distillguard-detect-*")), "the run made no spill directory"
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode in (128 + signal.SIGTERM, 0), err.decode()
    assert not list(tmp_path.glob("distillguard-detect-*"))
    assert not _processes_mentioning(str(tmp_path)), "the reader process outlived the run"


def _processes_mentioning(text: str) -> list[int]:
    """Running processes with ``text`` in their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_stops_held_are_delivered_when_the_block_ends() -> None:
    """The reader process is started with SIGTERM held, so a stop that lands while it is
    being started is not lost: it is delivered once the parent knows its child."""
    import signal

    from distillguard.detect.batch import _stops_held

    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with _stops_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert got == []
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


async def _import_accounts(state_url: str, accounts: Path) -> None:
    from distillguard.store import open_state_store
    from distillguard.traceio import read_accounts

    store = open_state_store(state_url)
    await store.migrate()
    await store.import_accounts(read_accounts(accounts))
    await store.close()


async def _online(trace: Path, accounts: Path, state_url: str, runs_in: str = "thread"
                  ) -> DetectionStage:
    """Replay the trace through the online stage, with account records in the store."""
    await _import_accounts(state_url, accounts)
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


@pytest.mark.parametrize("runs_in", ["thread", "process"])
def test_online_stage_gives_the_batch_verdicts(tmp_path: Path, world: tuple[Path, Path, Path],
                                               batch: Verdicts, runs_in: str) -> None:
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"

    async def go() -> tuple[list[AccountVerdict], list[CampaignVerdict]]:
        stage = await _online(world[0], world[1], url, runs_in)
        await stage.close()
        return await _tables_verdicts(url, batch)

    _assert_batch_verdicts(*asyncio.run(go()), batch)


@pytest.mark.redis
def test_one_follower_detects_over_every_replica(
        tmp_path: Path, world: tuple[Path, Path, Path], batch: Verdicts, redis_url: str,
        redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two replicas' stages (runs_in: follower) take alternate exchanges and add their
    features to the Redis stream; `distillguard detect follow` reads it and writes the
    verdicts the batch path gives on the whole trace. An entry that is not one of theirs
    (here a pickle) is skipped and logged, not run."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    stream = StreamSettings(url=redis_url, name=f"{redis_prefix}:features")
    lines = [x for block in iter_sorted_lines(world[0]) for x in block]

    async def publish() -> list[DetectionStage]:
        await _import_accounts(url, world[1])
        replicas = [DetectionStage(url, Calibration.read(), tick_seconds=TICK,
                                   runs_in="follower", stream=stream) for _ in range(2)]
        for n, line in enumerate(lines):
            await replicas[n % 2].on_exchange(Exchange.from_trace(orjson.loads(line)))
            if n == len(lines) // 2:
                await replicas[0].runner.redis.xadd(    # type: ignore[attr-defined]
                    stream.name, {"v": b"1", "f": __import__("pickle").dumps(object)})
        for replica in replicas:
            await replica.close()
        return replicas

    replicas = asyncio.run(publish())
    client = redis_sync.Redis.from_url(redis_url)
    try:
        assert client.xlen(stream.name) == sum(r.fed for r in replicas) + 1
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
        assert f"followed {sum(r.fed for r in replicas):,} exchanges (1 bad" in result.output
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
        tmp_path: Path, world: tuple[Path, Path, Path], redis_url: str,
        redis_prefix: str) -> None:
    """`detect follow` as a service: it takes what replicas add while it runs, serves
    its metrics, and on SIGTERM evaluates what is left, writes it and exits cleanly."""
    import signal

    from distillguard.serve import free_port

    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    stream = StreamSettings(url=redis_url, name=f"{redis_prefix}:features")
    lines = [x for block in iter_sorted_lines(world[0]) for x in block][:1500]
    config = tmp_path / "follower.yaml"
    config.write_text(orjson.dumps({
        "state": {"url": url},
        "detect": {"runs_in": "follower", "tick_seconds": TICK,
                   "stream": {"url": redis_url, "name": stream.name}}}).decode())
    port = free_port()
    follower = subprocess.Popen(
        [sys.executable, "-m", "distillguard.cli", "-c", str(config), "detect", "follow",
         "--metrics-port", str(port)], stderr=subprocess.PIPE, text=True)

    async def publish() -> int:
        await _import_accounts(url, world[1])
        replica = DetectionStage(url, Calibration.read(), runs_in="follower", stream=stream)
        for line in lines:
            await replica.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await replica.close()
        return replica.fed

    client = redis_sync.Redis.from_url(redis_url)
    try:
        fed = asyncio.run(publish())
        value: dict[tuple[str, tuple[str, ...]], float] = {}
        for _ in range(300):
            try:
                served = httpx.get(f"http://127.0.0.1:{port}/metrics")
            except httpx.TransportError:
                served = None
            if served is not None:
                value = {(x.name, tuple(x.labels.values())): x.value
                         for f in text_string_to_metric_families(served.text)
                         for x in f.samples}
                if value.get(("distillguard_detector_exchanges_total", ())) == fed:
                    break
            time.sleep(0.1)
        assert value["distillguard_detector_exchanges_total", ()] == fed
        assert value["distillguard_detector_stream_read_total", ()] == fed
        assert value["distillguard_detector_stream_bad_entries_total", ()] == 0
        assert value["distillguard_detector_stream_lag_seconds", ()] == 0
        assert value["distillguard_detector_evaluations_total", ()] > 0
        follower.send_signal(signal.SIGTERM)
        _, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
        client.delete(stream.name)
        client.close()
    assert follower.returncode == 0, err
    assert f"followed {fed:,} exchanges" in err

    async def rows() -> int:
        engine = create_async_engine(async_url(url))
        try:
            async with engine.connect() as conn:
                return int((await conn.execute(
                    text("SELECT count(*) FROM account_verdicts"))).scalar_one())
        finally:
            await engine.dispose()

    assert asyncio.run(rows()) > 0


@pytest.mark.redis
def test_a_follower_waits_out_a_redis_outage(
        tmp_path: Path, world: tuple[Path, Path, Path], redis_url: str, redis_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The follower reaches Redis through a connection that is cut: it logs once, waits,
    and once Redis is back goes on from the last entry it read, so nothing the replicas
    added meanwhile is missed."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    name = f"{redis_prefix}:features"
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = CuttableProxy(port).start()
    lines = [x for block in iter_sorted_lines(world[0]) for x in block][:600]

    async def until(check: Callable[[], bool]) -> None:
        for _ in range(300):
            if check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    async def go() -> tuple[Follower, int]:
        await _import_accounts(url, world[1])
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
        await until(lambda: follower.read == first)
        await asyncio.to_thread(proxy.cut)
        for line in lines[300:]:
            await replica.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await asyncio.sleep(1.5)
        assert follower.read == first        # it cannot reach Redis
        await asyncio.to_thread(proxy.restore)
        await until(lambda: follower.read == replica.fed)
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


def test_a_replica_goes_on_when_the_stream_is_unreachable(
        tmp_path: Path, world: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
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
    assert _samples(stage.metrics)["distillguard_detector_dropped_total", ()] == len(lines)
    assert sum("cannot add features" in r.getMessage() for r in caplog.records) == 1


def test_a_detector_process_that_ends_is_started_again(
        tmp_path: Path, world: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    """Killed mid-stream, the detector process is started again at the next exchange,
    with the account records seen so far; the stage keeps taking exchanges, and the
    error is logged. close() ends the process."""
    lines = [x for block in iter_sorted_lines(world[0]) for x in block][:400]
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"

    async def go() -> tuple[DetectionStage, int | None]:
        await _import_accounts(url, world[1])
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
    served = _samples(stage.metrics)
    assert served["distillguard_detector_restarts_total", ()] == 1
    assert served["distillguard_detector_exchanges_total", ()] == sum(
        1 for x in lines if orjson.loads(x).get("account_id"))


def test_queued_bytes_show_a_detector_process_that_is_behind(
        tmp_path: Path, world: tuple[Path, Path, Path]) -> None:
    """While the detector process takes nothing (stopped), what the stage sends it waits
    in the gateway, and the queued-bytes gauge shows it; once it runs again the queue
    empties and every exchange arrives."""
    import signal

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
            behind = _samples(stage.metrics)["distillguard_detector_queued_bytes", ()]
        finally:
            os.kill(pid, signal.SIGCONT)
        await feeding
        await stage.flush()
        caught_up = _samples(stage.metrics)["distillguard_detector_queued_bytes", ()]
        await stage.close()
        return behind, caught_up, stage

    behind, caught_up, stage = asyncio.run(go())
    assert behind > 0 and caught_up == 0
    assert isinstance(stage.runner, DetectorProcess)
    assert stage.runner.stats["exchanges"] == stage.fed == sum(
        1 for x in lines if orjson.loads(x).get("account_id"))


def test_a_failed_verdict_write_is_counted_and_the_stage_goes_on(
        tmp_path: Path, world: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    """With the verdict tables gone, an evaluation's changes cannot be written: that is
    logged and counted, the exchange that set it off is taken as usual, and the
    detector's state is kept, so once the tables are back the next changes are written."""
    lines = [x for block in iter_sorted_lines(world[0]) for x in block]
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"

    async def go() -> DetectionStage:
        stage = DetectionStage(url, Calibration.read(), tick_seconds=TICK, runs_in="thread")
        await stage.start()
        assert stage.engine is not None
        async with stage.engine.begin() as conn:
            await conn.execute(text("DROP TABLE account_verdicts"))
        half = len(lines) // 2
        for line in lines[:half]:
            await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))
        assert stage.write_errors > 0 and stage.written_accounts == 0
        await create_tables(stage.engine)
        for line in lines[half:]:
            await stage.on_exchange(Exchange.from_trace(orjson.loads(line)))
        await stage.flush()
        await stage.close()
        return stage

    with caplog.at_level("ERROR", logger="distillguard.detect"):
        stage = asyncio.run(go())
    assert stage.written_accounts > 0
    assert stage.detector is not None and stage.detector.exchanges == sum(
        1 for x in lines if orjson.loads(x).get("account_id"))
    served = _samples(stage.metrics)
    assert served["distillguard_detector_write_errors_total", ()] == stage.write_errors
    assert any("are not stored" in r.getMessage() for r in caplog.records)


@pytest.mark.postgres
def test_verdict_tables_on_postgres(pg_url: str) -> None:
    async def go() -> None:
        stage = DetectionStage(pg_url, Calibration.read())
        await stage.start()
        assert stage.engine is not None
        changes = Changes(at=1_772_000_000.0, accounts=[
            AccountVerdict("acct_a", risk=0.97, flagged=True, campaign_id="c-1",
                           reasons=["reasoning elicitation in 90% of prompts"],
                           exchanges_before_flag=12)],
            campaigns=[CampaignVerdict("c-1", accounts=["acct_a"], risk=0.9,
                                       evidence=["2 linked accounts"])])
        changes.accounts[0].first_flagged_at = changes.campaigns[0].detected_at = \
            __import__("datetime").datetime.fromtimestamp(changes.at,
                                                          __import__("datetime").UTC)
        await write_changes(stage.engine, changes)
        await write_changes(stage.engine, changes)    # the same evaluation again: upsert
        changes.at += 60
        changes.accounts[0].risk = 0.5
        await write_changes(stage.engine, changes)
        reader = SQLVerdicts(stage.engine, await tables(stage.engine))
        history = await reader.account_history("acct_a")
        assert [h["risk"] for h in history] == [0.5, 0.97]
        campaign = await reader.campaign("c-1")
        assert campaign is not None and campaign.accounts == ["acct_a"]
        assert campaign.extra.get("status") == "open"
        assert (await reader.campaigns(after=None, limit=10))[0]["campaign_id"] == "c-1"
        await stage.close()

    asyncio.run(go())


def test_threshold_from_target_fpr() -> None:
    peaks = np.linspace(0.0, 0.999, 1000)
    threshold, over = threshold_for(peaks, 0.001)
    assert over == 1 and threshold > peaks[-2]
    threshold0, over0 = threshold_for(peaks, 0.0)
    assert over0 == 0 and threshold0 > peaks[-1]
    assert threshold_for(peaks, 0.001) == (threshold, over)     # reproducible


def test_shipped_calibration_loads_and_says_what_it_was_fitted_on() -> None:
    cal = Calibration.read()
    assert 0.0 < cal.threshold <= 1.0 and cal.target_fpr == 0.001
    assert cal.fitted_on["trace_sha256"] and cal.fitted_on["benign"] > 100


def _samples(collector: Collector) -> dict[tuple[str, tuple[str, ...]], float]:
    """A collector's samples: (name, label values) -> value."""
    return {(x.name, tuple(x.labels.values())): x.value
            for family in collector.collect() for x in family.samples}


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
    served = httpx.get(stack.stack.base_url.removesuffix("/v1") + "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(served.text)}
    value = {(x.name, tuple(x.labels.values())): x.value
             for f in families.values() for x in f.samples}
    assert value["distillguard_detector_exchanges_total", ()] == 2
    assert value["distillguard_detector_evaluations_total", ()] >= 1
    assert value["distillguard_detector_accounts", ()] == 1
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
    assert _samples(stage.metrics) == {k: v for k, v in value.items()
                                       if k[0].startswith("distillguard_detector_")}


def test_calibration_is_reproducible(tmp_path: Path, world: tuple[Path, Path, Path]) -> None:
    """The same labelled trace gives the same calibration file, whatever the process's
    string-hash seed (set iteration order must not reach the result)."""
    trace, accounts, labels = world
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"cal{seed}.json"
        subprocess.run([sys.executable, "-m", "distillguard.cli", "detect", "calibrate",
                        "--trace", str(trace), "--accounts", str(accounts), "--labels",
                        str(labels), "--tick-seconds", str(TICK), "--out", str(out)],
                       check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    cal = Calibration.from_json(orjson.loads(outs[0]))
    assert cal.fitted_on["benign_flagged_at_threshold"] <= cal.target_fpr * cal.fitted_on[
        "benign"]


def test_thresholds_come_from_peaks_the_model_did_not_see(
        world: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-fitting: each benign account's peak is scored by models fitted without its
    fold's benign snapshots (all attack snapshots kept), the threshold is set from those
    peaks, and the shipped model is fitted on everything."""
    from distillguard.detect import batch as batch_module

    trace, accounts, labels = world
    attack = read_labels(labels)
    fits: list[int] = []
    replays: list[tuple[Calibration, object]] = []
    real_fit, real_run = batch_module.fit_model, batch_module.run_batch

    def fit_spy(rows: np.ndarray, y: np.ndarray) -> object:
        fits.append(len(rows))
        return real_fit(rows, y)

    def run_spy(*args: object, **kw: object) -> object:
        result = real_run(*args, **kw)  # type: ignore[arg-type]
        replays.append((args[1], result[1]))  # type: ignore[index]
        return result

    monkeypatch.setattr(batch_module, "fit_model", fit_spy)
    monkeypatch.setattr(batch_module, "run_batch", run_spy)
    cal = batch_module.calibrate(trace, labels, accounts=accounts, tick_seconds=TICK,
                                 folds=3)
    first = replays[0][1]
    snaps = [a for a, _ in first.snapshots if a in attack]  # type: ignore[attr-defined]
    folds = [batch_module._fold(a, 3) for a in snaps]
    expected = [sum(1 for a, f in zip(snaps, folds, strict=True) if attack[a] or f != k)
                for k in range(3)]
    assert fits == [*expected, len(snaps)]
    assert all(n < len(snaps) for n in expected)       # every fold holds benign snapshots
    peaks = []
    for k, (_, detector) in enumerate(replays[1:]):
        status = detector.status  # type: ignore[attr-defined]
        peaks += [status[a].peak if a in status else 0.0 for a, bad in attack.items()
                  if not bad and batch_module._fold(a, 3) == k]
    assert cal.threshold == threshold_for(np.array(peaks), cal.target_fpr)[0]
    assert cal.fitted_on["folds"] == 3
    bad = CliRunner().invoke(main, ["detect", "calibrate", "--trace", str(trace), "--labels",
                                    str(labels), "--folds", "0", "--out",
                                    str(trace.parent / "never.json")])
    assert bad.exit_code == 2 and "--folds" in bad.output
    assert not (trace.parent / "never.json").exists()


@pytest.mark.parametrize(("runs_in", "warned"), [("process", True), ("follower", False)])
def test_a_replica_with_a_detector_of_its_own_is_warned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, runs_in: str, warned: bool) -> None:
    from distillguard.detect import component

    detect = {"runs_in": runs_in, "stream": {"url": "redis://127.0.0.1:6379/0"}}
    with caplog.at_level("WARNING", logger="distillguard.detect"):
        extension = component(make_settings(tmp_path, server={"replica_id": "r1"},
                                            detect=detect))
    assert extension is not None and len(extension.stages) == 1
    assert any("sees only the traffic it serves" in r.getMessage()
               for r in caplog.records) == warned


def test_detect_over_the_ledger_gives_the_trace_verdicts(
        tmp_path: Path, world: tuple[Path, Path, Path], batch: Verdicts) -> None:
    """The trace replayed into the ledger (and its accounts into the state store), then
    `detect --ledger`: the verdicts of the trace itself. With bodies redacted, it warns
    that prompts cannot be read."""
    config = tmp_path / "settings.yaml"
    config.write_text(orjson.dumps({
        "state": {"url": f"sqlite:///{tmp_path / 'state.sqlite'}"},
        "ledger": {"path": str(tmp_path / "ledger")},
        "detect": {"enabled": False}}).decode())
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(main, ["-c", str(config), *args])
        assert result.exit_code == 0, result.output
        return result.output

    cli("accounts", "import", str(world[1]))
    cli("traces", "import", str(world[0]))
    out = tmp_path / "verdicts.json"
    cli("detect", "--ledger", "--out", str(out), "--tick-seconds", str(TICK))
    got = Verdicts.read(out)
    batch.write(tmp_path / "batch.json")      # as written (risks rounded)
    expected = Verdicts.read(tmp_path / "batch.json")
    assert got.accounts == expected.accounts and got.campaigns == expected.campaigns
    cli("ledger", "redact", "--before", "2100-01-01T00:00:00Z")
    warned = cli("detect", "--ledger", "--out", str(out), "--tick-seconds", str(TICK))
    assert "exchanges have no bodies in the ledger" in warned
    both = runner.invoke(main, ["-c", str(config), "detect", "--ledger", "--trace",
                                str(world[0]), "--out", str(out)])
    assert both.exit_code == 2 and "one of --trace or --ledger" in both.output
