"""STIX 2.1 export: contents, pseudonymisation per partner, inputs from files and state."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import stix2
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.errors import ConfigError
from distillguard.geoip import default_geoip
from distillguard.sharing.export import BundleBuilder, pattern_for
from distillguard.sharing.inputs import ExportInputError, collect_from_files, collect_from_state
from distillguard.sharing.pseudonym import salted_hash
from distillguard.sharing.settings import parse_sharing_settings
from distillguard.sharing.template import template_fingerprint
from distillguard.sharing.validate import parse_bundle
from distillguard.store import open_state_store
from tests import sharingworld as world


def _export(tmp_path: Path, partner: str = "acme", **changes: Any) -> dict[str, Any]:
    paths = world.write_world(tmp_path)
    options = parse_sharing_settings(world.sharing_section(**changes))
    evidence = collect_from_files(paths["verdicts"], paths["trace"], paths["accounts"],
                                  campaigns=None, min_risk=0.9, geoip=default_geoip())
    bundle, _ = BundleBuilder(options, partner).build(evidence)
    return dict(json.loads(bundle.serialize()))


def _by_type(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [o for o in bundle["objects"] if o["type"] == kind]


def test_bundle_has_every_part_and_parses_with_stix2(tmp_path: Path) -> None:
    bundle = _export(tmp_path)
    parsed = stix2.parse(bundle, allow_custom=True)
    assert parsed.type == "bundle"
    parse_bundle(json.dumps(bundle).encode(), max_bytes=10_000_000)  # our own validator
    (campaign,) = _by_type(bundle, "campaign")
    assert campaign["x_distillguard_campaign_id"] == "c-7"  # c-8 is below min_risk
    assert campaign["first_seen"].startswith("2026-03-01T12:00:00")
    kinds = {i["x_distillguard_kind"]: i for i in _by_type(bundle, "indicator")}
    assert set(kinds) == {"ip", "asn", "user_agent", "template", "payment"}
    assert kinds["ip"]["pattern"] == "[ipv4-addr:value ISSUBSET '5.9.10.0/24']"
    assert kinds["asn"]["pattern"] == "[autonomous-system:name = 'Hetzner Online GmbH']"
    assert world.CAMPAIGN_UA in kinds["user_agent"]["pattern"]
    fp = template_fingerprint({"messages": [{"role": "user",
                                             "content": world.TEMPLATE + "anything 12"}]})
    assert kinds["template"]["pattern"] == pattern_for("template", str(fp))
    salt = kinds["payment"]["x_distillguard_salt"]
    assert salted_hash(salt, world.CAMPAIGN_PF) in kinds["payment"]["pattern"]
    assert kinds["ip"]["x_distillguard_campaign_exchanges"] == 120
    (observed,) = _by_type(bundle, "observed-data")
    assert observed["number_observed"] == 120
    assert len(_by_type(bundle, "infrastructure")) == 1
    (sighting,) = _by_type(bundle, "sighting")
    assert sighting["sighting_of_ref"] == campaign["id"] and sighting["count"] == 120
    rels = {(r["relationship_type"], r["target_ref"].split("--")[0])
            for r in _by_type(bundle, "relationship")}
    assert {("indicates", "campaign"), ("uses", "infrastructure"),
            ("consists-of", "observed-data"), ("indicates", "infrastructure")} <= rels
    tlp = stix2.TLP_AMBER.id
    assert all(tlp in o.get("object_marking_refs", [tlp]) for o in bundle["objects"]
               if o["type"] not in ("ipv4-addr", "user-account", "marking-definition"))


def test_values_shared_with_ordinary_users_do_not_leave(tmp_path: Path) -> None:
    bundle = _export(tmp_path)
    text = json.dumps(bundle)
    assert world.COMMON_UA not in text  # also used by ordinary customers
    assert "81.2.69" not in text


def test_nothing_personal_leaves_and_pseudonyms_differ_per_partner(tmp_path: Path) -> None:
    acme = _export(tmp_path, "acme")
    globex = _export(tmp_path, "globex")
    for bundle in (acme, globex):
        text = json.dumps(bundle)
        for secret in [*world.CAMPAIGN, *world.LEGIT, world.CAMPAIGN_PF, "Shell Co", "5.9.10.11"]:
            assert secret not in text, secret
    users_a = {o["user_id"] for o in _by_type(acme, "user-account")}
    users_g = {o["user_id"] for o in _by_type(globex, "user-account")}
    assert len(users_a) == 6 and not users_a & users_g
    evidence = _by_type(acme, "campaign")[0]["x_distillguard_evidence"][0]
    assert evidence.startswith("acct-") and "share a card ([redacted], org [redacted])" \
        " from 5.9.10.0/24" in evidence
    assert _export(tmp_path, "acme") and users_a == {
        o["user_id"] for o in _by_type(_export(tmp_path, "acme"), "user-account")}


def test_same_partner_gets_new_versions_of_the_same_objects(tmp_path: Path) -> None:
    first, second = _export(tmp_path), _export(tmp_path)
    ids = lambda b: {o["id"] for o in b["objects"] if o["type"] != "indicator"}  # noqa: E731
    assert ids(first) == ids(second)
    c1, c2 = _by_type(first, "campaign")[0], _by_type(second, "campaign")[0]
    assert c1["created"] == c2["created"] and c2["modified"] >= c1["modified"]


def test_pseudonymisation_can_be_switched_off_per_partner(tmp_path: Path) -> None:
    bundle = _export(tmp_path, "initech")
    assert {o["user_id"] for o in _by_type(bundle, "user-account")} == set(world.CAMPAIGN)


def test_exact_addresses_only_when_configured(tmp_path: Path) -> None:
    bundle = _export(tmp_path, share_exact_ips=True)
    values = {o["value"] for o in _by_type(bundle, "ipv4-addr")}
    assert "5.9.10.11" in values and "5.9.10.0/24" not in values


def test_missing_key_and_unknown_campaign_are_clear_errors(tmp_path: Path) -> None:
    options = parse_sharing_settings(world.sharing_section(pseudonym_key=None,
                                                           pseudonym_key_env="DG_NO_SUCH"))
    with pytest.raises(ConfigError, match="pseudonymisation key"):
        BundleBuilder(options, "acme")
    with pytest.raises(ConfigError, match="unknown partner"):
        BundleBuilder(options, "nobody")
    paths = world.write_world(tmp_path)
    with pytest.raises(ExportInputError, match="unknown campaign"):
        collect_from_files(paths["verdicts"], paths["trace"], None, campaigns=["c-99"],
                           min_risk=0.9, geoip=None)


def test_cli_export_from_files(tmp_path: Path) -> None:
    paths = world.write_world(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"state": {"url": f"sqlite:///{tmp_path}/s.sqlite"},
                                  "sharing": world.sharing_section()}))
    out = tmp_path / "bundle.json"
    result = CliRunner().invoke(main, [
        "--config", str(config), "share", "export", "--verdicts", str(paths["verdicts"]),
        "--trace", str(paths["trace"]), "--accounts", str(paths["accounts"]),
        "--partner", "acme", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "pseudonymised" in result.output
    assert parse_bundle(out.read_bytes(), max_bytes=10**7).objects
    bad = CliRunner().invoke(main, ["--config", str(config), "share", "export",
                                    "--partner", "nobody", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown partner 'nobody'" in bad.output


def test_export_from_the_running_systems_state(tmp_path: Path) -> None:
    """Campaigns from detection's tables, accounts from the state store."""
    from sqlalchemy import text

    async def go() -> Any:
        store = open_state_store(f"sqlite:///{tmp_path}/state.sqlite")
        await store.migrate()
        await store.import_accounts(world.accounts())
        engine = store.engine  # type: ignore[attr-defined]
        async with engine.begin() as conn:
            await conn.execute(text(
                "CREATE TABLE campaigns (campaign_id TEXT PRIMARY KEY, risk REAL,"
                " detected_at TEXT, evidence TEXT, status TEXT)"))
            await conn.execute(text(
                "CREATE TABLE account_verdicts (account_id TEXT, risk REAL, flagged INTEGER,"
                " campaign_id TEXT)"))
            await conn.execute(text(
                "INSERT INTO campaigns VALUES ('c-7', 0.7, '2026-03-01T12:20:00Z',"
                " '[\"shared card\"]', 'confirmed'), ('c-9', 0.99, NULL, '[]', 'dismissed')"))
            for a in world.CAMPAIGN:
                await conn.execute(text(
                    "INSERT INTO account_verdicts VALUES (:a, 0.9, 1, 'c-7')"), {"a": a})
        paths = world.write_world(tmp_path)
        from distillguard.dashboard.index import create_schema

        await create_schema(engine)  # the dashboard's exchange index of the gateway
        async with engine.begin() as conn:
            for n, line in enumerate(world.trace_lines()):
                await conn.execute(text(
                    "INSERT INTO dashboard_exchanges (exchange_id, ts, account_id, client_ip,"
                    " status) VALUES (:i, :t, :a, :ip, 200)"),
                    {"i": f"ex_{n}", "t": line["ts"], "a": line["account_id"],
                     "ip": line["client_ip"]})
        try:
            with_trace = await collect_from_state(store, trace=paths["trace"], campaigns=None,
                                                  min_risk=0.9, geoip=default_geoip())
            indexed = await collect_from_state(store, trace=None, campaigns=None,
                                               min_risk=0.9, geoip=default_geoip())
            return with_trace, indexed
        finally:
            await store.close()

    (evidence,), (indexed,) = asyncio.run(go())  # confirmed c-7 despite its risk; not c-9
    assert evidence.campaign_id == "c-7" and evidence.exchanges == 120
    assert set(evidence.verdict.accounts) == set(world.CAMPAIGN)
    assert world.CAMPAIGN_PF in evidence.payment
    # Without a trace: networks and times from the index, no user agents or templates.
    assert indexed.exchanges == 120 and indexed.first_seen == evidence.first_seen
    assert set(indexed.features["ip"]) == {"5.9.10.0/24"}
    assert not indexed.features["user_agent"] and not indexed.features["template"]
    # The same through the command line, on the same state store.
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"state": {"url": f"sqlite:///{tmp_path}/state.sqlite"},
                                  "sharing": world.sharing_section()}))
    out = tmp_path / "state-bundle.json"
    result = CliRunner().invoke(main, ["--config", str(config), "share", "export",
                                       "--partner", "acme", "--out", str(out)])
    assert result.exit_code == 0, result.output
    kinds = {o.get("x_distillguard_kind") for o in json.loads(out.read_text())["objects"]}
    assert {"ip", "asn", "payment"} <= kinds and "user_agent" not in kinds


