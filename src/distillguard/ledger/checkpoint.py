"""Signed checkpoints: the C2SP tlog-checkpoint text in a C2SP signed note, Ed25519.

A checkpoint (format version 1, see docs/ledger.md) is::

    <origin>\\n
    <tree size, decimal>\\n
    <root hash, base64>\\n
    \\n
    \\u2014 <key name> <base64(key id (4 bytes) || Ed25519 signature (64 bytes))>\\n

The signature covers the note text (the first three lines, newlines included). The key
id is the first four bytes of ``SHA-256(key name || "\\n" || 0x01 || public key)``. Keys
use the signed-note encodings: the verifier (public) key is
``<name>+<key id hex>+<base64(0x01 || public key)>`` and the signer key
``PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 || seed)>``, so Go's
``golang.org/x/mod/sumdb/note`` and other C2SP tools read them too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from distillguard.files import write_atomically

ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "


class CheckpointError(ValueError):
    """A checkpoint or key is malformed, or a signature does not verify."""


def _key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()[:4]


def _check_name(name: str) -> str:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise CheckpointError(f"key name {name!r} must be non-empty, without spaces or '+'")
    return name


@dataclass(frozen=True)
class VerifierKey:
    name: str
    public: bytes

    @property
    def key_id(self) -> bytes:
        return _key_id(self.name, self.public)

    def encode(self) -> str:
        blob = base64.b64encode(bytes([ALG_ED25519]) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise CheckpointError("a verifier key is NAME+KEYID+BASE64")
        name, hexid, blob = parts
        try:
            raw = base64.b64decode(blob, validate=True)
        except ValueError as exc:
            raise CheckpointError("verifier key: bad base64") from exc
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise CheckpointError("verifier key: not an Ed25519 key")
        key = cls(_check_name(name), raw[1:])
        if key.key_id.hex() != hexid.lower():
            raise CheckpointError("verifier key: key id does not match the key")
        return key

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SignerKey:
    name: str
    seed: bytes

    @classmethod
    def generate(cls, name: str) -> SignerKey:
        return cls(_check_name(name), os.urandom(32))

    @property
    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @property
    def verifier(self) -> VerifierKey:
        public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return VerifierKey(self.name, public)

    def encode(self) -> str:
        blob = base64.b64encode(bytes([ALG_ED25519]) + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id.hex()}+{blob}"

    @classmethod
    def parse(cls, text: str) -> SignerKey:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise CheckpointError("a signer key is PRIVATE+KEY+NAME+KEYID+BASE64")
        try:
            raw = base64.b64decode(parts[4], validate=True)
        except ValueError as exc:
            raise CheckpointError("signer key: bad base64") from exc
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise CheckpointError("signer key: not an Ed25519 key")
        key = cls(_check_name(parts[2]), raw[1:])
        if key.verifier.key_id.hex() != parts[3].lower():
            raise CheckpointError("signer key: key id does not match the key")
        return key

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    tree_size: int
    root_hash: bytes

    def text(self) -> str:
        """The note text that is signed."""
        root = base64.b64encode(self.root_hash).decode()
        return f"{self.origin}\n{self.tree_size}\n{root}\n"

    def sign(self, key: SignerKey) -> str:
        """The signed note: text, blank line, one signature line."""
        sig = key.sign(self.text().encode())
        blob = base64.b64encode(key.verifier.key_id + sig).decode()
        return f"{self.text()}\n{SIG_PREFIX}{key.name} {blob}\n"


def parse_checkpoint(note: str) -> tuple[Checkpoint, list[tuple[str, bytes, bytes]]]:
    """Split a signed note into its checkpoint and (key name, key id, signature) lines.
    Anything else is :class:`CheckpointError`, whatever a store's column held: a
    checkpoint read from a database is as untrusted as one handed over."""
    if not isinstance(note, str):
        raise CheckpointError(f"a signed checkpoint is text, not {type(note).__name__}")
    text, sep, sigs = note.partition("\n\n")
    if not sep:
        raise CheckpointError("a signed checkpoint has a blank line before its signatures")
    lines = text.split("\n")
    if len(lines) < 3 or any(not line for line in lines):
        raise CheckpointError("a checkpoint has origin, tree size and root hash lines")
    origin, size_text, root_text = lines[:3]
    if not (size_text.isascii() and size_text.isdigit()) or (
            size_text != "0" and size_text.startswith("0")):
        raise CheckpointError(f"tree size {size_text!r} is not a decimal number")
    # a uint64 (C2SP tlog-checkpoint); a longer one raised ValueError from int()
    if len(size_text) > 20 or int(size_text) >= 2**64:
        raise CheckpointError(f"tree size {size_text[:24]}... is beyond 2^64 - 1")
    try:
        root = base64.b64decode(root_text, validate=True)
    except ValueError as exc:
        raise CheckpointError("root hash is not base64") from exc
    if len(root) != 32:
        raise CheckpointError("root hash is not 32 bytes")
    signatures = []
    for line in sigs.rstrip("\n").split("\n"):
        if not line.startswith(SIG_PREFIX):
            raise CheckpointError("signature lines start with an em dash and a space")
        name, _, blob = line[len(SIG_PREFIX):].rpartition(" ")
        try:
            raw = base64.b64decode(blob, validate=True)
        except ValueError as exc:
            raise CheckpointError("signature is not base64") from exc
        if len(raw) < 5:
            raise CheckpointError("signature is too short")
        signatures.append((name, raw[:4], raw[4:]))
    if not signatures:
        raise CheckpointError("checkpoint is not signed")
    return Checkpoint(origin, int(size_text), root), signatures


def open_checkpoint(note: str, key: VerifierKey) -> Checkpoint:
    """Parse a signed checkpoint and verify its signature by ``key``; the origin must be
    the key's name. Raises :class:`CheckpointError`."""
    checkpoint, signatures = parse_checkpoint(note)
    message = note.partition("\n\n")[0].encode() + b"\n"
    for name, key_id, sig in signatures:
        if name == key.name and key_id == key.key_id:
            if not key.verify(message, sig):
                raise CheckpointError("checkpoint signature does not verify")
            if checkpoint.origin != key.name:
                raise CheckpointError(f"checkpoint origin {checkpoint.origin!r} is not "
                                      f"the key's log {key.name!r}")
            return checkpoint
    raise CheckpointError(f"checkpoint carries no signature by key {key.name}")


