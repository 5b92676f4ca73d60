"""The ledger's spool: exchanges kept on local disk while the store cannot be written,
and written to it, whole and once, when it answers again (ledger/spool.py)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from distillguard.exchange import Retention
from distillguard.ledger import entry
from distillguard.ledger.core import Ledger
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.spool import Spool
from distillguard.ledger.verify import verify_ledger
from distillguard.ledger.writer import LedgerWriter
from tests.factories import make_exchange, make_settings, new_api_key, start_recorded_stack
from tests.tcp_proxy import CuttableProxy

CHAT = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5}


def _config(tmp_path: Path) -> LedgerConfig:
    return LedgerConfig(url=f"sqlite:///{tmp_path / 'ledger.sqlite'}",
                        key_path=tmp_path / "ledger.key", spool_dir=tmp_path / "spool")


def test_spooled_entries_are_written_at_start_whole_and_once(tmp_path: Path) -> None:
    """Segments left by a process that could not reach its store are written when the
    writer next starts, oldest first, with the leaves they would have had; a segment
    already committed (the process died before removing it) is not written twice."""
    config = _config(tmp_path)
    first = [entry.from_exchange(make_exchange(f"p{i}", body_size=300), Retention.FULL)
             for i in range(3)]
    second = [entry.from_exchange(make_exchange(f"q{i}"), Retention.HASH) for i in range(4)]
    spool = Spool(config.spool_dir)  # type: ignore[arg-type]
    spool.add(first)
    spool.add(second)
    # a segment a process died writing (never renamed, never acknowledged) is removed;
    # one a live process is writing is left alone
    dead = tmp_path / "spool" / f".{time.time_ns():020d}-{2**22 + 7}-000000.jsonl.tmp"
    alive = tmp_path / "spool" / f".{time.time_ns():020d}-{os.getpid()}-000009.jsonl.tmp"
    dead.write_bytes(b'{"half": ')
    alive.write_bytes(b'{"half": ')
    assert Spool(config.spool_dir).held == 7  # type: ignore[arg-type]
    assert not dead.exists() and alive.exists()
    alive.unlink()
    lg = Ledger(config)
    lg.append(second)     # committed, then the process died before removing the segment
    lg.close()

    writer = LedgerWriter(config)

    async def go() -> None:
        await writer.start()
        deadline = time.monotonic() + 10
        while writer.spool is not None and writer.spool.held:
            assert time.monotonic() < deadline, "the spool was not drained"
            await asyncio.sleep(0.05)
        await writer.close()

    asyncio.run(go())
    assert list((tmp_path / "spool").iterdir()) == []
    lg = Ledger(config)
    try:
        rows = list(lg.store.iter_rows())
        assert [r.entry_id for r in rows] == [p.entry_id for p in [*second, *first]]
        for row, p in zip(rows[4:], first, strict=True):
            assert row.leaf == p.leaf(row.idx) and row.request == p.request
        report = verify_ledger(lg.store, lg.verifier, workers=1)
        assert report.ok and report.entries == 7, report.to_json()
    finally:
        lg.close()


def test_segments_written_before_a_failure_are_counted(tmp_path: Path) -> None:
    """The appended count (distillguard_ledger_appended_total) grows as each spooled
    segment commits: one written before a later one failed was not counted before."""
    config = _config(tmp_path)
    spool = Spool(config.spool_dir)  # type: ignore[arg-type]
    spool.add([entry.from_exchange(make_exchange(f"a{i}"), Retention.FULL) for i in range(2)])
    spool.add([entry.from_exchange(make_exchange(f"b{i}"), Retention.FULL) for i in range(3)])
    writer = LedgerWriter(config)
    writer.ledger = Ledger(config)
    real = writer.ledger.append
    calls = 0

    def second_fails(pending: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("the store went away again")
        return real(pending)  # type: ignore[arg-type]
    writer.ledger.append = second_fails  # type: ignore[method-assign]
    writer._drain_spool()
    assert writer.appended == 2 and writer.spooled == 3
    writer.ledger.append = real  # type: ignore[method-assign]
    writer._drain_spool()
    assert writer.appended == 5 and writer.spooled == 0
    # a commit that went through but whose answer was lost: the entry was spooled too,
    # and the drain finds it stored; it is in the store, so it counts
    lost = [entry.from_exchange(make_exchange("lost"), Retention.FULL)]
    writer.ledger.append(lost)
    spool.add(lost)
    writer.spool = Spool(config.spool_dir)  # type: ignore[arg-type]
    writer._drain_spool()
    assert writer.appended == 6 and writer.spooled == 0
    writer.ledger.close()


def test_a_waiting_entry_is_found_by_its_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", sync=False)
    first, second = make_exchange("first"), make_exchange("second")
    pendings = [entry.from_exchange(ex, Retention.FULL) for ex in (first, second)]
    spool.add(pendings[:1])
    spool.add(pendings[1:])
    found = spool.find(second.id)
    assert found is not None and found.leaf(7) == pendings[1].leaf(7)
    assert found.request == pendings[1].request
    assert spool.find("ex_not_there") is None
    assert Spool(tmp_path / "none").find(first.id) is None


def test_an_exchange_is_spooled_only_when_the_store_fails(tmp_path: Path) -> None:
    """Without a spool an append that fails is the caller's error, as before; a writer
    whose segment cannot be written either tells its waiters."""
    config = _config(tmp_path)
    writer = LedgerWriter(config)

    async def go() -> tuple[int | None, int | None]:
        index = await writer.append_exchange(make_exchange("fine"))
        assert writer.ledger is not None
        real = writer.ledger.append

        def broken(pending: object) -> object:
            raise OSError("the store is gone")

        writer.ledger.append = broken  # type: ignore[method-assign]
        spooled = await writer.append_exchange(make_exchange("while away"))
        with pytest.raises(OSError):    # events are not spooled: their caller retries
            await writer.append_event("test:x:y", "x", None, None, {})
        writer.ledger.append = real  # type: ignore[method-assign]
        deadline = time.monotonic() + 10
        while writer.spool is not None and writer.spool.held:
            assert time.monotonic() < deadline, "the spool was not drained"
            await asyncio.sleep(0.05)
        after = await writer.append_exchange(make_exchange("back"))
        await writer.close()
        return index, spooled if spooled is not None else after

    index, later = asyncio.run(go())
    assert index == 0 and later == 2


@pytest.mark.postgres
@pytest.mark.redis
def test_exchanges_served_while_postgres_is_away_reach_the_ledger(
        tmp_path: Path, pg_url: str) -> None:
    """The ledger on PostgreSQL, its connection cut: the gateway goes on answering, and
    every exchange it answered meanwhile is in the ledger once the store is back (before,
    6 of 10 were in no record: those served while it was away and the first after)."""
    pg = CuttableProxy(5432).start()
    settings = make_settings(tmp_path, ledger={
        "url": pg_url.replace(":5432/", f":{pg.port}/"), "checkpoint_interval_s": 0})
    stack, recorder = start_recorded_stack(settings)
    try:
        key = new_api_key(stack, "s1")

        def call() -> int:
            return httpx.post(stack.stack.base_url + "/chat/completions", json=CHAT,
                              headers={"authorization": f"Bearer {key}"},
                              timeout=30).status_code

        assert [call() for _ in range(3)] == [200] * 3
        pg.cut()
        assert [call() for _ in range(5)] == [200] * 5
        metrics = httpx.get(stack.stack.base_url.removesuffix("/v1") + "/metrics").text
        spooled = [line for line in metrics.splitlines()
                   if line.startswith("distillguard_ledger_spooled ")]
        assert spooled and float(spooled[0].split()[1]) >= 4, spooled
        # the dashboard's ledger page says so (it was a 500: the store cannot be read)
        from tests.test_dashboard import login

        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
            login(client)
            page = client.get("/ledger")
        assert page.status_code == 200, page.text[:300]
        assert "The ledger's store cannot be read now" in page.text
        assert re.search(r"\d+ exchanges wait in the spool", page.text)
        # an exchange page: one still in the spool shows its bodies from there; one
        # stored before the cut says the store cannot be read (it was a 500)
        stack.call(stack.stack.gateway.settle())
        first, last = recorder.exchanges[0].id, recorder.exchanges[-1].id
        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
            login(client)
            waiting, stored = (client.get(f"/exchanges/{i}") for i in (last, first))
        assert waiting.status_code == 200, waiting.text[:300]
        assert "waits in the gateway's spool" in waiting.text
        assert "<h2>Request</h2>" in waiting.text and "max_tokens" in waiting.text
        assert "Inclusion proof" not in waiting.text
        assert stored.status_code == 200, stored.text[:300]
        assert "The ledger's store cannot be read now" in stored.text
        pg.restore()
        assert [call() for _ in range(2)] == [200] * 2
        stack.call(stack.stack.gateway.settle())
        from distillguard.ledger.writer import writer_for

        writer = writer_for(settings)
        deadline = time.monotonic() + 20
        while writer.spool is not None and writer.spool.held:
            assert time.monotonic() < deadline, "the spool was not drained"
            time.sleep(0.1)
        # the client has its answer before the ledger's commit of the last exchange, so
        # the count may lag its response for a moment
        wanted = ["distillguard_ledger_spooled 0.0", "distillguard_ledger_appended_total 10.0"]
        while True:
            metrics = httpx.get(stack.stack.base_url.removesuffix("/v1") + "/metrics").text
            seen = [line for line in metrics.splitlines() if line.startswith(
                ("distillguard_ledger_spooled ", "distillguard_ledger_appended_total "))]
            if sorted(seen) == sorted(wanted):
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
        served = [e.id for e in recorder.exchanges]
        assert len(served) == 10
        assert sum(1 for e in recorder.exchanges
                   if e.annotations.get("ledger") == {"spooled": True}) >= 5
    finally:
        stack.stop()
        pg.close()
    lg = Ledger(LedgerConfig(url=pg_url, key_path=tmp_path / "ledger" / "ledger.key"))
    try:
        stored = [r.entry_id for r in lg.store.iter_rows(bodies=False)
                  if r.kind == entry.KIND_EXCHANGE]
        assert sorted(stored) == sorted(served)
        report = verify_ledger(lg.store, lg.verifier, workers=1)
        assert report.ok, report.to_json()
    finally:
        lg.close()


def test_ledger_verify_says_what_waits_in_the_spool(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from distillguard.cli import main

    cfg = tmp_path / "dg.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"url": f"sqlite:///{tmp_path / 's.sqlite'}"},
                                   "ledger": {"path": str(tmp_path / "ledger")}}))
    Spool(tmp_path / "ledger" / "spool").add(
        [entry.from_exchange(make_exchange(f"w{i}"), Retention.FULL) for i in range(2)])
    assert CliRunner().invoke(main, ["-c", str(cfg), "ledger", "keygen"]).exit_code == 0
    done = CliRunner().invoke(main, ["-c", str(cfg), "ledger", "verify"])
    assert done.exit_code == 0, done.output
    assert f"2 exchanges wait in the spool {tmp_path / 'ledger' / 'spool'}" in done.stderr


def test_a_spool_folder_that_cannot_be_used_is_said_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The spool is first needed when the store is away: a folder it cannot write to
    would lose those exchanges then, so the writer says so when it starts."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    config = LedgerConfig(url=f"sqlite:///{tmp_path / 'ledger.sqlite'}",
                          key_path=tmp_path / "ledger.key", spool_dir=blocked / "spool")
    writer = LedgerWriter(config)
    with caplog.at_level("ERROR", logger="distillguard.ledger"):
        writer.open()
        writer.close_sync()
    said = [r.getMessage() for r in caplog.records]
    assert any(f"spool folder {blocked / 'spool'} cannot be used" in m for m in said), said
    fine = LedgerWriter(_config(tmp_path / "fine"))
    caplog.clear()
    with caplog.at_level("ERROR", logger="distillguard.ledger"):
        fine.open()
        fine.close_sync()
    assert not caplog.records


def test_segments_keep_their_order_when_the_clock_steps_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments were named by the wall clock alone: one spooled after the clock was set
    back (NTP) sorted before those spooled earlier, and its exchanges took indices before
    theirs."""
    from distillguard.ledger import spool as spool_module

    earlier = [entry.from_exchange(make_exchange("earlier"), Retention.FULL)]
    later = [entry.from_exchange(make_exchange("later"), Retention.FULL)]
    spool = Spool(tmp_path / "spool", sync=False)
    now = time.time_ns()
    monkeypatch.setattr(spool_module.time, "time_ns", lambda: now)
    spool.add(earlier)
    monkeypatch.setattr(spool_module.time, "time_ns", lambda: now - 10**9)  # set back
    spool.add(later)
    monkeypatch.undo()
    order: list[str] = []
    spool.drain(lambda pending: order.extend(p.entry_id for p in pending),
                lambda entry_id: False)
    assert order == [earlier[0].entry_id, later[0].entry_id]


