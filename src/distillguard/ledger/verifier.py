"""The standalone verifier: checks proofs and exports with nothing but the public key.

It reads the public formats of docs/ledger.md (proof bundles as JSON, signed checkpoints,
Parquet exports) and uses only :mod:`distillguard.ledger.merkle`,
:mod:`distillguard.ledger.checkpoint` and :mod:`distillguard.ledger.keyring`: no store,
no settings, no network. Where a function takes ``key``, a
:class:`~distillguard.ledger.keyring.KeyRing` of current and retired keys does too: a
checkpoint signed before a rotation of the signing key checks with the retired key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from distillguard.ledger import merkle
from distillguard.ledger.checkpoint import Checkpoint, CheckpointError, VerifierKey
from distillguard.ledger.keyring import KeyRing, as_ring

Keys = VerifierKey | KeyRing


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


def _claim(proof: dict[str, Any], name: str, verified: str | bytes | None) -> None:
    """A bundle field that only repeats what was verified (the entry's id, the log, a
    root) must say the same: a proof of one entry labelled with another's id, or with a
    root that is not its checkpoint's, does not prove what it claims. A field the bundle
    leaves out claims nothing; hex fields are compared as bytes."""
    value = proof.get(name)
    if value is None:
        return
    claimed = _hex_field(proof, name) if isinstance(verified, bytes) else value
    if claimed != verified:
        shown = verified.hex() if isinstance(verified, bytes) else verified
        raise VerificationFailed(f"the proof's {name!r} is {value!r}, but what it proves "
                                 f"has {shown!r}")


def _signed(note: str | None, key: Keys, what: str) -> Checkpoint:
    if not note:
        raise VerificationFailed(f"{what}: no signed checkpoint to check against")
    try:
        return as_ring(key).open(note)[0]
    except CheckpointError as exc:
        raise VerificationFailed(f"{what}: {exc}") from None


def verify_inclusion_bundle(proof: dict[str, Any], key: Keys,
                            checkpoint: str | None = None) -> dict[str, Any]:
    """Check an inclusion proof bundle against its (or the given) signed checkpoint.
    The fields that repeat what is verified (``origin``, ``root_hash``, ``leaf_hash``,
    ``entry_id``) must agree with the checkpoint and the leaf; the result names the
    entry proven by the leaf's own id (``entry_id``)."""
    cp = _signed(checkpoint or proof.get("checkpoint"), key, "inclusion proof")
    size, index = _whole(proof, "tree_size"), _whole(proof, "leaf_index")
    if size != cp.tree_size:
        raise VerificationFailed(f"the proof is for tree size {size}, the checkpoint for "
                                 f"{cp.tree_size}")
    _claim(proof, "origin", cp.origin)
    _claim(proof, "root_hash", cp.root_hash)
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
    entry_id = entry.get("id")
    _claim(proof, "entry_id", entry_id if isinstance(entry_id, str) else None)
    try:
        merkle.verify_inclusion(index, size, lh, _hex_list(proof, "path"), cp.root_hash)
    except merkle.ProofError as exc:
        raise VerificationFailed(str(exc)) from None
    return {"ok": True, "type": "inclusion", "leaf_index": index, "tree_size": size,
            "entry_id": entry_id, "entry": entry}


def verify_consistency_bundle(proof: dict[str, Any], key: Keys,
                              old_checkpoint: str | None = None) -> dict[str, Any]:
    new = _signed(proof.get("new_checkpoint"), key, "consistency proof")
    old = _signed(old_checkpoint or proof.get("old_checkpoint"), key, "consistency proof")
    if (old.tree_size, new.tree_size) != (_whole(proof, "old_size"),
                                          _whole(proof, "new_size")):
        raise VerificationFailed("the proof's sizes are not those of the checkpoints")
    if old.origin != new.origin:
        raise VerificationFailed(f"the checkpoints are of two logs, {old.origin!r} and "
                                 f"{new.origin!r}")
    _claim(proof, "origin", new.origin)
    _claim(proof, "old_root", old.root_hash)
    _claim(proof, "new_root", new.root_hash)
    try:
        merkle.verify_consistency(old.tree_size, new.tree_size, old.root_hash,
                                  new.root_hash, _hex_list(proof, "path"))
    except merkle.ProofError as exc:
        raise VerificationFailed(str(exc)) from None
    return {"ok": True, "type": "consistency", "old_size": old.tree_size,
            "new_size": new.tree_size}


