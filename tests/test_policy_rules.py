"""Policy evaluation, one rule kind at a time, on the request check itself (no gateway)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from distillguard.auth import Principal
from distillguard.errors import ConfigError
from distillguard.pipeline import Allowed, Denied
from distillguard.policy.actions import Action, ActiveActions
from distillguard.policy.audit import DenialAggregator
from distillguard.policy.check import PolicyCheck
from distillguard.policy.compiled import PolicyHolder, compile_policy, load_policy
from distillguard.policy.document import parse_document, parse_duration
from distillguard.policy.networks import NetworkSet
from distillguard.policy.schema import now_ts
from distillguard.store.models import Account, ApiKey
from tests.factories import make_exchange

KP, GB, DE_HOSTING, RU = "175.45.176.1", "81.2.69.142", "5.9.1.1", "213.87.0.1"


def judge(policy: dict[str, Any], *, ip: str = GB, model: str = "demo-chat-1",
          tier: str = "standard", country: str | None = "DE",
          actions: list[Action] = (), base: Path | None = None) -> tuple[Any, Any]:
    compiled = compile_policy(parse_document(policy), base=base)
    active = ActiveActions()
    for a in actions:
        active.apply(a)
    check = PolicyCheck(PolicyHolder(None, compiled), active, DenialAggregator())
    ex = make_exchange(account_id="acct_t", client_ip=ip, model=model)
    account = Account(account_id="acct_t", tier=tier, country=country)
    ex.principal = Principal(account, ApiKey("key_000000000001", "acct_t", "h"))
    return check.decide(ex, compiled), ex


def code(decision: Any) -> str:
    return decision.code if isinstance(decision, Denied) else "allowed"


def rule(name: str, when: dict[str, Any], **effect: Any) -> dict[str, Any]:
    return {"rules": [{"name": name, "when": when, **(effect or {"deny": "no"})}]}


def test_country_rules_use_the_ip_and_the_declared_country() -> None:
    embargo = rule("embargo", {"country": ["KP", "IR"]},
                   deny="Access from {country} is not permitted.")
    decision, ex = judge(embargo, ip=KP)
    assert code(decision) == "access_denied" and "KP is not permitted" in decision.reason
    assert "policy rule: embargo" in decision.reason and decision.retry is False
    assert ex.annotations["policy"]["denied"]["rule"] == "rule:embargo"
    assert code(judge(embargo, ip=GB)[0]) == "allowed"
    assert code(judge(embargo, ip=GB, country="IR")[0]) == "access_denied"
    only_ip = rule("ip", {"ip_country": ["KP"]})
    assert code(judge(only_ip, ip=GB, country="KP")[0]) == "allowed"
    declared = rule("decl", {"declared_country": ["KP"]})
    assert code(judge(declared, ip=KP, country="DE")[0]) == "allowed"


def test_allow_lists_fail_closed_but_judge_private_addresses_by_declared_country() -> None:
    allow = rule("eu-only", {"country_not": ["DE", "FR", "GB"]})
    assert code(judge(allow, ip=GB, country="DE")[0]) == "allowed"
    assert code(judge(allow, ip=RU, country="DE")[0]) == "access_denied"
    assert code(judge(allow, ip=GB, country=None)[0]) == "access_denied"  # undeclared
    assert code(judge(allow, ip="10.1.2.3", country="FR")[0]) == "allowed"
    assert code(judge(allow, ip="10.1.2.3", country="US")[0]) == "access_denied"
    ip_allow = rule("ip-eu", {"ip_country_not": ["DE", "GB"]})
    assert code(judge(ip_allow, ip=RU)[0]) == "access_denied"
    assert code(judge(ip_allow, ip="192.168.0.9")[0]) == "allowed"


def test_network_rules_hosting_asn_cidr_and_anonymizers(tmp_path: Path) -> None:
    assert code(judge(rule("dc", {"hosting": True}), ip=DE_HOSTING)[0]) == "access_denied"
    assert code(judge(rule("dc", {"hosting": True}), ip=GB)[0]) == "allowed"
    assert code(judge(rule("asn", {"asn_name": ["hetzner"]}), ip=DE_HOSTING)[0]) != "allowed"
    assert code(judge(rule("net", {"networks": ["81.2.64.0/18"]}), ip=GB)[0]) != "allowed"
    assert code(judge(rule("net", {"networks": ["81.2.64.0/18"]}), ip=RU)[0]) == "allowed"
    (tmp_path / "tor.txt").write_text(
        "# Tor bulk exit list\nExitNode 0011BD2485AD45D984EC4159C88FC066E5E3300E\n"
        "Published 2026-03-01 10:00:00\nExitAddress 213.87.0.1 2026-03-01 10:22:18\n"
        "185.220.101.0/24\n")
    anon = {**rule("anon", {"anonymizer": True}),
            "networks": {"anonymizer_files": ["tor.txt"]}}
    assert code(judge(anon, ip=RU, base=tmp_path)[0]) == "access_denied"
    assert code(judge(anon, ip="185.220.101.77", base=tmp_path)[0]) == "access_denied"
    assert code(judge(anon, ip=GB, base=tmp_path)[0]) == "allowed"
    # an empty list (a download caught half-way) switched the rule off without a word
    for text in ("", "# Tor bulk exit list\nExitNode 0011BD2485AD45D984EC4159C88F\n"):
        (tmp_path / "tor.txt").write_text(text)
        with pytest.raises(ConfigError, match="tor.txt lists no address"):
            judge(anon, ip=RU, base=tmp_path)


def test_model_tier_and_require_tier_rules() -> None:
    gated = rule("frontier", {"model": ["demo-reasoner-*"]}, require_tier="verified")
    decision, _ = judge(gated, model="demo-reasoner-1", tier="standard")
    assert code(decision) == "tier_required" and "requires a verified account" in decision.reason
    assert code(judge(gated, model="demo-reasoner-1", tier="trusted")[0]) == "allowed"
    assert code(judge(gated, model="demo-chat-1", tier="standard")[0]) == "allowed"
    only_unverified = rule("u", {"tier": ["unverified"], "endpoint": ["/v1/chat/completions"]})
    assert code(judge(only_unverified, tier="unverified")[0]) == "access_denied"
    assert code(judge(only_unverified, tier="verified")[0]) == "allowed"
    # The first refusal wins; rules after it are not consulted.
    two = {"rules": [{"name": "a", "when": {"model": ["demo-*"]}, "deny": "first"},
                     {"name": "b", "when": {}, "deny": "second"}]}
    assert "first" in judge(two)[0].reason


def test_tier_models_and_reasoning_capability() -> None:
    policy = {"messages": {"verification_url": "https://v.example/verify"},
              "tiers": {"unverified": {"models": ["demo-chat-*"], "reasoning": "strip"},
                        "verified": {"reasoning": "summarise"}}}
    decision, _ = judge(policy, tier="unverified", model="demo-reasoner-1")
    assert code(decision) == "model_not_permitted"
    assert "https://v.example/verify" in decision.reason
    decision, ex = judge(policy, tier="unverified", model="demo-chat-2")
    assert isinstance(decision, Allowed)
    assert ex.annotations["degrade"] == {"reasoning": "strip", "fingerprint": False}
    _, ex = judge(policy, tier="verified", model="demo-reasoner-1")
    assert ex.annotations["degrade"]["reasoning"] == "summarise"
    _, ex = judge(policy, tier="trusted", model="demo-reasoner-1")
    assert "degrade" not in ex.annotations
    # a tier tier_order does not list (one only limits.tiers names) ranks lowest and has
    # the lowest tier's gates: it had none, every model open to it
    decision, ex = judge(policy, tier="free", model="demo-reasoner-1")
    assert code(decision) == "model_not_permitted"
    _, ex = judge(policy, tier="free", model="demo-chat-2")
    assert ex.annotations["degrade"]["reasoning"] == "strip"


def test_degrade_rules_accumulate_the_strictest() -> None:
    policy = {"rules": [
        {"name": "hosted", "when": {"hosting": True}, "degrade": {"reasoning": "summarise",
                                                                  "fingerprint": False}},
        {"name": "ru", "when": {"declared_country": ["RU"]}, "degrade": {"reasoning": "strip"}},
    ]}
    _, ex = judge(policy, ip=DE_HOSTING, country="RU")
    assert ex.annotations["degrade"] == {"reasoning": "strip", "fingerprint": True}
    assert ex.annotations["policy"]["degrade"] == ["rule:hosted", "rule:ru"]


def _action(kind: str, **kw: Any) -> Action:
    base = {"action_id": f"act_{kind}", "account_id": "acct_t", "action": kind,
            "reason": "r", "source": "verdicts", "caused_by": "campaign:c-1",
            "actor": "detection", "created_at": now_ts(), "expires_at": None}
    return Action(**{**base, **kw})


def test_action_ladder_in_the_check() -> None:
    decision, _ = judge({}, actions=[_action("suspend", expires_at="2999-01-01T00:00:00Z")])
    assert code(decision) == "account_suspended" and decision.retry is False
    assert "until 2999-01-01 00:00 UTC" in decision.reason and "act_suspend" in decision.reason
    # Of several suspensions, the message names the one that lasts longest: "until"
    # the shortest told a client suspended by hand without expiry when to come back.
    for order in (1, -1):
        suspensions = [_action("suspend", action_id="act_verdict",
                               expires_at="2999-01-01T00:00:00Z"),
                       _action("suspend", action_id="act_by_hand", source="analyst"),
                       _action("suspend", action_id="act_review", source="review",
                               expires_at="2999-06-01T00:00:00Z")][::order]
        decision, _ = judge({}, actions=suspensions)
        assert "suspended following" in decision.reason, decision.reason
        assert "act_by_hand" in decision.reason
        decision, _ = judge({}, actions=[a for a in suspensions if a.expires_at])
        assert "until 2999-06-01 00:00 UTC" in decision.reason, decision.reason
    # An expired suspension no longer applies, even before housekeeping marks it.
    expired = _action("suspend", expires_at="2000-01-01T00:00:00.000000Z")
    assert code(judge({}, actions=[expired])[0]) == "allowed"
    verify = [_action("require_verification")]
    assert code(judge({}, actions=verify, tier="standard")[0]) == "verification_required"
    assert code(judge({}, actions=verify, tier="verified")[0]) == "allowed"
    _, ex = judge({}, actions=[_action("degrade")], tier="trusted")
    assert ex.annotations["degrade"] == {"reasoning": "strip", "fingerprint": True}
    _, ex = judge({}, actions=[_action("flag")])
    assert ex.annotations["policy"]["flagged"] == "act_flag"


def test_validation_names_the_option(tmp_path: Path) -> None:
    cases = [
        ({"rules": [{"name": "a", "when": {"country": ["XXX"]}, "deny": "x"}]},
         "rules.0.when.country"),
        # two letters no country has were taken and never matched: "UK" for GB left the
        # United Kingdom out of a rule that named it
        ({"rules": [{"name": "a", "when": {"country": ["IR", "UK"]}, "deny": "x"}]},
         "'UK' is not an ISO 3166-1 alpha-2 country code (the United Kingdom is GB)"),
        ({"rules": [{"name": "a", "when": {"ip_country_not": ["EU"]}, "deny": "x"}]},
         "rules.0.when.ip_country_not"),
        ({"rules": [{"name": "a", "when": {"declared_country": ["QQ"]}, "deny": "x"}]},
         "no country has it"),
        ({"rules": [{"name": "a", "deny": "x", "require_tier": "verified"}]},
         "give exactly one of deny, require_tier or degrade"),
        ({"rules": [{"name": "a", "require_tier": "gold"}]}, "unknown tier 'gold'"),
        ({"tiers": {"gold": {}}}, "tiers.gold: not in tier_order"),
        ({"actions": {"default_expiry": "7 weeks"}}, "actions.default_expiry"),
        ({"verdicts": {"rules": [{"name": "r", "action": "review"}]}}, "needs 'propose'"),
        ({"verdicts": {"rules": [{"name": "r", "action": "ban"}]}}, "verdicts.rules.0.action"),
        ({"screening": {"lists": ["nope.csv"]}}, "screening.lists: cannot read"),
        ({"version": 2}, "version"),
        ({"rulez": []}, "rulez"),
        ({"networks": {"hosting_cidrs": ["10.0.0.0/8", "not-a-cidr"]}},
         "networks.hosting_cidrs: 'not-a-cidr' is not an IP address or network"),
    ]
    for doc, needle in cases:
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError) as err:
            load_policy(path)
        assert needle in str(err.value), (doc, str(err.value))
    (tmp_path / "p.yaml").write_text("rules: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(tmp_path / "p.yaml")


def test_durations_and_network_sets() -> None:
    assert parse_duration("45s") == 45 and parse_duration("2h") == 7200
    assert parse_duration("7d") == 604_800 and parse_duration(90) == 90
    assert parse_duration("never") is None and parse_duration(None) is None
    for bad in ("0s", "soon", -1):
        with pytest.raises(ValueError):
            parse_duration(bad)
    nets = NetworkSet(["10.0.0.0/8", "10.1.0.0/16", "192.0.2.7", "2001:db8::/32"])
    assert "10.200.3.4" in nets and "192.0.2.7" in nets and "192.0.2.8" not in nets
    assert "2001:db8::1" in nets and "2001:db9::1" not in nets and "junk" not in nets
    assert nets.size == 3


def test_denials_are_counted_per_account_rule_and_code() -> None:
    agg = DenialAggregator(max_groups=2)
    for _ in range(3):
        agg.note(account_id="a", rule="rule:x", code="access_denied", reason="r",
                 model="m1", client_ip="1.2.3.4")
    agg.note(account_id="b", rule="rule:x", code="access_denied", reason="r", model="m2",
             client_ip=None)
    agg.note(account_id="c", rule="rule:y", code="access_denied", reason="r", model=None,
             client_ip=None)
    events = {e.subject: e for e in agg.drain()}
    assert events["account:a"].count == 3 and events["account:a"].detail["models"] == ["m1"]
    assert events["account:-"].detail["rule"] == "overflow"   # bounded memory
    assert len(agg) == 0


def test_several_throttles_hold_an_account_to_the_tightest_of_each_limit(
        tmp_path: Path) -> None:
    """An account under two throttles at once (one from verdicts with the policy's limits,
    one from an analyst with limits of their own) was held to whichever its replica
    listed first: the order the actions were read in."""
    from distillguard.config import LimitSet
    from distillguard.policy.limits import PolicyLimiter, tightest
    from distillguard.ratelimit import MemoryCounterStore
    from tests.factories import make_settings

    compiled = compile_policy(parse_document(
        {"actions": {"throttle": {"limits": {"requests_per_minute": 2,
                                             "tokens_per_minute": 50_000}}}}))
    verdicts = _action("throttle", action_id="act_v")
    analyst = _action("throttle", action_id="act_a", source="analyst",
                      detail={"limits": {"requests_per_minute": 10, "tokens_per_minute": 900,
                                         "tokens_per_day": 5000}})
    account = Account(account_id="acct_t")
    principal = Principal(account, ApiKey("key_000000000001", "acct_t", "h"))
    seen = []
    for order in ([verdicts, analyst], [analyst, verdicts]):
        active = ActiveActions()
        for item in order:
            active.apply(item)
        limiter = PolicyLimiter(make_settings(tmp_path), MemoryCounterStore(),
                                PolicyHolder(None, compiled), active, DenialAggregator())
        seen.append({scope: dict(limits) for scope, _, limits in
                     limiter._limit_sets(principal)})
    assert seen[0] == seen[1]
    assert seen[0]["throttle"] == {"requests_per_minute": 2, "tokens_per_minute": 900,
                                   "tokens_per_day": 5000}
    assert tightest([LimitSet(), LimitSet()]) == dict(LimitSet().model_dump())


@pytest.mark.parametrize("address", [
    "2002:af2d:b001::1",                        # 6to4 of 175.45.176.1
    "2001:0:4136:e378:8000:63bf:50d2:4ffe",     # Teredo, client 175.45.176.1 inverted
    "64:ff9b::175.45.176.1",                    # NAT64 / SIIT well-known prefix
])
def test_ipv6_transition_addresses_are_judged_by_the_ipv4_they_carry(address: str) -> None:
    """6to4, Teredo and NAT64 addresses carry the client's IPv4 address: looked up as
    written they had no country (Teredo even counted as private), so a client from an
    embargoed country that declared another one passed the embargo."""
    embargo = rule("embargo", {"country": ["KP"]})
    assert code(judge(embargo, ip=address, country="DE")[0]) == "access_denied"
    assert code(judge(rule("eu", {"ip_country_not": ["DE", "GB"]}), ip=address)[0]) \
        == "access_denied"
    assert code(judge(rule("net", {"networks": ["175.45.176.0/22"]}), ip=address)[0]) \
        == "access_denied"
    anon = {**rule("anon", {"anonymizer": True}),
            "networks": {"anonymizer_cidrs": ["175.45.176.1/32"]}}
    assert code(judge(anon, ip=address)[0]) == "access_denied"
    # a rule on the address as written still matches it
    assert code(judge(rule("v6", {"networks": [address + "/128"]}), ip=address)[0]) \
        == "access_denied"


def test_a_reload_with_a_bad_hosting_network_keeps_the_running_policy(tmp_path: Path) -> None:
    """Hosting networks were parsed only when the database opened: a bad one passed
    validation, and a reload failed with a ValueError the caller did not report."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(rule("embargo", {"country": ["KP"]})))
    holder = PolicyHolder(path)
    running = holder.current
    path.write_text(yaml.safe_dump({"networks": {"hosting_cidrs": ["not-a-cidr"]}}))
    with pytest.raises(ConfigError, match="hosting_cidrs"):
        holder.reload()
    assert holder.current is running and holder.generation == 1


