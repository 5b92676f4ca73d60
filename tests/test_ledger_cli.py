"""``distillguard ledger ...`` commands, the standalone verifier, Parquet export,
redaction, and the provenance look-up reading the ledger."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.exchange import Retention
from distillguard.ledger import entry
from distillguard.ledger.checkpoint import VerifierKey
from distillguard.ledger.core import Ledger
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.verifier import verify_inclusion_bundle
from distillguard.traceio import write_jsonl
from tests.factories import make_exchange
from tests.leakworld import SECRET, build_world


def _setup(tmp_path: Path, extra: str = "") -> tuple[Path, LedgerConfig]:
    config = tmp_path / "dg.yaml"
    config.write_text(f"state:\n  url: sqlite:///{tmp_path / 'state.sqlite'}\n{extra}")
    lc = LedgerConfig(url=f"sqlite:///{tmp_path / 'state-ledger' / 'ledger.sqlite'}",
                      key_path=tmp_path / "state-ledger" / "ledger.key")
    return config, lc


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_commands_and_standalone_verifier(tmp_path: Path) -> None:
    config, lc = _setup(tmp_path)
    c = str(config)
    code, out = _run("-c", c, "ledger", "keygen")
    assert code == 0 and out.startswith("distillguard/ledger+")
    pub = tmp_path / "state-ledger" / "ledger.key.pub"
    assert VerifierKey.parse(pub.read_text()).encode() == out.splitlines()[0]
    assert _run("-c", c, "ledger", "keygen")[0] != 0  # never overwritten by accident
    lg = Ledger(lc)
    ids = []
    for i in range(50):
        ex = make_exchange(f"question {i}", account_id=f"acct_{i % 4}")
        lg.append([entry.from_exchange(ex, Retention.FULL)])
        ids.append(ex.id)
        if i == 19:
            lg.checkpoint()
    lg.close()
    old_note = tmp_path / "old.txt"
    old_note.write_text(Ledger(lc).store.latest_checkpoint().note)  # type: ignore[union-attr]

    code, out = _run("-c", c, "ledger", "checkpoint")
    assert code == 0 and out.split("\n")[1] == "50"
    proof = tmp_path / "proof.json"
    assert _run("-c", c, "ledger", "prove", ids[7], "--out", str(proof))[0] == 0
    code, out = _run("ledger", "verify-proof", str(proof), "--key", str(pub))
    assert code == 0 and out.startswith("ok"), out
    # a proof whose leaf was altered does not verify
    doc = orjson.loads(proof.read_bytes())
    leaf = base64.b64decode(doc["leaf"]).replace(b"acct_3", b"acct_0")
    doc["leaf"], doc["leaf_hash"] = base64.b64encode(leaf).decode(), ""
    proof.write_bytes(orjson.dumps(doc))
    code, out = _run("ledger", "verify-proof", str(proof), "--key", str(pub))
    assert code == 1 and out.startswith("INVALID")

    cons = tmp_path / "cons.json"
    assert _run("-c", c, "ledger", "consistency", "20", "--out", str(cons))[0] == 0
    code, out = _run("ledger", "verify-proof", str(cons), "--key", str(pub),
                     "--checkpoint", str(old_note))
    assert code == 0 and '"old_size":20' in out, out
    # sizes and ranges a proof or an export cannot have are usage errors, not tracebacks
    for args, says in ((["prove", ids[30], "--tree-size", "20"], "not in a tree of size 20"),
                       (["prove", ids[3], "--tree-size", "999"], "beyond the ledger's"),
                       (["consistency", "30", "20"], "no consistency proof"),
                       (["consistency", "999"], "no consistency proof"),
                       (["export", "--out", str(tmp_path / "x.parquet"), "--start", "-1"],
                        "not in the range"),
                       (["export", "--out", str(tmp_path / "x.parquet"), "--start", "30",
                         "--end", "20"], "before --start 30"),
                       # an index SQLite cannot hold raised OverflowError; "²" is a digit
                       # to str.isdigit() and not to int()
                       (["show", "99999999999999999999"],
                        "no ledger entry '99999999999999999999'"),
                       (["prove", "99999999999999999999"], "no ledger entry"),
                       (["show", "²"], "no ledger entry '²'"),
                       (["show", "50"], "no ledger entry '50'"),
                       (["show", ""], "no ledger entry ''"),
                       (["prove", ""], "no ledger entry ''")):
        result = CliRunner().invoke(main, ["-c", c, "ledger", *args])
        assert result.exit_code == 2 and says in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit)
    # a key or checkpoint that is not one is a usage error, not a traceback
    binary = tmp_path / "binary.dat"
    binary.write_bytes(b"\xef\xbb\x00\xff" * 8)
    superscript = tmp_path / "superscript.txt"      # a tree size of "²" raised ValueError
    origin, _size, rest = old_note.read_text().split("\n", 2)
    superscript.write_text(f"{origin}\n²\n{rest}")
    for args, says in (
            (["--key", str(old_note)], "is not a ledger public key"),
            (["--key", str(binary)], "is not a ledger public key"),
            (["--key", str(pub), "--checkpoint", str(binary)], "is not a signed checkpoint"),
            (["--key", str(pub), "--checkpoint", str(tmp_path)], "is a directory")):
        result = CliRunner().invoke(main, ["ledger", "verify-proof", str(cons), *args])
        assert result.exit_code == 2 and says in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit)
    code, out = _run("ledger", "verify-proof", str(cons), "--key", str(pub), "--checkpoint",
                     str(superscript))
    assert code == 1 and "tree size '²' is not a decimal number" in out, out

    # export, redact, export again: proofs still check out without the bodies
    export = tmp_path / "e.parquet"
    assert _run("-c", c, "ledger", "export", "--out", str(export), "--start", "10")[0] == 0
    code, out = _run("ledger", "verify-proof", str(export), "--key", str(pub))
    assert code == 0 and '"rows":40' in out, out
    table = pq.read_table(export)
    assert table.column("request").null_count == 0
    assert _run("-c", c, "ledger", "redact", "--before", "2100-01-01T00:00:00Z") == \
        (0, "bodies deleted from 50 entries\n")
    code, out = _run("-c", c, "ledger", "verify")
    assert code == 0 and "100 bodies redacted" in out
    assert _run("-c", c, "ledger", "export", "--out", str(export))[0] == 0
    assert pq.read_table(export).column("response").null_count == 50
    assert _run("ledger", "verify-proof", str(export), "--key", str(pub))[0] == 0
    # an exported row changed afterwards is caught
    table = pq.read_table(export)
    leaves = table.column("leaf").to_pylist()
    leaves[3] = leaves[3].replace(b'"status":200', b'"status":500')
    meta = table.schema.metadata
    table = table.set_column(table.schema.get_field_index("leaf"), "leaf",
                             [leaves]).replace_schema_metadata(meta)
    pq.write_table(table, export)
    code, out = _run("ledger", "verify-proof", str(export), "--key", str(pub))
    assert code == 1 and "row 3" in out
    code, out = _run("-c", c, "ledger", "show", ids[0])
    assert code == 0 and orjson.loads(out)["entry"]["exchange_id"] == ids[0]


@pytest.mark.timeout(180)
def test_provenance_reads_the_ledger_with_proofs(tmp_path: Path) -> None:
    world = build_world()
    config, lc = _setup(tmp_path, f"countermeasures:\n  fingerprint:\n    secret: {SECRET}\n")
    lg = Ledger(lc)
    for i in range(0, len(world.exchanges), 500):
        lg.append([entry.from_exchange(e, Retention.FULL) for e in world.exchanges[i:i + 500]])
    lg.close()
    suspect = tmp_path / "suspect.jsonl"
    write_jsonl(({"prompt": "", "completion": s["output"]} for s in world.suspect), suspect)
    out = tmp_path / "report.json"
    code, output = _run("-c", str(config), "provenance", str(suspect), "--out", str(out),
                        "--quiet")
    assert code == 0, output
    report = orjson.loads(out.read_bytes())
    assert {a["account_id"] for a in report["accounts"]} == set(world.campaign)
    assert report["source"]["kind"] == "ledger"
    key = VerifierKey.parse((tmp_path / "state-ledger" / "ledger.key.pub").read_text())
    checked = 0
    for account in report["accounts"]:
        for match in account["evidence"]:
            result = verify_inclusion_bundle(match["ledger_proof"], key)
            assert result["entry"]["id"] == match["exchange_id"]
            assert result["entry"]["account_id"] == account["account_id"]
            checked += 1
    assert checked >= 3


def test_verify_says_when_no_checkpoint_covers_anything(tmp_path: Path) -> None:
    """With no signed checkpoint, every entry checked against the chain alone: `ok`
    said nothing of the fact that a rewrite of every entry would verify as well."""
    config, lc = _setup(tmp_path)
    c = str(config)
    assert _run("-c", c, "ledger", "keygen")[0] == 0
    lg = Ledger(lc)
    lg.append([entry.from_exchange(make_exchange("question"), Retention.FULL)])
    lg.close()
    code, out = _run("-c", c, "ledger", "verify")
    assert code == 0 and "no signed checkpoint covers any entry" in out, out
    assert _run("-c", c, "ledger", "checkpoint")[0] == 0
    code, out = _run("-c", c, "ledger", "verify")
    assert code == 0 and "no signed checkpoint" not in out, out