# The export's columns (docs/ledger.md, Parquet export): those a leaf holds, by the leaf's
# name for them, and those that carry the leaf, its proof and the retained bodies.
LEAF_COLUMNS = {"kind": "kind", "entry_id": "id", "ts": "ts", "account_id": "account_id",
                "key_id": "key_id", "client_ip": "client_ip", "model": "model",
                "status": "status", "prompt_tokens": "prompt_tokens",
                "completion_tokens": "completion_tokens", "latency_ms": "latency_ms"}
BODY_COLUMNS = ("request", "response")
EXPORT_COLUMNS = ("idx", *LEAF_COLUMNS, *BODY_COLUMNS, "leaf", "leaf_hash",
                  "inclusion_path")


def body_mismatch(leaf: dict[str, Any], request: str | bytes | None,
                  response: str | bytes | None) -> str | None:
    """What is wrong with the bodies given beside ``leaf`` (None: nothing): a body whose
    SHA-256 is not the one the leaf commits to, or a body beside an event. A missing body
    is fine (not retained, or redacted)."""
    for name, body in zip(BODY_COLUMNS, (request, response), strict=True):
        if body is None:
            continue
        if leaf.get("kind") != "exchange":
            return f"its {name} is set, but an {leaf.get('kind')} has no bodies"
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        if hashlib.sha256(raw).hexdigest() != leaf.get(f"{name}_sha256"):
            return f"its {name} does not match the hash its leaf commits to"
    return None


def _same(value: Any, expected: Any) -> bool:
    """A column's value is the leaf's: equal, and of the same JSON type (a Parquet
    float64 column holds a leaf's whole number of milliseconds as 812.0)."""
    if value is None or expected is None or isinstance(value, bool | str) \
            or isinstance(expected, bool | str):
        return type(value) is type(expected) and value == expected
    return isinstance(value, int | float) and isinstance(expected, int | float) \
        and value == expected


@dataclass(frozen=True, slots=True)
class ExportHeader:
    """An export's header, checked: its signed checkpoint (parsed, and as the note it
    came as) and the range of entries ``[start, end)`` it declares."""

    checkpoint: Checkpoint
    note: str
    start: int
    end: int


