"""``distillguard policy`` and ``distillguard review`` against a SQLite store."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml
from click.testing import CliRunner

from distillguard.cli import main

POLICY = {
    "version": 1,
    "tiers": {"unverified": {"models": ["demo-chat-*"]}},
    "rules": [{"name": "embargo", "when": {"country": ["KP"]},
               "deny": "Access from {country} is not permitted."}],
    "verdicts": {"rules": [
        {"name": "risky", "when": {"risk_at_least": 0.9}, "action": "throttle",
         "expires_in": "2h"},
        {"name": "watch", "when": {"flagged": True}, "action": "review", "propose": "suspend"},
        {"name": "campaign", "when": {"campaign_status": ["detected"]}, "action": "degrade"},
    ]},
    "screening": {"lists": ["list.json"]},
}
LIST = {"version": 1, "entries": [
    {"id": "x1", "name": "Rosoboronexport OAO", "aliases": ["Rosoboron Export"],
     "source": "SDN"},
    {"id": "x2", "name": "Li Wei Zhang", "type": "Individual", "source": "EL"},
]}


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    (tmp_path / "list.json").write_bytes(orjson.dumps(LIST))
    path = tmp_path / "dg.yaml"
    path.write_text(yaml.safe_dump({"state": {"url": f"sqlite:///{tmp_path / 's.sqlite'}"},
                                    "policy": {"file": str(tmp_path / "policy.yaml")}}))
    return str(path)


def run(cfg: str, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, ["-c", cfg, *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_check_and_explain(cfg: str, tmp_path: Path) -> None:
    out = run(cfg, "policy", "check")
    assert "valid" in out and "rule embargo: deny" in out and "screening entries: 2" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**POLICY, "rules": [{"name": "x", "require_tier": "gold"}]}))
    out = run(cfg, "policy", "check", str(bad), code=2)
    assert "rules.0 (x).require_tier: unknown tier 'gold'" in out
    decided = orjson.loads(run(cfg, "policy", "explain", "--model", "demo-chat-1",
                               "--ip", "175.45.176.1"))
    assert decided["network"]["country"] == "KP"
    assert decided["decision"]["denied"] == "rule:embargo"
    decided = orjson.loads(run(cfg, "policy", "explain", "--model", "demo-reasoner-1",
                               "--tier", "unverified", "--ip", "81.2.69.142"))
    assert decided["decision"]["code"] == "model_not_permitted"
    assert "Rosoboron Export" in run(cfg, "policy", "screen-name", "ROSOBORON-EXPORT")
    # A typo'd address was looked up as no network and the request reported as allowed;
    # a country of another shape matched no rule, unlike any stored account's.
    out = run(cfg, "policy", "explain", "--model", "demo-chat-1", "--ip", "175.45.176.300",
              code=2)
    assert "'175.45.176.300' is not an IPv4 or IPv6 address" in out
    out = run(cfg, "policy", "explain", "--model", "demo-chat-1", "--country", "PRK", code=2)
    assert "ISO 3166-1 alpha-2" in out
    decided = orjson.loads(run(cfg, "policy", "explain", "--model", "demo-chat-1",
                               "--country", "kp"))
    assert decided["decision"]["denied"] == "rule:embargo"


def test_actions_verdicts_screening_and_review(cfg: str, tmp_path: Path) -> None:
    for account, org in (("acct_a", "Rosoboronexport"), ("acct_b", "Acme Robotics"),
                         ("acct_c", None)):
        args = ["accounts", "create", account] + (["--org", org] if org else [])
        run(cfg, *args)
    out = run(cfg, "policy", "apply", "acct_b", "--action", "suspend", "--reason",
              "chargeback fraud", "--expires", "3d", "--actor", "ana")
    assert "suspend acct_b until" in out
    assert orjson.loads(run(cfg, "accounts", "show", "acct_b"))["status"] == "suspended"
    run(cfg, "policy", "apply", "acct_b", "--action", "nuke", "--reason", "x", code=2)
    # a mistyped account made an action for no one and printed it as applied
    out = run(cfg, "policy", "apply", "acct_b", "acct_zz", "--action", "flag", "--reason",
              "typo", code=2)
    assert "error: no account 'acct_zz'" in out
    assert orjson.loads(run(cfg, "policy", "actions")) == [
        a for a in orjson.loads(run(cfg, "policy", "actions")) if a["action"] == "suspend"]
    run(cfg, "policy", "revoke", "acct_b", "--reason", "appeal upheld", "--actor", "ana")
    assert orjson.loads(run(cfg, "accounts", "show", "acct_b"))["status"] == "active"
    verdicts = {"version": 1,
                "accounts": [{"account_id": "acct_c", "risk": 0.95, "flagged": True}],
                "campaigns": [{"campaign_id": "c-1", "accounts": ["acct_a", "acct_c"],
                               "risk": 0.9, "evidence": ["one payment fingerprint"]}]}
    (tmp_path / "v.json").write_bytes(orjson.dumps(verdicts))
    out = run(cfg, "policy", "apply-verdicts", str(tmp_path / "v.json"))
    assert "3 action(s) applied, 1 review item(s)" in out
    active = orjson.loads(run(cfg, "policy", "actions", "--active"))
    assert sorted((a["account_id"], a["action"]) for a in active) == [
        ("acct_a", "degrade"), ("acct_c", "degrade"), ("acct_c", "throttle")]
    throttle = next(a for a in active if a["action"] == "throttle")
    assert throttle["caused_by"] == "verdict:acct_c" and throttle["expires_at"]
    # Applying the same document again changes nothing.
    assert "0 action(s) applied" in run(cfg, "policy", "apply-verdicts",
                                        str(tmp_path / "v.json"))
    assert "1 review item(s)" in run(cfg, "policy", "screen")
    assert "screened 0" in run(cfg, "policy", "screen")   # nothing changed since
    listed = orjson.loads(run(cfg, "review", "list", "--json"))
    by_source = {i["source"]: i for i in listed}
    assert set(by_source) == {"verdicts", "screening"}
    assert by_source["screening"]["subject"] == "acct_a"
    run(cfg, "review", "dismiss", by_source["verdicts"]["item_id"], code=2)  # no reason
    out = run(cfg, "review", "dismiss", by_source["verdicts"]["item_id"], "--reason",
              "benign load test")
    assert "dismissed" in out
    out = run(cfg, "review", "confirm", by_source["screening"]["item_id"], "--actor", "lead")
    assert "suspend applied to acct_a" in out
    events = orjson.loads(run(cfg, "policy", "audit", "--subject", "account:acct_a"))
    names = [e["name"] for e in events]
    assert names[0] == "cli:account:suspend" and "review:item:confirm" in names
    assert events[0]["actor"] == "lead"


def test_unknown_items_and_limits_are_named_plainly(cfg: str) -> None:
    """An unknown item's id keeps both its quotes (a message ending in a quote lost it to
    the handling of KeyError's quoting); a limit below 1 is refused before the query
    (PostgreSQL refuses a negative LIMIT with an error of its own)."""
    assert "error: no review item 'nope'\n" in run(cfg, "review", "confirm", "nope", code=2)
    assert "error: no review item 'nope'\n" in run(cfg, "review", "show", "nope", code=2)
    for args in (["review", "list", "--limit", "-1"], ["policy", "audit", "--limit", "0"],
                 ["policy", "actions", "--limit", "-5"], ["accounts", "list", "--limit", "0"]):
        assert "is not in the range x>=1" in run(cfg, *args, code=2)


def test_a_throttle_by_hand_takes_its_own_limits(cfg: str) -> None:
    """The command line could throttle only at the policy file's limits; the admin API
    took others. --rpm, --tpm and --tpd give the throttle its own, and belong to a
    throttle only."""
    run(cfg, "accounts", "create", "acct_t")
    run(cfg, "policy", "apply", "acct_t", "--action", "throttle", "--reason", "bursty",
        "--rpm", "5", "--tpd", "20000", "--expires", "1h")
    (throttle,) = [a for a in orjson.loads(run(cfg, "policy", "actions"))
                   if a["account_id"] == "acct_t"]
    assert {k: v for k, v in throttle["detail"]["limits"].items() if v is not None} == {
        "requests_per_minute": 5, "tokens_per_day": 20000}
    out = run(cfg, "policy", "apply", "acct_t", "--action", "flag", "--reason", "x y z",
              "--rpm", "5", code=2)
    assert "limits of a throttle" in out
    assert "Invalid value for '--tpm'" in run(cfg, "policy", "apply", "acct_t", "--action",
                                              "throttle", "--reason", "abc", "--tpm", "-1",
                                              code=2)


def test_a_dismissed_screening_match_is_not_reopened_when_the_lists_change(
        cfg: str, tmp_path: Path) -> None:
    """Every change of the lists (a daily download) screens every account again: each
    match an analyst had dismissed opened a new item, the same false positives again."""
    run(cfg, "accounts", "create", "acct_a", "--org", "Rosoboronexport")
    run(cfg, "accounts", "create", "acct_b", "--org", "Acme Robotics")
    assert "1 review item(s)" in run(cfg, "policy", "screen")
    item = orjson.loads(run(cfg, "review", "list", "--json"))[0]
    run(cfg, "review", "dismiss", item["item_id"], "--reason", "a namesake in Tula")
    grown = {**LIST, "entries": [*LIST["entries"],
                                 {"id": "x3", "name": "Example Arms Ltd", "source": "EL"}]}
    (tmp_path / "list.json").write_bytes(orjson.dumps(grown))
    assert "screened 2 account(s): 1 match(es), 0 review item(s)" in run(
        cfg, "policy", "screen")
    assert orjson.loads(run(cfg, "review", "list", "--json")) == []
    # a new match of the same account is reviewed, with only the new evidence
    grown["entries"].append({"id": "x4", "name": "Rosoboronexport", "source": "EL"})
    (tmp_path / "list.json").write_bytes(orjson.dumps(grown))
    assert "1 review item(s)" in run(cfg, "policy", "screen")
    [fresh] = orjson.loads(run(cfg, "review", "list", "--json"))
    assert fresh["subject"] == "acct_a" and len(fresh["evidence"]) == 1
    assert "entry x4" in fresh["evidence"][0]


def test_a_change_of_the_matching_screens_accounts_again(
        cfg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accounts were screened again only when their names or the lists changed, so
    better matching never reached the accounts already screened."""
    from distillguard.policy import screening

    run(cfg, "accounts", "create", "acct_a", "--org", "Acme Robotics")
    assert "screened 1 account(s)" in run(cfg, "policy", "screen")
    assert "screened 0 account(s)" in run(cfg, "policy", "screen")
    monkeypatch.setattr(screening, "MATCHING_VERSION", screening.MATCHING_VERSION + 1)
    assert "screened 1 account(s)" in run(cfg, "policy", "screen")
