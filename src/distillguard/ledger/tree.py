"""The ledger's Merkle tree in memory: compact, incremental, with proofs on demand.

Leaves are grouped in chunks of 64. Memory holds the hashes of every complete chunk and
of every perfect subtree above it (two hashes per 64 entries: about 2.3 bytes per entry
as Python objects, 230 MB per hundred million entries), plus the leaf hashes of the last,
incomplete chunk. A proof or an old root that needs hashes inside a complete chunk reads
that chunk's 64 leaf hashes from the store (``fetch``) and hashes its 63 inner nodes
once, kept in a small cache. Roots of past sizes are memoised. Appending costs one leaf
hash plus, on average, just over one node hash per entry.

The tree is not thread-safe by itself; :class:`~distillguard.ledger.writer.LedgerWriter`
guards it with a lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from distillguard.ledger import merkle

CHUNK_BITS = 6
CHUNK = 1 << CHUNK_BITS
_CACHE_CHUNKS = 256
_CACHE_ROOTS = 64

Fetch = Callable[[int, int], list[bytes]]


class MerkleTree:
    """An append-only RFC 9162 tree over leaf hashes; see the module docstring."""

    def __init__(self, fetch: Fetch | None = None) -> None:
        self.size = 0
        self._fetch = fetch
        self._tail: list[bytes] = []
        self._levels: list[list[bytes]] = [[]]  # level j: subtrees of 2**(CHUNK_BITS+j)
        self._cache: OrderedDict[int, list[list[bytes]]] = OrderedDict()
        self._roots: OrderedDict[int, bytes] = OrderedDict()

    def append(self, leaf_hash: bytes) -> None:
        tail = self._tail
        tail.append(leaf_hash)
        self.size += 1
        if len(tail) == CHUNK:
            self._carry(merkle.perfect_root(tail))
            self._tail = []

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    def _carry(self, h: bytes) -> None:
        levels = self._levels
        j = 0
        while True:
            level = levels[j]
            level.append(h)
            if len(level) % 2:
                return
            h = merkle.node_hash(level[-2], level[-1])
            j += 1
            if j == len(levels):
                levels.append([])

    # -- SubtreeSource --------------------------------------------------------------------

    def perfect(self, lo: int, level: int) -> bytes:
        if level >= CHUNK_BITS:
            return self._levels[level - CHUNK_BITS][lo >> level]
        chunk = lo >> CHUNK_BITS
        off = lo - (chunk << CHUNK_BITS)
        if chunk == self.size >> CHUNK_BITS:  # the incomplete chunk: still growing
            return merkle.perfect_root(self._tail[off:off + (1 << level)])
        return self._chunk(chunk)[level][off >> level]

    def _chunk(self, chunk: int) -> list[list[bytes]]:
        """Every level of a complete chunk: leaf hashes, then each level of inner nodes."""
        found = self._cache.get(chunk)
        if found is not None:
            self._cache.move_to_end(chunk)
            return found
        if self._fetch is None:
            raise LookupError("leaf hashes of complete chunks need a store to read from")
        lo = chunk << CHUNK_BITS
        level = self._fetch(lo, lo + CHUNK)
        if len(level) != CHUNK:
            raise LookupError(f"store returned {len(level)} leaf hashes for chunk {chunk}")
        found = [level]
        while len(level) > 1:
            level = [merkle.node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
            found.append(level)
        self._cache[chunk] = found
        if len(self._cache) > _CACHE_CHUNKS:
            self._cache.popitem(last=False)
        return found

    def forget_cache(self) -> None:
        self._cache.clear()
        self._roots.clear()

    # -- queries --------------------------------------------------------------------------

    def root(self, size: int | None = None) -> bytes:
        n = self.size if size is None else size
        if not 0 <= n <= self.size:
            raise merkle.ProofError(f"tree size {n} is beyond the ledger's {self.size}")
        found = self._roots.get(n)
        if found is None:
            found = self._roots[n] = merkle.mth(self, 0, n)
            if len(self._roots) > _CACHE_ROOTS:
                self._roots.popitem(last=False)
        return found

    def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        n = self.size if size is None else size
        if n > self.size:
            raise merkle.ProofError(f"tree size {n} is beyond the ledger's {self.size}")
        return merkle.inclusion_path(self, index, n)

    def consistency(self, old: int, new: int | None = None) -> list[bytes]:
        n = self.size if new is None else new
        if n > self.size:
            raise merkle.ProofError(f"tree size {n} is beyond the ledger's {self.size}")
        return merkle.consistency_path(self, old, n)
