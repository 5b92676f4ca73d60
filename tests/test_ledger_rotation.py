"""Rotating the checkpoint signing key (``ledger keygen --force``): the old public key is
kept as a retired key, valid up to the tree size it was retired at; verification checks
each checkpoint with the key its signature line names; real tampering is still caught."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from click.testing import CliRunner, Result

from distillguard.cli import main
from distillguard.exchange import Retention
from distillguard.ledger import entry, merkle
from distillguard.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    SignerKey,
    VerifierKey,
    open_checkpoint,
    replace_key,
)
from distillguard.ledger.core import Ledger
from distillguard.ledger.keyring import RetiredKey, add_retired_key, parse_retired_keys
from distillguard.ledger.rotation import rotate_key
from distillguard.ledger.settings import LedgerConfig, parse_settings
from distillguard.ledger.verify import verify_ledger
from distillguard.ledger.writer import writer_for
from tests.factories import (
    ADMIN_TOKEN,
    forge_leaf,
    make_exchange,
    make_ledger,
    make_settings,
    read_leaf,
    start_stack,
)

ORIGIN = "distillguard/ledger"
N = 30  # entries before the rotation, signed every 10
RETIRED = "ledger.key.retired.pub"  # beside ledger.key


class World:
    """A ledger of N entries signed by the first key, rotated with ``keygen --force``,
    then grown by 10 entries signed by the new key; the old key and public keys saved."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "l"
        make_ledger(self.dir, N, checkpoint_every=10).close()
        self.config = LedgerConfig(url=f"sqlite:///{self.dir / 'ledger.sqlite'}",
                                   key_path=self.dir / "ledger.key")
        self.settings = tmp_path / "dg.yaml"
        self.settings.write_text(f"ledger:\n  path: {self.dir}\n")
        self.old_key = SignerKey.parse(self.config.key_path.read_text())
        self.old_pub = tmp_path / "old.pub"
        shutil.copy(self.dir / "ledger.key.pub", self.old_pub)
        self.old_export = tmp_path / "before.parquet"
        assert self.cli("ledger", "export", "--out", str(self.old_export)).exit_code == 0
        self.rotated = self.cli("ledger", "keygen", "--force")
        assert self.rotated.exit_code == 0, self.rotated.output
        self.new_pub = tmp_path / "new.pub"
        shutil.copy(self.dir / "ledger.key.pub", self.new_pub)
        lg = Ledger(self.config)
        for i in range(10):
            lg.append([entry.from_exchange(make_exchange(f"after {i}"), Retention.FULL)])
        lg.checkpoint()
        lg.close()

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["-c", str(self.settings), *args])

    def verify(self, *args: str) -> Result:
        return self.cli("ledger", "verify", *args)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.dir / "ledger.sqlite", isolation_level=None)

    def store_checkpoint(self, size: int, key: SignerKey) -> None:
        """A checkpoint of the first ``size`` stored entries signed by ``key``."""
        db = self.db()
        hashes = [h for (h,) in db.execute("SELECT leaf_hash FROM ledger_entries "
                                           "WHERE idx < ? ORDER BY idx", (size,))]
        root = merkle.root_of(hashes)
        db.execute("INSERT INTO ledger_checkpoints (tree_size, root_hash, ts, note) "
                   "VALUES (?, ?, ?, ?)", (size, root, "2026-03-02T00:00:00.000Z",
                                           Checkpoint(ORIGIN, size, root).sign(key)))
        db.close()

    @property
    def old_id(self) -> str:
        return f"{ORIGIN}+{self.old_key.verifier.key_id.hex()}"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield World(tmp_path)


def test_rotation_keeps_the_old_public_key_and_continues_the_signed_history(
        world: World) -> None:
    """keygen --force deleted the key; every checkpoint the old key had signed was then
    "checkpoint-signature" and verify printed TAMPERED, and the old public key was gone."""
    result = world.verify()
    assert result.exit_code == 0, result.output
    assert f"3 checkpoint(s) signed by retired key {world.old_id} (retired at tree size " \
           f"{N})" in result.output
    assert result.output.splitlines()[-1] == "ok"
    lines = (world.dir / RETIRED).read_text().splitlines()
    assert lines[0].startswith("# ")
    assert [line.split()[:2] for line in lines if not line.startswith("#")] == [
        [world.old_key.verifier.encode(), str(N)]]
    assert f"{world.old_key.verifier.encode()}, its checkpoints count up to tree size {N}" \
        in world.rotated.output
    new_key = VerifierKey.parse(world.new_pub.read_text())
    assert new_key != world.old_key.verifier
    # the new key signed the tree as it was at rotation: no gap in the signed history
    lg = Ledger(world.config, create_key=False)
    notes = [c.note for c in lg.store.checkpoints()]
    lg.close()
    assert [open_checkpoint(n, new_key).tree_size for n in notes
            if _signed_by(n, new_key)] == [N, N + 10]
    doc = orjson.loads(world.verify("--json").output)
    assert doc["verdict"] == "ok" and doc["checkpoints_matched"] == 5
    assert doc["signed_by_retired_key"] == [{"key": world.old_id, "retired_at_size": N,
                                             "checkpoints": 3}]
    assert doc["key"]["retired_keys"]["source"] == "beside the signing key"


