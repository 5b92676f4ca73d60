"""The verdicts format: what detection concludes, as one typed document.

This is a public interface (``docs/formats.md``): batch detection writes it, the
benchmark, policy, sharing and the dashboard read it. Version 1::

    {"version": 1,
     "accounts": [{"account_id", "risk", "flagged", "campaign_id", "first_flagged_at",
                   "exchanges_before_flag", "reasons"}],
     "campaigns": [{"campaign_id", "accounts", "risk", "detected_at", "evidence"}]}

Every account of the input appears once in ``accounts``. Extra fields are preserved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from distillguard.exchange import format_ts, parse_ts
from distillguard.files import write_atomically

VERDICTS_VERSION = 1


@dataclass(slots=True)
class AccountVerdict:
    account_id: str
    risk: float = 0.0
    flagged: bool = False
    campaign_id: str | None = None
    first_flagged_at: datetime | None = None
    exchanges_before_flag: int | None = None
    reasons: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.extra,
                "account_id": self.account_id, "risk": round(float(self.risk), 6),
                "flagged": bool(self.flagged), "campaign_id": self.campaign_id,
                "first_flagged_at": format_ts(self.first_flagged_at)
                if self.first_flagged_at else None,
                "exchanges_before_flag": self.exchanges_before_flag,
                "reasons": list(self.reasons)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AccountVerdict:
        known = {"account_id", "risk", "flagged", "campaign_id", "first_flagged_at",
                 "exchanges_before_flag", "reasons"}
        if not isinstance(data.get("account_id"), str):
            raise ValueError("an account verdict needs a string 'account_id'")
        first = data.get("first_flagged_at")
        ebf = data.get("exchanges_before_flag")
        return cls(account_id=data["account_id"], risk=float(data.get("risk") or 0.0),
                   flagged=bool(data.get("flagged")), campaign_id=data.get("campaign_id"),
                   first_flagged_at=parse_ts(first) if first else None,
                   exchanges_before_flag=None if ebf is None else int(ebf),
                   reasons=[str(r) for r in data.get("reasons") or []],
                   extra={k: v for k, v in data.items() if k not in known})


@dataclass(slots=True)
class CampaignVerdict:
    campaign_id: str
    accounts: list[str] = field(default_factory=list)
    risk: float = 0.0
    detected_at: datetime | None = None
    evidence: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.extra,
                "campaign_id": self.campaign_id, "accounts": list(self.accounts),
                "risk": round(float(self.risk), 6),
                "detected_at": format_ts(self.detected_at) if self.detected_at else None,
                "evidence": list(self.evidence)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CampaignVerdict:
        known = {"campaign_id", "accounts", "risk", "detected_at", "evidence"}
        if not isinstance(data.get("campaign_id"), str):
            raise ValueError("a campaign needs a string 'campaign_id'")
        detected = data.get("detected_at")
        return cls(campaign_id=data["campaign_id"],
                   accounts=[str(a) for a in data.get("accounts") or []],
                   risk=float(data.get("risk") or 0.0),
                   detected_at=parse_ts(detected) if detected else None,
                   evidence=[str(e) for e in data.get("evidence") or []],
                   extra={k: v for k, v in data.items() if k not in known})


@dataclass(slots=True)
class Verdicts:
    accounts: list[AccountVerdict] = field(default_factory=list)
    campaigns: list[CampaignVerdict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, "version": VERDICTS_VERSION,
                "accounts": [a.to_json() for a in self.accounts],
                "campaigns": [c.to_json() for c in self.campaigns]}

    @classmethod
    def from_json(cls, data: Any) -> Verdicts:
        if not isinstance(data, dict):
            raise ValueError("a verdicts document must be a JSON object")
        version = data.get("version")
        if version != VERDICTS_VERSION:
            raise ValueError(f"unsupported verdicts version {version!r} "
                             f"(this build reads version {VERDICTS_VERSION})")
        return cls(accounts=[AccountVerdict.from_json(a) for a in data.get("accounts") or []],
                   campaigns=[CampaignVerdict.from_json(c) for c in data.get("campaigns") or []],
                   extra={k: v for k, v in data.items()
                          if k not in {"version", "accounts", "campaigns"}})

    def write(self, path: str | Path) -> None:
        write_atomically(path, orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2))

    @classmethod
    def read(cls, path: str | Path) -> Verdicts:
        try:
            return cls.from_json(orjson.loads(Path(path).read_bytes()))
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg})") from None
