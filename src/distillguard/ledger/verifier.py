"""The standalone verifier: checks proofs and exports with nothing but the public key.

It reads the public formats of docs/ledger.md (proof bundles as JSON, signed checkpoints,
Parquet exports) and uses only :mod:`distillguard.ledger.merkle` and
:mod:`distillguard.ledger.checkpoint`: no store, no settings, no network.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from distillguard.ledger import merkle
from distillguard.ledger.checkpoint import Checkpoint, CheckpointError, VerifierKey, open_checkpoint


class VerificationFailed(ValueError):
    pass


def _whole(proof: dict[str, Any], name: str) -> int:
    """The proof's field ``name``, a whole number (a proof from elsewhere is checked
    field by field: a wrong one is a clear INVALID, not a traceback)."""
    value = proof.get(name)
    if type(value) is not int:
        raise VerificationFailed(f"the proof's {name!r} must be a whole number, not "
                                 f"{value!r}")
    return value


def _hex_list(proof: dict[str, Any], name: str) -> list[bytes]:
    """The proof's field ``name``, a list of hex strings, as bytes."""
    value = proof.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise VerificationFailed(f"the proof's {name!r} must be a list of hex strings")
    try:
        return [bytes.fromhex(v) for v in value]
    except ValueError:
        raise VerificationFailed(f"the proof's {name!r} holds a value that is not hex"
                                 ) from None


def _hex_field(proof: dict[str, Any], name: str) -> bytes:
    """The proof's field ``name``, a hex string, as bytes."""
    value = proof.get(name)
    if not isinstance(value, str):
        raise VerificationFailed(f"the proof's {name!r} must be a hex string, not {value!r}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise VerificationFailed(f"the proof's {name!r} is not hex") from None


def _signed(note: str | None, key: VerifierKey, what: str) -> Checkpoint:
    if not note:
        raise VerificationFailed(f"{what}: no signed checkpoint to check against")
    try:
        return open_checkpoint(note, key)
    except CheckpointError as exc:
        raise VerificationFailed(f"{what}: {exc}") from None


def verify_inclusion_bundle(proof: dict[str, Any], key: VerifierKey,
                            checkpoint: str | None = None) -> dict[str, Any]:
    """Check an inclusion proof bundle against its (or the given) signed checkpoint."""
    cp = _signed(checkpoint or proof.get("checkpoint"), key, "inclusion proof")
    size, index = _whole(proof, "tree_size"), _whole(proof, "leaf_index")
    if size != cp.tree_size:
        raise VerificationFailed(f"the proof is for tree size {size}, the checkpoint for "
                                 f"{cp.tree_size}")
    try:
        leaf = base64.b64decode(proof.get("leaf") or "", validate=True)
    except (ValueError, TypeError):
        raise VerificationFailed("the proof's 'leaf' is not base64") from None
    lh = merkle.leaf_hash(leaf)
    if proof.get("leaf_hash") is not None and _hex_field(proof, "leaf_hash") != lh:
        raise VerificationFailed("the leaf hash is not the hash of the leaf")
    try:
        entry = orjson.loads(leaf)
    except orjson.JSONDecodeError:
        entry = None
    if not isinstance(entry, dict):
        raise VerificationFailed("the proof's leaf is not a ledger entry")
    if entry.get("idx") != index:
        raise VerificationFailed(f"the leaf names index {entry.get('idx')}, not {index}")
    try:
        merkle.verify_inclusion(index, size, lh, _hex_list(proof, "path"), cp.root_hash)
    except merkle.ProofError as exc:
        raise VerificationFailed(str(exc)) from None
    return {"ok": True, "type": "inclusion", "leaf_index": index, "tree_size": size,
            "entry": entry}


def verify_consistency_bundle(proof: dict[str, Any], key: VerifierKey,
                              old_checkpoint: str | None = None) -> dict[str, Any]:
    new = _signed(proof.get("new_checkpoint"), key, "consistency proof")
    old = _signed(old_checkpoint or proof.get("old_checkpoint"), key, "consistency proof")
    if (old.tree_size, new.tree_size) != (_whole(proof, "old_size"),
                                          _whole(proof, "new_size")):
        raise VerificationFailed("the proof's sizes are not those of the checkpoints")
    try:
        merkle.verify_consistency(old.tree_size, new.tree_size, old.root_hash,
                                  new.root_hash, _hex_list(proof, "path"))
    except merkle.ProofError as exc:
        raise VerificationFailed(str(exc)) from None
    return {"ok": True, "type": "consistency", "old_size": old.tree_size,
            "new_size": new.tree_size}


def _export_checkpoint(path: Path, key: VerifierKey) -> Checkpoint:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"distillguard.ledger")
    if raw is None:
        raise VerificationFailed(f"{path} is not a ledger export")
    header = orjson.loads(raw)
    return _signed(header.get("checkpoint"), key, str(path))


def verified_rows(path: Path, key: VerifierKey) -> Iterator[tuple[int, bytes]]:
    """``(index, leaf hash)`` of every row of a Parquet export, each checked first: its
    leaf, hash and inclusion path against the signed checkpoint in the file's metadata.
    Raises :class:`VerificationFailed` at the first row that does not check."""
    import pyarrow.parquet as pq

    cp = _export_checkpoint(path, key)
    table = pq.ParquetFile(path)
    for batch in table.iter_batches(columns=["idx", "leaf", "leaf_hash", "inclusion_path"]):
        cols = batch.to_pydict()
        for idx, leaf, stored, path_nodes in zip(cols["idx"], cols["leaf"], cols["leaf_hash"],
                                                 cols["inclusion_path"], strict=True):
            lh = merkle.leaf_hash(leaf)
            if lh != stored:
                raise VerificationFailed(f"row {idx}: leaf hash does not match its leaf")
            try:
                merkle.verify_inclusion(idx, cp.tree_size, lh, path_nodes, cp.root_hash)
            except merkle.ProofError as exc:
                raise VerificationFailed(f"row {idx}: {exc}") from None
            yield idx, lh


def verify_export(path: Path, key: VerifierKey) -> dict[str, Any]:
    """Check every row of a Parquet export (see :func:`verified_rows`)."""
    cp = _export_checkpoint(path, key)
    rows = sum(1 for _ in verified_rows(path, key))
    return {"ok": True, "type": "export", "rows": rows, "tree_size": cp.tree_size}


def verify_file(path: Path, key: VerifierKey, *, checkpoint: str | None = None
                ) -> dict[str, Any]:
    """A proof bundle (JSON) or a Parquet export, by content."""
    data = path.read_bytes()
    if data[:4] == b"PAR1":
        return verify_export(path, key)
    proof = orjson.loads(data)
    if not isinstance(proof, dict):
        raise VerificationFailed(f"{path}: not a ledger proof (not a JSON object)")
    kind = proof.get("type")
    if kind == "inclusion":
        return verify_inclusion_bundle(proof, key, checkpoint)
    if kind == "consistency":
        return verify_consistency_bundle(proof, key, checkpoint)
    raise VerificationFailed(f"{path}: not a ledger proof (type {kind!r})")