def export_header(path: Path, key: Keys) -> ExportHeader:
    """The export's header, checked: the signed checkpoint, the declared range within
    it, and that the file has exactly the export format's columns. ``ledger verify
    --export`` checks the ledger against its checkpoint too."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(b"distillguard.ledger")
    if raw is None:
        raise VerificationFailed(f"{path} is not a ledger export")
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError:
        header = None
    if not isinstance(header, dict):
        raise VerificationFailed(f"{path}: its ledger header is not a JSON object")
    note = header.get("checkpoint")
    cp = _signed(note, key, str(path))
    start, end = header.get("start"), header.get("end")
    if type(start) is not int or type(end) is not int or start < 0 \
            or end > cp.tree_size:
        raise VerificationFailed(f"{path}: its range [{start}, {end}) is not within the "
                                 f"{cp.tree_size} entries of its checkpoint")
    if header.get("origin") != cp.origin:
        raise VerificationFailed(f"{path}: its header names the ledger "
                                 f"{header.get('origin')!r}, its checkpoint {cp.origin!r}")
    for name in schema.names:
        if name not in EXPORT_COLUMNS:
            raise VerificationFailed(f"{path}: column {name!r} is not part of the export "
                                     "format")
    for name in EXPORT_COLUMNS:
        if name not in schema.names:
            raise VerificationFailed(f"{path}: column {name!r} is missing")
    return ExportHeader(cp, str(note), start, max(start, end))


def _out_of_sequence(path: Path, position: int, got: Any, expected: int, start: int,
                     end: int) -> str:
    """Why the row at ``position`` (``got``) is not entry ``expected``, the next of the
    declared range: reads the file's indices once more (on this failure path only) to
    tell a reordered row from missing ones."""
    import pyarrow.parquet as pq

    span = f"the export's range [{start}, {end})"
    if type(got) is not int:
        return f"row {position + 1} of the file (after entry {expected - 1}): its idx is " \
               f"{got!r}, not a whole number"
    if not start <= got < end:
        return f"row {got}: outside {span}"
    if got < expected:
        return f"row {got}: a second row for entry {got}"
    later = pq.read_table(path, columns=["idx"]).column("idx").to_pylist()[position + 1:]
    if expected in later:
        return f"row {got}: out of order (row {expected} expected)"
    present = min([i for i in later if isinstance(i, int) and expected < i] + [got])
    return f"row {got}: rows {expected} to {present - 1} of {span} are missing"


def _check_row(row: dict[str, Any], cp: Checkpoint) -> tuple[bytes, str | None]:
    """One row whose index is in sequence: its leaf hash, and what is wrong (None: it
    checks)."""
    idx = row["idx"]
    leaf_raw, stored, nodes = row["leaf"], row["leaf_hash"], row["inclusion_path"]
    for name, value in (("leaf", leaf_raw), ("leaf_hash", stored)):
        if type(value) is not bytes:
            return b"", f"its {name} is {'null' if value is None else 'not binary'}"
    if not isinstance(nodes, list) or not all(type(n) is bytes for n in nodes):
        return b"", ("its inclusion_path is null" if nodes is None
                     else "its inclusion_path is not a list of hashes")
    lh = merkle.leaf_hash(leaf_raw)
    if lh != stored:
        return lh, "leaf hash does not match its leaf"
    try:
        merkle.verify_inclusion(idx, cp.tree_size, lh, nodes, cp.root_hash)
    except merkle.ProofError as exc:
        return lh, str(exc)
    try:
        leaf = orjson.loads(leaf_raw)
    except orjson.JSONDecodeError:
        leaf = None
    if not isinstance(leaf, dict):
        return lh, "its leaf is not a ledger entry"
    if leaf.get("idx") != idx:
        return lh, f"its leaf names index {leaf.get('idx')!r}"
    for column, name in LEAF_COLUMNS.items():
        if not _same(row[column], leaf.get(name)):
            return lh, f"its {column} is {row[column]!r}, its leaf says {leaf.get(name)!r}"
    return lh, body_mismatch(leaf, row["request"], row["response"])


def verified_rows(path: Path, key: Keys, *, header: ExportHeader | None = None
                  ) -> Iterator[tuple[int, bytes]]:
    """``(index, leaf hash)`` of every row of a Parquet export, each checked first: its
    leaf, hash and inclusion path against the signed checkpoint in the file's metadata,
    every other column against what the leaf says (the bodies against the hashes it
    commits to), and the rows one per entry, in order, filling the range the header
    declares. Raises :class:`VerificationFailed` at the first row that does not check.
    ``header``: the export's, when the caller has read it (:func:`export_header`)."""
    import pyarrow.parquet as pq

    if header is None:
        header = export_header(path, key)
    cp, start, end = header.checkpoint, header.start, header.end
    expected = start
    for batch in pq.ParquetFile(path).iter_batches(columns=list(EXPORT_COLUMNS)):
        for row in batch.to_pylist():
            idx = row["idx"]
            if idx != expected or type(idx) is not int or idx >= end:
                raise VerificationFailed(_out_of_sequence(path, expected - start, idx,
                                                          expected, start, end))
            lh, wrong = _check_row(row, cp)
            if wrong is not None:
                raise VerificationFailed(f"row {idx}: {wrong}")
            expected += 1
            yield idx, lh
    if expected < end:
        raise VerificationFailed(f"rows {expected} to {end - 1} of the export's range "
                                 f"[{start}, {end}) are missing")


def verify_export(path: Path, key: Keys) -> dict[str, Any]:
    """Check every row of a Parquet export (see :func:`verified_rows`)."""
    header = export_header(path, key)
    rows = sum(1 for _ in verified_rows(path, key, header=header))
    return {"ok": True, "type": "export", "rows": rows, "start": header.start,
            "end": header.end, "tree_size": header.checkpoint.tree_size}


# A proof bundle holds a leaf, at most 64 hashes and two checkpoints: kilobytes. A file
# larger than this is not read whole into memory to find out.
MAX_PROOF_BYTES = 64 << 20


def verify_file(path: Path, key: Keys, *, checkpoint: str | None = None
                ) -> dict[str, Any]:
    """A proof bundle (JSON) or a Parquet export, by content. An export is streamed
    (never read whole); a bundle larger than ``MAX_PROOF_BYTES`` is refused unread."""
    with open(path, "rb") as fh:
        if fh.read(4) == b"PAR1":
            return verify_export(path, key)
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_PROOF_BYTES:
            raise VerificationFailed(f"{path}: {size} bytes is too large for a ledger proof "
                                     f"(at most {MAX_PROOF_BYTES}) and not a Parquet export")
        fh.seek(0)
        data = fh.read(MAX_PROOF_BYTES + 1)
    if len(data) > MAX_PROOF_BYTES:
        raise VerificationFailed(f"{path}: too large for a ledger proof")
    proof = orjson.loads(data)
    if not isinstance(proof, dict):
        raise VerificationFailed(f"{path}: not a ledger proof (not a JSON object)")
    kind = proof.get("type")
    if kind == "inclusion":
        return verify_inclusion_bundle(proof, key, checkpoint)
    if kind == "consistency":
        return verify_consistency_bundle(proof, key, checkpoint)
    raise VerificationFailed(f"{path}: not a ledger proof (type {kind!r})")
