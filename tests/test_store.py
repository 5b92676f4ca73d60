"""The state store on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from distillguard.errors import InvalidRecord, NotFound, StoreError
from distillguard.store import open_state_store
from distillguard.store.migrations import MIGRATIONS
from distillguard.store.models import (
    Account,
    AccountStatus,
    key_expiry,
    key_id_of,
    key_matches,
)
from tests.factories import make_account


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 's.sqlite'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = open_state_store(url)
    applied = await s.migrate()
    assert applied == [m[0] for m in MIGRATIONS]
    assert await s.migrate() == []  # idempotent
    yield s
    await s.close()


async def test_accounts_round_trip(store) -> None:  # type: ignore[no-untyped-def]
    created = datetime(2026, 2, 20, 9, 0, tzinfo=UTC)
    acct = make_account("acct_17", org="Acme Ltd", email_domain="acme.example",
                        payment_fingerprint="pf_3c1e", created_at=created.isoformat(),
                        custom_field={"x": 1})
    await store.put_account(acct)
    with pytest.raises(StoreError):
        await store.put_account(acct)
    got = await store.get_account("acct_17")
    assert got.org == "Acme Ltd" and got.created_at == created
    assert got.extra == {"custom_field": {"x": 1}}
    updated = await store.update_account("acct_17", tier="verified", status="suspended",
                                         limits={"requests_per_minute": 5})
    assert updated.status is AccountStatus.SUSPENDED
    again = await store.get_account("acct_17")
    assert again.tier == "verified" and again.limits == {"requests_per_minute": 5}
    assert [a.account_id for a in await store.list_accounts(query="Acme")] == ["acct_17"]
    with pytest.raises(NotFound):
        await store.get_account("nope")


async def test_import_is_all_or_nothing_and_upserts(store) -> None:  # type: ignore[no-untyped-def]
    await store.import_accounts([make_account(f"a{i}") for i in range(50)])
    await store.import_accounts([make_account("a1", org="Changed")])
    assert await store.count_accounts() == 50
    assert (await store.get_account("a1")).org == "Changed"
    # given twice, an account is one account (it was reported as two), the last record
    twice = [make_account("a60", org="First"), make_account("a60", org="Second")]
    assert await store.import_accounts(twice) == 1
    assert (await store.get_account("a60")).org == "Second"


async def test_keys_hashed_revocable_expiring(store) -> None:  # type: ignore[no-untyped-def]
    await store.put_account(make_account("acct_k"))
    expiry = datetime.now(UTC) + timedelta(days=1)
    key, secret = await store.create_key("acct_k", name="ci", expires_at=expiry,
                                         limits={"tokens_per_day": 10})
    assert key_id_of(secret) == key.key_id
    stored = await store.get_key(key.key_id)
    assert stored is not None and secret not in repr(stored)
    assert key_matches(secret, stored.key_hash) and not key_matches(secret + "x", stored.key_hash)
    assert stored.is_usable(datetime.now(UTC))
    assert not stored.is_usable(expiry + timedelta(seconds=1))
    revoked = await store.revoke_key(key.key_id)
    assert revoked.revoked_at is not None
    assert not (await store.get_key(key.key_id)).is_usable(datetime.now(UTC))
    with pytest.raises(NotFound):
        await store.create_key("missing-account")


async def test_records_the_store_will_not_keep(store) -> None:  # type: ignore[no-untyped-def]
    """A country no jurisdiction rule could match, a negative or fractional limit, or a
    date that is not one is refused with the field named, as InvalidRecord (a StoreError
    for the command line and the admin API, a ValueError for parsers); nothing is
    written."""
    await store.put_account(make_account("acct_v"))
    for bad in ({"country": "ZZZ"}, {"country": "Germany"}, {"country": 49},
                {"limits": {"requests_per_minute": -1}},
                {"limits": {"tokens_per_day": 2.5}}, {"limits": {"tokens_per_day": True}},
                {"created_at": "yesterday"}):
        with pytest.raises(InvalidRecord) as raised:
            await store.update_account("acct_v", **bad)
        field = next(iter(bad))
        assert (next(iter(bad[field])) if field == "limits" else field) in str(raised.value)
        with pytest.raises(ValueError):
            Account.from_public({"account_id": "acct_w", **bad})
    for when in (None, 5):       # a 500 (the column's NOT NULL) on the admin API
        with pytest.raises(InvalidRecord, match="'created_at'"):
            await store.update_account("acct_v", created_at=when)
    assert (await store.get_account("acct_v")).country == "DE"
    updated = await store.update_account("acct_v", country="de",
                                         limits={"requests_per_minute": "60",
                                                 "tokens_per_day": 5000.0,
                                                 "tokens_per_minute": None})
    assert updated.country == "DE" and updated.limits == {
        "requests_per_minute": 60, "tokens_per_day": 5000, "tokens_per_minute": None}
    with pytest.raises(InvalidRecord, match="'requests_per_minute'"):
        await store.create_key("acct_v", limits={"requests_per_minute": -5})
    assert await store.list_keys("acct_v") == []
    assert issubclass(InvalidRecord, StoreError) and issubclass(InvalidRecord, ValueError)


async def test_an_update_changes_only_its_own_fields(store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An update wrote back the whole account as read a moment before: the detector's
    suspension landing in between (policy actions set the status alone) was undone by
    an analyst's change of tier."""
    from sqlalchemy import text

    await store.put_account(make_account("acct_r"))
    read = store.get_account

    async def read_then_suspended(account_id: str):  # type: ignore[no-untyped-def]
        account = await read(account_id)
        async with store.engine.begin() as conn:
            await conn.execute(text("UPDATE accounts SET status = 'suspended' "
                                    "WHERE account_id = :a"), {"a": account_id})
        return account
    monkeypatch.setattr(store, "get_account", read_then_suspended)
    await store.update_account("acct_r", tier="verified")
    monkeypatch.undo()
    got = await store.get_account("acct_r")
    assert got.tier == "verified" and got.status is AccountStatus.SUSPENDED
    assert (await store.update_account("acct_r")).tier == "verified"   # nothing to change
    with pytest.raises(NotFound):
        await store.update_account("acct_none", tier="verified")


