"""The command line against a SQLite store."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml
from click.testing import CliRunner

from distillguard.cli import main


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    path = tmp_path / "dg.yaml"
    path.write_text(yaml.safe_dump({"state": {"url": f"sqlite:///{tmp_path / 's.sqlite'}"}}))
    return str(path)


def run(cfg: str, *args: str) -> str:
    result = CliRunner().invoke(main, ["-c", cfg, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_accounts_and_keys_commands(cfg: str, tmp_path: Path) -> None:
    out = run(cfg, "accounts", "create", "acct_1", "--org", "Acme", "--country", "de",
              "--tier", "unverified")
    assert orjson.loads(out)["country"] == "DE"
    run(cfg, "accounts", "update", "acct_1", "--tier", "verified", "--rpm", "5")
    shown = orjson.loads(run(cfg, "accounts", "show", "acct_1"))
    assert shown["tier"] == "verified" and shown["limits"] == {"requests_per_minute": 5}
    created = orjson.loads(run(cfg, "keys", "create", "acct_1", "--name", "ci",
                               "--expires-in-days", "2").splitlines()[0])
    assert created["key"].startswith("sk-dg-")
    listed = run(cfg, "keys", "list", "--account", "acct_1")
    assert created["key_id"] in listed and created["key"] not in listed
    assert orjson.loads(run(cfg, "keys", "revoke", created["key_id"]))["revoked_at"]

    src = tmp_path / "in.jsonl"
    src.write_text("".join(orjson.dumps({"account_id": f"b{i}", "org": "Beta"}).decode() + "\n"
                           for i in range(5)))
    run(cfg, "accounts", "import", str(src))
    dst = tmp_path / "out.jsonl"
    run(cfg, "accounts", "export", str(dst))
    ids = [orjson.loads(line)["account_id"] for line in dst.read_text().splitlines()]
    assert ids == ["acct_1", "b0", "b1", "b2", "b3", "b4"]


def test_errors_are_one_clear_line(cfg: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["-c", cfg, "accounts", "show", "ghost"])
    assert result.exit_code == 2 and "error: no account 'ghost'" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream:\n  timeout_s: -1\n")
    result = CliRunner().invoke(main, ["-c", str(bad), "check-config"])
    assert result.exit_code == 2 and "upstream.timeout_s" in result.stderr
    src = tmp_path / "broken.jsonl"
    src.write_text('{"account_id": "ok"}\n{"org": "no id"}\n')
    result = CliRunner().invoke(main, ["-c", cfg, "accounts", "import", str(src)])
    assert result.exit_code == 2 and "broken.jsonl:2" in result.stderr
    # Nothing from the bad file was imported.
    assert "ok" not in run(cfg, "accounts", "list")


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    path = tmp_path / "dg.yaml"
    path.write_text(yaml.safe_dump({"admin": {"token": "super-secret-admin-token"},
                                    "upstream": {"base_url": "http://x/v1", "api_key": "k"}}))
    out = run(str(path), "check-config")
    assert "super-secret" not in out and '"***"' in out
    # a short admin token opened the admin API and the dashboard to guessing
    path.write_text(yaml.safe_dump({"admin": {"token": "x"}}))
    result = CliRunner().invoke(main, ["-c", str(path), "check-config"])
    assert result.exit_code != 0 and "at least 16 characters" in result.output
    assert "'x'" not in result.output and '"x"' not in result.output   # no secret echoed


def test_check_config_masks_every_secret_and_url_password(tmp_path: Path) -> None:
    """Only the admin token and the upstream key were masked: the database and Redis
    passwords in their URLs, the fingerprint and session secrets and every sharing
    partner's token were printed as they are."""
    secrets = ["pgsecretpw", "redissecretpw", "fingerprint-secret-0123456789",
               "session-secret-0123456789abc", "partner-token-secret-0123"]
    path = tmp_path / "dg.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"url": f"postgresql://dg:{secrets[0]}@127.0.0.1:5432/test"},
        "counters": {"backend": "redis", "redis_url": f"redis://:{secrets[1]}@127.0.0.1/0"},
        "ledger": {"url": f"postgresql://dg:{secrets[0]}@db/ledger"},
        "countermeasures": {"fingerprint": {"secret": secrets[2]}},
        "dashboard": {"session_secret": secrets[3]},
        "sharing": {"partners": {"acme": {"token": secrets[4]}}}}))
    out = run(str(path), "check-config")
    assert not [s for s in secrets if s in out]
    assert "postgresql://dg:***@127.0.0.1:5432/test" in out and "redis://:***@127.0.0.1/0" in out


def test_check_config_masks_a_url_password_with_a_slash(tmp_path: Path) -> None:
    """SQLAlchemy takes a password with a ``/`` in it as written (``dg:pg/secret@db``),
    and check-config printed such a password in clear."""
    path = tmp_path / "dg.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"url": "postgresql://dg:pg/secret:pw@db.internal:5432/dg"}}))
    out = run(str(path), "check-config")
    assert "secret" not in out
    assert "postgresql://dg:***@db.internal:5432/dg" in out

