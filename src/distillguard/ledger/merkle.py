"""RFC 9162 Merkle tree hashing, proof generation and proof verification.

Hashes follow RFC 9162 section 2.1 exactly: a leaf hash is ``SHA-256(0x00 || leaf)``, an
interior node ``SHA-256(0x01 || left || right)``, the empty tree ``SHA-256()``; a tree of
``n`` leaves splits at ``k``, the largest power of two smaller than ``n``.

Proof *generation* works on any :class:`SubtreeSource` (something that returns the hash of
a perfect, aligned subtree); :mod:`distillguard.ledger.tree` keeps one in memory for the
ledger. Proof *verification* (:func:`verify_inclusion`, :func:`verify_consistency`) needs
nothing but this module and ``hashlib``, so a standalone verifier can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof does not verify, or its parameters are out of range."""


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n`` >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def perfect_root(hashes: Sequence[bytes]) -> bytes:
    """Root of a perfect subtree given its 2**k leaf hashes, in order."""
    level = list(hashes)
    sha256 = hashlib.sha256
    while len(level) > 1:
        level = [sha256(NODE_PREFIX + level[i] + level[i + 1]).digest()
                 for i in range(0, len(level), 2)]
    return level[0]


def root_of(hashes: Sequence[bytes]) -> bytes:
    """MTH over a list of leaf hashes (any length), for small trees and tests."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = split_point(n)
    return node_hash(root_of(hashes[:k]), root_of(hashes[k:]))


class SubtreeSource(Protocol):
    def perfect(self, lo: int, level: int) -> bytes:
        """Hash of the perfect subtree of ``2**level`` leaves starting at ``lo``
        (``lo`` is a multiple of ``2**level``)."""
        ...


def mth(src: SubtreeSource, lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for a range that is a subtree of the RFC 9162 decomposition."""
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0 and lo % n == 0:
        return src.perfect(lo, n.bit_length() - 1)
    k = split_point(n)
    return node_hash(mth(src, lo, lo + k), mth(src, lo + k, hi))


def inclusion_path(src: SubtreeSource, index: int, size: int) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 section 2.1.3.1, leaf end first."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    path: list[bytes] = []
    lo, hi, m = 0, size, index
    while hi - lo > 1:
        k = split_point(hi - lo)
        if m < k:
            path.append(mth(src, lo + k, hi))
            hi = lo + k
        else:
            path.append(mth(src, lo, lo + k))
            lo, m = lo + k, m - k
    path.reverse()
    return path


def consistency_path(src: SubtreeSource, old: int, new: int) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1, leaf end first."""
    if not 0 <= old <= new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    if old == 0 or old == new:
        return []
    out: list[bytes] = []
    lo, hi, m, whole = 0, new, old, True
    while True:
        n = hi - lo
        if m == n:
            if not whole:
                out.append(mth(src, lo, hi))
            break
        k = split_point(n)
        if m <= k:
            out.append(mth(src, lo + k, hi))
            hi = lo + k
        else:
            out.append(mth(src, lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    out.reverse()
    return out


def _lsb(x: int) -> int:
    return x & 1


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes:
    """The root a valid inclusion proof leads to (RFC 9162 section 2.1.3.2)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if _lsb(fn) or fn == sn:
            r = node_hash(p, r)
            if not _lsb(fn):
                while fn and not _lsb(fn):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes],
                     root: bytes) -> None:
    """Raise :class:`ProofError` unless ``leaf`` (a leaf hash) is at ``index`` in the tree
    of ``size`` leaves whose root is ``root``."""
    if root_from_inclusion(index, size, leaf, path) != root:
        raise ProofError("inclusion proof does not lead to the root hash")


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes,
                       path: Sequence[bytes]) -> None:
    """Raise :class:`ProofError` unless the tree of size ``old`` with ``old_root`` is a
    prefix of the tree of size ``new`` with ``new_root`` (RFC 9162 section 2.1.4.2)."""
    if not 0 <= old <= new:
        raise ProofError(f"sizes {old} and {new} are not in order")
    if old == new:
        if path or old_root != new_root:
            raise ProofError("equal sizes need equal roots and an empty proof")
        return
    if old == 0:
        if path:
            raise ProofError("a proof from the empty tree must be empty")
        return
    if not path:
        raise ProofError("empty consistency proof")
    nodes = list(path)
    if old & (old - 1) == 0:
        nodes.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while _lsb(fn):
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if _lsb(fn) or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not _lsb(fn):
                while fn and not _lsb(fn):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")
