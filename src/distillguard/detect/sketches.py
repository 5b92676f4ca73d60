"""Per-account behaviour in bounded memory: sketches, never the raw history.

Each account keeps an :class:`AccountState` whose size does not grow with its traffic:

* counters (volume, reasoning, rubric, tool use, harvest, multi-turn, hosting, errors) and
  sums of the completion limits asked for and the answer lengths received;
* a capability histogram over the fixed categories;
* heavy hitters (Space-Saving, :class:`TopK`) of its template keys, SimHash LSH keys,
  models, user agents, IP prefixes and AS names: template reuse and concentration;
* the distinct AS names it sent from, up to NETWORKS_CAP: an account whose every request
  leaves through another residential proxy exit spans dozens of networks, a person on a
  home line and a phone two or three;
* a bottom-k sample of the client /24s it sent from (:class:`ExitSample`): the exits
  of a proxy network it rotates through, which its operator's other accounts share;
* a HyperLogLog (datasketch) of distinct skeleton fingerprints: template diversity;
* Welford mean and variance of log inter-arrival gaps: timing regularity;
* a 24-bin hour-of-day histogram: the diurnal pattern;
* a MinHash (datasketch) of the minute buckets it was active in: lockstep with others.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from datasketch import HyperLogLog, MinHash

from distillguard.detect.features import CATEGORIES, ExchangeFeatures

ACTIVITY_BUCKET_S = 120
# Session starts (an exchange after at least SESSION_GAP_S of the account's silence) are
# placed in BURST_BUCKET_S buckets for the co-start link (see linking.py).
SESSION_GAP_S = 1_800
BURST_BUCKET_S = 10
ACTIVITY_PERM = 64
_HLL_P = 8
# Distinct networks counted per account: past a few dozen the count says nothing more.
NETWORKS_CAP = 32
# The most client /24s an account's ExitSample holds.
EXIT_SAMPLE = 32


def _rank(item: tuple[object, int]) -> tuple[int, str]:
    """Which counter :meth:`TopK.first` names: highest count first, ties by the item's
    text."""
    return -item[1], str(item[0])


class TopK:
    """Space-Saving heavy hitters: at most ``k`` counters. A new item takes the smallest
    counter's place and count; ``errors`` keeps that inherited count, so ``counts`` may
    over-estimate an item by its error and ``counts - errors`` (:meth:`guaranteed`)
    never does. With many distinct items (every prompt's last words differ) the
    counters all climb together, and only the guaranteed count says which items are
    really frequent.

    The victim is the first counter, in insertion order, holding the smallest count.
    Finding it afresh costs a pass over all ``k`` counters, and when the counters climb
    together nearly every add evicts; so the counters at the smallest count are listed
    once (``_low``, in insertion order) and used up one eviction at a time. Counts only
    grow, so no other counter can join that list before it is used up: the pass then
    happens about once per ``k`` evictions, and the victims are the same."""

    __slots__ = ("k", "counts", "errors", "_floor", "_low", "_next")

    def __init__(self, k: int) -> None:
        self.k = k
        self.counts: dict[object, int] = {}
        self.errors: dict[object, int] = {}
        self._floor = 0                   # the smallest count, when _low is valid
        self._low: list[object] = []      # counters that held _floor, in insertion order
        self._next = 0                    # _low[:_next] are used up

    def add(self, item: object, weight: int = 1) -> None:
        counts = self.counts
        if item in counts:
            counts[item] += weight
        elif len(counts) < self.k:
            counts[item] = weight
            self._low.clear()             # a new small counter: list them again
            self._next = 0
        else:
            victim = self._victim()
            floor = counts.pop(victim)
            self.errors.pop(victim, None)
            counts[item] = floor + weight
            self.errors[item] = floor

    def add_each(self, items: Iterable[object]) -> None:
        """:meth:`add` each item once (one call for an exchange's several keys)."""
        counts = self.counts
        for item in items:
            if item in counts:
                counts[item] += 1
            else:
                self.add(item)

    def _victim(self) -> object:
        counts, low, floor = self.counts, self._low, self._floor
        i = self._next
        while i < len(low):
            candidate = low[i]
            i += 1
            if counts.get(candidate) == floor:    # not evicted or grown since
                self._next = i
                return candidate
        self._floor = floor = min(counts.values())
        low[:] = [key for key, n in counts.items() if n == floor]
        self._next = 1
        return low[0]

    def guaranteed(self, item: object) -> int:
        """How many times the item was certainly seen (0 if it is not counted)."""
        return self.counts.get(item, 0) - self.errors.get(item, 0)

    def first(self) -> object | None:
        """The most counted item, ties by its text (None when empty)."""
        return min(self.counts.items(), key=_rank)[0] if self.counts else None

    def max_count(self) -> int:
        return max(self.counts.values(), default=0)

    def max_guaranteed(self) -> int:
        """The largest guaranteed count."""
        return max(map(self.guaranteed, self.counts), default=0)


class ExitSample:
    """The client /24s an account sent from: all of them up to ``k``, beyond that the
    ``k`` whose CRC-32 is smallest (a bottom-k sample). Every account samples by the same
    hash, so two accounts that used the same /24s hold the same ones in their samples
    (coordinated sampling): a /24 two samples share is one both accounts used, and an
    account that rotates through hundreds of proxy exits keeps ``k`` of them, not
    hundreds."""

    __slots__ = ("k", "hashes", "_largest", "changed")

    def __init__(self, k: int = EXIT_SAMPLE) -> None:
        self.k = k
        self.hashes: dict[str, int] = {}
        self._largest = -1          # the largest hash held, once the sample is full
        self.changed = False

    def add(self, prefix: str) -> None:
        hashes = self.hashes
        if prefix in hashes:
            return
        h = zlib.crc32(prefix.encode())
        if len(hashes) < self.k:
            hashes[prefix] = h
            if len(hashes) == self.k:
                self._largest = max(hashes.values())
        elif h < self._largest:
            del hashes[max(hashes, key=hashes.__getitem__)]
            hashes[prefix] = h
            self._largest = max(hashes.values())
        else:
            return
        self.changed = True

    def __len__(self) -> int:
        return len(self.hashes)


@dataclass(slots=True)
class Welford:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


def _identity(value: int) -> int:
    return value


def _mix32(h: int) -> int:
    """32 well-mixed bits of a 64-bit value (a SimHash's own bits are correlated)."""
    h = ((h ^ (h >> 33)) * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
    h = ((h ^ (h >> 33)) * 0xC4CEB9FE1A85EC53) & 0xFFFFFFFFFFFFFFFF
    return (h ^ (h >> 33)) & 0xFFFFFFFF


def _hll() -> HyperLogLog:
    # Values arrive already hashed (:func:`_mix32`).
    return HyperLogLog(p=_HLL_P, hashfunc=_identity)


_ACTIVITY_HASH = MinHash(num_perm=ACTIVITY_PERM, seed=7)


def _minhash() -> MinHash:
    # Every account's activity MinHash uses the same permutations (which it only reads):
    # drawing them again for each new account cost 100 us, passing them 6 us.
    return MinHash(num_perm=ACTIVITY_PERM, seed=7, permutations=_ACTIVITY_HASH.permutations,
                   scheme=_ACTIVITY_HASH.scheme)


# The completion limit counted for a request that sets none: it gets as long an answer as
# the model gives, so leaving the limit out must not look like asking for short answers.
UNCAPPED_COMPLETION_LIMIT = 4096


@dataclass(slots=True)
class AccountState:
    """Everything detection remembers of one account (a few KB, whatever its volume)."""

    account_id: str
    count: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    reasoning: int = 0
    rubric: int = 0
    tool_use: int = 0
    harvest: int = 0
    multi_turn: int = 0
    system_like: int = 0
    hosting: int = 0
    errors: int = 0
    model_switches: int = 0
    last_model: str = ""
    log_ratio_sum: float = 0.0
    completion_limit_sum: float = 0.0
    completion_sum: float = 0.0
    # Plain lists: a numpy element's += costs several times a list's, at every exchange.
    categories: list[int] = field(default_factory=lambda: [0] * len(CATEGORIES))
    hours: list[int] = field(default_factory=lambda: [0] * 24)
    gaps: Welford = field(default_factory=Welford)
    templates: TopK = field(default_factory=lambda: TopK(12))
    lsh: TopK = field(default_factory=lambda: TopK(16))
    user_agents: TopK = field(default_factory=lambda: TopK(4))
    prefixes: TopK = field(default_factory=lambda: TopK(6))
    exits: ExitSample = field(default_factory=ExitSample)
    asns: TopK = field(default_factory=lambda: TopK(4))
    networks: set[str] = field(default_factory=set)
    distinct: HyperLogLog = field(default_factory=_hll)
    activity: MinHash = field(default_factory=_minhash)
    active_buckets: int = 0
    last_bucket: int = -1
    pending_buckets: list[bytes] = field(default_factory=list)
    activity_changed: bool = False
    session_starts: int = 0
    pending_starts: list[int] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    # The distinct-count estimate and the registers it was computed from: an account's
    # registers rise rarely once it has sent a few dozen prompts, and the estimate (a
    # pass over all registers) is read at every evaluation.
    _distinct_registers: bytes = b""
    _distinct_estimate: float = 0.0
    # The most common AS name, read for every member of a community at each evaluation,
    # and whether an exchange since has changed it.
    _top_asn: str | None = None
    _asn_moved: bool = False

    def update(self, f: ExchangeFeatures) -> None:
        if self.count == 0 or f.ts - self.last_ts >= SESSION_GAP_S:
            self.session_starts += 1
            self.pending_starts.append(int(f.ts // BURST_BUCKET_S))
        if self.count == 0:
            self.first_ts = f.ts
        else:
            self.gaps.add(math.log1p(max(0.0, f.ts - self.last_ts)))
        self.count += 1
        self.last_ts = max(self.last_ts, f.ts)
        self.reasoning += f.reasoning
        self.rubric += f.rubric
        self.tool_use += f.tool_use
        self.harvest += f.harvest
        self.multi_turn += f.depth > 0
        self.hosting += f.hosting
        self.errors += f.status >= 400
        if self.last_model and f.model != self.last_model:
            self.model_switches += 1
        self.last_model = f.model
        self.log_ratio_sum += math.log1p(f.output_ratio)
        self.completion_limit_sum += (min(f.max_tokens, 32_768) if f.max_tokens > 0
                                      else UNCAPPED_COMPLETION_LIMIT)
        self.completion_sum += min(f.completion_tokens, 32_768)
        self.categories[f.category] += 1
        self.hours[int(f.ts // 3600) % 24] += 1
        if f.depth == 0:
            # A follow-up turn ("can you give an example?") is short and generic: people
            # who never met type the same ones, so only opening turns carry a template.
            self.templates.add_each(f.template_keys)
            self.lsh.add_each(f.lsh_keys)
        self.user_agents.add(f.user_agent)
        if f.ip_prefix:
            self.prefixes.add(f.ip_prefix)
            self.exits.add(f.ip_prefix)
        if f.asn:
            self.asns.add(f.asn)
            self._asn_moved = True
            if len(self.networks) < NETWORKS_CAP:
                self.networks.add(f.asn)
        self.distinct.update(_mix32(f.simhash))
        bucket = int(f.ts // ACTIVITY_BUCKET_S)
        if bucket != self.last_bucket:
            self.last_bucket = bucket
            self.active_buckets += 1
            self.pending_buckets.append(bucket.to_bytes(8, "little"))
        if len(self.examples) < 3 and (not self.examples or f.reasoning or f.rubric
                                       or f.tool_use or f.harvest):
            self.examples.append(f.exchange_id)

    def flush(self) -> None:
        """Fold the activity buckets seen since the last call into the MinHash. Only a
        MinHash that really moved marks the activity as changed: once an account has been
        active for a while, most new buckets lower none of its minima, and its lockstep
        similarities with every other account are then exactly what they were."""
        if self.pending_buckets:
            before = self.activity.hashvalues.copy()
            self.activity.update_batch(self.pending_buckets)
            self.pending_buckets.clear()
            if not np.array_equal(before, self.activity.hashvalues):
                self.activity_changed = True

    # -- derived behaviour -------------------------------------------------------------

    def share(self, n: int) -> float:
        return n / self.count if self.count else 0.0

    def dominant_keys(self, min_share: float, min_count: int, *, frames: bool = True,
                      bands: bool = True) -> list[tuple[int, float]]:
        """Template (``frames``) and LSH (``bands``) keys seen in at least ``min_share`` of
        the account's traffic, by their guaranteed counts (:meth:`TopK.guaranteed`): in an
        account of a few dozen exchanges whose prompts each end in new words, every
        counter of the sketch climbs past the share, whatever the account sent."""
        out = []
        count = self.count
        for topk in (self.templates,) * frames + (self.lsh,) * bands:
            errors = topk.errors
            for key, seen in topk.counts.items():
                n = seen - errors.get(key, 0)      # TopK.guaranteed, inlined: a hot loop
                if n >= min_count and n / count >= min_share:
                    out.append((int(key), n / count))  # type: ignore[call-overload]
        return out

    @property
    def template_reuse(self) -> float:
        """Share of exchanges certainly carrying the account's most frequent template
        frame (its guaranteed count)."""
        return self.share(self.templates.max_guaranteed())

    @property
    def diversity(self) -> float:
        """Distinct skeleton fingerprints per exchange (1.0: every prompt different)."""
        if not self.count:
            return 1.0
        registers = self.distinct.reg.tobytes()
        if registers != self._distinct_registers:
            with warnings.catch_warnings():   # small counts: datasketch warns, the value is fine
                warnings.simplefilter("ignore", UserWarning)
                self._distinct_estimate = self.distinct.count()
            self._distinct_registers = registers
        return min(1.0, self._distinct_estimate / self.count)

    @property
    def concentration(self) -> float:
        """Share of the account's most used capability category."""
        return max(self.categories) / self.count if self.count else 0.0

    @property
    def diurnal_entropy(self) -> float:
        """Entropy of the hour-of-day histogram over log(24): 1.0 is round-the-clock."""
        hours = np.array(self.hours, dtype=float)
        total = hours.sum()
        if total <= 0:
            return 0.0
        p = hours[hours > 0] / total
        return float(-(p * np.log(p)).sum() / math.log(24))

    @property
    def timing_regularity(self) -> float:
        """1 / (1 + std of log gaps): near 1 for a metronome, lower for human bursts."""
        if self.gaps.n < 3:
            return 0.0
        return 1.0 / (1.0 + self.gaps.std)

    @property
    def rate_per_hour(self) -> float:
        span = max(self.last_ts - self.first_ts, 60.0)
        return self.count * 3600.0 / span

    @property
    def top_asn(self) -> str | None:
        if self._asn_moved:
            top = self.asns.first()
            self._top_asn = None if top is None else str(top)
            self._asn_moved = False
        return self._top_asn

    @property
    def home_prefix(self) -> str | None:
        """The client /24 at least half of the account's exchanges came from, if one did."""
        top = self.prefixes.first()
        if top is None or 2 * self.prefixes.guaranteed(top) < self.count:
            return None
        return str(top)

    @property
    def top_user_agent(self) -> str | None:
        top = self.user_agents.first()
        return None if top is None else str(top)