def test_template_fingerprint_follows_its_definition() -> None:
    import hashlib
    import re

    def reference(system: str, user: str) -> str:  # docs/sharing.md, "tfp1", literally
        norm = lambda t: re.sub(r"[0-9]+", "0", " ".join(t.lower().split()))  # noqa: E731
        lead = " ".join(norm(user).split(" ")[:8])
        return "tfp1:" + hashlib.sha256(f"{norm(system)}\0{lead}".encode()).hexdigest()[:16]

    cases = [("", "Solve 12 + 30 step by step, then explain"),
             ("You are a TUTOR.\n\n", "  word " + " " * 900 + "two three 4 5 6 7 8 9 10"),
             ("sys", "x" * 2000 + " tail words here"),
             ("", "short"), ("", "1 2 3 4 5 6 7 8 9 10 11"), (" A\tB ", "a\u00a0b 7x 8")]
    for system, user in cases:
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": user}]}
        assert template_fingerprint(body) == reference(system, user), (system, user[:20])
    same = [template_fingerprint({"messages": [{"role": "user", "content":
                                                world.TEMPLATE + f"problem {n} of {n * 3}"}]})
            for n in range(5)]
    assert len(set(same)) == 1
    assert template_fingerprint({"prompt": "abc"}) == reference("", "abc")
    assert template_fingerprint({"messages": []}) is None


@pytest.mark.parametrize(("partner", "changes"), [
    ("acme", {}), ("acme", {"share_exact_ips": True}), ("initech", {})],
    ids=["default", "exact-ips", "not-pseudonymised"])
def test_bundle_passes_the_oasis_stix_validator(tmp_path: Path, partner: str,
                                                changes: dict[str, Any]) -> None:
    """The OASIS validator finds no error (its warnings remain: custom properties
    rather than extension definitions, and ids that are UUIDv5, derived from content, so
    a re-export updates the same objects)."""
    from stix2validator import ValidationOptions, validate_instance

    bundle = _export(tmp_path, partner, **changes)
    result = validate_instance(bundle, ValidationOptions(version="2.1"))
    assert result.is_valid, [str(e) for e in result.errors]
    for indicator in _by_type(bundle, "indicator"):
        assert indicator["description"].endswith("were the campaign's.")
        assert str(indicator["x_distillguard_campaign_exchanges"]) in (
            indicator["description"].replace(",", ""))