async def test_text_with_a_nul_is_refused_and_never_found(store) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL cannot keep a NUL in text: an account or key name holding one was a
    500 from the admin API there, and kept as given on SQLite. Both stores now refuse
    it with the field named, and a look-up by such an id finds nothing on both."""
    await store.put_account(make_account("acct_n"))
    for field in ("org", "email_domain", "payment_fingerprint", "tier"):
        with pytest.raises(InvalidRecord) as raised:
            await store.update_account("acct_n", **{field: "a\x00b"})
        assert raised.value.field == field and "NUL" in str(raised.value)
        with pytest.raises(InvalidRecord):
            Account.from_public({"account_id": "acct_w", field: "a\x00b"})
    with pytest.raises(InvalidRecord) as raised:
        Account.from_public({"account_id": "acct\x00w"})
    assert raised.value.field == "account_id"
    with pytest.raises(InvalidRecord) as raised:
        await store.create_key("acct_n", name="lap\x00top")
    assert raised.value.field == "name"
    assert await store.list_keys("acct_n") == []
    with pytest.raises(NotFound):
        await store.get_account("acct\x00n")
    with pytest.raises(NotFound):
        await store.update_account("acct\x00n", org="x")
    with pytest.raises(NotFound):
        await store.revoke_key("key\x00")
    assert await store.get_key("key\x00") is None
    assert await store.list_keys("acct\x00n") == []
    assert await store.list_accounts(query="acct\x00") == []
    # PostgreSQL keeps at most 2,704 bytes in an index entry: ids and orgs are indexed
    for fields, field in (({"account_id": "x" * 257}, "account_id"),
                          ({"account_id": "acct_l", "org": "o" * 501}, "org"),
                          ({"account_id": "acct_l", "payment_fingerprint": "p" * 257},
                           "payment_fingerprint")):
        with pytest.raises(InvalidRecord) as raised:
            Account.from_public(fields)
        assert raised.value.field == field and "characters long" in str(raised.value)
    with pytest.raises(InvalidRecord):
        await store.create_key("acct_n", name="k" * 257)
    deep: object = {}
    for _ in range(300):     # kept as JSON that orjson writes (254 levels at most)
        deep = {"a": deep}
    with pytest.raises(InvalidRecord, match="more than 64 levels deep"):
        Account.from_public({"account_id": "acct_d", "x": deep})
    await store.put_account(Account.from_public({"account_id": "é" * 256,
                                                 "org": "😀" * 500}))
    assert (await store.get_account("é" * 256)).org == "😀" * 500
    assert [a.account_id for a in await store.list_accounts(query="acct_n")] == ["acct_n"]
    assert (await store.get_account("acct_n")).org == make_account("acct_n").org


NOW = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(("at", "days", "expected"), [
    (None, None, None),
    ("2026-03-02T00:00:00Z", None, NOW + timedelta(days=1)),
    (None, 30, NOW + timedelta(days=30)),
    (None, "30", NOW + timedelta(days=30)),      # as a form or a shell sends it
    (None, 0.5, NOW + timedelta(hours=12)),
])
def test_a_new_keys_expiry(at: object, days: object, expected: datetime | None) -> None:
    assert key_expiry(at, days, now=NOW) == expected


@pytest.mark.parametrize(("at", "days", "says"), [
    ("2026-03-01T00:00:00Z", None, "must be in the future"),    # now is not the future
    ("2020-01-01T00:00:00Z", None, "must be in the future"),
    ("March", None, "not an RFC 3339 time"),
    (5, None, "RFC 3339"),
    (None, 0, "(0, 36500]"),
    (None, -1, "(0, 36500]"),
    (None, float("nan"), "(0, 36500]"),
    (None, 36_501, "(0, 36500]"),
    (None, True, "(0, 36500]"),
    (None, "soon", "(0, 36500]"),
    (None, 1e-300, "(0, 36500]"),       # no time at all: a key created expired
    ("9999-12-31T23:59:59-01:00", None, "out of range"),
    ("2027-01-01T00:00:00Z", 3, "not both"),
])
def test_a_new_key_is_not_created_expired_or_out_of_range(at: object, days: object,
                                                          says: str) -> None:
    with pytest.raises(InvalidRecord, match=re.escape(says)):
        key_expiry(at, days, now=NOW)


def _migrate_at_once(url: str, barrier: object, results: object) -> None:
    import asyncio

    async def run() -> None:
        store = open_state_store(url)
        try:
            await store.migrate()
        finally:
            await store.close()
    try:
        barrier.wait()  # type: ignore[attr-defined]
        asyncio.run(run())
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the test, which shows it
        results.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_processes_starting_at_once_on_a_new_sqlite_file_all_come_up(
        tmp_path: Path) -> None:
    """``serve`` and ``detect follow`` started together on a fresh SQLite file each
    migrated it: both saw nothing applied, and one failed on "table accounts already
    exists" (about one process in seven, six at a time)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    outcomes: list[str] = []
    for attempt in range(4):
        url = f"sqlite:///{tmp_path / f'{attempt}.sqlite'}"
        barrier, results = context.Barrier(6), context.Queue()
        workers = [context.Process(target=_migrate_at_once, args=(url, barrier, results))
                   for _ in range(6)]
        for w in workers:
            w.start()
        outcomes += [results.get(timeout=120) for _ in workers]
        for w in workers:
            w.join(timeout=60)
    assert outcomes == ["ok"] * len(outcomes)


