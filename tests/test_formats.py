"""The public trace and accounts formats (docs/formats.md)."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from distillguard.exchange import Exchange, Retention
from distillguard.store.models import Account
from distillguard.traceio import (
    FormatError,
    read_accounts,
    read_trace,
    write_accounts,
    write_trace,
)

DESIGN_LINE = {
    "ts": "2026-03-01T12:00:00.123Z", "account_id": "acct_17", "key_id": "key_17a",
    "client_ip": "203.0.113.7", "user_agent": "openai-python/1.40.0",
    "request": {"model": "m1", "messages": [{"role": "user", "content": "..."}],
                "max_tokens": 1024},
    "response": {"choices": [{"message": {"role": "assistant", "content": "..."}}],
                 "usage": {"prompt_tokens": 12, "completion_tokens": 300}},
    "status": 200, "latency_ms": 812, "campaign_hint": "kept"}


def test_trace_line_from_design_round_trips(tmp_path: Path) -> None:
    ex = Exchange.from_trace(DESIGN_LINE)
    assert ex.model == "m1" and ex.usage and ex.usage.completion_tokens == 300
    assert ex.latency_ms == 812 and ex.extra == {"campaign_hint": "kept"}
    path = tmp_path / "t.jsonl"
    write_trace([ex], path)
    (back,) = list(read_trace(path))
    out = back.to_trace()
    for field, value in DESIGN_LINE.items():
        assert out[field] == value, field


def test_a_line_without_an_id_is_named_by_its_content() -> None:
    """A trace line of the public format (no exchange_id) got a random id at every
    reading: importing it twice recorded it twice, and each run of detect named other
    example exchanges, none of them findable."""
    first, again = Exchange.from_trace(DESIGN_LINE), Exchange.from_trace(dict(DESIGN_LINE))
    assert first.id == again.id
    assert first.id[:16] == f"ex_{int(first.ts.timestamp() * 1000):013x}"
    other = Exchange.from_trace({**DESIGN_LINE, "latency_ms": 813})
    assert other.id != first.id and other.id[:16] == first.id[:16]
    assert Exchange.from_trace({**DESIGN_LINE, "exchange_id": "ex_mine"}).id == "ex_mine"
    deep: list[object] = []
    for _ in range(300):   # too deep to write again: still read, with an id of its own
        deep = [deep]
    assert Exchange.from_trace({**DESIGN_LINE, "x": deep}).id.startswith("ex_")


def test_hash_retention_drops_bodies_keeps_hashes() -> None:
    ex = Exchange.from_trace(DESIGN_LINE)
    line = ex.to_trace(Retention.HASH)
    assert line["request"] is None and line["response"] is None
    assert len(line["request_sha256"]) == 64 and line["model"] == "m1"
    assert line["usage"] == {"prompt_tokens": 12, "completion_tokens": 300}
    assert Exchange.from_trace(line).usage.completion_tokens == 300


def test_gzip_and_bad_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    write_trace([Exchange.from_trace(DESIGN_LINE)] * 3, path)
    assert len(list(read_trace(path))) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(orjson.dumps(DESIGN_LINE) + b"\n\n{\"account_id\": 1}\n")
    with pytest.raises(FormatError, match="bad.jsonl:3: a trace line needs 'ts'"):
        list(read_trace(bad))
    bad.write_bytes(b"{oops\n")
    with pytest.raises(FormatError, match=":1: not valid JSON"):
        list(read_trace(bad))


def test_accounts_format(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text('{"account_id": "acct_17", "created_at": "2026-02-20T09:00:00Z", '
                   '"org": "Acme Ltd", "email_domain": "acme.example", '
                   '"payment_fingerprint": "pf_3c1e", "country": "DE", "tier": "standard"}\n'
                   '{"account_id": "acct_18"}\n')
    accounts = list(read_accounts(src))
    assert accounts[0].org == "Acme Ltd" and accounts[1].tier == "standard"
    out = tmp_path / "out.jsonl"
    write_accounts(accounts, out)
    first = orjson.loads(out.read_bytes().splitlines()[0])
    assert first["created_at"] == "2026-02-20T09:00:00Z" and first["country"] == "DE"
    with pytest.raises(ValueError):
        Account.from_public({"account_id": ""})


@pytest.mark.parametrize(("record", "message"), [
    ({"account_id": "a1", "created_at": "yesterday"},
     r"a\.jsonl:1: account 'created_at': not an RFC 3339 time .*'yesterday'"),
    ({"account_id": "a1", "created_at": 5},
     r"a\.jsonl:1: account 'created_at': expected an RFC 3339 time string, got int"),
    ({"account_id": "a1", "limits": {"requests_per_minute": "lots"}},
     r"a\.jsonl:1: account limit 'requests_per_minute' must be a whole number from 0 to "
     r"9007199254740991, or null; not 'lots'"),
    ({"account_id": "a1", "country": "Deutschland"},
     r"a\.jsonl:1: account 'country' must be an ISO 3166-1 alpha-2 code such as DE"),
    ({"account_id": "a1", "org": ["Acme", "Ltd"]},
     r"a\.jsonl:1: account 'org' must be a string, not an array$"),
    ({"account_id": "a1", "payment_fingerprint": True},
     r"a\.jsonl:1: account 'payment_fingerprint' must be a string, not a boolean$"),
    ({"account_id": "a1", "email_domain": {"host": "x.com"}},
     r"a\.jsonl:1: account 'email_domain' must be a string, not an object$"),
])
def test_a_bad_account_field_is_named(tmp_path: Path, record: dict[str, object],
                                      message: str) -> None:
    """A clear line naming the file, the line and the field, never a Python traceback."""
    src = tmp_path / "a.jsonl"
    src.write_bytes(orjson.dumps(record) + b"\n")
    with pytest.raises(FormatError, match=message):
        list(read_accounts(src))


def test_a_bad_trace_time_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "t.jsonl"
    bad.write_bytes(orjson.dumps({**DESIGN_LINE, "ts": "noon"}) + b"\n"
                    + orjson.dumps({**DESIGN_LINE, "ts": 1772000000}) + b"\n")
    with pytest.raises(FormatError, match=r":1: not an RFC 3339 time .*'noon'"):
        list(read_trace(bad))
    bad.write_bytes(orjson.dumps({**DESIGN_LINE, "ts": 1772000000}) + b"\n")
    with pytest.raises(FormatError, match=r":1: expected an RFC 3339 time string, got int"):
        list(read_trace(bad))


@pytest.mark.parametrize(("field", "value", "says"), [
    ("account_id", {"x": 1}, "'account_id' must be a string, not an object"),
    ("account_id", 17, "'account_id' must be a string, not a number"),
    ("key_id", ["k1"], "'key_id' must be a string, not an array"),
    ("user_agent", True, "'user_agent' must be a string, not a boolean"),
    ("client_ip", 3.5, "'client_ip' must be a string, not a number"),
    ("exchange_id", {"id": 1}, "'exchange_id' must be a string, not an object"),
    ("model", 4, "'model' must be a string, not a number"),
    # PostgreSQL cannot keep NUL: the ledger's append failed, and every verdict write
    # naming the account
    ("account_id", "a\x00b", "'account_id' must not contain the NUL character"),
    ("key_id", "\x00", "'key_id' must not contain the NUL character"),
    ("exchange_id", "ex\x00", "'exchange_id' must not contain the NUL character"),
    # PostgreSQL's index entries hold at most 2,704 bytes
    ("account_id", "a" * 257, "'account_id' is 257 characters long; ids are at most 256"),
])
def test_a_trace_text_field_that_is_not_text_is_named(tmp_path: Path, field: str,
                                                       value: object, says: str) -> None:
    """str() of an object or a boolean made ids such as "{'x': 1}" or "True": accounts in
    the verdicts that no accounts file could name, and two lines with `true` for a key
    one key."""
    bad = tmp_path / "t.jsonl"
    bad.write_bytes(orjson.dumps(DESIGN_LINE) + b"\n"
                    + orjson.dumps({**DESIGN_LINE, field: value}) + b"\n")
    with pytest.raises(FormatError, match=f":2: {re.escape(says)}$"):
        list(read_trace(bad))
    request = {**DESIGN_LINE["request"], "model": ["m"]}
    bad.write_bytes(orjson.dumps({**DESIGN_LINE, "request": request}) + b"\n")
    with pytest.raises(FormatError, match=":1: 'model' must be a string, not an array$"):
        list(read_trace(bad))
    bad.write_bytes(orjson.dumps({**DESIGN_LINE, field: "x1"}) + b"\n")
    (good,) = read_trace(bad)
    assert getattr(good, "id" if field == "exchange_id" else field) == "x1"


@pytest.mark.parametrize(("field", "value", "says"), [
    ("status", "ok", "'status' must be an HTTP status code, not 'ok'"),
    ("status", 200.5, "'status' must be an HTTP status code, not 200.5"),
    ("status", -1, "'status' must be an HTTP status code, not -1"),
    ("latency_ms", "slow", "'latency_ms' must be a number of milliseconds, not 'slow'"),
    ("latency_ms", -3, "'latency_ms' must be a number of milliseconds, not -3"),
])
def test_a_bad_trace_number_is_named(tmp_path: Path, field: str, value: object,
                                     says: str) -> None:
    """int('ok') said "invalid literal for int() with base 10", naming no field; a
    negative latency or status was kept."""
    bad = tmp_path / "t.jsonl"
    bad.write_bytes(orjson.dumps(DESIGN_LINE) + b"\n"
                    + orjson.dumps({**DESIGN_LINE, field: value}) + b"\n")
    with pytest.raises(FormatError, match=f":2: {re.escape(says)}$"):
        list(read_trace(bad))
    bad.write_bytes(orjson.dumps({**DESIGN_LINE, "status": 200, "latency_ms": 12}) + b"\n")
    (good,) = read_trace(bad)
    assert good.status == 200 and good.latency_ms_override == 12.0
