"""Which public key ``ledger verify`` checks the checkpoints with, and that it says so: a
key kept beside the ledger proves nothing against whoever can rewrite the ledger."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import orjson
from click.testing import CliRunner

from distillguard.cli import main
from distillguard.exchange import Retention
from distillguard.ledger import entry, merkle
from distillguard.ledger.checkpoint import Checkpoint, load_or_create_key
from distillguard.ledger.core import Ledger
from distillguard.ledger.settings import LedgerConfig
from tests.factories import forge_leaf, make_exchange, read_leaf

WARNING = "is the one kept beside the ledger's signing key"


def _ledger(tmp_path: Path) -> LedgerConfig:
    config = LedgerConfig(url=f"sqlite:///{tmp_path / 'l' / 'ledger.sqlite'}",
                          key_path=tmp_path / "l" / "ledger.key")
    lg = Ledger(config)
    for i in range(20):
        lg.append([entry.from_exchange(make_exchange(f"prompt {i}"), Retention.FULL)])
        if i % 10 == 9:
            lg.checkpoint()
    lg.close()
    return config


def _rewrite_and_sign_again(config: LedgerConfig, kept: Path) -> None:
    """Cut the ledger to 10 entries, rewrite one, and sign it with a new key of the same
    name, replacing the key files beside the ledger."""
    shutil.copy(config.key_path.with_name("ledger.key.pub"), kept)
    db = sqlite3.connect(config.url[len("sqlite:///"):], isolation_level=None)
    db.execute("DELETE FROM ledger_entries WHERE idx >= 10")
    db.execute("DELETE FROM ledger_checkpoints")
    forge_leaf(db, 5, {**read_leaf(db, 5), "model": "evil"})
    config.key_path.unlink()
    config.key_path.with_name("ledger.key.pub").unlink()
    key = load_or_create_key(config.key_path, "distillguard/ledger")
    hashes = [h for (h,) in db.execute("SELECT leaf_hash FROM ledger_entries ORDER BY idx")]
    root = merkle.root_of(hashes)
    db.execute("INSERT INTO ledger_checkpoints (tree_size, root_hash, ts, note) "
               "VALUES (?, ?, ?, ?)", (10, root, "2026-01-01T00:00:00.000Z",
                                       Checkpoint("distillguard/ledger", 10, root).sign(key)))
    db.close()


def test_verify_says_when_its_key_lies_beside_the_ledger(tmp_path: Path) -> None:
    """A ledger cut short, rewritten and signed again with a new key put in place of the
    old one verified "ok" with no word that the key checked came from the ledger's own
    folder, so the operator took it for proof that the ledger was untouched."""
    config = _ledger(tmp_path)
    kept = tmp_path / "kept.pub"
    _rewrite_and_sign_again(config, kept)
    settings = tmp_path / "dg.yaml"
    settings.write_text(f"ledger:\n  path: {tmp_path / 'l'}\n")
    runner = CliRunner()
    beside = runner.invoke(main, ["-c", str(settings), "ledger", "verify"])
    assert beside.exit_code == 0, beside.output   # as before: the key checks the ledger
    assert WARNING in beside.output and "--key" in beside.output, beside.output
    doc = orjson.loads(runner.invoke(main, ["-c", str(settings), "ledger", "verify",
                                            "--json"]).stdout)
    assert doc["key"]["source"] == "beside the signing key" and WARNING in doc["key"]["note"]
    # the copy kept elsewhere catches it, and the report does not warn
    apart = runner.invoke(main, ["-c", str(settings), "ledger", "verify", "--key", str(kept)])
    assert apart.exit_code == 1 and WARNING not in apart.output, apart.output


def test_the_settings_can_name_the_expected_key(tmp_path: Path) -> None:
    """ledger.verifier_key names a public key kept apart from the ledger: verify (and the
    dashboard's verification) use it instead of the one beside the signing key."""
    config = _ledger(tmp_path)
    kept = tmp_path / "kept.pub"
    shutil.copy(config.key_path.with_name("ledger.key.pub"), kept)
    settings = tmp_path / "dg.yaml"
    settings.write_text(f"ledger:\n  path: {tmp_path / 'l'}\n  verifier_key: {kept}\n")
    runner = CliRunner()
    good = runner.invoke(main, ["-c", str(settings), "ledger", "verify"])
    assert good.exit_code == 0 and WARNING not in good.output, good.output
    _rewrite_and_sign_again(config, tmp_path / "unused.pub")
    bad = runner.invoke(main, ["-c", str(settings), "ledger", "verify"])
    assert bad.exit_code == 1, bad.output
    assert "checkpoint-unknown-key" in bad.output and "TAMPERED" not in bad.output
    assert bad.output.splitlines()[-1].startswith("UNVERIFIED: ")
    from distillguard.ledger.settings import LedgerConfig as Config

    lg = Ledger(Config(url=config.url, key_path=config.key_path, verifier_key=kept),
                create_key=False)
    try:
        assert lg.verifier is not None and lg.verifier.encode() == kept.read_text().strip()
    finally:
        lg.close()
