"""Typed records kept in the state store: accounts and API keys."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from distillguard.config import LimitSet
from distillguard.errors import InvalidRecord
from distillguard.exchange import (
    MAX_ID_CHARS,
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    format_ts,
    nested_deeper_than,
    parse_ts,
    text_value,
)

KEY_PREFIX = "sk-dg-"
# The longest a new key may be given to live: a hundred years (beyond it datetime soon
# overflows).
MAX_KEY_DAYS = 36_500
ACCOUNT_FIELDS = ("account_id", "created_at", "org", "email_domain", "payment_fingerprint",
                  "country", "tier")


class AccountStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


@dataclass(slots=True)
class Account:
    account_id: str
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    org: str | None = None
    email_domain: str | None = None
    payment_fingerprint: str | None = None
    country: str | None = None
    tier: str = "standard"
    status: AccountStatus = AccountStatus.ACTIVE
    limits: dict[str, int | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_public(self) -> dict[str, Any]:
        """The account as one object of the accounts format, plus status and limits."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "account_id": self.account_id,
                "created_at": format_ts(self.created_at).replace(".000Z", "Z"),
                "org": self.org,
                "email_domain": self.email_domain,
                "payment_fingerprint": self.payment_fingerprint,
                "country": self.country,
                "tier": self.tier,
                "status": str(self.status),
            }
        )
        if self.limits:
            out["limits"] = dict(self.limits)
        return out

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> Account:
        """Build an account from one accounts-format object (only ``account_id`` required)."""
        if not isinstance(data, dict):
            raise InvalidRecord("an account must be a JSON object")
        account_id = data.get("account_id")
        if not isinstance(account_id, str) or not account_id.strip():
            raise InvalidRecord("an account needs a non-empty string 'account_id'", "account_id")
        stored_text(account_id.strip(), "account 'account_id'", "account_id")
        created = data.get("created_at")
        try:
            created_at = parse_ts(created) if created else datetime.now(UTC)
        except ValueError as exc:
            raise InvalidRecord(f"account 'created_at': {exc}", "created_at") from None
        status = data.get("status") or AccountStatus.ACTIVE
        if status not in AccountStatus.__members__.values():
            raise InvalidRecord(
                f"account status must be one of {[s.value for s in AccountStatus]}", "status")
        known = set(ACCOUNT_FIELDS) | {"status", "limits"}
        if nested_deeper_than(data):     # kept as JSON written by orjson (254 levels)
            raise InvalidRecord(f"an account nests objects and arrays more than "
                                f"{MAX_JSON_DEPTH} levels deep")
        return cls(
            account_id=account_id.strip(),
            created_at=created_at,
            org=_text(data.get("org"), "org"),
            email_domain=_text(data.get("email_domain"), "email_domain"),
            payment_fingerprint=_text(data.get("payment_fingerprint"), "payment_fingerprint"),
            country=check_country(data.get("country")),
            tier=stored_text(str(data.get("tier") or "standard"), "account 'tier'", "tier"),
            status=AccountStatus(status),
            limits=check_limits(data.get("limits") or {}, "account"),
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True, slots=True)
class AccountImport:
    """The accounts of an import (``accounts import``, ``POST /admin/v1/accounts/import``),
    each as its last line says, and those whose last line gives no ``status``: an existing
    one keeps its stored status (a file from a system that knows nothing of suspensions
    does not reactivate suspended accounts); a new one is active."""

    accounts: list[Account]
    keep_status: frozenset[str]

    @staticmethod
    def line(data: Any) -> tuple[Account, bool]:
        """One line: the account, and whether the line gives its status."""
        return Account.from_public(data), data.get("status") is not None

    @classmethod
    def of(cls, lines: Iterable[tuple[Account, bool]]) -> AccountImport:
        accounts: list[Account] = []
        given: dict[str, bool] = {}
        for account, status_given in lines:
            accounts.append(account)
            given[account.account_id] = status_given
        return cls(accounts, frozenset(a for a, status in given.items() if not status))


