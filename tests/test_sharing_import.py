"""Importing partner bundles: validation, provenance, indicators with expiry, all or nothing."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from distillguard.cli import main
from distillguard.geoip import default_geoip
from distillguard.sharing.export import BundleBuilder
from distillguard.sharing.indicators import indicator_inputs
from distillguard.sharing.inputs import collect_from_files
from distillguard.sharing.settings import parse_sharing_settings
from distillguard.sharing.store import SharingStore, create_schema
from distillguard.sharing.validate import BundleError, parse_bundle
from distillguard.store import open_state_store
from tests import sharingworld as world

TABLES = ("sharing_bundles", "sharing_objects", "sharing_indicators")


def _bundle(tmp_path: Path) -> dict[str, Any]:
    paths = world.write_world(tmp_path)
    options = parse_sharing_settings(world.sharing_section())
    evidence = collect_from_files(paths["verdicts"], paths["trace"], paths["accounts"],
                                  campaigns=None, min_risk=0.9, geoip=default_geoip())
    bundle, _ = BundleBuilder(options, "acme").build(evidence)
    return dict(json.loads(bundle.serialize()))


def _config(tmp_path: Path, url: str | None = None) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "state": {"url": url or f"sqlite:///{tmp_path}/state.sqlite"},
        "sharing": world.sharing_section(max_bundle_bytes=200_000)}))
    return config


def _cli(config: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--config", str(config), "share", *args])


def _counts(url: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        store = open_state_store(url)
        try:
            await create_schema(store.engine)  # type: ignore[attr-defined]
            async with store.engine.connect() as conn:  # type: ignore[attr-defined]
                return {t: int((await conn.execute(text(f"SELECT COUNT(*) FROM {t}")))
                               .scalar_one()) for t in TABLES}
        finally:
            await store.close()
    return asyncio.run(go())


def _import_and_check(tmp_path: Path, url: str) -> None:
    config = _config(tmp_path, url)
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(_bundle(tmp_path)))
    result = _cli(config, "import", str(path), "--partner", "globex")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["active"] == {"ip": 1, "asn": 1, "user_agent": 1, "template": 1,
                                 "payment": 1}
    assert summary["duplicate"] is False
    rows = [json.loads(line) for line in _cli(config, "indicators").output.splitlines()]
    assert {r["kind"] for r in rows} == {"ip", "asn", "user_agent", "template", "payment"}
    assert all(r["partner"] == "globex" for r in rows)
    assert {r["value"] for r in rows if r["kind"] == "asn"} == {"hetzner online gmbh"}
    (bundle,) = [json.loads(line) for line in _cli(config, "bundles").output.splitlines()]
    assert bundle["partner"] == "globex" and bundle["bundle_id"] == summary["bundle_id"]
    assert bundle["source"].startswith("file:") and len(bundle["sha256"]) == 64
    again = json.loads(_cli(config, "import", str(path), "--partner", "globex").output)
    assert again["duplicate"] is True
    assert _counts(url)["sharing_bundles"] == 1
    # Other contents under an id already imported were called a duplicate, and dropped.
    changed = json.loads(path.read_text())
    changed["objects"] = [o for o in changed["objects"] if o["type"] != "indicator"]
    path.write_text(json.dumps(changed))
    refused = _cli(config, "import", str(path), "--partner", "globex")
    assert refused.exit_code != 0
    assert (f"refused, nothing imported: bundle {summary['bundle_id']} was imported from "
            "globex at ") in refused.output
    assert "with other contents" in refused.output and "Traceback" not in refused.output
    assert _counts(url)["sharing_bundles"] == 1


def test_import_keeps_provenance_and_activates_indicators(tmp_path: Path) -> None:
    _import_and_check(tmp_path, f"sqlite:///{tmp_path}/state.sqlite")


@pytest.mark.postgres
def test_import_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    _import_and_check(tmp_path, pg_url)


def _bad_bundles(good: dict[str, Any]) -> dict[str, tuple[bytes, str]]:
    def variant(change: Any) -> bytes:
        copy = json.loads(json.dumps(good))
        change(copy)
        return json.dumps(copy).encode()

    def last_bad_pattern(b: dict[str, Any]) -> None:
        b["objects"][-3] = {**next(o for o in b["objects"] if o["type"] == "indicator"),
                            "id": "indicator--0a3a8f3e-1b1b-4c3c-8d8d-9e9e9e9e9e9e",
                            "pattern": "[ipv4-addr:value = "}

    return {
        "json": (b'{"type": "bundle", "objects": [', "not valid JSON"),
        "spec": (variant(lambda b: b.update(spec_version="2.0")), "STIX 2.0 bundle"),
        "object-spec": (variant(lambda b: b["objects"][1].update(spec_version="2.0")),
                        "only \"2.1\" is accepted"),
        "type": (variant(lambda b: b["objects"].append(
            {"type": "x-acme-thing", "spec_version": "2.1",
             "id": "x-acme-thing--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f"})),
            "unknown object type 'x-acme-thing'"),
        "big": (variant(lambda b: b["objects"][1].update(description="x" * 300_000)),
                "the limit is 200000"),
        "pattern": (variant(last_bad_pattern), "invalid object"),
        "not-bundle": (b'{"type": "report"}', "not a STIX bundle"),
        # PostgreSQL cannot keep NUL in text: the import failed there with a traceback
        # any text after bundle-- was kept; thousands of characters failed PostgreSQL
        "bundle-id": (variant(lambda b: b.update(id="bundle--" + "x" * 4000)),
                      "no valid \"id\" (bundle--<uuid>)"),
        "bundle-id-braces": (variant(lambda b: b.update(
            id="bundle--{" + b["id"][len("bundle--"):] + "}")), "no valid \"id\""),
        "nul": (variant(lambda b: next(o for o in b["objects"] if o["type"] == "indicator")
                        .update(name="a\x00b")), "name holds the NUL character"),
        "nul-deep": (variant(lambda b: b["objects"][1].update(
            external_references=[{"source_name": "x", "description": "\x00"}])),
            "external_references[0].description holds the NUL character"),
        # stix2 fills in a missing id, created and modified: the import then failed on
        # the object's id with a traceback (a TAXII 500)
        "no-id": (variant(lambda b: next(o for o in b["objects"] if o["type"] == "indicator")
                          .pop("id")), "no \"id\""),
        "no-modified": (variant(lambda b: next(o for o in b["objects"]
                                                if o["type"] == "campaign").pop("modified")),
                        "no \"modified\""),
        "no-sco-id": (variant(lambda b: next(o for o in b["objects"]
                                              if o["type"] == "ipv4-addr").pop("id")),
                      "no \"id\""),
        # the pattern parser recursed past Python's limit: RecursionError, a traceback
        "deep-pattern": (variant(lambda b: next(o for o in b["objects"]
                                                 if o["type"] == "indicator").update(
            pattern="(" * 1000 + "[ipv4-addr:value = '1.2.3.4']" + ")" * 1000)),
            "nested too deeply"),
    }


def test_bad_bundles_are_refused_and_change_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    url = f"sqlite:///{tmp_path}/state.sqlite"
    good = _bundle(tmp_path)
    assert _counts(url) == dict.fromkeys(TABLES, 0)
    for name, (raw, message) in _bad_bundles(good).items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(raw)
        result = _cli(config, "import", str(path), "--partner", "globex")
        assert result.exit_code == 2, (name, result.output)
        assert "refused, nothing imported" in result.output and message in result.output, (
            name, result.output)
        assert _counts(url) == dict.fromkeys(TABLES, 0), name


def test_a_failing_write_rolls_back_the_whole_bundle(tmp_path: Path) -> None:
    good = _bundle(tmp_path)
    objects = good["objects"]

    async def go() -> dict[str, int]:
        store = open_state_store(f"sqlite:///{tmp_path}/s.sqlite")
        engine = store.engine  # type: ignore[attr-defined]
        await create_schema(engine)
        sharing = SharingStore(engine, ttl=timedelta(days=30))
        broken = [*objects, {"type": "indicator"}]  # fails half-way (no id)
        with pytest.raises(KeyError):
            await sharing.import_bundle(partner="acme", bundle_id=good["id"],
                                        objects=broken, source="test", sha256=None)
        async with engine.connect() as conn:
            out = {t: int((await conn.execute(text(f"SELECT COUNT(*) FROM {t}")))
                          .scalar_one()) for t in TABLES}
        await store.close()
        return out

    assert asyncio.run(go()) == dict.fromkeys(TABLES, 0)


def test_unknown_partner_and_validation_messages() -> None:
    with pytest.raises(BundleError, match="not a TAXII|not a STIX"):
        parse_bundle(b"[]", max_bytes=100)
    # JSON nested as deep as the parser allows was accepted and then failed the store
    # (orjson writes at most 254 levels); the NUL check raised RecursionError on it
    for depth, leaf, says in ((60, b'"x"', None), (60, b'"\\u0000"', r"x_deep\.a\.a.*… holds"),
                              (1020, b'"x"', "more than 64 levels deep")):
        deep = b'{"a":' * depth + leaf + b"}" * depth
        note = (b'{"type": "note", "spec_version": "2.1", '
                b'"id": "note--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f", '
                b'"created": "2026-01-01T00:00:00Z", "modified": "2026-01-01T00:00:00Z", '
                b'"content": "x", "object_refs": '
                b'["note--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f"], "x_deep": ' + deep + b"}")
        raw = (b'{"type": "bundle", "id": "bundle--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f", '
               b'"objects": [' + note + b"]}")
        if says is None:
            assert len(parse_bundle(raw, max_bytes=10**6).objects) == 1
        else:
            with pytest.raises(BundleError, match=says):
                parse_bundle(raw, max_bytes=10**6)
    with pytest.raises(BundleError) as info:
        parse_bundle(b"{" + b" " * 200 + b"}", max_bytes=100)
    assert info.value.status == 413


def test_indicator_expiry_and_supported_patterns() -> None:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    base = {"type": "indicator", "id": "indicator--1", "pattern_type": "stix",
            "valid_from": "2026-02-01T00:00:00Z"}
    ttl = timedelta(days=30)
    (ip,) = indicator_inputs({**base, "pattern": "[ipv4-addr:value = '198.51.100.7']"},
                             now=now, ttl=ttl)
    assert (ip.kind, ip.value, ip.expires_at) == ("ip", "198.51.100.7/32", now + ttl)
    (ua,) = indicator_inputs({**base, "valid_until": "2026-04-01T00:00:00Z", "pattern":
                              "[network-traffic:extensions.'http-request-ext'.request_header"
                              ".'User-Agent' MATCHES '^curl/']"}, now=now, ttl=ttl)
    assert (ua.kind, ua.op, ua.expires_at.month) == ("user_agent", "MATCHES", 4)
    either = indicator_inputs({**base, "pattern": "[autonomous-system:name = 'X'] OR "
                               "[file:name = 'a.exe']"}, now=now, ttl=ttl)
    assert [i.kind for i in either] == ["asn"]  # the testable half of an OR
    for pattern in ("[ipv4-addr:value = '1.2.3.4' AND autonomous-system:name = 'X']",
                    "[ipv4-addr:value = '1.2.3.4'] WITHIN 5 SECONDS",
                    "[file:name = 'a.exe']",
                    "[user-account:x_payment_fingerprint_sha256 = 'ab']"):  # no salt
        assert indicator_inputs({**base, "pattern": pattern}, now=now, ttl=ttl) == [], pattern
    assert indicator_inputs({**base, "revoked": True,
                             "pattern": "[ipv4-addr:value = '1.2.3.4']"}, now=now, ttl=ttl) == []


@pytest.mark.postgres
def test_matches_risk_and_taxii_collections_on_postgresql(pg_url: str) -> None:
    from distillguard.sharing import taxiistore

    objects = [{"type": "indicator", "spec_version": "2.1", "pattern_type": "stix",
                "id": f"indicator--{i:08d}-1b1b-4c3c-8d8d-9e9e9e9e9e9e",
                "created": "2026-03-01T00:00:00.000Z", "modified": f"2026-03-0{1 + i % 2}"
                "T00:00:00.000Z", "valid_from": "2026-03-01T00:00:00Z",
                "pattern": f"[ipv4-addr:value = '198.51.100.{i}']"} for i in range(5)]

    async def go() -> None:
        store = open_state_store(pg_url)
        engine = store.engine  # type: ignore[attr-defined]
        await create_schema(engine)
        await taxiistore.create_schema(engine)
        sharing = SharingStore(engine, ttl=timedelta(days=30))
        when = datetime(2026, 3, 2, tzinfo=UTC)
        first = await sharing.record_match(account_id="a1", partner="acme",
                                           indicator_id="indicator--x", kind="ip",
                                           value="198.51.100.0/24", when=when, risk=0.4)
        again = await sharing.record_match(account_id="a1", partner="acme",
                                           indicator_id="indicator--x", kind="ip",
                                           value="198.51.100.0/24", when=when, risk=0.4)
        other = await sharing.record_match(account_id="a1", partner="acme",
                                           indicator_id="indicator--y", kind="ua",
                                           value="x", when=when, risk=0.4)
        assert (first, again, other) == (True, False, True)
        assert await sharing.risk() == {"a1": pytest.approx(0.8)}
        assert (await sharing.matches("a1"))[0]["hits"] == 2
        async with engine.begin() as conn:
            ok, failed = await taxiistore.add_objects(conn, "c1", objects, "acme")
        assert len(ok) == 5 and not failed
        page = await taxiistore.query(engine, "c1", limit=2, types=["indicator"])
        assert page.more and len(page.rows) == 2 and page.next
        rest = await taxiistore.query(engine, "c1", limit=10, after=page.next)
        assert [r["id"] for r in page.rows + rest.rows] == [o["id"] for o in objects]
        newest = await taxiistore.query(engine, "c1", limit=10,
                                        added_after=page.rows[-1]["date_added"])
        assert len(newest.rows) == 3
        await store.close()

    asyncio.run(go())


def test_small_commands(tmp_path: Path) -> None:
    import hashlib

    config = _config(tmp_path)
    made = json.loads(CliRunner().invoke(main, ["share", "partner-secret"]).output)
    assert hashlib.sha256(made["secret"].encode()).hexdigest() == made["token_sha256"]
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(_bundle(tmp_path)))
    assert _cli(config, "import", str(path), "--partner", "acme").exit_code == 0
    assert _cli(config, "matches").output == ""
    purge = _cli(config, "purge")
    assert purge.exit_code == 0 and "deleted 0 expired" in purge.output
    unknown = _cli(config, "import", str(path), "--partner", "nobody")
    assert unknown.exit_code == 2 and "unknown partner 'nobody'" in unknown.output


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_matches_of_one_account_at_once_all_count(backend: str, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    """Each match read the account's risk and wrote its own sum: on PostgreSQL, matches
    at once (the account's requests on several replicas) kept one indicator's risk of
    several, and the first match of one indicator twice over raised the risk twice."""
    url = (f"sqlite:///{tmp_path / 's.sqlite'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))

    async def go() -> None:
        store = open_state_store(url)
        engine = store.engine  # type: ignore[attr-defined]
        await create_schema(engine)
        sharing = SharingStore(engine, ttl=timedelta(days=30))
        when = datetime(2026, 3, 2, tzinfo=UTC)

        def match(indicator: str) -> Any:
            return sharing.record_match(account_id="a1", partner="acme",
                                        indicator_id=indicator, kind="ip",
                                        value="198.51.100.0/24", when=when, risk=0.1)
        firsts = await asyncio.gather(*(match(f"indicator--{i}") for i in range(6)),
                                      *(match("indicator--0") for _ in range(4)))
        assert sum(firsts) == 6
        assert await sharing.risk() == {"a1": pytest.approx(0.6)}
        hits = {m["indicator_id"]: m["hits"] for m in await sharing.matches("a1")}
        assert hits == {f"indicator--{i}": 5 if i == 0 else 1 for i in range(6)}
        await store.close()
    asyncio.run(go())


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_imports_at_once_keep_the_newer_object_and_see_a_repeated_bundle(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two imports of one partner each read an object's stored version before either
    wrote: the older copy of an indicator replaced its revision about half the time (the
    revoked indicator active again), and the same bundle twice at once failed on its id
    instead of counting as a duplicate."""
    url = (f"sqlite:///{tmp_path / 's.sqlite'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))

    def indicator(oid: str, modified: str, revoked: bool) -> dict[str, Any]:
        return {"type": "indicator", "spec_version": "2.1", "id": oid,
                "created": "2026-01-01T00:00:00.000Z", "modified": modified,
                "pattern": "[ipv4-addr:value = '203.0.113.7']", "pattern_type": "stix",
                "valid_from": "2026-01-01T00:00:00Z", "revoked": revoked}

    async def go() -> None:
        store = open_state_store(url)
        engine = store.engine  # type: ignore[attr-defined]
        await store.migrate()
        sharing = SharingStore(engine, ttl=timedelta(days=30))
        await sharing.start()
        for trial in range(8):
            oid = f"indicator--{trial:08d}-1b1b-4c3c-8d8d-9e9e9e9e9e9e"
            revision = indicator(oid, "2026-03-02T00:00:00.000Z", revoked=True)
            older = indicator(oid, "2026-03-01T00:00:00.000Z", revoked=False)
            await asyncio.gather(*(sharing.import_bundle(
                partner="acme", bundle_id=f"bundle--{trial}-{n}", objects=[obj],
                source="test", sha256=None) for n, obj in enumerate((revision, older))))
            async with engine.connect() as conn:
                modified = (await conn.execute(text(
                    "SELECT modified FROM sharing_objects WHERE object_id = :o"),
                    {"o": oid})).scalar_one()
            assert modified == "2026-03-02T00:00:00.000Z", trial
        same = [indicator("indicator--00000099-1b1b-4c3c-8d8d-9e9e9e9e9e9e",
                          "2026-03-01T00:00:00.000Z", False)]
        summaries = await asyncio.gather(*(sharing.import_bundle(
            partner="acme", bundle_id="bundle--same", objects=same, source="test",
            sha256="ab" * 32) for _ in range(2)))
        assert sorted(s.duplicate for s in summaries) == [False, True]
        await store.close()
    asyncio.run(go())