def load_or_create_key(path: Path, name: str, *, create: bool = True) -> SignerKey:
    """The signer key at ``path`` (created with mode 0600, its verifier key next to it as
    ``<path>.pub``, when missing and ``create``).

    Processes opening a new ledger at once (two replicas on a shared volume) all get the
    one key: each writes a key of its own to a temporary file, complete and on disk, and
    links it into place; a process that finds the place taken reads the key there, which
    is whole because it was linked only once written."""
    if path.exists():
        return SignerKey.parse(path.read_text())
    if not create:
        raise CheckpointError(f"no ledger signing key at {path} (run distillguard ledger keygen)")
    return _install_new_key(path, name, replace=False)


def replace_key(path: Path, name: str) -> SignerKey:
    """A new signer key at ``path`` in place of the one there (renamed over it, so a
    reader finds the old key or the new one, whole), its verifier key at ``<path>.pub``.
    Keeping the old public key is the caller's part (:mod:`distillguard.ledger.rotation`)."""
    return _install_new_key(path, name, replace=True)


def _install_new_key(path: Path, name: str, *, replace: bool) -> SignerKey:
    """A new signer key, written whole to a temporary file and then put at ``path``:
    renamed over what is there (``replace``), or linked into place only if the place is
    free (else the key already there is returned); its verifier key at ``<path>.pub``."""
    key = SignerKey.generate(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _write_private(path, key)
    try:
        (os.replace if replace else os.link)(temporary, path)
    except FileExistsError:          # linking only: another process's key is in place
        return SignerKey.parse(path.read_text())
    finally:
        with contextlib.suppress(FileNotFoundError):    # renamed away: nothing left
            os.unlink(temporary)
    write_atomically(public_path(path), (key.verifier.encode() + "\n").encode())
    return key


def _write_private(path: Path, key: SignerKey) -> Path:
    """A new file beside ``path``, mode 0600, holding ``key``, complete and on disk."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(key.encode() + "\n")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def public_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".pub")