def test_check_config_masks_the_sharing_pseudonym_keys(tmp_path: Path) -> None:
    """The sharing master key and a partner's own pseudonym key were printed as they are:
    whoever holds one can turn the pseudonyms in every bundle shared back into account ids."""
    secrets = ["master-pseudonym-key-0123", "partner-pseudonym-key-456"]
    path = tmp_path / "dg.yaml"
    path.write_text(yaml.safe_dump({"sharing": {
        "pseudonym_key": secrets[0],
        "partners": {"acme": {"token_sha256": "0" * 64, "pseudonym_key": secrets[1]}}}}))
    out = run(str(path), "check-config")
    assert not [s for s in secrets if s in out]
    sharing = orjson.loads(out)["extensions"]["sharing"]
    assert sharing["pseudonym_key"] == "***"
    assert sharing["partners"]["acme"]["pseudonym_key"] == "***"


def test_check_config_checks_every_component_section(tmp_path: Path) -> None:
    """check-config validates the components' sections too, as they would be at start-up,
    and names a section that no component reads (a misspelt one is otherwise ignored)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"detect": {"runs_in": "follower", "stream": {
        "url": "redis://127.0.0.1:6379/0", "lease_seconds": 0.5}}}))
    result = CliRunner().invoke(main, ["-c", str(bad), "check-config"])
    assert result.exit_code == 2 and "detect.stream.lease_seconds" in result.stderr
    for section, value, option in (("sharing", {"enabled": "maybe"}, "sharing.enabled"),
                                   ("dashboard", {"nope": 1}, "dashboard.nope"),
                                   ("ledger", {"nope": 1}, "ledger.nope")):
        bad.write_text(yaml.safe_dump({section: value}))
        result = CliRunner().invoke(main, ["-c", str(bad), "check-config"])
        assert result.exit_code == 2 and option in result.stderr, (section, result.stderr)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"detct": {"enabled": False}}))
    result = CliRunner().invoke(main, ["-c", str(typo), "check-config"])
    assert result.exit_code == 0
    assert "no component reads the section 'detct'" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"detect": {"tick_seconds": 60}, "ledger": {}}))
    result = CliRunner().invoke(main, ["-c", str(good), "check-config"])
    assert result.exit_code == 0 and result.stderr == ""


def test_every_component_has_a_settings_check() -> None:
    from distillguard.components import DEFAULT_COMPONENTS, SETTINGS_CHECKS

    assert [name for name, _ in SETTINGS_CHECKS] == [name for name, _ in DEFAULT_COMPONENTS]


@pytest.mark.parametrize(("args", "says"), [
    (["accounts", "create", "acct_x", "--country", "ZZZ"], "ISO 3166-1 alpha-2"),
    (["accounts", "create", "acct_x", "--created-at", "notatime"], "not an RFC 3339 time"),
    (["accounts", "update", "acct_1", "--rpm", "-3"], "from 0 to"),
    (["keys", "create", "acct_1", "--expires-in-days", "-1"], "must be a number in (0, 36500]"),
    (["keys", "create", "acct_1", "--expires-in-days", "nan"], "must be a number in (0, 36500]"),
    (["keys", "create", "acct_1", "--expires-in-days", "inf"], "must be a number in (0, 36500]"),
    (["keys", "create", "acct_1", "--expires-at", "notatime"], "not an RFC 3339 time"),
    (["keys", "create", "acct_1", "--expires-at", "2020-01-01T00:00:00Z"],
     "a key's expiry must be in the future: 2020-01-01T00:00:00"),
    (["keys", "create", "acct_1", "--expires-at", "2999-01-01T00:00:00Z",
      "--expires-in-days", "3"], "not both"),
    (["keys", "create", "acct_1", "--tpm", "-1"], "from 0 to"),
    (["accounts", "create", "acct_x", "--tier", "gold"],
     "account 'acct_x': unknown tier 'gold' (tiers of limits.tiers and the policy file: "
     "standard, trusted, unverified, verified)"),
    (["accounts", "update", "acct_1", "--tier", "gold"], "account 'acct_1': unknown tier"),
])
def test_bad_account_and_key_options_are_refused(cfg: str, args: list[str], says: str) -> None:
    """Each of these was a traceback (a date, NaN or infinity), or was kept: a country no
    jurisdiction rule matches, a negative limit, a key expiring days ago, a tier that is
    not configured (served the default tier's limits)."""
    run(cfg, "accounts", "create", "acct_1", "--country", "DE")
    result = CliRunner().invoke(main, ["-c", cfg, *args])
    assert result.exit_code == 2, result.output
    assert says in result.output and isinstance(result.exception, SystemExit)
    shown = orjson.loads(run(cfg, "accounts", "show", "acct_1"))
    assert shown["keys"] == [] and "limits" not in shown and shown["tier"] == "standard"
    assert "acct_x" not in run(cfg, "accounts", "list")


def test_an_import_with_an_unknown_tier_imports_nothing(cfg: str, tmp_path: Path) -> None:
    records = tmp_path / "accounts.jsonl"
    records.write_text('{"account_id": "a1", "tier": "verified"}\n'
                       '{"account_id": "a2", "tier": "gold"}\n')
    result = CliRunner().invoke(main, ["-c", cfg, "accounts", "import", str(records)])
    assert result.exit_code == 2
    assert "account 'a2': unknown tier 'gold'" in result.output
    assert run(cfg, "accounts", "list") == ""


@pytest.mark.parametrize(("args", "says"), [
    (["serve", "--port", "99999"], "0<=x<=65535"),
    (["serve", "--admin-port", "-1"], "0<=x<=65535"),
    (["demo-upstream", "--port", "70000"], "0<=x<=65535"),
    (["demo-upstream", "--chunk-delay-ms", "nan"], "nan is not in [0, inf) ms"),
    (["demo", "--minutes", "-1"], "is not a positive number of minutes"),
    (["demo", "--minutes", "nan"], "is not a positive number of minutes"),
    (["provenance", "{file}", "--trace", "{file}", "--out", "r.json",
      "--min-containment", "2"], "2.0 is not in (0, 1]"),
    (["provenance", "{file}", "--trace", "{file}", "--out", "r.json", "--min-items", "0"],
     "x>=1"),
    (["fingerprint", "trace", "{file}", "--account", "a", "--alpha", "5"],
     "5.0 is not in (0, 1)"),
    (["fingerprint", "model-test", "--outputs", "{file}", "--alpha", "nan"],
     "nan is not in (0, 1)"),
    (["share", "export", "--partner", "p", "--min-risk", "nan"], "nan is not in [0, 1]"),
    (["share", "serve", "--port", "70000"], "0<=x<=65535"),
    (["detect", "follow", "--idle-exit", "nan"], "is not a positive number of seconds"),
    (["detect", "follow", "--metrics-port", "99999"], "0<=x<=65535"),
    (["dashboard", "index", "{file}", "--batch", "0"], "x>=1"),
    (["bench", "baseline", "--trace", "{file}", "--accounts", "{file}", "--out", "v.json",
      "--per-day", "0"], "x>=1"),
    (["spark", "detect", "--trace", "{file}", "--out", "v.json", "--tick-seconds", "0"],
     "not in (0, 86400] seconds"),
])
def test_out_of_range_options_are_refused_before_anything_runs(
        cfg: str, tmp_path: Path, args: list[str], says: str) -> None:
    """Each was taken as given: a port past 65535 (the server then hung without a word,
    or the metrics server raised OverflowError), NaN minutes (a traceback), a
    containment share of 2 or a significance level of 5 (a report that looks valid), a
    NaN idle time (follow forever), a batch of 0 rows, a volume threshold of 0."""
    some = tmp_path / "some.jsonl"
    some.write_text('{"text": "x"}\n')
    argv = [a.replace("{file}", str(some)) for a in args]
    result = CliRunner().invoke(main, ["-c", cfg, *argv])
    assert result.exit_code == 2, result.output
    assert says in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "v.json").exists()