def _signed_by(note: str, key: VerifierKey) -> bool:
    try:
        open_checkpoint(note, key)
    except CheckpointError:
        return False
    return True


def test_a_retired_key_cannot_sign_history_after_its_retirement(world: World) -> None:
    """The old private key, leaked after the rotation, signs the grown ledger: refused,
    while the checkpoints it signed before the rotation still count."""
    world.store_checkpoint(N + 10, world.old_key)
    result = world.verify("--json")
    assert result.exit_code == 1
    doc = orjson.loads(result.output)
    assert [p["kind"] for p in doc["problems"]] == ["checkpoint-signature"]
    assert doc["verdict"] == "tampered"
    assert f"signed by retired key {world.old_id} for a tree of {N + 10} entries, but " \
           f"the key was retired at tree size {N}" in doc["problems"][0]["message"]
    assert doc["signed_by_retired_key"][0]["checkpoints"] == 3
    text = world.verify()
    assert text.output.splitlines()[-1] == "TAMPERED: the checkpoints (no entry named)"


def test_a_checkpoint_by_an_unknown_key_is_its_own_problem(world: World) -> None:
    """Not tampering of entries, and not a signature that fails: a key verify was not
    given, named so that it can be passed if it is one of the ledger's."""
    stranger = SignerKey.generate(ORIGIN)
    world.store_checkpoint(N + 5, stranger)
    result = world.verify("--json")
    assert result.exit_code == 1
    doc = orjson.loads(result.output)
    stranger_id = f"{ORIGIN}+{stranger.verifier.key_id.hex()}"
    assert [(p["kind"], p["message"]) for p in doc["problems"]] == [(
        "checkpoint-unknown-key",
        f"checkpoint #6: signed by an unknown key {stranger_id}: neither the current key "
        "nor a retired one; pass its public key (--key, or --retired-keys with its "
        "retirement size) if it is one of this ledger's keys, else this ledger's keys did "
        "not sign it")]
    assert doc["verdict"] == "unverified" and "first_bad" not in doc
    last = world.verify().output.splitlines()[-1]
    assert last.startswith("UNVERIFIED: ") and "TAMPERED" not in world.verify().output
    # given as a key, it is checked like any other
    pub = world.dir.parent / "stranger.pub"
    pub.write_text(stranger.verifier.encode() + "\n")
    both = world.verify("--key", str(world.new_pub), "--key", str(pub),
                        "--retired-keys", str(world.dir / RETIRED))
    assert both.exit_code == 0, both.output


def test_tampering_after_a_rotation_is_still_tampering(world: World) -> None:
    db = world.db()
    # an entry the retired key's checkpoints cover, rewritten with its hash: mismatch
    forge_leaf(db, 15, {**read_leaf(db, 15), "model": "forged"})
    # an entry only the new key's checkpoint covers, changed without its hash
    forge_leaf(db, 35, {**read_leaf(db, 35), "status": 500}, rehash=False)
    db.close()
    result = world.verify("--json")
    assert result.exit_code == 1
    doc = orjson.loads(result.output)
    assert {p["kind"] for p in doc["problems"]} == {"checkpoint-mismatch", "modified"}
    assert doc["verdict"] == "tampered" and doc["first_bad"] == 10
    assert {p["index"] for p in doc["problems"] if p["kind"] == "modified"} == {35}
    assert world.verify().output.splitlines()[-1] == "TAMPERED: first bad entry 10"


