"""The ``ledger:`` settings section, validated when the component starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from distillguard.config import Settings, validate_section
from distillguard.exchange import Retention


class LedgerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    path: str | None = None
    url: str | None = None
    key_path: str | None = None
    verifier_key: str | None = None
    retired_keys: str | None = None
    origin: str = "distillguard/ledger"
    durability: Literal["fsync", "process"] = "fsync"
    max_batch: int = Field(8192, gt=0, le=1_000_000)
    checkpoint_interval_s: float = Field(60.0, ge=0)
    retention: Retention | None = None
    spool: bool = True
    spool_path: str | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
                ("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("ledger.url must start with sqlite:/// or postgresql://")
        return value

    @field_validator("origin")
    @classmethod
    def _origin(cls, value: str) -> str:
        if not value or any(c.isspace() or c == "+" for c in value):
            raise ValueError("ledger.origin must be non-empty, without spaces or '+'")
        return value


@dataclass(frozen=True)
class LedgerConfig:
    """Resolved ledger settings: where it lives and how it writes."""

    url: str
    key_path: Path
    origin: str = "distillguard/ledger"
    durability: Literal["fsync", "process"] = "fsync"
    max_batch: int = 8192
    checkpoint_interval_s: float = 60.0
    retention: Retention = Retention.FULL
    enabled: bool = True
    # where exchanges wait while the store cannot be written (ledger/spool.py); None: they
    # are not kept, and an append that fails is an error for its caller
    spool_dir: Path | None = None
    # a copy of the public key kept apart from the ledger; None: the one beside key_path
    verifier_key: Path | None = None
    # a copy of the retired-keys file kept apart (ledger/keyring.py); None: the one beside
    # key_path, read only when verifier_key is None (both then lie with the ledger)
    retired_keys: Path | None = None


def default_dir(settings: Settings) -> Path:
    """Next to the SQLite state store: ``<state file without suffix>-ledger/``."""
    url = settings.state.url
    if url.startswith("sqlite:///") and ":memory:" not in url:
        state = Path(url[len("sqlite:///"):])
        return state.with_name(state.stem + "-ledger")
    return Path("distillguard-ledger")


def parse_settings(settings: Settings) -> LedgerConfig:
    section = validate_section(LedgerSection, settings.extensions.get("ledger") or {},
                               "ledger")
    base = Path(section.path) if section.path else default_dir(settings)
    url = section.url or f"sqlite:///{base / 'ledger.sqlite'}"
    key_path = Path(section.key_path) if section.key_path else base / "ledger.key"
    return LedgerConfig(url=url, key_path=key_path, origin=section.origin,
                        durability=section.durability, max_batch=section.max_batch,
                        checkpoint_interval_s=section.checkpoint_interval_s,
                        retention=section.retention or settings.pipeline.retention,
                        enabled=section.enabled,
                        verifier_key=(Path(section.verifier_key) if section.verifier_key
                                      else None),
                        retired_keys=(Path(section.retired_keys) if section.retired_keys
                                      else None),
                        spool_dir=(Path(section.spool_path) if section.spool_path
                                   else base / "spool") if section.spool else None)