def test_serve_on_a_taken_port_is_one_clear_error(cfg: str) -> None:
    """uvicorn logged the failed bind, then exited from inside the event loop with a
    traceback (and the announcement had already named the address as served)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["-c", cfg, "serve", "--port", str(port),
                                           "--admin-port", "0"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: cannot listen for the public API on 127.0.0.1:{port}: Address already in "
        f"use (while attempting to bind on address ('127.0.0.1', {port}))")
    assert "Traceback" not in result.output and "gateway on" not in result.output


def test_serve_with_its_database_down_is_one_clear_error(tmp_path: Path) -> None:
    """The gateway's start-up failed inside uvicorn with about 150 lines of traceback,
    the cause near the middle; now one line names the store (password masked) and why."""
    import socket

    with socket.socket() as probe:      # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = tmp_path / "dg.yaml"
    cfg.write_text(yaml.safe_dump({"state": {
        "url": f"postgresql://dg:hunter2-secret@127.0.0.1:{port}/dg"}}))
    result = CliRunner().invoke(main, ["-c", str(cfg), "serve", "--port", "0",
                                       "--admin-port", "0"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot use the state store postgresql://dg:***@127.0.0.1:"
                           f"{port}/dg: "), last
    assert "hunter2" not in result.output and "Traceback" not in result.output


def test_a_tier_the_policy_file_names_is_a_tier(tmp_path: Path) -> None:
    """A tier of the policy's tier_order that has no entry in limits.tiers is legitimate:
    its accounts get the default tier's limits and the policy ranks them."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "tier_order": [
        "unverified", "standard", "verified", "enterprise"]}))
    cfg = tmp_path / "dg.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"url": f"sqlite:///{tmp_path / 's.sqlite'}"},
                                   "policy": {"file": str(policy)}}))
    made = orjson.loads(run(str(cfg), "accounts", "create", "acct_e", "--tier", "enterprise"))
    assert made["tier"] == "enterprise"
    result = CliRunner().invoke(main, ["-c", str(cfg), "accounts", "update", "acct_e",
                                       "--tier", "platinum"])
    assert result.exit_code == 2 and ("enterprise, standard, trusted, unverified, verified)"
                                      in result.output)