def test_an_auditor_with_only_public_keys(world: World, tmp_path: Path) -> None:
    """The auditor holds the old public key (saved before), the new one and a copy of
    the retired-keys file; nothing beside the ledger is trusted when --key is given."""
    retired = tmp_path / "auditor-retired.pub"
    shutil.copy(world.dir / RETIRED, retired)
    new, old = str(world.new_pub), str(world.old_pub)
    assert world.verify("--key", new, "--retired-keys", str(retired)).exit_code == 0
    assert world.verify("--key", new, "--key", old).exit_code == 0
    mixed_up = world.verify("--key", str(retired))
    assert mixed_up.exit_code == 2 and "pass it with --retired-keys" in mixed_up.output
    only_new = world.verify("--key", new, "--json")   # the old key's checkpoints: unknown
    doc = orjson.loads(only_new.output)
    assert {p["kind"] for p in doc["problems"]} == {"checkpoint-unknown-key"}
    assert only_new.exit_code == 1 and doc["verdict"] == "unverified"
    # the export made before the rotation verifies with the old key, alone or in the ring
    for keys in (["--key", old], ["--key", new, "--retired-keys", str(retired)]):
        proof = CliRunner().invoke(main, ["ledger", "verify-proof", str(world.old_export),
                                          *keys])
        assert proof.exit_code == 0 and proof.output.startswith("ok "), proof.output
    assert CliRunner().invoke(main, ["ledger", "verify-proof", str(world.old_export),
                                     "--key", new]).exit_code == 1
    with_export = world.verify("--key", new, "--retired-keys", str(retired), "--export",
                               str(world.old_export))
    assert with_export.exit_code == 0, with_export.output
    # an export made now is signed by the new key
    now = tmp_path / "after.parquet"
    assert world.cli("ledger", "export", "--out", str(now)).exit_code == 0
    proof = CliRunner().invoke(main, ["ledger", "verify-proof", str(now), "--key", new])
    assert proof.exit_code == 0 and '"rows":40' in proof.output, proof.output
    # a consistency proof from a checkpoint the auditor saved before the rotation
    saved = tmp_path / "saved.txt"
    saved.write_text(_note_at(world, 20, world.old_key.verifier))
    cons = tmp_path / "cons.json"
    assert world.cli("ledger", "consistency", "20", "--out", str(cons)).exit_code == 0
    checked = CliRunner().invoke(main, ["ledger", "verify-proof", str(cons), "--key", new,
                                        "--retired-keys", str(retired), "--checkpoint",
                                        str(saved)])
    assert checked.exit_code == 0 and '"old_size":20' in checked.output, checked.output


def _note_at(world: World, size: int, key: VerifierKey) -> str:
    lg = Ledger(world.config, create_key=False)
    try:
        return next(c.note for c in lg.store.checkpoints()
                    if c.tree_size == size and _signed_by(c.note, key))
    finally:
        lg.close()


def test_the_single_key_of_before_still_works(world: World) -> None:
    """``--key`` given once is the key verify checks with, as before: the old key alone
    checks what it signed, and the new key's checkpoints are unknown to it."""
    result = world.verify("--key", str(world.old_pub), "--json")
    doc = orjson.loads(result.output)
    assert doc["key"] == {"path": str(world.old_pub), "source": "--key"}
    assert {p["kind"] for p in doc["problems"]} == {"checkpoint-unknown-key"}
    assert len(doc["problems"]) == 2 and doc["checkpoints_matched"] == 3


def test_a_second_rotation_keeps_both_retired_keys(world: World) -> None:
    second = SignerKey.parse(world.config.key_path.read_text())
    lg = Ledger(world.config)
    lg.append([entry.from_exchange(make_exchange("more"), Retention.FULL)])
    lg.close()
    assert world.cli("ledger", "keygen", "--force").exit_code == 0
    lines = [line.split() for line in (world.dir / RETIRED).read_text().splitlines()
             if not line.startswith("#")]
    assert [fields[:2] for fields in lines] == [[world.old_key.verifier.encode(), str(N)],
                                                [second.verifier.encode(), str(N + 11)]]
    doc = orjson.loads(world.verify("--json").output)
    assert doc["ok"], doc["problems"]
    assert [(s["retired_at_size"], s["checkpoints"]) for s in doc["signed_by_retired_key"]
            ] == [(N, 3), (N + 11, 2)]


def test_a_running_gateway_signs_with_the_new_key(tmp_path: Path) -> None:
    """A process that opened the ledger before the rotation kept signing with the old key,
    whose checkpoints for the grown ledger verify no more."""
    folder = tmp_path / "l"
    gateway = make_ledger(folder, 12)
    settings = tmp_path / "dg.yaml"
    settings.write_text(f"ledger:\n  path: {folder}\n")
    assert CliRunner().invoke(main, ["-c", str(settings), "ledger", "keygen",
                                     "--force"]).exit_code == 0
    gateway.append([entry.from_exchange(make_exchange("later"), Retention.FULL)])
    cp = gateway.checkpoint()
    gateway.close()
    assert cp is not None
    new_key = VerifierKey.parse((folder / "ledger.key.pub").read_text())
    assert open_checkpoint(cp.note, new_key).tree_size == 13
    assert CliRunner().invoke(main, ["-c", str(settings), "ledger", "verify"]).exit_code == 0


