"""The ``sharing`` settings section, validated at start-up (and by every ``share`` command).

```yaml
sharing:
  enabled: true
  organisation: Example Lab          # the STIX identity that signs our bundles
  pseudonym_key: null                # master secret (>= 16 chars) for per-partner pseudonyms,
  pseudonym_key_env: DISTILLGUARD_SHARING_KEY   # or the variable that holds it
  tlp: amber                         # clear | green | amber | red marking on every object
  share_exact_ips: false             # observed data names /24 (/48) prefixes, not addresses
  min_specificity: 0.8               # share of a value's exchanges that came from the campaign
  min_accounts: 2                    # campaign accounts that must share a value
  indicator_ttl_days: 30             # valid_until of exported indicators; default on import
  max_bundle_bytes: 10000000         # larger bundles are refused before parsing
  action: flag                       # flag | block, for every indicator kind ...
  actions: {ip: block}               # ... or per kind: ip, asn, user_agent, template, payment
  match_risk: 0.5                    # risk a match adds to the account (capped at 1)
  refresh_s: 10                      # how often the request check reloads indicators
  taxii:
    enabled: true                    # routes under /taxii2/ on the admin port
    api_root: distillguard
    title: distillguard TAXII server
    max_page_size: 100
    collections:
      - {id: 2f6a...-uuid, alias: outbound, title: Our campaigns}
  partners:
    acme:
      token_sha256: <hex SHA-256 of the partner's secret>   # or token: <secret>
      pseudonym_key: null            # overrides the key derived from the master secret
      pseudonymize: true             # false: account ids leave as they are
      read: [outbound]               # collection ids or aliases
      write: [inbound]
```
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from distillguard.config import validate_section
from distillguard.errors import ConfigError

KINDS = ("ip", "asn", "user_agent", "template", "payment")


class Action(StrEnum):
    FLAG = "flag"
    BLOCK = "block"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CollectionSettings(_Section):
    id: str
    alias: str | None = None
    title: str = ""
    description: str = ""

    @field_validator("id")
    @classmethod
    def _uuid(cls, value: str) -> str:
        try:
            uuid.UUID(value)
        except ValueError:
            raise ValueError(f"collection id {value!r} is not a UUID") from None
        return value


class PartnerSettings(_Section):
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    token: str | None = Field(None, min_length=16)
    pseudonym_key: str | None = Field(None, min_length=16)
    pseudonymize: bool = True
    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)

    def accepts(self, secret: str) -> bool:
        """Constant-time check of a presented secret."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        expected = self.token_sha256 or (
            hashlib.sha256(self.token.encode()).hexdigest() if self.token else None)
        return expected is not None and hmac.compare_digest(digest, expected)


class TaxiiSettings(_Section):
    enabled: bool = True
    api_root: str = Field("distillguard", pattern=r"^[A-Za-z0-9_-]+$")
    title: str = "distillguard TAXII server"
    description: str = "Distillation campaign indicators"
    contact: str | None = None
    max_page_size: int = Field(100, ge=1, le=10_000)
    collections: list[CollectionSettings] = Field(default_factory=list)


class SharingSettings(_Section):
    enabled: bool = True
    organisation: str = "distillguard operator"
    pseudonym_key: str | None = Field(None, min_length=16)
    pseudonym_key_env: str = "DISTILLGUARD_SHARING_KEY"
    tlp: str = Field("amber", pattern=r"^(clear|white|green|amber|red)$")
    share_exact_ips: bool = False
    min_specificity: float = Field(0.8, ge=0.0, le=1.0)
    min_accounts: int = Field(2, ge=1)
    indicator_ttl_days: float = Field(30.0, gt=0)
    max_bundle_bytes: int = Field(10_000_000, gt=0)
    action: Action = Action.FLAG
    actions: dict[str, Action] = Field(default_factory=dict)
    match_risk: float = Field(0.5, ge=0.0, le=1.0)
    refresh_s: float = Field(10.0, gt=0)
    taxii: TaxiiSettings = Field(default_factory=TaxiiSettings)
    partners: dict[str, PartnerSettings] = Field(default_factory=dict)

    @field_validator("actions")
    @classmethod
    def _kinds(cls, value: dict[str, Action]) -> dict[str, Action]:
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown indicator kinds {unknown}; known: {list(KINDS)}")
        return value

    def action_for(self, kind: str) -> Action:
        return self.actions.get(kind, self.action)

    def master_key(self, environ: dict[str, str] | None = None) -> str | None:
        if self.pseudonym_key:
            return self.pseudonym_key
        value = (os.environ if environ is None else environ).get(self.pseudonym_key_env)
        if value is not None and len(value) < 16:
            raise ConfigError(f"sharing: the key in {self.pseudonym_key_env} must be at "
                              "least 16 characters")
        return value or None

    def partner(self, name: str) -> PartnerSettings:
        try:
            return self.partners[name]
        except KeyError:
            known = ", ".join(sorted(self.partners)) or "none configured"
            raise ConfigError(f"sharing: unknown partner {name!r} (partners: {known})") from None

    def collection(self, ref: str) -> CollectionSettings | None:
        return next((c for c in self.taxii.collections if ref in (c.id, c.alias)), None)


def parse_sharing_settings(raw: Any) -> SharingSettings:
    options = validate_section(SharingSettings, raw, "sharing")
    for name, partner in options.partners.items():
        for ref in [*partner.read, *partner.write]:
            if options.collection(ref) is None:
                raise ConfigError(f"sharing.partners.{name}: unknown collection {ref!r}")
    return options
