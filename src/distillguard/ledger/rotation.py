"""Rotating the checkpoint signing key (``ledger keygen --force``) without a gap in the
signed history and without false alarms from ``ledger verify``.

1. The old key's public key is recorded in the retired-keys file beside the signing key
   (:mod:`distillguard.ledger.keyring`) with the ledger's tree size: its checkpoints
   count only up to that size, so the old private key, should it leak later, cannot
   sign new history.
2. A new key replaces the old one (renamed over it; a running gateway reads it before
   it signs its next checkpoint, see :attr:`Ledger.key`).
3. The retirement size is read again and recorded once more: checkpoints the old key
   signed while the key was being replaced are covered too.
4. When the ledger exists, the new key signs a checkpoint of the tree as it is now: the
   checkpoints go on from the old key's to the new key's without a gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from distillguard.exchange import format_ts
from distillguard.ledger.checkpoint import (
    CheckpointError,
    SignerKey,
    VerifierKey,
    public_path,
    replace_key,
)
from distillguard.ledger.core import Ledger
from distillguard.ledger.keyring import (
    KeyRing,
    RetiredKey,
    add_retired_key,
    retired_keys_path,
)
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.store import StoredCheckpoint


@dataclass(frozen=True)
class Rotation:
    """What :func:`rotate_key` did."""

    key: SignerKey
    retired: RetiredKey | None        # None: there was no old key that could be read
    retired_keys: Path                # the retired-keys file
    checkpoint: StoredCheckpoint | None
    not_signed: str | None            # why no checkpoint was signed at rotation


def old_public_key(key_path: Path) -> VerifierKey | None:
    """The public key of the signing key at ``key_path``: from the key itself, else from
    the public key beside it; None when neither can be read."""
    for read in (lambda: SignerKey.parse(key_path.read_text()).verifier,
                 lambda: VerifierKey.parse(public_path(key_path).read_text())):
        try:
            return read()
        except (OSError, UnicodeDecodeError, CheckpointError):
            continue
    return None


def _ledger_exists(config: LedgerConfig) -> bool:
    if config.url.startswith("sqlite:///"):
        return Path(config.url[len("sqlite:///"):]).exists()
    return True


def _signed_size(ledger: Ledger | None, old: VerifierKey) -> int:
    """The size up to which the old key may have signed: the entries stored, or the
    largest tree a stored checkpoint the old key signed covers, if larger (entries were
    removed; verify says so). Only signed notes count: the ``tree_size`` column beside
    a note is whatever the database says, and someone who can write it could otherwise
    stretch the retired key's reach to any size."""
    if ledger is None:
        return 0
    ring = KeyRing([old])
    signed = 0
    for cp in ledger.store.checkpoints():
        try:
            signed = max(signed, ring.open(cp.note)[0].tree_size)
        except CheckpointError:
            continue
    return max(ledger.refresh(), signed)


def rotate_key(config: LedgerConfig) -> Rotation:
    """Replace the signing key at ``config.key_path``, keeping the old public key as a
    retired key (module docstring). The ledger is opened first: when it cannot be, this
    raises and nothing is changed."""
    ledger = Ledger(config, create_key=False) if _ledger_exists(config) else None
    try:
        old = old_public_key(config.key_path)
        path = retired_keys_path(config.key_path)
        retired = None
        if old is not None:
            retired = RetiredKey(old, _signed_size(ledger, old), format_ts(datetime.now(UTC)))
            add_retired_key(path, retired)
        key = replace_key(config.key_path, config.origin)
        if old is not None and ledger is not None:
            retired = RetiredKey(old, _signed_size(ledger, old), format_ts(datetime.now(UTC)))
            add_retired_key(path, retired)
        if ledger is None:
            return Rotation(key, retired, path, None,
                            f"no ledger at {config.url} yet")
        try:
            checkpoint = ledger.checkpoint()
        except CheckpointError as exc:
            return Rotation(key, retired, path, None, str(exc))
        return Rotation(key, retired, path, checkpoint, None)
    finally:
        if ledger is not None:
            ledger.close()
