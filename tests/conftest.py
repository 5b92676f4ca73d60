from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from distillguard.serve import StackThread
from tests.factories import ADMIN_TOKEN, make_settings, start_stack

PG_BASE = os.environ.get("DISTILLGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DISTILLGUARD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema-isolated database URL on the real server."""
    if not _reachable("127.0.0.1", 5432):
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 (.ci/run starts it)")
    import psycopg

    name = "dgtest_" + uuid.uuid4().hex[:10]
    admin = PG_BASE.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_BASE.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    if not _reachable("127.0.0.1", 6379):
        pytest.fail("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")
    return REDIS_URL


@pytest.fixture
def redis_prefix() -> str:
    return "dgtest-" + uuid.uuid4().hex[:8]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[StackThread]:
    """A running gateway (SQLite, in-process counters, demo upstream) on free ports."""
    running = start_stack(make_settings(tmp_path))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def admin(stack: StackThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.stack.admin_url,
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        yield client


@pytest.fixture
def account_key(admin: httpx.Client) -> tuple[str, str]:
    """(account_id, secret key) of a fresh standard-tier account."""
    account_id = "acct_" + uuid.uuid4().hex[:6]
    admin.post("/admin/v1/accounts", json={"account_id": account_id, "country": "DE",
                                           "org": "Test Org"}).raise_for_status()
    r = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "t"})
    r.raise_for_status()
    return account_id, r.json()["key"]


@pytest.fixture(autouse=True)
def _sigterm_handler_restored() -> Iterator[None]:
    """Commands run in-process (CliRunner) install their own SIGTERM handler (``detect``
    exits through SystemExit on it); left in place, a SIGTERM meant for the test run
    became a SystemExit inside whichever test was running."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)
