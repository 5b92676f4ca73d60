"""The traffic simulator: formats, ground truth, reproducibility."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.geoip import client_prefix, default_geoip
from distillguard.simulate import simulate
from distillguard.simulate.presets import ALL_TUNE
from distillguard.traceio import iter_jsonl, read_accounts, read_trace

LABEL_KEYS = {"account_id", "campaign_id", "campaign_type", "population", "hard_negative"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return simulate(tmp_path_factory.mktemp("smoke"), preset="smoke", seed=7)


def _labels(path: Path) -> dict[str, dict[str, object]]:
    return {rec["account_id"]: rec for _, rec in iter_jsonl(path)}


def test_smoke_writes_three_files_in_the_public_formats(smoke: tuple[Path, Path, Path]) -> None:
    trace, accounts, labels = smoke
    assert [p.name for p in smoke] == ["trace.jsonl", "accounts.jsonl", "labels.jsonl"]
    account_ids = {a.account_id for a in read_accounts(accounts)}
    lab = _labels(labels)
    assert set(lab) == account_ids
    for rec in lab.values():
        assert set(rec) == LABEL_KEYS
        assert isinstance(rec["hard_negative"], bool)
        assert (rec["campaign_id"] is None) == (rec["campaign_type"] is None)
    exchanges = list(read_trace(trace))
    assert len(exchanges) > 500
    assert {ex.account_id for ex in exchanges} <= account_ids
    times = [ex.ts for ex in exchanges]
    assert times == sorted(times)
    ex = exchanges[0]
    assert ex.status == 200 and ex.usage is not None and ex.usage.completion_tokens > 0
    assert ex.request["messages"][-1]["role"] == "user"
    assert ex.response_text()
    assert len({ex.id for ex in exchanges}) == len(exchanges)
    # chat front-ends stream; the trace holds the reassembled completion with its usage
    streamed = [ex for ex in exchanges if ex.stream]
    assert streamed and all(ex.usage and ex.response_text() for ex in streamed)


def test_smoke_covers_every_population_and_campaign_type(
        smoke: tuple[Path, Path, Path]) -> None:
    lab = _labels(smoke[2])
    types = {r["campaign_type"] for r in lab.values() if r["campaign_type"]}
    assert types == set(ALL_TUNE)
    pops = Counter(r["population"] for r in lab.values())
    assert {"casual", "saas", "eval_runner", "company", "attack"} == set(pops)
    hard = {r["population"] for r in lab.values() if r["hard_negative"]}
    assert hard == {"saas", "eval_runner", "company"}
    sent = Counter(ex.account_id for ex in read_trace(smoke[0]))
    by_type: dict[str, int] = defaultdict(int)
    for acct, count in sent.items():
        by_type[str(lab[acct]["campaign_type"] or lab[acct]["population"])] += count
    assert all(by_type[t] > 0 for t in (*ALL_TUNE, "casual", "saas", "eval_runner"))


def test_addresses_are_classified_by_geoip_as_intended(smoke: tuple[Path, Path, Path]) -> None:
    lab = _labels(smoke[2])
    geo = default_geoip()
    hosting: dict[str, set[bool]] = defaultdict(set)
    for ex in read_trace(smoke[0]):
        rec = lab[str(ex.account_id)]
        hosting[str(rec["campaign_type"] or rec["population"])].add(
            geo.lookup(str(ex.client_ip)).hosting)
    for kind in ("hydra", "heavy_single", "saas", "eval_runner", "rubric_grading"):
        assert hosting[kind] == {True}, kind
    for kind in ("casual", "company", "slow_low"):
        assert hosting[kind] == {False}, kind


def test_same_seed_same_bytes_other_seed_differs_any_worker_count(tmp_path: Path) -> None:
    a = simulate(tmp_path / "a", preset="smoke", seed=1, days=0.25)
    b = simulate(tmp_path / "b", preset="smoke", seed=1, days=0.25)
    c = simulate(tmp_path / "c", preset="smoke", seed=2, days=0.25)
    d = simulate(tmp_path / "d", preset="smoke", seed=1, days=0.25, workers=3)
    for x, y, z in zip(a, b, d, strict=True):
        assert x.read_bytes() == y.read_bytes() == z.read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()
    assert not list((tmp_path / "d").glob(".*part*"))


def test_cli_simulate(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["simulate", "--out", str(tmp_path), "--preset", "smoke",
                                       "--seed", "4", "--days", "0.2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "exchanges" in result.output
    assert (tmp_path / "labels.jsonl").exists()
    for option, value in (("--scale", "0"), ("--scale", "nan"), ("--days", "nan"),
                          ("--days", "inf")):
        bad = CliRunner().invoke(main, ["simulate", "--out", str(tmp_path / "bad"), option,
                                        value])
        assert bad.exit_code != 0
        assert f"{option} must be a positive number" in bad.output, bad.output
    # a span whose end no timestamp can write said "year 1021077 is out of range"
    bad = CliRunner().invoke(main, ["simulate", "--out", str(tmp_path / "bad"), "--days",
                                    "1e9"])
    assert bad.exit_code == 2 and "--days must be at most 3653 (ten years)" in bad.output


def test_account_records_and_networks_overlap_between_honest_and_attack(
        tmp_path: Path) -> None:
    """What an account record or an address says does not give the population away: some
    campaign accounts are aged and name an organisation (one for the campaign, or one
    each), some honest organisations are new or left the field blank, and strangers
    share carrier NAT, VPN and residential-proxy /24s."""
    from datetime import datetime

    trace, accounts, labels = simulate(tmp_path, preset="heldout", seed=3, days=0.5)
    lab = _labels(labels)
    records = {a.account_id: a for a in read_accounts(accounts)}
    start = datetime.fromisoformat("2026-03-02T00:00:00+00:00")

    def age(aid: str) -> float:
        created = records[aid].created_at
        assert created is not None
        return (start - created).total_seconds() / 86_400

    attack = [a for a, r in lab.items() if r["population"] == "attack"]
    hard = [a for a, r in lab.items() if r["hard_negative"]]
    aged = sum(age(a) > 30 for a in attack) / len(attack)
    assert 0.1 < aged < 0.9
    orgs: dict[object, set[str | None]] = defaultdict(set)
    for a in attack:
        orgs[lab[a]["campaign_id"]].add(records[a].org)
    sizes = {c: sum(lab[a]["campaign_id"] == c for a in attack) for c in orgs}
    assert any(len(o) == 1 and None not in o and sizes[c] > 2 for c, o in orgs.items())
    assert any(len(o) == sizes[c] > 2 and None not in o for c, o in orgs.items())
    assert any(o == {None} for o in orgs.values())
    assert any(age(a) < 14 for a in hard) and any(age(a) > 30 for a in hard)
    assert any(records[a].org is None for a in hard) and any(records[a].org for a in hard)

    users: dict[str, set[str]] = defaultdict(set)
    for ex in read_trace(trace):
        users[ex.client_ip.rsplit(".", 1)[0]].add(ex.account_id)
    casual_shared = [s for s in users.values()
                     if sum(lab[a]["population"] == "casual" for a in s) >= 3]
    assert casual_shared, "no carrier or VPN /24 shared by consumers"
    assert any(any(lab[a]["campaign_type"] == "tool_harvest" for a in s)
               and any(lab[a]["population"] == "casual" for a in s) for s in users.values())
    hosting = [default_geoip().lookup(f"{s}.1").hosting for s, accts in users.items()
               if sum(lab[a]["population"] == "casual" for a in accts) >= 3]
    assert any(hosting) and not all(hosting)     # a VPN's exits, and carrier NAT


def test_every_second_hydra_operator_sends_through_residential_proxies(tmp_path: Path) -> None:
    """Of two ``hydra`` operators, the first sends from its datacenter ranges and the second
    through a residential proxy network, each request from another exit: the calibration
    world then holds the proxy pools the public record's clusters used."""
    trace, _, labels = simulate(tmp_path, preset="smoke", seed=7, scale=2.0)
    lab = _labels(labels)
    geo = default_geoip()
    hosting: dict[str, set[bool]] = defaultdict(set)
    prefixes: dict[str, set[str]] = defaultdict(set)
    operator: dict[str, str] = {}
    for ex in read_trace(trace):
        rec = lab[str(ex.account_id)]
        if rec["campaign_type"] != "hydra":
            continue
        operator[str(ex.account_id)] = str(rec["campaign_id"])
        hosting[str(rec["campaign_id"])].add(geo.lookup(str(ex.client_ip)).hosting)
        prefixes[str(ex.account_id)].add(str(client_prefix(str(ex.client_ip))))
    assert sorted(map(sorted, hosting.values())) == [[False], [True]]
    proxied = next(c for c, seen in hosting.items() if seen == {False})
    spread = sorted(len(p) for a, p in prefixes.items() if operator[a] == proxied)
    others = sorted(len(p) for a, p in prefixes.items() if operator[a] != proxied)
    assert spread[len(spread) // 2] >= 10 and others[-1] <= 4


def test_a_few_consumers_travel_and_send_from_many_networks(tmp_path: Path) -> None:
    """Some honest consumers send most of their sessions from hotels, cafés and offices:
    more client /24s than a home line and a phone give (at most four), so that an account
    spread over many networks is not a campaign's mark alone."""
    trace, _, labels = simulate(tmp_path, preset="tune", seed=7, days=2.0)
    lab = _labels(labels)
    prefixes: dict[str, set[str]] = defaultdict(set)
    for ex in read_trace(trace):
        if lab[str(ex.account_id)]["population"] == "casual":
            prefixes[str(ex.account_id)].add(str(client_prefix(str(ex.client_ip))))
    assert sum(len(p) >= 5 for p in prefixes.values()) >= 3
