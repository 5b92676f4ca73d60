"""The verdicts document (docs/formats.md)."""

from __future__ import annotations

import re
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


@pytest.mark.parametrize(("account", "says"), [
    ({"flagged": "false"}, "account 'a1': 'flagged' must be true or false, not 'false'"),
    ({"risk": 2}, "account 'a1': 'risk' must be a number from 0 to 1, not 2"),
    ({"risk": "0.9"}, "'risk' must be a number from 0 to 1, not '0.9'"),
    ({"risk": True}, "'risk' must be a number from 0 to 1, not True"),
    ({"campaign_id": 7}, "'campaign_id' must be a string or null, not 7"),
    ({"exchanges_before_flag": -1}, "'exchanges_before_flag' must be a whole number"),
    ({"reasons": "burst"}, "'reasons' must be a list of strings"),
    ({"first_flagged_at": "yesterday"}, "'first_flagged_at': not an RFC 3339 time"),
])
def test_a_field_of_the_wrong_kind_is_named(account: dict[str, object], says: str) -> None:
    """A verdicts document written elsewhere with "flagged": "false" was read as a flagged
    account, a risk of 2 or "0.9" taken as it came."""
    with pytest.raises(ValueError, match=re.escape(says)):
        Verdicts.from_json({"version": 1, "accounts": [{"account_id": "a1", **account}]})
    with pytest.raises(ValueError, match="must be a list of strings"):
        Verdicts.from_json({"version": 1, "campaigns": [{"campaign_id": "c", "accounts": [1]}]})
    with pytest.raises(ValueError, match="an account verdict needs"):
        Verdicts.from_json({"version": 1, "accounts": ["a1"]})
    with pytest.raises(ValueError, match="'accounts' must be a list"):
        Verdicts.from_json({"version": 1, "accounts": {"a1": {}}})
    ok = Verdicts.from_json({"version": 1, "accounts": [{"account_id": "a1", "risk": 1,
                                                          "flagged": True}]})
    assert ok.accounts[0].risk == 1.0 and ok.accounts[0].flagged
