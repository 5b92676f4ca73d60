"""One open ledger: its store, its Merkle tree in memory and its signing key.

:class:`Ledger` is synchronous and thread-safe; the writer, the CLI, the HTTP routes and
the dashboard all go through it. Appending with group commit lives in
:mod:`distillguard.ledger.writer`.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from distillguard.exchange import format_ts
from distillguard.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    SignerKey,
    VerifierKey,
    load_or_create_key,
    public_path,
)
from distillguard.ledger.entry import Pending
from distillguard.ledger.keyring import (
    KeyRing,
    RetiredKey,
    read_retired_keys,
    retired_keys_path,
    signer_ids,
)
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.store import LedgerStore, Row, StoredCheckpoint, open_store
from distillguard.ledger.tree import MerkleTree

log = logging.getLogger("distillguard.ledger")
# ``index:N`` names the entry at index N, whatever ids the entries have (Ledger.find).
INDEX_PREFIX = "index:"

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Ledger:
    def __init__(self, config: LedgerConfig, *, create_key: bool = True,
                 store: LedgerStore | None = None) -> None:
        self.config = config
        self.store = store or open_store(config.url, durability=config.durability)
        self.store.migrate()
        self.lock = threading.RLock()
        self.tree = MerkleTree(self.store.leaf_hashes)
        self.tree.extend(self.store.iter_leaf_hashes())
        # Why this process will not sign (None: it will): see _check_store.
        self.refusal: str | None = self._check_store()
        if self.refusal is not None:
            log.error("ledger: %s; no checkpoint will be signed until it is repaired "
                      "(distillguard ledger verify says where)", self.refusal)
        # the key as read, and its file's stamp taken before reading it (see key)
        self._key_stamp = _stamp(config.key_path)
        self._key: SignerKey | None = None
        if create_key or config.key_path.exists():
            self._key = load_or_create_key(config.key_path, config.origin, create=create_key)

    @property
    def size(self) -> int:
        return self.tree.size

    @property
    def key(self) -> SignerKey | None:
        """The checkpoint signing key, read again when its file was replaced (``ledger
        keygen --force`` rotates it): a running gateway signs its next checkpoint with
        the new key, not with the retired one, whose checkpoints count only up to the
        tree size it was retired at."""
        stamp = _stamp(self.config.key_path)
        if stamp is not None and stamp != self._key_stamp:
            try:
                key = SignerKey.parse(self.config.key_path.read_text())
            except (OSError, UnicodeDecodeError, CheckpointError) as exc:
                log.error("ledger: cannot read the signing key %s (%s); still signing "
                          "with the one read before", self.config.key_path, exc)
            else:
                if self._key is not None and key != self._key:
                    log.info("ledger: the signing key %s was replaced (ledger keygen "
                             "--force); signing with the new key %s", self.config.key_path,
                             key.verifier.key_id.hex())
                self._key, self._key_stamp = key, stamp
        return self._key

    @property
    def verifier(self) -> VerifierKey | None:
        """The public key checkpoints are checked with: ``ledger.verifier_key`` when the
        settings name one (a copy kept apart from the ledger), else the signing key's."""
        if self.config.verifier_key is not None:
            try:
                return VerifierKey.parse(self.config.verifier_key.read_text())
            except (OSError, UnicodeDecodeError, CheckpointError) as exc:
                raise CheckpointError(f"ledger.verifier_key {self.config.verifier_key}: "
                                      f"{exc}") from None
        if self.key is not None:
            return self.key.verifier
        pub = public_path(self.config.key_path)
        return VerifierKey.parse(pub.read_text()) if pub.exists() else None

    @property
    def retired_keys(self) -> list[RetiredKey]:
        """The retired keys checkpoints are checked with, in the order of their file: those
        of ``ledger.retired_keys`` when the settings name that file, else, when the
        verifier is the one beside the signing key, those of the retired-keys file beside
        it (a verifier key kept apart is not paired with retired keys that lie with the
        ledger), else none."""
        if self.config.retired_keys is not None:
            if not self.config.retired_keys.exists():
                raise CheckpointError(f"ledger.retired_keys {self.config.retired_keys}: "
                                      "no such file")
            return read_retired_keys(self.config.retired_keys)
        if self.config.verifier_key is None:
            return read_retired_keys(retired_keys_path(self.config.key_path))
        return []

    @property
    def keyring(self) -> KeyRing | None:
        """The keys the checkpoints in the store are checked with: :attr:`verifier` as the
        current key and :attr:`retired_keys`. None: no key at all."""
        current = self.verifier
        retired = self.retired_keys
        if current is None and not retired:
            return None
        return KeyRing([current] if current is not None else [], retired)

    def signed_by_key(self, cp: StoredCheckpoint) -> bool:
        """Whether the current signing key signed ``cp`` (a checkpoint signed before a
        key rotation was not): proofs and exports handed out carry a checkpoint that the
        current public key checks."""
        key = self.key
        return key is not None and key.verifier.key_id in signer_ids(cp.note)

    def _check_store(self) -> str | None:
        """What is wrong with the stored entries as this process found them, or None.
        The signer signs the tree it builds from the store: with an entry deleted, the
        tree counted the last one twice and signed that, and with one rewritten, the
        new history. So the entries must be numbered without a gap, and give the root
        the last signed checkpoint says."""
        size, count = self.store.size(), self.store.count()
        if count != size or self.tree.size != size:
            return (f"the store holds {count} entries numbered up to {size - 1}: entries "
                    "were removed or moved")
        last = self.store.latest_checkpoint()
        if last is None:
            return None
        if last.tree_size > size:
            return (f"the last signed checkpoint covers {last.tree_size} entries, the store "
                    f"holds {size}: entries were removed")
        if self.tree.root(last.tree_size) != last.root_hash:
            return (f"the first {last.tree_size} entries do not give the root of the last "
                    "signed checkpoint: entries were changed")
        return None

    def refresh(self) -> int:
        """Catch up with entries other processes appended."""
        with self.lock:
            top = self.store.size()
            if top > self.tree.size:
                self.tree.extend(self.store.leaf_hashes(self.tree.size, top))
            return self.tree.size

    def append(self, pending: Sequence[Pending]) -> list[Row]:
        """Append entries in one durable transaction; returns them with their indices."""

        def make_rows(start: int) -> list[Row]:
            with self.lock:
                if start > self.tree.size:
                    self.tree.extend(self.store.leaf_hashes(self.tree.size, start))
                if start != self.tree.size:
                    raise RuntimeError(f"ledger store holds {start} entries, the tree "
                                       f"{self.tree.size}: entries were removed")
            return [p.to_row(start + i) for i, p in enumerate(pending)]

        rows = self.store.append(make_rows)
        with self.lock:
            if rows and rows[0].idx == self.tree.size:
                for r in rows:
                    self.tree.append(r.leaf_hash)
        return rows

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, *, only_if_grown: bool = False) -> StoredCheckpoint | None:
        """Sign and store a checkpoint of the tree as it is now."""
        key = self.key
        if key is None:
            raise CheckpointError(f"no signing key at {self.config.key_path}")
        if self.refusal is not None:
            raise CheckpointError(f"not signing: {self.refusal}")
        with self.lock:
            size = self.tree.size
            root = self.tree.root(size)
        if only_if_grown:
            last = self.store.latest_checkpoint()
            if last is not None and last.tree_size >= size:
                return None
        note = Checkpoint(self.config.origin, size, root).sign(key)
        ts = format_ts(datetime.now(UTC))
        self.store.add_checkpoint(size, root, ts, note)
        return self.store.latest_checkpoint()

    # -- proofs ---------------------------------------------------------------------------

    def root(self, size: int | None = None) -> bytes:
        with self.lock:
            return self.tree.root(size)

    def inclusion(self, ref: str | int, size: int | None = None, *,
                  sign_if_needed: bool = False) -> dict[str, Any]:
        """Inclusion proof of an entry (exchange/event id or index) in the tree of ``size``
        (default: the latest checkpoint's size; when that does not cover the entry, a new
        checkpoint if ``sign_if_needed`` and the key is at hand, else the current size)."""
        row = self.find(ref)
        if row is None:
            raise LookupError(f"no ledger entry {ref!r}")
        self.refresh()
        note = None
        if size is None:
            last = self.store.latest_checkpoint()
            if (last is None or last.tree_size <= row.idx or not self.signed_by_key(last)) \
                    and sign_if_needed and self.key:
                last = self.checkpoint()
            if last is not None and last.tree_size > row.idx:
                size, note = last.tree_size, last.note
            else:
                size = self.tree.size
        else:
            note = self.note_at(size)
        with self.lock:
            path = self.tree.inclusion(row.idx, size)
            root = self.tree.root(size)
        return {"version": 1, "type": "inclusion", "origin": self.config.origin,
                "entry_id": row.entry_id, "leaf_index": row.idx, "tree_size": size,
                "leaf": b64(row.leaf), "leaf_hash": row.leaf_hash.hex(),
                "root_hash": root.hex(), "path": [p.hex() for p in path],
                "checkpoint": note}

    def note_at(self, size: int) -> str | None:
        """The newest stored signed checkpoint of tree size ``size``, if any."""
        for cp in reversed(self.store.checkpoints()):
            if cp.tree_size == size:
                return cp.note
        return None

    def consistency(self, old: int, new: int | None = None) -> dict[str, Any]:
        self.refresh()
        with self.lock:
            n = self.tree.size if new is None else new
            path = self.tree.consistency(old, n)
            return {"version": 1, "type": "consistency", "origin": self.config.origin,
                    "old_size": old, "new_size": n,
                    "old_root": self.tree.root(old).hex(), "new_root": self.tree.root(n).hex(),
                    "path": [p.hex() for p in path]}

    def find(self, ref: str | int) -> Row | None:
        """The entry ``ref`` names; None when there is none. ``ref`` is an entry id (an
        exchange's or an event's), an index (an int, or ``index:N``), or digits: the entry
        with that id when there is one (a trace may give an exchange the id ``42``),
        else the index. An index past the ledger is none, rather than a number the
        database cannot hold (a 20-digit index raised OverflowError in SQLite)."""
        if isinstance(ref, int):
            return self._at(ref)
        if ref.startswith(INDEX_PREFIX):
            number = ref[len(INDEX_PREFIX):]
            return self._at(int(number)) if _digits(number) else None
        found = self.store.find(ref)
        if found is None and _digits(ref):
            return self._at(int(ref))
        return found

    def _at(self, idx: int) -> Row | None:
        if not 0 <= idx < self.store.size():
            return None
        return next(iter(self.store.iter_rows(idx, idx + 1)), None)

    def close(self) -> None:
        self.store.close()


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _stamp(path: os.PathLike[str]) -> tuple[int, int, int] | None:
    """What tells a replaced file from the one read before (None: no file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
