"""The public keys checkpoints are checked with, across rotations of the signing key.

After ``ledger keygen --force`` the ledger holds checkpoints signed by the old key and by
the new one. A :class:`KeyRing` holds the keys a verifier trusts: current keys (the
public key of the signing key, and any an auditor passes with ``--key``), each vouching
for any tree size, and **retired** keys, each vouching only for trees up to the size
the ledger had when the key was retired, so that an old private key that leaks later
cannot sign new history. A signature line names its key by name and 4-byte key id
(:mod:`distillguard.ledger.checkpoint`); the ring picks the key by those, as C2SP signed
note verifiers do, rather than trying every key.

Retired keys are kept, public keys only, in the **retired-keys file** beside the
signing key, ``<key_path>.retired.pub`` (``ledger.key.retired.pub``): ``#`` comment
lines, and one line per retired key::

    <verifier key> <tree size at retirement> <time of retirement, RFC 3339>

for instance ``distillguard/ledger+1a2b3c4d+AQ...= 1200 2026-03-01T12:00:00.000Z``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from distillguard.files import write_atomically
from distillguard.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    VerifierKey,
    parse_checkpoint,
)

RETIRED_HEADER = (
    "# Retired public keys of this ledger's checkpoint signing key (docs/ledger.md,\n"
    "# \"Rotating the signing key\"). One per line: the verifier key, the tree size the\n"
    "# ledger had when it was retired, and when. A retired key's checkpoints count only up\n"
    "# to that size. Public keys only: keep a copy with the public key you verify with.\n")


def retired_keys_path(key_path: Path) -> Path:
    """The retired-keys file of the signing key at ``key_path``."""
    return key_path.with_name(key_path.name + ".retired.pub")


def describe(name: str, key_id: bytes) -> str:
    """How reports name a key: its name and key id, as its verifier key begins."""
    return f"{name}+{key_id.hex()}"


@dataclass(frozen=True)
class RetiredKey:
    """A public key that no longer signs: its checkpoints count up to ``tree_size``."""

    key: VerifierKey
    tree_size: int
    retired_at: str = ""

    def encode(self) -> str:
        return f"{self.key.encode()} {self.tree_size} {self.retired_at}".rstrip()


def parse_retired_keys(text: str, source: str = "retired keys") -> list[RetiredKey]:
    """The retired keys of a retired-keys file's text. Raises :class:`CheckpointError`
    naming the line that is not one."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) not in (2, 3):
            raise CheckpointError(f"{source}, line {number}: a retired key is "
                                  "'<verifier key> <tree size> [<time retired>]'")
        try:
            key = VerifierKey.parse(fields[0])
        except CheckpointError as exc:
            raise CheckpointError(f"{source}, line {number}: {exc}") from None
        size = fields[1]
        if not (size.isascii() and size.isdigit()):
            raise CheckpointError(f"{source}, line {number}: tree size {size!r} is not a "
                                  "whole number")
        keys.append(RetiredKey(key, int(size), fields[2] if len(fields) == 3 else ""))
    return keys


def read_retired_keys(path: Path) -> list[RetiredKey]:
    """The retired keys in the file at ``path`` (none when there is no such file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a retired-keys file (not text)") from None
    return parse_retired_keys(text, str(path))


def format_retired_keys(keys: Iterable[RetiredKey]) -> str:
    """The text of a retired-keys file holding ``keys``, in that order (the header alone
    when there are none): what :func:`parse_retired_keys` reads."""
    return RETIRED_HEADER + "".join(r.encode() + "\n" for r in keys)


def add_retired_key(path: Path, retired: RetiredKey) -> None:
    """Record ``retired`` in the retired-keys file at ``path`` (written whole, atomically);
    a record of the same key already there is replaced."""
    kept = [r for r in read_retired_keys(path) if r.key != retired.key]
    write_atomically(path, format_retired_keys([*kept, retired]).encode())


@dataclass(frozen=True)
class TrustedKey:
    """A key of a :class:`KeyRing`; ``retired_at_size`` None: it vouches for any size."""

    key: VerifierKey
    retired_at_size: int | None = None

    @property
    def retired(self) -> bool:
        return self.retired_at_size is not None

    def describe(self) -> str:
        return describe(self.key.name, self.key.key_id)


class UnknownKeyError(CheckpointError):
    """A checkpoint signed only by keys the ring does not hold: it cannot be checked,
    which is not the same as a signature that does not verify."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        super().__init__(
            f"signed by an unknown key {', '.join(keys)}: neither the current key nor a "
            "retired one; pass its public key (--key, or --retired-keys with its "
            "retirement size) if it is one of this ledger's keys, else this ledger's "
            "keys did not sign it")


class KeyRing:
    """Current and retired public keys, looked up by the key name and id of a signature
    line. Build it from current keys and :class:`RetiredKey` records; a key that is both
    (a rotation stopped half-way) is current."""

    def __init__(self, current: Iterable[VerifierKey] = (),
                 retired: Iterable[RetiredKey] = ()) -> None:
        self._keys: dict[tuple[str, bytes], TrustedKey] = {}
        for r in retired:
            self._keys[(r.key.name, r.key.key_id)] = TrustedKey(r.key, r.tree_size)
        for key in current:
            self._keys[(key.name, key.key_id)] = TrustedKey(key)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> list[TrustedKey]:
        return list(self._keys.values())

    def open(self, note: str) -> tuple[Checkpoint, TrustedKey]:
        """Parse a signed checkpoint and verify it with the key its signature line names;
        returns the checkpoint and that key. Raises :class:`UnknownKeyError` when no
        signature is by a key of the ring, :class:`CheckpointError` when one is and does
        not verify, is not for the key's log, or is a retired key's for a tree larger
        than the key's retirement size."""
        checkpoint, signatures = parse_checkpoint(note)
        message = note.partition("\n\n")[0].encode() + b"\n"
        failure: CheckpointError | None = None
        unknown = []
        for name, key_id, sig in signatures:
            trusted = self._keys.get((name, key_id))
            if trusted is None:
                unknown.append(describe(name, key_id))
                continue
            if not trusted.key.verify(message, sig):
                failure = failure or CheckpointError(
                    f"checkpoint signature by {trusted.describe()} does not verify")
            elif checkpoint.origin != trusted.key.name:
                failure = failure or CheckpointError(
                    f"checkpoint origin {checkpoint.origin!r} is not the key's log "
                    f"{trusted.key.name!r}")
            elif (trusted.retired_at_size is not None
                  and checkpoint.tree_size > trusted.retired_at_size):
                failure = failure or CheckpointError(
                    f"signed by retired key {trusted.describe()} for a tree of "
                    f"{checkpoint.tree_size} entries, but the key was retired at tree size "
                    f"{trusted.retired_at_size}: a retired key cannot vouch for later "
                    "history")
            else:
                return checkpoint, trusted
        if failure is not None:
            raise failure
        raise UnknownKeyError(unknown)


def as_ring(key: VerifierKey | KeyRing) -> KeyRing:
    """A single public key as a ring of one current key."""
    return key if isinstance(key, KeyRing) else KeyRing([key])


def signer_ids(note: str) -> list[bytes]:
    """The key ids of a signed checkpoint's signature lines (none if it is malformed)."""
    try:
        return [key_id for _name, key_id, _sig in parse_checkpoint(note)[1]]
    except CheckpointError:
        return []
