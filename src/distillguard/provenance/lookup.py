"""Finding the exchanges a suspect data set came from.

The suspect items (usually far fewer than the ledger's exchanges) go into a
:class:`datasketch.MinHashLSH` index; the ledger or trace is then read once, in batches,
and every exchange's answer is looked up in that index. LSH candidates are verified on
the exact shingle sets: an item matches an exchange when at least ``min_containment`` of
the item's shingles occur in the exchange's answer (so an excerpt or a lightly edited
copy still matches) - the LSH threshold is set below that so such copies are found.
Memory is bounded by the suspect set, not by the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
from datasketch import MinHashLSH
from tqdm import tqdm

from distillguard.exchange import Exchange, format_ts
from distillguard.provenance.minhash import NUM_PERM, containment, lean, shingles, signatures
from distillguard.provenance.suspect import SuspectItem

MIN_SHINGLES = 3


@dataclass(frozen=True, slots=True)
class Match:
    item: int
    exchange_id: str
    account_id: str | None
    ts: str
    containment: float
    jaccard: float
    exact: float  # containment without folding fingerprint variants: the tie-breaker


@dataclass
class ScanStats:
    exchanges: int = 0
    with_text: int = 0
    candidates: int = 0
    matches: int = 0


def _batches(it: Iterable[Exchange], size: int) -> Iterator[list[Exchange]]:
    source = iter(it)
    while batch := list(islice(source, size)):
        yield batch


class ProvenanceIndex:
    """An LSH index over the suspect items' answers."""

    def __init__(self, items: Sequence[SuspectItem], *, lsh_threshold: float = 0.2,
                 min_containment: float = 0.5) -> None:
        if not 0 < min_containment <= 1 or not 0 < lsh_threshold < 1:
            raise ValueError("thresholds must lie in (0, 1]")
        self.items = list(items)
        self.min_containment = min_containment
        self.sets = [shingles(i.response) for i in self.items]
        self.indexed = [i for i, s in enumerate(self.sets) if len(s) >= MIN_SHINGLES]
        self.lsh = MinHashLSH(threshold=lsh_threshold, num_perm=NUM_PERM)
        sigs = signatures([self.sets[i] for i in self.indexed])
        for row, i in enumerate(self.indexed):
            self.lsh.insert(i, lean(sigs[row]))
        self.stats = ScanStats()
        self._exact_sets: dict[int, np.ndarray] = {}

    def _exact(self, i: int) -> np.ndarray:
        found = self._exact_sets.get(i)
        if found is None:
            found = self._exact_sets[i] = shingles(self.items[i].response, fold=False)
        return found

    @property
    def too_short(self) -> list[int]:
        """Items whose answer is too short (under 3 shingles) to attribute."""
        indexed = set(self.indexed)
        return [i for i in range(len(self.items)) if i not in indexed]

    def scan(self, exchanges: Iterable[Exchange], *, total: int | None = None,
             batch_size: int = 500, progress: bool = True) -> list[Match]:
        """Read ``exchanges`` once; return every verified (item, exchange) match."""
        found: list[Match] = []
        bar = tqdm(total=total, unit="ex", desc="provenance", disable=not progress,
                   mininterval=1.0)
        try:
            for batch in _batches(exchanges, batch_size):
                found += self._scan_batch(batch)
                bar.update(len(batch))
        finally:
            bar.close()
        return found

    def _scan_batch(self, batch: list[Exchange]) -> list[Match]:
        stats = self.stats
        stats.exchanges += len(batch)
        texts = [e.response_text() if e.status in (0, 200) else "" for e in batch]
        sets = [shingles(t) if t else np.zeros(0, dtype=np.uint64) for t in texts]
        live = [k for k, s in enumerate(sets) if len(s)]
        stats.with_text += len(live)
        sigs = signatures([sets[k] for k in live])
        out = []
        for row, k in enumerate(live):
            candidates = self.lsh.query(lean(sigs[row]))
            if not candidates:
                continue
            stats.candidates += len(candidates)
            ex = batch[k]
            for i in candidates:
                c, j = containment(self.sets[i], sets[k])
                if c >= self.min_containment:
                    exact, _ = containment(self._exact(int(i)), shingles(texts[k], fold=False))
                    out.append(Match(int(i), ex.id, ex.account_id, format_ts(ex.ts),
                                     round(c, 4), round(j, 4), round(exact, 4)))
        stats.matches += len(out)
        return out
