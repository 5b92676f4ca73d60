"""MaxMind ``.mmdb`` databases behind GeoIPDatabase, on small files built with mmdb-writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from distillguard.geoip import GeoIP, Geoip2FastDatabase, MaxMindDatabase
from distillguard.policy.compiled import load_policy
from distillguard.policy.jurisdiction import RequestFacts, evaluate


def _write(path: Path, kind: str, networks: dict[str, dict]) -> str:  # type: ignore[type-arg]
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=kind)
    for cidr, record in networks.items():
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(path))
    return str(path)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("mmdb")
    return {
        "country": _write(folder / "country.mmdb", "GeoIP2-Country", {
            "81.2.69.0/24": {"country": {"iso_code": "GB", "names": {"en": "United Kingdom"}}},
            "203.0.114.0/24": {"country": {"iso_code": "IR", "names": {"en": "Iran"}}},
        }),
        "asn": _write(folder / "asn.mmdb", "GeoLite2-ASN", {
            "203.0.114.0/24": {"autonomous_system_number": 64500,
                               "autonomous_system_organization": "Example VPS Hosting"},
        }),
        "anonymous": _write(folder / "anon.mmdb", "GeoIP2-Anonymous-IP", {
            "203.0.114.128/25": {"is_anonymous": True, "is_anonymous_vpn": True},
        }),
    }


def test_reader_answers_country_asn_and_anonymity(dbs: dict[str, str]) -> None:
    db = MaxMindDatabase(dbs["country"], asn_path=dbs["asn"], anonymous_path=dbs["anonymous"])
    assert db.country("81.2.69.142") == "GB" and db.country("203.0.114.9") == "IR"
    assert db.country("8.8.8.8") is None            # not in this file
    assert db.asn("203.0.114.9") == ("Example VPS Hosting", "203.0.114.0/24")
    assert db.asn("81.2.69.142") == (None, None)
    assert db.anonymous("203.0.114.200") is True and db.anonymous("203.0.114.9") is False
    assert db.country("not an ip") is None
    info = GeoIP(db).lookup("203.0.114.9")
    assert info.country == "IR" and info.hosting is True   # "hosting" in the AS name
    db.close()


def test_fallback_answers_what_the_files_do_not() -> None:
    db = MaxMindDatabase(None, fallback=Geoip2FastDatabase())
    assert db.country("175.45.176.1") == "KP"
    assert db.asn("5.9.1.1")[0] == "Hetzner Online GmbH"
    assert db.anonymous("5.9.1.1") is None


def test_policy_file_plugs_in_maxmind(dbs: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({
        "networks": {"maxmind_country_db": dbs["country"], "maxmind_asn_db": dbs["asn"],
                     "maxmind_anonymous_db": dbs["anonymous"]},
        "rules": [{"name": "vpn", "when": {"anonymizer": True}, "deny": "No VPNs."},
                  {"name": "iran", "when": {"ip_country": ["IR"]}, "deny": "No."}]}))
    policy = load_policy(path)

    def decide(ip: str) -> str | None:
        facts = RequestFacts(model="m", endpoint="/v1/chat/completions", tier="standard",
                             tier_rank=1, declared_country=None,
                             network=policy.networks.lookup(ip))
        rule = evaluate(policy.rules, facts).denied_by
        return rule.name if rule else None

    assert decide("203.0.114.200") == "vpn"
    assert decide("203.0.114.9") == "iran"
    assert decide("81.2.69.142") is None
    assert decide("175.45.176.1") is None    # KP through the fallback; no rule for it
    assert policy.networks.lookup("175.45.176.1").info.country == "KP"
    path.write_text(yaml.safe_dump({"networks": {"maxmind_country_db": "missing.mmdb"}}))
    with pytest.raises(Exception, match="missing.mmdb does not exist"):
        load_policy(path)