async def test_a_migration_that_fails_midway_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distillguard.store import sql

    broken = [(1, "two tables, the second bad",
               ["CREATE TABLE first_half (x INTEGER)", "CREATE TABLE (no name)"])]
    monkeypatch.setattr(sql, "pending", lambda applied: broken)
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    store = open_state_store(url)
    with pytest.raises(StoreError, match="migration failed"):
        await store.migrate()
    await store.close()
    monkeypatch.undo()
    store = open_state_store(url)
    try:
        assert await store.migrate() == [m[0] for m in MIGRATIONS]
        async with store.engine.connect() as conn:  # type: ignore[attr-defined]
            tables = {r[0] for r in await conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "first_half" not in tables
    finally:
        await store.close()


async def test_limits_changed_at_once_are_all_kept(store) -> None:  # type: ignore[no-untyped-def]
    """``accounts update --rpm`` and ``--tpd`` run at once each wrote back the limits
    as read before the other's change: one was lost in about half the runs."""
    import asyncio

    await store.put_account(make_account("acct_l", limits={"tokens_per_minute": 7}))
    names = ["requests_per_minute", "tokens_per_day"] * 4
    await asyncio.gather(*(store.merge_limits("acct_l", {name: 10 + i})
                           for i, name in enumerate(names)))
    limits = (await store.get_account("acct_l")).limits
    assert limits["tokens_per_minute"] == 7
    assert limits.keys() == {"tokens_per_minute", *names}
    with pytest.raises(InvalidRecord):
        await store.merge_limits("acct_l", {"requests_per_minute": -1})
    with pytest.raises(NotFound):
        await store.merge_limits("acct_none", {"requests_per_minute": 1})


async def test_an_account_search_matches_its_text_literally_and_case_blind(store) -> None:  # type: ignore[no-untyped-def]
    """The search was a LIKE of the raw text: ``a_b`` also found ``axb`` and ``%`` every
    account; and SQLite's LIKE ignores case where PostgreSQL's does not, so ``acme``
    found the Acme account on one store and not on the other."""
    await store.import_accounts([
        make_account("a_b", org="Acme Corp"), make_account("axb", org="Other"),
        make_account("pct", org="100% Real"), make_account("back", org="C:\\dir")])

    async def found(query: str) -> list[str]:
        return [a.account_id for a in await store.list_accounts(query=query)]

    assert await found("a_b") == ["a_b"]
    assert await found("%") == ["pct"]
    assert await found("\\") == ["back"]
    assert await found("acme") == await found("ACME CORP") == ["a_b"]


async def test_a_new_sqlite_state_file_is_its_owners_only(tmp_path: Path) -> None:
    """The state file holds accounts, payment fingerprints, key hashes and verdicts; it
    was created with the umask's mode (0644: readable by every user of the machine). A
    new file and a new folder are the owner's only now, and SQLite's write-ahead log
    takes the file's mode; an existing file keeps the mode its owner gave it."""
    import os
    import stat

    before = os.umask(0o022)
    try:
        path = tmp_path / "new" / "s.sqlite"
        s = open_state_store(f"sqlite:///{path}")
        await s.migrate()
        await s.put_account(make_account("private"))
        for made in (path, path.with_name("s.sqlite-wal")):
            assert stat.S_IMODE(made.stat().st_mode) == 0o600, made
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        await s.close()
        shared = tmp_path / "shared.sqlite"
        shared.touch(mode=0o640)
        s = open_state_store(f"sqlite:///{shared}")
        await s.migrate()
        await s.close()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    finally:
        os.umask(before)