def test_a_segment_another_process_drains_is_not_overtaken(tmp_path: Path) -> None:
    """A drain skipped a segment another process held locked (it was draining it) and
    appended the later segments at once: they took indices before the skipped one's
    entries, and the ledger verified with the exchanges out of order."""
    import fcntl

    spool = Spool(tmp_path / "spool", sync=False)
    first = [entry.from_exchange(make_exchange("first"), Retention.FULL)]
    second = [entry.from_exchange(make_exchange("second"), Retention.FULL)]
    spool.add(first)
    spool.add(second)
    order: list[str] = []

    def append(pending: list[entry.Pending]) -> None:
        order.extend(p.entry_id for p in pending)

    held = os.open(spool.segments()[0], os.O_RDONLY)   # as another process's drain
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert spool.drain(append, lambda entry_id: False) == 0
        assert order == [] and spool.blocked and spool.held == 2
    finally:
        os.close(held)
    assert spool.drain(append, lambda entry_id: False) == 2
    assert order == [first[0].entry_id, second[0].entry_id] and not spool.blocked


def test_the_ledger_and_spool_folders_are_the_owners_only(tmp_path: Path) -> None:
    """Both hold prompts and answers in full; made with the umask's 0755 they were
    readable by every user of the machine."""
    before = os.umask(0o022)
    try:
        config = LedgerConfig(url=f"sqlite:///{tmp_path / 'ledger' / 'ledger.sqlite'}",
                              key_path=tmp_path / "ledger" / "ledger.key",
                              spool_dir=tmp_path / "ledger" / "spool")
        Ledger(config).close()
        Spool(config.spool_dir).add(  # type: ignore[arg-type]
            [entry.from_exchange(make_exchange("a"), Retention.FULL)])
    finally:
        os.umask(before)
    for folder in (tmp_path / "ledger", tmp_path / "ledger" / "spool"):
        assert folder.stat().st_mode & 0o077 == 0, (folder, oct(folder.stat().st_mode))