def test_a_verifier_key_kept_apart_reads_retired_keys_kept_apart(world: World,
                                                                 tmp_path: Path) -> None:
    """With ledger.verifier_key, the retired keys beside the ledger are not trusted; the
    settings name a copy kept apart (the dashboard reads the same keys)."""
    apart = tmp_path / "apart.retired.pub"
    shutil.copy(world.dir / RETIRED, apart)
    world.settings.write_text(f"ledger:\n  path: {world.dir}\n"
                              f"  verifier_key: {world.new_pub}\n")
    assert orjson.loads(world.verify("--json").output)["verdict"] == "unverified"
    world.settings.write_text(f"ledger:\n  path: {world.dir}\n"
                              f"  verifier_key: {world.new_pub}\n  retired_keys: {apart}\n")
    result = world.verify()
    assert result.exit_code == 0, result.output
    config = LedgerConfig(url=world.config.url, key_path=world.config.key_path,
                          verifier_key=world.new_pub)
    lg = Ledger(dataclasses.replace(config, retired_keys=apart), create_key=False)
    try:
        assert verify_ledger(lg.store, lg.keyring).ok
    finally:
        lg.close()


def test_keygen_without_a_ledger_and_the_retired_keys_format(tmp_path: Path) -> None:
    from distillguard.ledger.keyring import RetiredKey, parse_retired_keys

    settings = tmp_path / "dg.yaml"
    settings.write_text(f"ledger:\n  path: {tmp_path / 'l'}\n")
    runner = CliRunner()
    assert runner.invoke(main, ["-c", str(settings), "ledger", "keygen"]).exit_code == 0
    first = VerifierKey.parse((tmp_path / "l" / "ledger.key.pub").read_text())
    again = runner.invoke(main, ["-c", str(settings), "ledger", "keygen", "--force"])
    assert again.exit_code == 0 and "no checkpoint signed now (no ledger at" in again.output
    assert not (tmp_path / "l" / "ledger.sqlite").exists()
    text = (tmp_path / "l" / "ledger.key.retired.pub").read_text()
    assert text.startswith("# ") and [r.key for r in parse_retired_keys(text)] == [first]
    assert [r.tree_size for r in parse_retired_keys(text)] == [0]
    line = RetiredKey(first, 7, "2026-03-01T00:00:00.000Z").encode()
    assert parse_retired_keys(line) == [RetiredKey(first, 7, "2026-03-01T00:00:00.000Z")]
    for bad, says in ((f"{first.encode()}", "line 1: a retired key is"),
                      (f"{first.encode()} -1", "tree size '-1' is not a whole number"),
                      ("x+y+z 3", "line 1: verifier key")):
        with pytest.raises(ValueError, match=says):
            parse_retired_keys(bad)


