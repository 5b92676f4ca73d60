"""Schema migrations for the state store, one explicit ordered list.

Each migration is ``(version, description, statements)``; statements are plain SQL that
both SQLite and PostgreSQL accept. Applied versions are recorded in
``distillguard_migrations``; :func:`pending` tells which still have to run. Add a migration
by appending to :data:`MIGRATIONS`; never edit one that has shipped.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "accounts and api keys",
        [
            """CREATE TABLE accounts (
                account_id TEXT PRIMARY KEY,
                created_at TEXT NOT NULL,
                org TEXT,
                email_domain TEXT,
                payment_fingerprint TEXT,
                country TEXT,
                tier TEXT NOT NULL DEFAULT 'standard',
                status TEXT NOT NULL DEFAULT 'active',
                limits TEXT NOT NULL DEFAULT '{}',
                extra TEXT NOT NULL DEFAULT '{}'
            )""",
            "CREATE INDEX accounts_org ON accounts (org)",
            "CREATE INDEX accounts_payment ON accounts (payment_fingerprint)",
            """CREATE TABLE api_keys (
                key_id TEXT PRIMARY KEY,
                account_id TEXT NOT NULL REFERENCES accounts (account_id),
                key_hash TEXT NOT NULL,
                name TEXT,
                created_at TEXT NOT NULL,
                expires_at TEXT,
                revoked_at TEXT,
                limits TEXT NOT NULL DEFAULT '{}'
            )""",
            "CREATE INDEX api_keys_account ON api_keys (account_id)",
        ],
    ),
]


def pending(applied: set[int]) -> list[tuple[int, str, list[str]]]:
    return [m for m in MIGRATIONS if m[0] not in applied]
