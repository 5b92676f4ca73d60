"""The verdicts document (docs/formats.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillguard.verdicts import Verdicts

DOC = {"version": 1,
       "accounts": [{"account_id": "acct_17", "risk": 0.97, "flagged": True,
                     "campaign_id": "c-3", "first_flagged_at": "2026-03-01T14:02:11Z",
                     "exchanges_before_flag": 41, "reasons": ["shared templates"],
                     "extra_field": 1},
                    {"account_id": "acct_18", "risk": 0.01, "flagged": False,
                     "campaign_id": None, "first_flagged_at": None,
                     "exchanges_before_flag": None, "reasons": []}],
       "campaigns": [{"campaign_id": "c-3", "accounts": ["acct_17"], "risk": 0.99,
                      "detected_at": "2026-03-01T14:02:11Z", "evidence": ["e"]}]}


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "v.json"
    Verdicts.from_json(DOC).write(path)
    again = Verdicts.read(path)
    out = again.to_json()
    assert out["accounts"][0]["first_flagged_at"] == "2026-03-01T14:02:11.000Z"
    out["accounts"][0]["first_flagged_at"] = "2026-03-01T14:02:11Z"
    out["campaigns"][0]["detected_at"] = "2026-03-01T14:02:11Z"
    assert out == DOC


def test_rejects_unknown_version_and_bad_records() -> None:
    with pytest.raises(ValueError, match="unsupported verdicts version"):
        Verdicts.from_json({**DOC, "version": 2})
    with pytest.raises(ValueError, match="account_id"):
        Verdicts.from_json({"version": 1, "accounts": [{"risk": 1}]})
