"""The policy layer's tables in the state store, and the detection tables it reads.

Every statement is ``CREATE ... IF NOT EXISTS`` in the SQL subset SQLite and PostgreSQL
share, so :func:`ensure_schema` is safe to run from every replica, every CLI call and
every helper that receives an engine (:func:`distillguard.policy.review.open_item`).

Tables::

    policy_actions   one row per ladder action (flag, throttle, require_verification,
                     degrade, suspend) on an account; active while not revoked and
                     not expired; ``updated_at`` is the refresh cursor
    policy_review    the review queue (open, escalated, confirmed, dismissed)
    policy_audit     typed audit events ``source:subject:action``
    policy_screened  which accounts were screened against which lists (a digest)
    policy_cursor    where the verdict feed has read up to (one row per feed)

Detection's tables (``campaigns``, ``account_verdicts``) are created here too, with the
schema detection writes, so the verdict feed works before detection has run once, with an
index on ``updated_at`` each (the feed's cursor column).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

DETECTION_TABLES = [
    """CREATE TABLE IF NOT EXISTS campaigns (
        campaign_id TEXT PRIMARY KEY, risk REAL, detected_at TEXT, evidence TEXT,
        accounts TEXT, status TEXT, updated_at TEXT)""",
    """CREATE TABLE IF NOT EXISTS account_verdicts (
        account_id TEXT, risk REAL, flagged INTEGER, campaign_id TEXT,
        first_flagged_at TEXT, exchanges_before_flag INTEGER, reasons TEXT,
        updated_at TEXT, PRIMARY KEY (account_id, updated_at))""",
    # The verdict feed reads both tables by updated_at every second.
    "CREATE INDEX IF NOT EXISTS account_verdicts_updated ON account_verdicts (updated_at)",
    "CREATE INDEX IF NOT EXISTS campaigns_updated ON campaigns (updated_at)",
]

POLICY_TABLES = [
    """CREATE TABLE IF NOT EXISTS policy_actions (
        action_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, action TEXT NOT NULL,
        reason TEXT NOT NULL, source TEXT NOT NULL, caused_by TEXT NOT NULL,
        actor TEXT NOT NULL, created_at TEXT NOT NULL, expires_at TEXT,
        revoked_at TEXT, revoked_by TEXT, revoke_reason TEXT, detail TEXT NOT NULL,
        updated_at TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS policy_actions_updated ON policy_actions (updated_at)",
    "CREATE INDEX IF NOT EXISTS policy_actions_account ON policy_actions (account_id)",
    """CREATE TABLE IF NOT EXISTS policy_review (
        item_id TEXT PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL,
        risk REAL, status TEXT NOT NULL, source TEXT NOT NULL, action TEXT,
        evidence TEXT NOT NULL, opened_at TEXT NOT NULL, updated_at TEXT NOT NULL,
        decided_at TEXT, decided_by TEXT, decision TEXT, decision_reason TEXT)""",
    "CREATE INDEX IF NOT EXISTS policy_review_status ON policy_review (status, item_id)",
    "CREATE INDEX IF NOT EXISTS policy_review_subject ON policy_review (kind, subject)",
    """CREATE TABLE IF NOT EXISTS policy_audit (
        event_id TEXT PRIMARY KEY, ts TEXT NOT NULL, name TEXT NOT NULL,
        subject TEXT NOT NULL, actor TEXT, reason TEXT, detail TEXT NOT NULL,
        count INTEGER NOT NULL DEFAULT 1, ledger_seq INTEGER)""",
    "CREATE INDEX IF NOT EXISTS policy_audit_subject ON policy_audit (subject, ts)",
    "CREATE INDEX IF NOT EXISTS policy_audit_ts ON policy_audit (ts)",
    """CREATE TABLE IF NOT EXISTS policy_screened (
        account_id TEXT PRIMARY KEY, digest TEXT NOT NULL, screened_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS policy_cursor (
        feed TEXT PRIMARY KEY, position TEXT NOT NULL)""",
]

_ready: weakref.WeakSet[AsyncEngine] = weakref.WeakSet()


async def ensure_schema(engine: AsyncEngine) -> None:
    """Create the policy and detection tables if they are missing (once per engine)."""
    if engine in _ready:
        return
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Serialise concurrent start-ups: CREATE IF NOT EXISTS can race on PostgreSQL.
            await conn.execute(text("SELECT pg_advisory_xact_lock(72707371)"))
        for statement in [*DETECTION_TABLES, *POLICY_TABLES]:
            await conn.execute(text(statement))
    _ready.add(engine)


def forget_engine(engine: AsyncEngine) -> None:
    _ready.discard(engine)


def now_ts(dt: datetime | None = None) -> str:
    """RFC 3339 UTC with microseconds and ``Z``: sorts as text in time order."""
    return (dt or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(prefix: str) -> str:
    """Time-ordered id: prefix, 13 hex digits of milliseconds, 8 random hex digits."""
    return f"{prefix}_{time.time_ns() // 1_000_000:013x}{os.urandom(4).hex()}"


@contextlib.asynccontextmanager
async def reading(source: AsyncEngine | AsyncConnection) -> AsyncIterator[AsyncConnection]:
    """A connection for reads: the caller's (one per background pass) or a new one."""
    if isinstance(source, AsyncConnection):
        yield source
        return
    async with source.connect() as conn:
        yield conn

