"""Finding the exchanges a suspect data set came from.

The suspect items (usually far fewer than the ledger's exchanges) go into a
:class:`datasketch.MinHashLSH` index; the ledger or trace is then read once, in batches,
and every exchange's answer is looked up in that index. LSH candidates are verified on
the exact shingle sets: an item matches an exchange when at least ``min_containment`` of
the item's shingles occur in the exchange's answer (so an excerpt or a lightly edited
copy still matches) - the LSH threshold is set below that so such copies are found.
Memory is bounded by the suspect set, not by the ledger.

With ``workers`` above one, the batches are looked up in that many processes (forked
after the index is built, so each starts with it), while this process reads the
exchanges and hands each batch's answer texts over; results come back in batch order, so
the matches are the same, in the same order, as with one.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass
from datetime import datetime
from itertools import islice
from multiprocessing.pool import AsyncResult
from typing import Any

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


# What the look-up needs of an exchange: its id, account, time and answer text ("" when
# it has none, or its status was not a success). The time is formatted for matches only.
Answer = tuple[str, str | None, datetime, str]


def _answers(it: Iterable[Exchange], size: int) -> Iterator[list[Answer]]:
    source = iter(it)
    while batch := list(islice(source, size)):
        yield [(e.id, e.account_id, e.ts,
                e.response_text() if e.status in (0, 200) else "") for e in batch]


def default_workers() -> int:
    """Processes for a scan: one per core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


# The index a forked worker looks batches up in (set in the parent just before the fork).
_WORKER_INDEX: ProvenanceIndex | None = None


def _worker_batch(batch: list[Answer]) -> tuple[list[Match], tuple[int, ...]]:
    assert _WORKER_INDEX is not None
    index = _WORKER_INDEX
    index.stats = ScanStats()
    found = index._scan_batch(batch)
    return found, astuple(index.stats)


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
             batch_size: int = 500, progress: bool = True, workers: int = 1) -> list[Match]:
        """Read ``exchanges`` once; return every verified (item, exchange) match, looked
        up in ``workers`` processes (see the module docstring)."""
        found: list[Match] = []
        bar = tqdm(total=total, unit="ex", desc="provenance", disable=not progress,
                   mininterval=1.0)
        batches = _answers(exchanges, batch_size)
        try:
            if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
                for batch in batches:
                    found += self._scan_batch(batch)
                    bar.update(len(batch))
                return found
            global _WORKER_INDEX
            _WORKER_INDEX = self
            try:
                with multiprocessing.get_context("fork").Pool(workers) as pool:
                    # Two batches per worker in flight: the input is read only as fast as
                    # it is looked up, so memory stays bounded by the batch size.
                    waiting: deque[tuple[AsyncResult[Any], int]] = deque()

                    def take() -> None:
                        result, size = waiting.popleft()
                        matches, stats = result.get()
                        found.extend(matches)
                        self.stats = ScanStats(*(a + b for a, b in zip(
                            astuple(self.stats), stats, strict=True)))
                        bar.update(size)

                    for batch in batches:
                        waiting.append((pool.apply_async(_worker_batch, (batch,)),
                                        len(batch)))
                        if len(waiting) >= 2 * workers:
                            take()
                    while waiting:
                        take()
            finally:
                _WORKER_INDEX = None
        finally:
            bar.close()
        return found

    def _scan_batch(self, batch: list[Answer]) -> list[Match]:
        stats = self.stats
        stats.exchanges += len(batch)
        texts = [text for _, _, _, text in batch]
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
            exchange_id, account_id, ts, _ = batch[k]
            for i in candidates:
                c, j = containment(self.sets[i], sets[k])
                if c >= self.min_containment:
                    exact, _ = containment(self._exact(int(i)), shingles(texts[k], fold=False))
                    out.append(Match(int(i), exchange_id, account_id, format_ts(ts),
                                     round(c, 4), round(j, 4), round(exact, 4)))
        stats.matches += len(out)
        return out