def account_change(name: str, value: Any) -> Any:
    """One field of an account update as the account keeps it (text fields as
    :meth:`Account.from_public` reads them), or InvalidRecord naming the field."""
    try:
        if name == "status":
            return AccountStatus(value)
        if name == "created_at" and isinstance(value, str):
            return parse_ts(value)
    except ValueError as exc:
        raise InvalidRecord(f"account {name!r}: {exc}", name) from None
    if name == "created_at" and not isinstance(value, datetime):
        raise InvalidRecord(f"account 'created_at' must be an ISO 8601 time, not {value!r}",
                            name)
    if name in ("org", "email_domain", "payment_fingerprint"):
        return _text(value, name)
    if name == "tier" and (not isinstance(value, str) or not value.strip()):
        raise InvalidRecord(f"account 'tier' must be a non-empty string, not {value!r}",
                            "tier")
    if name == "tier":
        stored_text(value, "account 'tier'", "tier")
    if name == "country":
        return check_country(value)
    if name == "limits":
        return check_limits(value, "account")
    if name == "extra" and not isinstance(value, dict):
        # kept as given, the account could no longer be shown: every listing was a 500
        raise InvalidRecord(f"account 'extra' must be an object, not {value!r:.40}", name)
    return value


def check_country(value: Any) -> str | None:
    """An account's country as stored: an ISO 3166-1 alpha-2 code, upper case (None when
    not given). Jurisdiction rules match these codes, so a code of another shape (``ZZZ``,
    ``Germany``) is refused rather than kept where no rule would ever match it."""
    if value is None or value == "":
        return None
    code = value.strip().upper() if isinstance(value, str) else ""
    if len(code) != 2 or not ("A" <= code[0] <= "Z" and "A" <= code[1] <= "Z"):
        raise InvalidRecord(f"account 'country' must be an ISO 3166-1 alpha-2 code such as "
                            f"DE, not {value!r}", "country")
    return code


# The limits an account or a key may set: those a tier sets.
LIMIT_NAMES = tuple(LimitSet.model_fields)


def check_limits(limits: Any, owner: str) -> dict[str, int | None]:
    """An account's or a key's limits as stored: whole numbers from 0 to MAX_JSON_INT, or
    null (no override), under the names of LIMIT_NAMES (a misspelt one would be kept
    and never applied)."""
    if not isinstance(limits, dict):
        raise InvalidRecord(f"{owner} 'limits' must be an object", "limits")
    out: dict[str, int | None] = {}
    for name, value in limits.items():
        if name not in LIMIT_NAMES:
            raise InvalidRecord(f"{owner} limit {str(name)[:40]!r} is not one of "
                                f"{', '.join(LIMIT_NAMES)}", "limits")
        if value is None:
            out[name] = None
        elif _whole_at_least_0(value) and int(value) <= MAX_JSON_INT:
            out[name] = int(value)
        else:
            raise InvalidRecord(f"{owner} limit {name!r} must be a whole number from 0 to "
                                f"{MAX_JSON_INT}, or null; not {value!r:.40}", "limits")
    return out


