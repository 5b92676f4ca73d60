"""Pseudonyms and salted hashes: what stands in for personal values in a shared bundle.

* Account identifiers become ``acct-`` + 16 hex digits of HMAC-SHA256 under the
  partner's key. The same account always gets the same pseudonym for one partner (so
  repeated shares correlate) and different, unlinkable pseudonyms for different partners.
  A partner's key is ``partners.NAME.pseudonym_key`` or, by default, HMAC-SHA256 of the
  partner name under the master ``sharing.pseudonym_key``.
* Payment fingerprints become ``SHA-256(salt || fingerprint)`` with a random salt per
  bundle carried in the indicator, so a partner holding the same fingerprint can match it
  and nobody can read it back or link it across bundles without already knowing it.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from distillguard.errors import ConfigError
from distillguard.geoip import client_prefix
from distillguard.sharing.settings import SharingSettings


def partner_key(options: SharingSettings, partner: str) -> bytes:
    settings = options.partner(partner)
    if settings.pseudonym_key:
        return settings.pseudonym_key.encode()
    master = options.master_key()
    if master is None:
        raise ConfigError(
            f"sharing: no pseudonymisation key for partner {partner!r}: set "
            f"sharing.pseudonym_key (or {options.pseudonym_key_env}) or "
            f"sharing.partners.{partner}.pseudonym_key")
    return hmac.new(master.encode(), b"partner:" + partner.encode(), hashlib.sha256).digest()


class Pseudonymizer:
    """Maps account identifiers for one partner; identity when pseudonymisation is off."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self._seen: dict[str, str] = {}

    @classmethod
    def for_partner(cls, options: SharingSettings, partner: str) -> Pseudonymizer:
        if not options.partner(partner).pseudonymize:
            return cls(None)
        return cls(partner_key(options, partner))

    @property
    def active(self) -> bool:
        return self.key is not None

    def account(self, account_id: str) -> str:
        if self.key is None:
            return account_id
        found = self._seen.get(account_id)
        if found is None:
            mac = hmac.new(self.key, b"account:" + account_id.encode(), hashlib.sha256)
            found = self._seen[account_id] = "acct-" + mac.hexdigest()[:16]
        return found

    def text(self, value: str, account_ids: list[str], personal: set[str] | None = None,
             *, keep_addresses: bool = False) -> str:
        """Free text (evidence lines) with account identifiers replaced by pseudonyms,
        other personal values (orgs, e-mail domains, payment fingerprints) by
        ``[redacted]`` and IP addresses by their /24 (/48) network."""
        if self.key is None:
            return value
        if account_ids:
            ids = sorted(set(account_ids), key=len, reverse=True)
            pattern = re.compile("|".join(rf"(?<![\w-]){re.escape(a)}(?![\w-])" for a in ids))
            value = pattern.sub(lambda m: self.account(m.group(0)), value)
        for item in sorted(personal or (), key=len, reverse=True):
            if len(item) >= 3:
                value = re.sub(re.escape(item), "[redacted]", value, flags=re.IGNORECASE)
        if not keep_addresses:
            value = _IPV4.sub(lambda m: client_prefix(m.group(0)) or m.group(0), value)
        return value


_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d./])")


def salted_hash(salt: str, value: str) -> str:
    return hashlib.sha256(salt.encode() + b"\x00" + value.encode()).hexdigest()