def test_the_gateway_serves_the_retired_keys(tmp_path: Path) -> None:
    """The admin API served only the current public key: an auditor who took the keys
    from the gateway could not check the checkpoints signed before a rotation. It serves
    the retired keys too, as the retired-keys file ``--retired-keys`` reads and as JSON."""
    settings = make_settings(tmp_path)
    stack = start_stack(settings)
    try:
        with httpx.Client(base_url=stack.stack.admin_url,
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            writer = writer_for(settings)
            for i in range(3):
                stack.call(writer.append_event("policy:account:suspend", f"account:a{i}",
                                               "ana", "test", {"i": i}))
            assert admin.post("/admin/v1/ledger/checkpoint").json()["tree_size"] == 3
            old = VerifierKey.parse(admin.get("/admin/v1/ledger/key").text)
            empty = admin.get("/admin/v1/ledger/key/retired")
            assert empty.status_code == 200 and parse_retired_keys(empty.text) == []
            rotation = rotate_key(parse_settings(settings))   # ledger keygen --force
            assert rotation.retired is not None and rotation.retired.key == old
            stack.call(writer.append_event("policy:account:suspend", "account:a3", "ana",
                                           "test", {"i": 3}))
            assert admin.post("/admin/v1/ledger/checkpoint").json()["tree_size"] == 4
            current = admin.get("/admin/v1/ledger/key")
            retired = admin.get("/admin/v1/ledger/key/retired")
            keys = admin.get("/admin/v1/ledger/keys")
    finally:
        stack.stop()
    new = VerifierKey.parse(current.text)
    assert new == rotation.key.verifier != old
    assert retired.status_code == 200, retired.text
    assert retired.headers["content-type"].startswith("text/plain")
    assert retired.text.startswith("# ")
    assert parse_retired_keys(retired.text) == [rotation.retired]
    assert keys.status_code == 200, keys.text
    assert keys.json() == {
        "current": {"key": new.encode(), "name": ORIGIN, "key_id": new.key_id.hex()},
        "retired": [{"key": old.encode(), "name": ORIGIN, "key_id": old.key_id.hex(),
                     "tree_size": 3, "retired_at": rotation.retired.retired_at}]}
    # the auditor, with what the gateway served and nothing else
    current_pub, retired_pub = tmp_path / "current.pub", tmp_path / "retired.pub"
    current_pub.write_text(current.text)
    retired_pub.write_text(retired.text)
    config = tmp_path / "dg.yaml"
    config.write_text(f"ledger:\n  path: {tmp_path / 'ledger'}\n")
    verify = ["-c", str(config), "ledger", "verify", "--key", str(current_pub), "--json"]
    result = CliRunner().invoke(main, [*verify, "--retired-keys", str(retired_pub)])
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.output)
    assert doc["verdict"] == "ok" and doc["checkpoints_matched"] == 3
    assert doc["signed_by_retired_key"] == [
        {"key": f"{ORIGIN}+{old.key_id.hex()}", "retired_at_size": 3, "checkpoints": 1}]
    alone = orjson.loads(CliRunner().invoke(main, verify).output)
    assert alone["verdict"] == "unverified"   # the old key's checkpoint, without it


def test_the_dashboard_names_the_key_that_signed_the_checkpoint(tmp_path: Path) -> None:
    """The ledger page showed the current key's id as the checkpoint's key even when the
    checkpoint shown was signed by a retired key (a rotation that could not sign)."""
    from distillguard.ledger.source import LedgerView
    from tests.test_dashboard import login

    folder = tmp_path / "ledger"
    make_ledger(folder, 5).close()
    old = SignerKey.parse((folder / "ledger.key").read_text()).verifier
    add_retired_key(folder / RETIRED, RetiredKey(old, 5, "2026-03-01T00:00:00.000Z"))
    new = replace_key(folder / "ledger.key", ORIGIN).verifier   # no checkpoint signed
    old_id, new_id = f"{ORIGIN}+{old.key_id.hex()}", f"{ORIGIN}+{new.key_id.hex()}"
    settings = make_settings(tmp_path)
    stack = start_stack(settings)
    try:
        shown = stack.call(LedgerView(writer_for(settings)).checkpoint())
        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
            login(client)
            page = client.get("/ledger").text
    finally:
        stack.stop()
    assert shown["signed_by"] == (f"{old_id} (a retired key, its checkpoints count up to "
                                  "tree size 5)")
    assert shown["signature"] == f"valid (retired key {old_id})"
    assert shown["current_key"] == new_id
    assert "key_id" not in shown
    signed_by = re.search(r"<dt>signed by</dt><dd><code>([^<]*)</code>", page)
    current = re.search(r"<dt>current key</dt><dd><code>([^<]*)</code>", page)
    assert signed_by is not None and signed_by.group(1).startswith(old_id + " ")
    assert current is not None and current.group(1) == new_id
    assert page.count(new.key_id.hex()) == 1   # only as the current key


def test_the_retirement_size_is_what_the_old_key_signed(tmp_path: Path) -> None:
    """The retirement size was the larger of the entries stored and the latest stored
    checkpoint's tree_size column, which nothing signs: whoever could write the database
    set it to 10^15 before a rotation, and the retired key then vouched for checkpoints
    of any size, as if never retired."""
    from distillguard.ledger.rotation import rotate_key

    lg = make_ledger(tmp_path / "l", 12, checkpoint_every=5)
    config = lg.config
    lg.close()
    db = sqlite3.connect(tmp_path / "l" / "ledger.sqlite", isolation_level=None)
    db.execute("UPDATE ledger_checkpoints SET tree_size = 1000000000000000")
    db.execute("INSERT INTO ledger_checkpoints (tree_size, root_hash, ts, note) "
               "VALUES (2000000000000000, X'00', '2026-03-02T00:00:00.000Z', 'forged')")
    db.close()
    rotation = rotate_key(config)
    assert rotation.retired is not None and rotation.retired.tree_size == 12
