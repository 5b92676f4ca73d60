"""``distillguard ledger ...``: keys, checkpoints, proofs, verification, export, redaction.

Every command but ``verify-proof`` opens the ledger named by the settings (``ledger:``
section); ``verify-proof`` needs only a public key and the file to check.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import orjson

from distillguard.files import output_path, write_atomically
from distillguard.ledger.checkpoint import (
    CheckpointError,
    VerifierKey,
    load_or_create_key,
    public_path,
)
from distillguard.ledger.keyring import (
    KeyRing,
    RetiredKey,
    read_retired_keys,
    retired_keys_path,
)
from distillguard.ledger.merkle import ProofError
from distillguard.ledger.settings import LedgerConfig, parse_settings


def _config(ctx: click.Context) -> LedgerConfig:
    return parse_settings(ctx.find_root().obj.settings)


def _open(ctx: click.Context, *, create_key: bool = False) -> Any:
    from distillguard.ledger.core import Ledger

    return Ledger(_config(ctx), create_key=create_key)


def _emit(value: Any, out: str | None) -> None:
    data = orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n"
    if out:
        write_atomically(out, data)
    else:
        sys.stdout.write(data.decode())


BESIDE = "beside the signing key"


def _key_source(ctx: click.Context) -> tuple[str, str]:
    """The public key ``ledger verify`` uses without ``--key`` and where it comes from:
    ``ledger.verifier_key``, else the one the ledger keeps beside its signing key."""
    config = _config(ctx)
    if config.verifier_key is not None:
        return str(config.verifier_key), "ledger.verifier_key"
    return str(public_path(config.key_path)), BESIDE


def _beside_note(path: str) -> str:
    return (f"the public key used, {path}, is the one kept beside the ledger's signing key: "
            "whoever can rewrite the ledger can replace it too, and a ledger rewritten and "
            "signed again with a new key verifies with it. Only --key with a copy of the "
            "public key kept elsewhere (or ledger.verifier_key naming one) shows the ledger "
            "untouched.")


def _retired(path: str) -> list[RetiredKey]:
    try:
        return read_retired_keys(Path(path))
    except OSError as exc:
        raise click.UsageError(f"cannot read retired keys {path}: {exc.strerror}") from None
    except CheckpointError as exc:
        raise click.UsageError(f"{path} is not a retired-keys file: {exc}") from None


def _ring(key_paths: tuple[str, ...], retired_path: str | None,
          ctx: click.Context | None) -> tuple[KeyRing, dict[str, Any]]:
    """The keys ``ledger verify`` and ``verify-proof`` check checkpoints with, and where
    they come from. Every ``--key`` is a current key (valid for any tree size); retired
    keys, each valid up to its retirement size, come from ``--retired-keys``, else (in
    ``ledger verify`` without ``--key``) from ``ledger.retired_keys``, else from the file
    beside the signing key when the current key is the one beside it too."""
    if key_paths:
        paths, source = list(key_paths), "--key"
    elif ctx is None:             # verify-proof: no settings to fall back on
        if retired_path is None:
            raise click.UsageError("pass --key PUBLIC_KEY_FILE")
        paths, source = [], "--key"
    else:
        used, source = _key_source(ctx)
        paths = [used]
    current = [read_public_key(p) for p in paths]
    info: dict[str, Any] = {"path": paths[0] if paths else None, "source": source}
    if len(paths) > 1:
        info["also"] = paths[1:]
    where: tuple[str, str] | None = None
    if retired_path is not None:
        where = (retired_path, "--retired-keys")
    elif ctx is not None and not key_paths:
        config = _config(ctx)
        if config.retired_keys is not None:
            where = (str(config.retired_keys), "ledger.retired_keys")
        elif source == BESIDE and retired_keys_path(config.key_path).exists():
            where = (str(retired_keys_path(config.key_path)), BESIDE)
    retired = _retired(where[0]) if where else []
    if where:
        info["retired_keys"] = {"path": where[0], "source": where[1], "keys": len(retired)}
    return KeyRing(current, retired), info


def read_public_key(path: str) -> VerifierKey:
    """The ledger public key in the file ``path``; UsageError naming what is wrong."""
    try:
        return VerifierKey.parse(Path(path).read_text())
    except OSError as exc:
        raise click.UsageError(f"cannot read public key {path}: {exc.strerror}") from None
    except (CheckpointError, UnicodeDecodeError) as exc:
        if _is_retired_keys(path):
            raise click.UsageError(f"{path} is a retired-keys file, not a public key: pass "
                                   "it with --retired-keys") from None
        raise click.UsageError(f"{path} is not a ledger public key ({exc}); the ledger "
                               "writes its own beside its private key, as .pub") from None


def _is_retired_keys(path: str) -> bool:
    try:
        return bool(read_retired_keys(Path(path)))
    except (OSError, CheckpointError):
        return False


@click.group("ledger")
def ledger() -> None:
    """The tamper-evident access ledger (docs/ledger.md)."""


@ledger.command()
@click.option("--force", is_flag=True,
              help="Rotate: replace an existing key. The old public key is kept in the "
                   "retired-keys file beside it (<key>.retired.pub) with the ledger's tree "
                   "size, up to which its checkpoints keep verifying, and the new key signs "
                   "a checkpoint of the ledger as it is now.")
@click.pass_context
def keygen(ctx: click.Context, force: bool) -> None:
    """Create the checkpoint signing key; print the public (verifier) key.

    With --force, rotate the key (docs/ledger.md, "Rotating the signing key"): the old
    private key is deleted, its public key is kept as a retired key, and `ledger verify`
    accepts its checkpoints up to the tree size recorded with it. Give auditors the new
    public key and the retired-keys file. A running gateway signs its next checkpoint
    with the new key."""
    from distillguard.ledger.rotation import rotate_key

    config = _config(ctx)
    if not config.key_path.exists():
        key = load_or_create_key(config.key_path, config.origin)
        click.echo(key.verifier.encode())
        click.echo(f"signing key: {config.key_path}\npublic key:  "
                   f"{public_path(config.key_path)}", err=True)
        return
    if not force:
        raise click.UsageError(f"{config.key_path} exists (--force rotates it: see "
                               "docs/ledger.md, \"Rotating the signing key\")")
    try:
        rotation = rotate_key(config)
    except CheckpointError as exc:
        raise click.ClickException(f"key not rotated: {exc}") from None
    click.echo(rotation.key.verifier.encode())
    click.echo(f"signing key: {config.key_path}\npublic key:  "
               f"{public_path(config.key_path)}", err=True)
    if rotation.retired is None:
        click.echo("the old key could not be read: no retired key recorded, and "
                   "checkpoints it signed verify only with its public key passed as --key",
                   err=True)
    else:
        click.echo(f"retired key: {rotation.retired.key.encode()}, its checkpoints count up "
                   f"to tree size {rotation.retired.tree_size} (kept in "
                   f"{rotation.retired_keys})", err=True)
    if rotation.checkpoint is not None:
        click.echo(f"checkpoint of tree size {rotation.checkpoint.tree_size} signed with the "
                   "new key", err=True)
    else:
        click.echo(f"no checkpoint signed now ({rotation.not_signed})", err=True)
    if config.verifier_key is not None or config.retired_keys is not None:
        click.echo(f"the settings name copies kept apart from the ledger "
                   f"(ledger.verifier_key: {config.verifier_key}, ledger.retired_keys: "
                   f"{config.retired_keys}): put the new public key in the first and a copy "
                   f"of {rotation.retired_keys} in the second", err=True)


@ledger.command()
@click.pass_context
def checkpoint(ctx: click.Context) -> None:
    """Sign a checkpoint of the ledger as it is now and print it."""
    lg = _open(ctx, create_key=True)
    try:
        lg.refresh()
        cp = lg.checkpoint()
        click.echo(cp.note, nl=False)
    finally:
        lg.close()


@ledger.command()
@click.argument("ref")
@click.option("--tree-size", type=int, help="Prove against this (older) tree size.")
@click.option("--out", type=click.Path(dir_okay=False), callback=output_path,
              help="Write the proof here.")
@click.pass_context
def prove(ctx: click.Context, ref: str, tree_size: int | None, out: str | None) -> None:
    """Inclusion proof of entry REF (exchange id, event id or index), with the signed
    checkpoint it leads to (signing one when none covers the entry yet)."""
    lg = _open(ctx, create_key=True)
    try:
        try:
            proof = lg.inclusion(ref, tree_size, sign_if_needed=True)
        except LookupError:
            raise click.UsageError(f"no ledger entry {ref!r}") from None
        except ProofError as exc:         # a tree size the entry is not in
            raise click.UsageError(str(exc)) from None
        _emit(proof, out)
    finally:
        lg.close()


@ledger.command()
@click.argument("old_size", type=int)
@click.argument("new_size", type=int, required=False)
@click.option("--out", type=click.Path(dir_okay=False), callback=output_path)
@click.pass_context
def consistency(ctx: click.Context, old_size: int, new_size: int | None,
                out: str | None) -> None:
    """Consistency proof that the tree of OLD_SIZE is a prefix of the tree of NEW_SIZE
    (default: the latest checkpoint, signed now if the ledger has grown)."""
    lg = _open(ctx, create_key=True)
    try:
        if new_size is None:
            lg.refresh()
            cp = lg.checkpoint(only_if_grown=True) or lg.store.latest_checkpoint()
            new_size = cp.tree_size
        try:
            proof = lg.consistency(old_size, new_size)
        except ProofError as exc:         # sizes out of order or beyond the ledger
            raise click.UsageError(str(exc)) from None
        proof["old_checkpoint"] = lg.note_at(old_size)
        proof["new_checkpoint"] = lg.note_at(new_size)
        _emit(proof, out)
    finally:
        lg.close()


@ledger.command()
@click.option("--key", "key_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Public key, a copy kept apart from the ledger (default: "
                   "ledger.verifier_key, else the one next to the signing key). Repeatable: "
                   "each key given is trusted for every tree size.")
@click.option("--retired-keys", "retired_path", type=click.Path(exists=True, dir_okay=False),
              help="Retired-keys file (a copy of <key>.retired.pub): checkpoints signed by a "
                   "retired key count up to the tree size it was retired at (default: "
                   "ledger.retired_keys, else, without --key and ledger.verifier_key, the "
                   "file beside the signing key).")
@click.option("--checkpoint", "extra", multiple=True, type=click.Path(exists=True),
              help="Also check against a checkpoint kept elsewhere (repeatable).")
@click.option("--export", "exports", multiple=True, type=click.Path(exists=True),
              help="Also compare each entry with its row in a Parquet export kept elsewhere, "
                   "once the export checks against its signed checkpoint (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(ctx: click.Context, key_paths: tuple[str, ...], retired_path: str | None,
           extra: tuple[str, ...], exports: tuple[str, ...], as_json: bool) -> None:
    """Check every entry and checkpoint; exit 1 naming the first bad entry (TAMPERED), or
    the checkpoints signed by a key not given (UNVERIFIED)."""
    from distillguard.ledger.spool import Spool
    from distillguard.ledger.store import open_store
    from distillguard.ledger.verifier import (
        VerificationFailed,
        export_header,
        verified_rows,
    )
    from distillguard.ledger.verify import verify_ledger

    config = _config(ctx)
    key, key_info = _ring(key_paths, retired_path, ctx)
    used, source = key_info["path"], key_info["source"]
    reference: dict[int, bytes] = {}
    # an export's signed checkpoint is a checkpoint kept elsewhere, as --checkpoint is
    labelled: list[tuple[str, str]] = []
    for export in exports:
        try:
            header = export_header(Path(export), key)
            reference.update(verified_rows(Path(export), key, header=header))
            labelled.append((f"the checkpoint of {export}", header.note))
        except VerificationFailed as exc:
            raise click.ClickException(f"{export} does not verify: {exc}") from None
    store = open_store(config.url, durability=config.durability)
    try:
        store.migrate()
        report = verify_ledger(store, key,
                               extra_checkpoints=[Path(p).read_text() for p in extra],
                               labelled_checkpoints=labelled, reference=reference)
    finally:
        store.close()
    doc = report.to_json()
    doc["key"] = key_info
    if source == BESIDE:
        doc["key"]["note"] = _beside_note(used)
    if as_json:
        _emit(doc, None)
    else:
        click.echo(f"{doc['entries']} entries, {doc['checkpoints']} checkpoints "
                   f"({doc['checkpoints_matched']} matched), {doc['uncovered']} entries "
                   f"after the last checkpoint, {doc['redacted_bodies']} bodies redacted")
        for signer in doc["signed_by_retired_key"]:
            click.echo(f"  {signer['checkpoints']} checkpoint(s) signed by retired key "
                       f"{signer['key']} (retired at tree size {signer['retired_at_size']})")
        for p in doc["problems"]:
            click.echo(f"  {p['kind']}: {p['message']}")
        waiting = Spool(config.spool_dir).held if config.spool_dir is not None else 0
        if waiting:
            click.echo(f"{waiting} exchanges wait in the spool {config.spool_dir} (served "
                       "while the store could not be written; the gateway writes them "
                       "when it reaches the store)", err=True)
        if source == BESIDE:
            click.echo("note: " + _beside_note(used))
        if doc["entries"] and not doc["covered_by_checkpoint"]:
            click.echo("note: no signed checkpoint covers any entry, so nothing here is "
                       "protected yet: a rewrite of every entry would verify as well. Sign "
                       "one (ledger checkpoint) and keep copies of checkpoints elsewhere "
                       "(--checkpoint).")
        if report.ok:
            click.echo("ok")
        elif report.tampered:
            first = doc.get("first_bad")
            click.echo("TAMPERED: " + (f"first bad entry {first}" if first is not None
                                       else "the checkpoints (no entry named)"))
        else:
            click.echo("UNVERIFIED: checkpoints signed by a key not given (above) could not "
                       "be checked; unless that key is one of this ledger's, they are forged")
    sys.exit(0 if report.ok else 1)


@ledger.command("verify-proof")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="The ledger's public key (repeatable: a proof whose checkpoints were "
                   "signed before and after a key rotation).")
@click.option("--retired-keys", "retired_path", type=click.Path(exists=True, dir_okay=False),
              help="The ledger's retired-keys file: checkpoints signed by a retired key "
                   "count up to the tree size it was retired at.")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(exists=True, dir_okay=False),
              help="A signed checkpoint you trust (inclusion: the one to prove against; "
                   "consistency: your old one).")
def verify_proof(file: str, key_paths: tuple[str, ...], retired_path: str | None,
                 checkpoint_path: str | None) -> None:
    """Check FILE (an inclusion or consistency proof, or a Parquet export) with only the
    public key; exit 1 if it does not verify."""
    from distillguard.ledger.verifier import VerificationFailed, verify_file

    key, _info = _ring(key_paths, retired_path, None)
    try:
        note = Path(checkpoint_path).read_text() if checkpoint_path else None
    except UnicodeDecodeError:
        raise click.UsageError(f"{checkpoint_path} is not a signed checkpoint (not "
                               "text)") from None
    try:
        result = verify_file(Path(file), key, checkpoint=note)
    except (VerificationFailed, KeyError, ValueError) as exc:
        click.echo(f"INVALID: {exc}")
        sys.exit(1)
    result.pop("entry", None)
    click.echo("ok " + orjson.dumps(result).decode())


@ledger.command()
@click.option("--out", type=click.Path(dir_okay=False), required=True, callback=output_path)
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True,
              help="First index.")
@click.option("--end", type=click.IntRange(min=0),
              help="End index (exclusive; default: everything).")
@click.pass_context
def export(ctx: click.Context, out: str, start: int, end: int | None) -> None:
    """Export entries to Parquet with per-row inclusion proofs."""
    from distillguard.ledger.export import export_parquet

    if end is not None and end < start:
        raise click.BadParameter(f"{end} is before --start {start}", param_hint="--end")
    lg = _open(ctx, create_key=True)
    try:
        header = export_parquet(lg, Path(out), start=start, end=end)
    finally:
        lg.close()
    click.echo(f"{header['rows']} entries [{header['start']}, {header['end']}) to {out}, "
               f"checkpoint size {header['tree_size']}")


@ledger.command()
@click.option("--before", required=True, help="Delete retained bodies of exchanges older "
              "than this RFC 3339 time.")
@click.pass_context
def redact(ctx: click.Context, before: str) -> None:
    """Delete stored bodies (privacy, retention); entries and proofs stay valid."""
    from distillguard.exchange import format_ts, parse_ts
    from distillguard.ledger.store import open_store

    config = _config(ctx)
    store = open_store(config.url, durability=config.durability)
    try:
        store.migrate()
        n = store.redact(format_ts(parse_ts(before)))
    finally:
        store.close()
    click.echo(f"bodies deleted from {n} entries")


@ledger.command()
@click.argument("ref")
@click.pass_context
def show(ctx: click.Context, ref: str) -> None:
    """Print one entry (exchange in the trace format, or event)."""
    from distillguard.ledger.routes import entry_json

    lg = _open(ctx)
    try:
        row = lg.find(ref)
        if row is None:
            raise click.UsageError(f"no ledger entry {ref!r}")
        _emit(entry_json(row), None)
    finally:
        lg.close()