def test_an_empty_policy_file_is_refused_and_a_reload_keeps_the_rules(tmp_path: Path) -> None:
    """A file caught empty while it was being written again was read as the defaults:
    a reload at that moment dropped every rule, the embargo included."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(rule("embargo", {"country": ["KP"]})))
    holder = PolicyHolder(path)
    for empty in ("", "# being rewritten\n"):
        path.write_text(empty)
        with pytest.raises(ConfigError, match="is empty"):
            holder.reload()
        assert [r.name for r in holder.current.rules] == ["embargo"]
    path.write_text("version: 1\n")
    assert holder.reload().rules == ()


def test_a_rule_can_refuse_addresses_the_database_cannot_place() -> None:
    """A public address the geo-IP database cannot place passes a deny-list of
    countries (it is in none of them); ip_country_unknown names such addresses, so an
    export rule can refuse them too. Private addresses and placed ones are not unknown."""
    from distillguard.geoip import NetworkInfo
    from distillguard.policy.jurisdiction import CompiledRule, RequestFacts
    from distillguard.policy.networks import ClientNetwork

    doc = parse_document({"rules": [{"name": "unplaced", "when": {"ip_country_unknown": True},
                                     "deny": "We cannot tell where you are."}]})
    (rule,) = [CompiledRule.build(r, {}) for r in doc.rules]

    def facts(info: NetworkInfo) -> RequestFacts:
        return RequestFacts(model="m", endpoint="/v1/chat/completions", tier="standard",
                            tier_rank=1, declared_country="DE",
                            network=ClientNetwork(info, anonymizer=False))

    assert rule.matches(facts(NetworkInfo(ip="198.18.0.1")))          # public, unplaced
    assert not rule.matches(facts(NetworkInfo(ip="81.2.69.142", country="GB")))
    assert not rule.matches(facts(NetworkInfo(ip="10.0.0.1", private=True)))
    placed = parse_document({"rules": [{"name": "p", "when": {"ip_country_unknown": False},
                                        "deny": "x"}]})
    assert CompiledRule.build(placed.rules[0], {}).matches(
        facts(NetworkInfo(ip="81.2.69.142", country="GB")))
