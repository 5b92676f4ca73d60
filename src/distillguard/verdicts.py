"""The verdicts format: what detection concludes, as one typed document.

This is a public interface (``docs/formats.md``): batch detection writes it, the
benchmark, policy, sharing and the dashboard read it. Version 1::

    {"version": 1,
     "accounts": [{"account_id", "risk", "flagged", "campaign_id", "first_flagged_at",
                   "exchanges_before_flag", "reasons"}],
     "campaigns": [{"campaign_id", "accounts", "risk", "detected_at", "evidence"}]}

Every account of the input appears once in ``accounts``. Extra fields are preserved.
Fields are read as the format gives them (a risk is a number in [0, 1], ``flagged`` a
boolean, ids strings, lists lists): a document written elsewhere with ``"flagged":
"false"`` was read as flagged, a risk of 2 as a risk; now the entry and field are named.
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
    def from_json(cls, data: Any) -> AccountVerdict:
        known = {"account_id", "risk", "flagged", "campaign_id", "first_flagged_at",
                 "exchanges_before_flag", "reasons"}
        if not isinstance(data, dict) or not isinstance(data.get("account_id"), str):
            raise ValueError("an account verdict needs a string 'account_id'")
        where = f"account {data['account_id']!r}"
        flagged = data.get("flagged", False)
        if type(flagged) is not bool:
            raise ValueError(f"{where}: 'flagged' must be true or false, not {flagged!r}")
        ebf = data.get("exchanges_before_flag")
        if ebf is not None and (type(ebf) is not int or ebf < 0):
            raise ValueError(f"{where}: 'exchanges_before_flag' must be a whole number of "
                             f"at least 0, not {ebf!r}")
        return cls(account_id=data["account_id"], risk=_risk(data, where),
                   flagged=flagged, campaign_id=_text(data, "campaign_id", where),
                   first_flagged_at=_time(data, "first_flagged_at", where),
                   exchanges_before_flag=ebf, reasons=_texts(data, "reasons", where),
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
    def from_json(cls, data: Any) -> CampaignVerdict:
        known = {"campaign_id", "accounts", "risk", "detected_at", "evidence"}
        if not isinstance(data, dict) or not isinstance(data.get("campaign_id"), str):
            raise ValueError("a campaign needs a string 'campaign_id'")
        where = f"campaign {data['campaign_id']!r}"
        return cls(campaign_id=data["campaign_id"],
                   accounts=_texts(data, "accounts", where), risk=_risk(data, where),
                   detected_at=_time(data, "detected_at", where),
                   evidence=_texts(data, "evidence", where),
                   extra={k: v for k, v in data.items() if k not in known})


def _risk(data: dict[str, Any], where: str) -> float:
    value = data.get("risk", 0.0)
    if value is None:
        return 0.0
    # compared as written, to 6 decimals: a mean of risks may end a rounding step past 1
    if type(value) not in (int, float) or not 0.0 <= round(value, 6) <= 1.0:
        raise ValueError(f"{where}: 'risk' must be a number from 0 to 1, not {value!r}")
    return float(value)


def _text(data: dict[str, Any], name: str, where: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: {name!r} must be a string or null, not {value!r}")
    return value


def _texts(data: dict[str, Any], name: str, where: str) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {name!r} must be a list of strings")
    return list(value)


def _time(data: dict[str, Any], name: str, where: str) -> datetime | None:
    value = data.get(name)
    if value is None:
        return None
    try:
        return parse_ts(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {name!r}: {exc}") from None


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
        for name in ("accounts", "campaigns"):
            if not isinstance(data.get(name, []), list):
                raise ValueError(f"a verdicts document's {name!r} must be a list")
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