def _whole_at_least_0(value: Any) -> bool:
    """60, 60.0 and "60" are; -1, 60.5, True and "sixty" are not."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    if isinstance(value, float):
        return value.is_integer() and value >= 0
    # isdigit() alone takes "²" and other digits int() refuses
    return isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()


_Text = TypeVar("_Text", bound=str | None)


def _text(value: Any, name: str) -> str | None:
    """An account's text field (:func:`~distillguard.exchange.text_value`), or
    InvalidRecord naming it."""
    try:
        text = text_value(value, name)
    except ValueError as exc:
        raise InvalidRecord(f"account {exc}", name) from None
    return stored_text(text, f"account {name!r}", name,
                       MAX_ORG_CHARS if name == "org" else MAX_ID_CHARS)


# The longest text an account (its id, e-mail domain, payment fingerprint, tier) or a
# key's name may hold is MAX_ID_CHARS, as a trace's ids; an org's name may be longer.
# PostgreSQL keeps at most 2,704 bytes in an index entry (ids, orgs and fingerprints are
# indexed): a 4,000-character id was a database error there. 500 characters of 4-byte
# UTF-8 stay below that.
MAX_ORG_CHARS = 500


def stored_text(value: _Text, what: str, field: str, limit: int = MAX_ID_CHARS) -> _Text:
    """``value``, or InvalidRecord naming ``field`` if it holds the NUL character
    (PostgreSQL cannot keep one in text, so the state store would fail on it; SQLite
    would keep it) or is longer than ``limit`` characters. Refused on either store, so an
    account or key means the same on both."""
    if value is not None:
        if "\x00" in value:
            raise InvalidRecord(f"{what} must not contain the NUL character", field)
        if len(value) > limit:
            raise InvalidRecord(f"{what} is {len(value)} characters long; at most {limit} "
                                "are kept", field)
    return value


@dataclass(slots=True)
class ApiKey:
    key_id: str
    account_id: str
    key_hash: str
    name: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    limits: dict[str, int | None] = field(default_factory=dict)

    def is_usable(self, now: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at

    def to_public(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "account_id": self.account_id,
            "name": self.name,
            "created_at": format_ts(self.created_at),
            "expires_at": format_ts(self.expires_at) if self.expires_at else None,
            "revoked_at": format_ts(self.revoked_at) if self.revoked_at else None,
            "limits": dict(self.limits),
        }


def key_expiry(expires_at: Any = None, expires_in_days: Any = None, *,
               now: datetime) -> datetime | None:
    """When a new key expires, from an RFC 3339 time after ``now`` or a number of days
    in (0, MAX_KEY_DAYS]; None (never) when neither is given. A time already past is
    refused rather than stored: a key created expired is a typo (a year, a sign), and
    its holder would only learn so from a 401."""
    if expires_at is not None and expires_in_days is not None:
        raise InvalidRecord("give a key's expiry as a time or as days from now, not both",
                            "expires_at")
    if expires_at is not None:
        try:
            when = parse_ts(expires_at)
        except ValueError as exc:
            raise InvalidRecord(str(exc), "expires_at") from None
        if when <= now:
            raise InvalidRecord(f"a key's expiry must be in the future: {format_ts(when)} "
                                f"is not (now {format_ts(now)})", "expires_at")
        return when
    if expires_in_days is None:
        return None
    days = expires_in_days
    if isinstance(days, str):           # "30", as a form or a shell would send it
        with contextlib.suppress(ValueError):
            days = float(days)
    # NaN compares false, so it is refused with the rest; so is a number of days too
    # small to move the time at all (1e-300), which would make a key created expired
    if isinstance(days, bool) or not isinstance(days, int | float) or not (
            0 < days <= MAX_KEY_DAYS) or now + timedelta(days=float(days)) <= now:
        raise InvalidRecord(f"the days until a key expires must be a number in "
                            f"(0, {MAX_KEY_DAYS}], not {expires_in_days!r:.40}",
                            "expires_in_days")
    return now + timedelta(days=float(days))


def new_key_material() -> tuple[str, str]:
    """A new ``(key_id, secret_key)``; the secret is shown once and never stored."""
    key_id = "key_" + secrets.token_hex(6)
    secret = secrets.token_hex(24)
    return key_id, f"{KEY_PREFIX}{key_id[4:]}-{secret}"


def hash_key(secret_key: str) -> str:
    """Keys are 192-bit random, so a plain SHA-256 resists guessing; no salt is needed."""
    return hashlib.sha256(secret_key.encode()).hexdigest()


def key_id_of(secret_key: str) -> str | None:
    """The public key id inside a presented key, or None if it is not a distillguard key."""
    if not secret_key.startswith(KEY_PREFIX):
        return None
    body = secret_key[len(KEY_PREFIX):]
    ident, sep, secret = body.partition("-")
    if not sep or len(ident) != 12 or len(secret) != 48:
        return None
    return "key_" + ident


def key_matches(secret_key: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_key(secret_key), key_hash)
