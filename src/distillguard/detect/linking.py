"""Cross-account links: which accounts behave as one.

Four kinds of evidence connect two accounts, each kept in an index whose size grows with
the number of accounts, not of exchanges:

* **template**: both accounts send a large share of their traffic with the same template
  frame or at least two of the same SimHash LSH bands (their *dominant* keys, from
  :meth:`AccountState.dominant_keys`; one 16-bit band is shared by chance too often);
* **lockstep**: the accounts were active in nearly the same time buckets (in the spirit
  of SynchroTrap and CopyCatch): Jaccard similarity of their activity MinHashes, found
  with datasketch's :class:`~datasketch.MinHashLSH`, well above what two independent
  accounts as busy would share by chance; or they started sessions within seconds of
  each other more often than their session counts make likely (*co-start*, below);
* **infrastructure**: the same payment fingerprint, the same home /24 (the client /24
  at least half of each account's exchanges came from: an account whose requests rotate
  through a proxy network's exits has none, or it would be linked to the strangers on
  whichever exit it used most), the same sign-up window, or the same mail domain when
  it is not a public mail provider's (:mod:`distillguard.maildomains`: a hydra operator's
  throwaway domains, a company's own);
* the account records' sign-up window counts only together with another link kind;
* **exit**: both accounts rotate through a proxy network's exits (at least
  EXIT_MIN_DISTINCT client /24s in their :class:`~.sketches.ExitSample`, none of them
  home) and sent from at least EXIT_MIN_SHARED of the same /24s that no account that
  does not rotate used. An operator that sends every request through another exit of
  the pool it buys gives each of its accounts a few dozen of the pool's /24s, and two
  of its accounts share many; a carrier NAT or a company /24 that settled users share
  makes no link. An operator whose script gives each account another harness has
  pieces that share no frame, no system prompt and no schedule, and this is what they
  share. Two operators that buy exits from the same proxy network's pool are linked
  too: for whoever investigates, one campaign of shared infrastructure.

A key shared by very many accounts (a big corporate NAT, a sign-up window on launch day)
says little; groups larger than ``max_group`` make no edges. Within a group each account
links to a few neighbours on a ring rather than to every member, which keeps a group of
*n* accounts to O(n) edges while leaving it connected. The ring of a key strangers may
share (a /24, a sign-up window) is ordered by each account's dominant frame set first,
so the sampled edges of a group two operators share join accounts of one harness. The
ring of a key one party holds (a payment fingerprint, a mail domain of its own) is
ordered by a hash of the key and the account alone: ordered by frame set, every such ring
of an operator whose accounts use several harness variants put the variants in the same
blocks, and community detection cut the operator along them.

**Co-start.** Accounts that each send a few exchanges a day share too few activity
buckets for the MinHash above, but a scheduler that drives them makes several start at
once, again and again. An account's *session starts* (an exchange after half an hour of
its silence: a conversation's follow-ups do not count) are indexed by 10-second bucket;
two accounts whose starts fell within two buckets of each other ``k`` times are linked
when ``k >= 2`` and a Poisson count with the rate two independent accounts with as many
starts over their span (at least a day) would show reaches ``k`` with probability at most
``costart_alpha`` (divided by the square of the active accounts per thousand beyond the
first thousand: every pair of accounts is compared, so the number of chance links stays
bounded as the population grows). Only the last few minutes of
buckets are kept, the count of a pair that is not linked is forgotten after three days
without a co-start, and each evaluation looks up only the new starts of the accounts
that moved. A scheduler with a large pool
rarely wakes the same two accounts together twice; :meth:`LinkIndex.group_costarts` then
tests an account's co-starts against each community of its partners as a whole, and
for a quiet account measures the chance from the group's own recent starts (a scheduler
wakes several at once, so their densities added up overstate it). A quiet account that
also carries one of the community's template frames in its prompts (any count: too few
for a frame of its own) is held to alpha over the share of the accounts outside the
community that carry one of them, the chance of carrying one by coincidence.

**Community co-start.** A scheduler that spreads each wake-up over minutes makes few
co-starts within seconds, and its accounts, each sending a different part of the
harness, fall into several template communities. :meth:`LinkIndex.community_costarts`
links two communities that start sessions in the same five-minute buckets far more often
than shifted copies of their starts do.

**Owned frame.** A scheduler's accounts of one to four exchanges send the operator's frame
in some of their prompts, too rarely for a frame of their own, and start beside its pool
about as often as a stranger does. :meth:`LinkIndex.owned_frames` links such a quiet
account to a community's members when it sends a frame that several of them send and no
other account outside the community does: the operator's script, not a public format.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import zlib
from collections import defaultdict
from collections.abc import Iterable, KeysView, Mapping, Set
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from datasketch import MinHashLSH
from scipy.special import pdtrc

from distillguard.detect.graph import Community
from distillguard.detect.sketches import ACTIVITY_BUCKET_S, BURST_BUCKET_S, AccountState
from distillguard.maildomains import operator_mail_domain

KINDS = ("template", "lockstep", "payment", "prefix", "signup", "domain", "exit")
RING_NEIGHBOURS = 3
MIN_SHARED_BANDS = 2
# Two accounts that both have dominant frames are template-linked when at least this share
# of the smaller frame set is common; their SimHash bands then do not link them. Two
# operators that copied one public instruction share it and one or two more frames of
# their harnesses' pools; at one half they were linked by it often enough to be merged.
MIN_FRAME_SIMILARITY = 0.7
# Keys only one party holds: their rings are not ordered by frame set (module docstring,
# _ring_position). An exit /24 that no settled account used is the pool one operator
# buys, and ordered by frame set its ring would tie each harness variant only to itself.
OWNED_KINDS = ("payment", "domain", "exit")
# Exit links (module docstring): the fewest distinct client /24s an account without a
# home /24 must have sent from to count as rotating through exits (no account of the
# simulator's benign populations sends from more than seven), and the most accounts that
# do not rotate that may have used an exit /24 before it counts as an access network
# others share (a carrier NAT, a company, a campus) rather than the pool's. At one or two,
# the carrier NAT /24s of countries with few users in a world of a thousand accounts
# linked two operators whose pools are their own.
EXIT_MIN_DISTINCT = 8
EXIT_MAX_SETTLED = 0
# Two rotating accounts on an exit /24's ring are linked when their samples share at
# least this many such /24s. The carrier NAT /24s of a country where no settled user
# happens to send from are shared by every operator that rotates through that country's
# exits: one or two of them in a world of a thousand accounts, where two accounts of one
# operator share six or more of its pool's.
EXIT_MIN_SHARED = 3
COSTART_NEIGHBOURS = 2          # buckets either side: starts within about 20 seconds
COSTART_MIN_SPAN_S = 86_400.0   # starts are spread over a day at least (daily rhythms)
COSTART_KEEP_S = 600.0          # how far behind the newest start a bucket is kept
# A pair's co-start count is forgotten when the pair is not linked and has not started
# together for this long, so the counts stay bounded by recent traffic.
COSTART_PAIR_TTL_S = 3 * 86_400.0
GROUP_COSTART_MIN = 3
# A quiet account that carries the community's frame needs this many co-starts: the
# frame's chance multiplies the co-start tail, so the two together are held to the same
# alpha as GROUP_COSTART_MIN co-starts alone (LinkIndex.group_costarts).
FRAMED_COSTART_MIN = 2
# The group test's measured chance: how far around each of an account's starts the
# group's starts are counted, and how many of its latest starts are measured (an account
# of at most this many exchanges is quiet: every start of it is measured).
GROUP_COSTART_LOCAL_S = 3_600.0
GROUP_COSTART_SAMPLE = 16
# The measured chance is trusted down to this fraction of the modelled one: a scheduler's
# wake-ups of two to five members at once make the model that many times too high, and
# fewer measured windows than that would be noise.
GROUP_COSTART_BURST = 4.0
# A quiet account's group test is passed at alpha over the share of the accounts outside
# the community carrying one of its frames when it carries one too
# (LinkIndex.group_costarts); a share below this counts as this, so the timing alone must
# still reach 100 x the alpha and a rare frame cannot link an account on a couple of
# chance co-starts.
FRAME_SHARE_FLOOR = 0.01
# Owned frames (LinkIndex.owned_frames): a community's dominant frame that at least
# OWNED_FRAME_CARRIERS of its members send, and no account outside it and its co-start
# partners, among at least OWNED_FRAME_POPULATION such accounts, links the one other
# quiet account that sends it to those members.
OWNED_FRAME_CARRIERS = 5
OWNED_FRAME_POPULATION = 500
# ``costart_alpha`` holds for a population up to this many active accounts; beyond it,
# there are more pairs to compare, so the pair alpha shrinks with their number.
COSTART_POPULATION = 1_000
# The community co-start test (LinkIndex.community_costarts): the width of its time
# buckets, the shifts (in those buckets, each way) whose overlaps make its chance, the
# fewest buckets two communities must share, how often it runs (trace time).
COMMUNITY_COSTART_BUCKET_S = 300
COMMUNITY_COSTART_SHIFTS = tuple(s for s in range(-12, 13) if abs(s) >= 2)
COMMUNITY_COSTART_MIN = 6
COMMUNITY_COSTART_EVERY_S = 3_600
# The test waits until the starts kept span this many times the largest shift (four
# hours): over less, a shift moves a large share of each community's starts off the ends.
COMMUNITY_COSTART_HISTORY = 4
# At most this many communities are tested in one run (the quietest, see
# LinkIndex.community_costarts): every pair is compared, and its matrices grow with the
# square of their number (2,000: 16 MB, and a few tenths of a second a run here).
COMMUNITY_COSTART_MAX = 2_000


RingPosition = tuple[int, int, str]
K = TypeVar("K")


def _ring_position(group: tuple[str, object], account_id: str, signature: int = 0
                   ) -> RingPosition:
    """Where an account sits on a group's ring: by its frame-set signature first (not on
    the ring of a key one party holds, :data:`OWNED_KINDS`), then by a hash of the group
    and its id (ties by id). The hash differs from group to group, so accounts of one
    harness that share several groups get other neighbours on each ring: the union of
    their rings is well knit, where one order for all would make a long chain that
    community detection cuts into pieces."""
    return (0 if group[0] in OWNED_KINDS else signature,
            _mixed_hash(f"{group[0]}\x00{group[1]}\x00{account_id}"), account_id)


def _mixed_hash(text: str) -> int:
    """A 64-bit hash in which every input bit moves every output bit (BLAKE2b). CRC-32
    does not do for ring orders: it is affine, so the CRCs of one account's id behind two
    groups' keys differ by a constant XOR, and accounts whose CRCs share their high bits
    sat side by side on every ring."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _signature(frames: Iterable[int]) -> int:
    """A hash of an account's dominant frame set (0 for none)."""
    ordered = sorted(frames)
    return zlib.crc32(b",".join(b"%d" % f for f in ordered)) if ordered else 0


Pair = tuple[str, str]


def _pair(a: str, b: str) -> Pair:
    return (a, b) if a < b else (b, a)


def _density(state: AccountState) -> float:
    """Share of the activity buckets of its active span in which the account was seen."""
    span = (state.last_ts - state.first_ts) / ACTIVITY_BUCKET_S + 1.0
    return min(1.0, state.active_buckets / span)


def chance_jaccard(a: AccountState, b: AccountState) -> float:
    """The activity similarity two independent accounts this busy would show anyway: two
    integrations busy round the clock share nearly every bucket without any common
    operator, so lockstep must exceed this by a margin."""
    p, q = _density(a), _density(b)
    union = p + q - p * q
    return p * q / union if union > 0 else 0.0


def poisson_tail(rate: float, k: int) -> float:
    """P(X >= k) for X ~ Poisson(rate)."""
    term = math.exp(-rate)
    below = 0.0
    for i in range(k):
        below += term
        term *= rate / (i + 1)
    return max(0.0, 1.0 - below)


def costart_chance(a: AccountState, b: AccountState) -> float:
    """Expected co-starts of two independent accounts with these session counts."""
    span = max(max(a.last_ts, b.last_ts) - min(a.first_ts, b.first_ts), COSTART_MIN_SPAN_S)
    window = (2 * COSTART_NEIGHBOURS + 1) * BURST_BUCKET_S
    return a.session_starts * b.session_starts * window / span


# A group's recent session starts: distinct buckets in order, and the members per bucket.
GroupStarts = tuple[np.ndarray, np.ndarray]


def _coverage(starts: np.ndarray, lo: int, hi: int) -> int:
    """How many buckets in ``[lo, hi]`` lie within COSTART_NEIGHBOURS of one of the
    sorted distinct ``starts``."""
    near = COSTART_NEIGHBOURS
    a, b = np.searchsorted(starts, [lo - near, hi + near + 1])
    if a == b:
        return 0
    near_ones = starts[a:b]
    begin = np.maximum(near_ones - near, lo)
    end = np.minimum(near_ones + near, hi)
    # The windows are as wide as each other, so their ends are in order: each adds what
    # lies beyond the previous one's end.
    begin[1:] = np.maximum(begin[1:], end[:-1] + 1)
    return int(np.maximum(end - begin + 1, 0).sum())


def _index_pair(index: dict[str, set[Pair]], pair: Pair) -> None:
    """Record a linked pair under both of its accounts."""
    index.setdefault(pair[0], set()).add(pair)
    index.setdefault(pair[1], set()).add(pair)


def _unindex_pair(index: dict[str, set[Pair]], pair: Pair) -> None:
    for aid in pair:
        mine = index[aid]
        mine.discard(pair)
        if not mine:
            del index[aid]


def _reindex(holders: dict[K, set[str]], held: dict[str, frozenset[K]], aid: str,
             keys: Iterable[K]) -> set[K]:
    """Make ``keys`` the account's in a two-way index (key -> accounts, account -> keys);
    returns the keys it gained or lost."""
    old = held.get(aid, frozenset())
    if keys == old:
        return set()
    new = frozenset(keys)
    for key in old - new:
        mine = holders[key]
        mine.discard(aid)
        if not mine:
            del holders[key]
    for key in new - old:
        holders.setdefault(key, set()).add(aid)
    held[aid] = new
    return set(old ^ new)


def _jaccards(states: dict[str, AccountState], pairs: list[Pair]) -> np.ndarray:
    """Estimated Jaccard similarity of each pair's activity MinHashes (the share of equal
    hash values, as :meth:`datasketch.MinHash.jaccard` computes it), in one pass."""
    left = np.vstack([states[a].activity.hashvalues for a, _ in pairs])
    right = np.vstack([states[b].activity.hashvalues for _, b in pairs])
    equal = np.count_nonzero(left == right, axis=1).astype(float)
    return equal / float(left.shape[1])


@dataclass
class LinkIndex:
    """Group memberships by key, per evidence kind, and the edges they make.

    Edges are maintained incrementally: a group whose membership changed is re-linked at
    the next :meth:`refresh`, which returns the pairs whose evidence changed."""

    template_share: float = 0.25
    template_min_count: int = 3
    lockstep_threshold: float = 0.5
    lockstep_min_buckets: int = 48
    lockstep_margin: float = 0.25
    max_group: int = 400
    costart_alpha: float = 1e-4
    # Stricter than a pair's: each account is tested against several groups, again as its
    # starts accumulate.
    group_costart_alpha: float = 1e-5
    # The community co-start test's: for all pairs of communities of one run together.
    community_costart_alpha: float = 1e-3
    groups: dict[str, dict[object, set[str]]] = field(
        default_factory=lambda: {k: defaultdict(set) for k in (*KINDS, "lsh")
                                 if k != "lockstep"})
    member_keys: dict[str, dict[str, set[object]]] = field(default_factory=dict)
    edges: dict[Pair, dict[str, float]] = field(default_factory=dict)
    _group_edges: dict[tuple[str, object], set[Pair]] = field(default_factory=dict)
    _counts: dict[Pair, dict[str, int]] = field(default_factory=dict)
    _dirty_groups: set[tuple[str, object]] = field(default_factory=set)
    _lockstep: dict[Pair, float] = field(default_factory=dict)
    _lockstep_of: dict[str, set[Pair]] = field(default_factory=dict)
    # Per group, its active members in ring order, kept sorted as members come and go.
    _rings: dict[tuple[str, object], list[RingPosition]] = field(default_factory=dict)
    _signatures: dict[str, int] = field(default_factory=dict)
    _dirty_pairs: set[Pair] = field(default_factory=set)
    _lsh: MinHashLSH | None = None
    _in_lsh: set[str] = field(default_factory=set)
    _active: set[str] = field(default_factory=set)
    # Co-start: recent session starts by bucket, counts per pair, linked pairs.
    _starts: dict[int, list[str]] = field(default_factory=dict)
    _newest_start: int = 0
    _costart_seen: dict[Pair, int] = field(default_factory=dict)   # pair -> last bucket
    _pairs_pruned_at: int = 0
    _costarts: dict[Pair, int] = field(default_factory=dict)
    _costart: set[Pair] = field(default_factory=set)
    _costart_of: dict[str, set[Pair]] = field(default_factory=dict)
    _costart_dirty: set[Pair] = field(default_factory=set)
    _frames_moved: set[str] = field(default_factory=set)
    # Per account, every pair of it that has an edge or ring-group evidence: when its
    # frames change, each of these has a new template similarity, whichever link made it.
    _pairs_of: dict[str, set[Pair]] = field(default_factory=dict)
    # Group co-start: per account, the accounts it co-started with (the pair counts above);
    # pairs linked because the account co-started with a community as a whole.
    _partners: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    _group_costart: dict[str, set[Pair]] = field(default_factory=dict)
    _group_tested: set[str] = field(default_factory=set)
    _group_dirty: set[Pair] = field(default_factory=set)
    # Owned frames: per quiet account, its pairs with the members of a community whose
    # own frame it sends, and the keys that made them; per key, the accounts it linked.
    _owned: dict[str, set[Pair]] = field(default_factory=dict)
    _owned_keys: dict[str, frozenset[object]] = field(default_factory=dict)
    _owned_by_key: dict[object, set[str]] = field(default_factory=dict)
    _owned_dirty: set[Pair] = field(default_factory=set)
    # Keys carried by the accounts evaluated since the last owned-frame test.
    _keys_moved: set[object] = field(default_factory=set)
    # Each account's session starts from :meth:`_starts_kept_from` on, for the group
    # test's measured chance.
    _own_starts: dict[str, list[int]] = field(default_factory=dict)
    # Per template key, the accounts whose frame sketch holds it at all (any count), as
    # of their last evaluation; per account, those keys. The group test's frame chance
    # reads them.
    _carriers: dict[object, set[str]] = field(default_factory=dict)
    _carried: dict[str, frozenset[object]] = field(default_factory=dict)
    # Pairs linked because their two communities started sessions together more often
    # than shifted copies of the same starts do (community_costarts), and when that test
    # last ran (a start bucket).
    _community_costart: set[Pair] = field(default_factory=set)
    _community_dirty: set[Pair] = field(default_factory=set)
    _community_tested_at: int | None = None
    # The community test's links the last refresh applied: their components are to be
    # partitioned again (AccountGraph.update's ``rerun``).
    joining: set[Pair] = field(default_factory=set)
    # Exit links: per client /24, the accounts whose exit samples hold it (rotating or
    # not); per account, the /24s indexed for it.
    _exit_holders: dict[str, set[str]] = field(default_factory=dict)
    _exit_held: dict[str, frozenset[str]] = field(default_factory=dict)
    # Exit /24s that link (no settled user) as of the last refresh, and the accounts
    # whose exit keys changed since: every pair of theirs has a new count of shared ones.
    _exits_linking: set[str] = field(default_factory=set)
    _exits_moved: set[str] = field(default_factory=set)

    def _set_keys(self, kind: str, account_id: str, keys: Iterable[object]) -> bool:
        """Make ``keys`` the account's keys of ``kind``; returns whether they changed."""
        new = set(keys)
        mine = self.member_keys.setdefault(account_id, {})
        old = mine.get(kind, set())
        if new == old:
            return False
        groups = self.groups[kind]
        active = account_id in self._active
        for key in old - new:
            members = groups.get(key)
            if members is not None:
                members.discard(account_id)
                if not members:
                    del groups[key]
            if active:
                self._ring_leave((kind, key), account_id)
            self._dirty_groups.add((kind, key))
        for key in new - old:
            groups[key].add(account_id)
            if active:
                self._ring_join((kind, key), account_id)
            self._dirty_groups.add((kind, key))
        mine[kind] = new
        return True

    def _ring_join(self, group: tuple[str, object], account_id: str) -> None:
        bisect.insort(self._rings.setdefault(group, []), _ring_position(
            group, account_id, self._signatures.get(account_id, 0)))

    def _ring_leave(self, group: tuple[str, object], account_id: str) -> None:
        ring = self._rings.get(group)
        if ring is None:
            return
        key = _ring_position(group, account_id, self._signatures.get(account_id, 0))
        i = bisect.bisect_left(ring, key)
        if i < len(ring) and ring[i] == key:
            del ring[i]
        if not ring:
            del self._rings[group]

    def set_static(self, account_id: str, payment: str | None, signup_bucket: int | None,
                   mail_domain: str | None = None) -> None:
        """Keys from the account record, set once when the account is first seen."""
        self._set_keys("payment", account_id, [payment] if payment else [])
        self._set_keys("signup", account_id, [] if signup_bucket is None else [signup_bucket])
        domain = operator_mail_domain(mail_domain)
        self._set_keys("domain", account_id, [domain] if domain else [])

    def update(self, state: AccountState) -> None:
        """Refresh the account's behavioural keys and lockstep candidates."""
        aid = state.account_id
        if aid not in self._active:
            # Groups count only active accounts: its static groups must be re-linked.
            self._active.add(aid)
            for kind, keys in self.member_keys.get(aid, {}).items():
                for k in keys:
                    self._ring_join((kind, k), aid)
                    self._dirty_groups.add((kind, k))
        share, count = self.template_share, self.template_min_count
        before = self.member_keys.get(aid, {}).get("template")
        frames = [k for k, _ in state.dominant_keys(share, count, frames=True, bands=False)]
        moved = set(frames) != (before or set())
        if moved:
            self._keys_moved.update(set(frames) ^ (before or set()))
            self._move_on_rings(aid, frames)
        self._set_keys("template", aid, frames)
        if moved:
            self._frames_moved.add(aid)
        self._set_keys("lsh", aid, [k for k, _ in state.dominant_keys(
            share, count, frames=False, bands=True)])
        prefix = state.home_prefix
        self._set_keys("prefix", aid, [prefix] if prefix else [])
        self._index_exits(state, rotating=prefix is None
                          and len(state.exits) >= EXIT_MIN_DISTINCT)
        if state.activity_changed and state.active_buckets >= self.lockstep_min_buckets:
            state.activity_changed = False
            self._lockstep_candidates(state)
        self._carry(aid, state.templates.counts.keys())
        self.index_starts(state)

    def _index_exits(self, state: AccountState, *, rotating: bool) -> None:
        """Index the account's exit sample; a rotating account's /24s are its exit keys.
        A /24 whose settled users changed is re-linked when rotating accounts used it
        (its count of settled users decides whether it links); one whose rotating
        accounts changed is re-linked by :meth:`_set_keys`."""
        aid = state.account_id
        sample = state.exits
        if sample.changed:
            sample.changed = False
            rotating_on = self.groups["exit"]
            for p in _reindex(self._exit_holders, self._exit_held, aid, sample.hashes.keys()):
                if rotating_on.get(p):
                    self._dirty_groups.add(("exit", p))
        keys = self._exit_held.get(aid, frozenset()) if rotating else ()
        if self._set_keys("exit", aid, keys):
            self._exits_moved.add(aid)

    def _settled_on(self, prefix: object) -> int:
        """How many accounts that do not rotate used the client /24."""
        holders = self._exit_holders.get(str(prefix), ())
        return len(holders) - len(self.groups["exit"].get(prefix, ()))

    def _exits_shared(self, a: str, b: str) -> int:
        """How many exit /24s that link (as of the last refresh) both accounts' samples
        hold."""
        ka = self.member_keys.get(a, {}).get("exit", ())
        kb = self.member_keys.get(b, {}).get("exit", ())
        return len(self._exits_linking.intersection(ka, kb))

    def _carry(self, aid: str, keys: KeysView[object]) -> None:
        """Note the template keys the account's frame sketch holds now."""
        self._keys_moved.update(_reindex(self._carriers, self._carried, aid, keys))

    def _carries_frame_of(self, keys: Iterable[object], community: Community) -> bool:
        """Whether any of ``keys`` is a dominant frame of a member of the community (as
        :meth:`community_frames` would find, without its union over every member)."""
        holders = self.groups["template"]
        members = community.members
        for key in keys:
            held = holders.get(key)
            if held is not None and not held.isdisjoint(members):
                return True
        return False

    def community_frames(self, community: Community) -> tuple[set[object], float]:
        """The community's dominant template frames (its members' together), and the
        chance that an account unrelated to the community carries one of them (1.0 when
        it has none): the share of the accounts outside the community, and that never
        started a session beside a member's start, whose frame sketches hold any of them
        at all, counted with one carrier more than seen (add one: a frame no outsider
        has sent yet is not taken to be impossible by chance).

        The members are left out: the frames are theirs, so counting them would measure
        the community's size, not coincidence. So are their co-start partners: the
        operator's accounts not yet linked into the community are among them, each
        carrying its frames, and they made the frame look common to the very accounts
        tested against it. Whether an unrelated account carries a frame has little to do
        with whether it happened to start beside a member (busier accounts are somewhat
        likelier to do both), so the accounts left are a fair sample of the ones the
        chance is meant for."""
        members = community.members
        frames: set[object] = set()
        for m in members:
            frames.update(self.member_keys.get(m, {}).get("template", ()))
        if not frames:
            return frames, 1.0
        holders: set[str] = set()
        for key in frames:
            holders |= self._carriers.get(key, set())
        # The accounts that started a session with a member: an operator's accounts that
        # are not in its community yet are among them, and each carries its frames.
        partners = self._partners
        near = set(members).union(*(partners.get(m, {}).keys() for m in members))
        outside = len(holders - near)
        population = len(self._carried.keys() - near)
        return frames, (outside + 1) / (population + 1)

    def index_starts(self, state: AccountState) -> None:
        """Count the account's session starts since the last call against those indexed
        (see :meth:`_costart_candidates`). Only the last COSTART_KEEP_S of starts are
        kept, so the detector calls this at every evaluation for every account with new
        exchanges, due or not."""
        if state.pending_starts:
            self._costart_candidates(state)

    def _move_on_rings(self, aid: str, frames: list[int]) -> None:
        """Give the account its ring position for a new frame set, in every group it is
        on: members that hold the same frames sit next to each other, so the ring edges
        of a group two operators share (a public instruction, a hosting /24) join
        accounts of one harness, and the group still stays connected."""
        groups = [(kind, key) for kind, keys in self.member_keys.get(aid, {}).items()
                  for key in keys] if aid in self._active else []
        for group in groups:
            self._ring_leave(group, aid)
        self._signatures[aid] = _signature(frames)
        for group in groups:
            self._ring_join(group, aid)
            self._dirty_groups.add(group)

    def _costart_candidates(self, state: AccountState) -> None:
        """Count the account's new session starts against the starts already indexed
        (each pair of starts is counted once, by whichever came second into the index)."""
        aid = state.account_id
        for bucket in state.pending_starts:
            for near in range(bucket - COSTART_NEIGHBOURS, bucket + COSTART_NEIGHBOURS + 1):
                for other in self._starts.get(near, ()):
                    if other != aid:
                        pair = (aid, other) if aid < other else (other, aid)
                        self._costarts[pair] = self._costarts.get(pair, 0) + 1
                        self._costart_seen[pair] = bucket
                        self._costart_dirty.add(pair)
                        self._partners.setdefault(aid, {}).setdefault(other, []).append(bucket)
                        self._partners.setdefault(other, {}).setdefault(aid, []).append(near)
                        self._group_tested.add(other)
            self._starts.setdefault(bucket, []).append(aid)
            self._own_starts.setdefault(aid, []).append(bucket)
            self._newest_start = max(self._newest_start, bucket)
        state.pending_starts.clear()
        # More starts make chance co-starts likelier: its links are tested again, and so
        # is its co-start with groups (its own starts and partners moved).
        self._costart_dirty.update(self._costart_of.get(aid, ()))
        self._group_tested.add(aid)

    def _prune_starts(self) -> None:
        oldest = self._newest_start - int(COSTART_KEEP_S // BURST_BUCKET_S)
        for bucket in [b for b in self._starts if b < oldest]:
            del self._starts[bucket]
        # Once an hour of trace time: forget the counts of unlinked pairs that have not
        # started together for COSTART_PAIR_TTL_S (one pass over the counted pairs).
        hour = int(3_600 // BURST_BUCKET_S)
        if self._newest_start - self._pairs_pruned_at >= hour:
            self._pairs_pruned_at = self._newest_start
            stale = self._starts_kept_from()
            grouped = self._grouped_pairs()
            for pair in [p for p, b in self._costart_seen.items()
                         if b < stale and p not in self._costart and p not in grouped]:
                del self._costart_seen[pair]
                self._costarts.pop(pair, None)
                for x, y in (pair, pair[::-1]):
                    mine = self._partners.get(x)
                    if mine is not None:
                        mine.pop(y, None)
                        if not mine:
                            del self._partners[x]
            # The starts the measured chance reads are kept as long as the pairs.
            for aid in [a for a, bs in self._own_starts.items() if bs[0] < stale]:
                own = self._own_starts[aid]
                del own[:bisect.bisect_left(own, stale)]
                if not own:
                    del self._own_starts[aid]

    def _starts_kept_from(self) -> int:
        """The oldest bucket whose co-start counts and session starts are still kept
        (as of the last hourly prune)."""
        return self._pairs_pruned_at - int(COSTART_PAIR_TTL_S // BURST_BUCKET_S)

    def _grouped_pairs(self) -> set[Pair]:
        return {p for pairs in self._group_costart.values() for p in pairs}

    def _in_group_costart(self, pair: Pair) -> bool:
        a, b = pair
        return pair in self._group_costart.get(a, ()) or pair in self._group_costart.get(b, ())

    def group_costarts(self, states: dict[str, AccountState],
                       communities: Mapping[str, Community]) -> None:
        """Test the accounts that started a session or co-started since their last test
        (a partner's new start alone does not re-test them) against groups of their
        co-start partners as a whole: a scheduler wakes a few of its many accounts at a
        time, so two of them rarely start together twice, but each account starts with
        *some* member of its operator's group again and again.

        The groups are each community a partner belongs to, and the union of those
        communities that already hold lockstep evidence (a scheduler's pool found in
        pieces). ``k`` is the number of the account's session starts at which some member
        of the group started too (a wake-up of several members is one event). By chance,
        each of its starts meets one with probability ``1 - exp(-density)``, the density
        summing each member's starts over its own span (at least a day): the model of
        members that start on their own. When ``k >= GROUP_COSTART_MIN`` and the Poisson
        tail is at most ``group_costart_alpha``, the account's pairs with its partners in
        that group are linked as lockstep (applied at the next :meth:`refresh`).

        A scheduler that wakes two to five members at once makes the model's chance
        too high by about that many times, so a test the model fails is tried again
        with the chance :meth:`_local_start_chance` measures around the account's recent
        starts, but not below the model's over GROUP_COSTART_BURST. It is measured for
        a quiet account only, of at most GROUP_COSTART_SAMPLE exchanges (too few for
        template or activity evidence; every start of it is measured, and the chance is
        per start, times its starts), against one community (a union's test would link
        the account to every partner in it, and one community of the union passing
        would carry the others), and only when ``k`` passes at that floor and fails
        the model.

        Such a quiet account that also carries one of the community's dominant template
        frames (its frame sketch holds it at all, :meth:`_carries_frame_of`) is tested at
        ``group_costart_alpha`` over the share of the accounts outside the community
        (and not its co-start partners) whose sketches hold one of them
        (:meth:`community_frames`, at least
        FRAME_SHARE_FLOOR): an account unrelated to the community would co-start so
        *and* carry one of its frames with the product of the two chances. A scheduler's
        accounts of two to five exchanges send the operator's frame in some prompts, as
        an ordinary user of a public instruction format may, but too rarely for a frame
        of their own. Since the frame's chance already multiplies the tail, such an
        account needs FRAMED_COSTART_MIN co-starts, not GROUP_COSTART_MIN: an operator's
        account that sent two prompts, each beside its pool, has nothing else to tie it
        to the operator."""
        tested = sorted(self._group_tested)
        self._group_tested.clear()
        window = (2 * COSTART_NEIGHBOURS + 1) * BURST_BUCKET_S
        densities: dict[int, float] = {}
        group_starts: dict[int, GroupStarts] = {}
        group_frames: dict[int, float] = {}

        def start_density(aid: str) -> float:
            st = states.get(aid)
            if st is None:
                return 0.0
            return st.session_starts * window / max(st.last_ts - st.first_ts,
                                                    COSTART_MIN_SPAN_S)

        def density(community: Community) -> float:
            key = id(community)
            if key not in densities:
                densities[key] = math.fsum(start_density(m) for m in sorted(community.members))
            return densities[key]

        for aid in tested:
            mine = states[aid]
            # k is at most the account's starts: with fewer than FRAMED_COSTART_MIN no
            # group can pass (nor did one before: starts only grow), and many of the
            # accounts tested are such new ones.
            if mine.session_starts < FRAMED_COSTART_MIN:
                continue
            partners = self._partners.get(aid, {})
            # Per group: the partners in it, and with each its list of this account's
            # starts it met. Only partners in a community count. A busy account has
            # co-started with thousands of accounts, most of them in none: the
            # intersection runs in C.
            found: dict[int, tuple[Community, list[str], list[list[int]]]] = {}
            too_small: set[int] = set()
            for other in partners.keys() & communities.keys():
                community = communities[other]
                key = id(community)
                entry = found.get(key)
                if entry is None:
                    if key in too_small:
                        continue
                    if community.size - (aid in community.members) < 2:
                        too_small.add(key)
                        continue
                    entry = found[key] = (community, [], [])
                entry[1].append(other)
                entry[2].append(partners[other])
            # In the order of each group's first partner by id, so that the sum over
            # several groups below is always added up in the same order.
            met = sorted(found.values(), key=lambda g: min(g[1]))
            candidates = [([c], mates, lists) for c, mates, lists in met]
            scheduled = [group for group in met if "lockstep" in group[0].kinds]
            if len(scheduled) >= 2:
                candidates.append(([c for c, _, _ in scheduled],
                                   [m for _, mates, _ in scheduled for m in mates],
                                   [bs for _, _, lists in scheduled for bs in lists]))
            linked: set[Pair] = set()
            own = start_density(aid)
            # The chance is measured only for a quiet account, one whose every start
            # the measure reads (see below).
            quiet = mine.count <= GROUP_COSTART_SAMPLE and len(
                self._own_starts.get(aid, ())) == mine.session_starts
            alpha = self.group_costart_alpha
            carried = mine.templates.counts.keys()
            for group, mates, lists in candidates:
                # k is at most the lists' entries and at most the account's starts: when
                # even that many would not pass, the union is not worth building (nearly
                # every test of a busy account against a group it met by chance).
                most = min(sum(map(len, lists)), mine.session_starts)
                if most < FRAMED_COSTART_MIN:
                    continue
                total = sum(density(c) - (own if aid in c.members else 0.0)
                            for c in group)
                chance = mine.session_starts * -math.expm1(-max(total, 0.0))
                # A test the model fails may pass on the measured chance, which is at
                # least the model's over GROUP_COSTART_BURST: when even that floor
                # fails, so would the test.
                measured = quiet and len(group) == 1
                floor = chance / GROUP_COSTART_BURST if measured else chance
                # A quiet account that also carries one of the community's frames would
                # do both by chance with the co-start tail times the share of accounts
                # that carry one of them: its test passes at alpha over that share.
                bar, need = alpha, GROUP_COSTART_MIN
                if measured and self._carries_frame_of(carried, group[0]):
                    key = id(group[0])
                    if key not in group_frames:
                        group_frames[key] = self.community_frames(group[0])[1]
                    bar = alpha / max(group_frames[key], FRAME_SHARE_FLOOR)
                    need = FRAMED_COSTART_MIN
                if most < need or poisson_tail(floor, most) > bar:
                    continue
                k = len(set().union(*lists))
                if k < need or poisson_tail(floor, k) > bar:
                    continue
                if measured and poisson_tail(chance, k) > bar:
                    key = id(group[0])
                    if key not in group_starts:
                        group_starts[key] = self.starts_of(group[0].members)
                    local = self._local_start_chance(aid, group_starts[key])
                    if local is None or poisson_tail(
                            max(floor, local * mine.session_starts), k) > bar:
                        continue
                linked.update(_pair(aid, m) for m in mates)
            old = self._group_costart.get(aid, set())
            if linked != old:
                self._group_dirty |= linked ^ old
                if linked:
                    self._group_costart[aid] = linked
                else:
                    del self._group_costart[aid]

    def _in_owned(self, pair: Pair) -> bool:
        a, b = pair
        return pair in self._owned.get(a, ()) or pair in self._owned.get(b, ())

    def _owners(self, key: object, communities: Mapping[str, Community]
                ) -> list[Community]:
        """The communities of which some member holds ``key`` as a dominant frame."""
        found: dict[int, Community] = {}
        for m in self.groups["template"].get(key, ()):
            community = communities.get(m)
            if community is not None:
                found.setdefault(id(community), community)
        return [found[k] for k in sorted(found, key=lambda k: min(found[k].members))]

    def _core(self, community: Community, key: object, owned: Set[str]) -> set[str]:
        """The community's members that send ``key`` on evidence of their own: every
        member but those an owned frame alone linked to it, unless they hold ``key`` as a
        dominant frame now (``owned``: the accounts linked by owned frames). Counted as
        members, the accounts an owned frame linked would make the frame look owned to
        the next outsider that sends it, and that one to the next: a frame would pull in
        every later sender, one at a time."""
        holders = self.groups["template"].get(key, set())
        return {m for m in community.members if m not in owned or m in holders}

    def _outsiders(self, carriers: set[str], core: set[str], community: Community,
                   communities: Mapping[str, Community], owned: Set[str], most: int
                   ) -> list[str]:
        """Up to ``most + 1`` of ``carriers`` outside ``core``: those in another community
        on evidence of their own, and those in none (or linked by an owned frame alone)
        that never started a session beside an account of ``core``. The partners are left
        out as :meth:`community_frames` leaves them out: the operator's accounts not
        linked into it yet are among them. An account of another community is not: the
        partners of a large busy community are a large share of everyone, and two
        operators who picked the same fragment for their harnesses would each find it
        their own."""
        partners = self._partners
        out: list[str] = []
        for x in carriers - core:
            theirs = communities.get(x)
            if ((theirs is not None and theirs is not community and x not in owned)
                    or all(m not in core for m in partners.get(x, ()))):
                out.append(x)
                if len(out) > most:
                    break
        return out

    def owned_frames(self, states: Mapping[str, AccountState],
                     communities: Mapping[str, Community], moved: Iterable[str]) -> None:
        """Link a quiet account in no other community to the members of a community whose
        own frame it sends (applied at the next :meth:`refresh`, as template links).

        A frame is the community's own when at least OWNED_FRAME_CARRIERS of its members
        send it, one of them as a dominant frame, and no account outside the community
        and its co-start partners in no other community does, among at least
        OWNED_FRAME_POPULATION accounts outside it: an operator's script, not a public
        instruction format (:meth:`_outsiders`). Members linked by an owned frame alone
        count as outside (:meth:`_core`). The one account outside that sends it too, in
        no other community and with at most GROUP_COSTART_SAMPLE exchanges when tested,
        is linked to those members. A scheduler's
        accounts of one to four exchanges send the operator's frame in some of their
        prompts, too rarely for a dominant frame of their own, and each starts beside a
        member about as often as a stranger does; the frame is what they share with
        their operator. An unrelated account that happens to send the frame would need
        no other account outside to have sent it before, and one that sends it later
        ends the link of any account it was the only outsider for.

        Tested are the carriers of the frames whose carriers or holders changed since the
        last test, of the frames of the accounts whose community changed (``moved``), and
        the accounts such frames linked before. A linked account keeps its links until
        such a test finds otherwise: one that has since sent more than
        GROUP_COSTART_SAMPLE exchanges loses them at the next test of its frame."""
        keys = self._keys_moved
        for aid in moved:
            keys.update(self.member_keys.get(aid, {}).get("template", ()))
        self._keys_moved = set()
        # Every account is judged against the links as they stood before this test, so a
        # key's owners and a community's core for it are the same for every account.
        owned = frozenset(self._owned)
        owners_of: dict[object, list[Community]] = {}
        cores: dict[tuple[object, int], set[str]] = {}

        def owners(key: object) -> list[Community]:
            if key not in owners_of:
                owners_of[key] = self._owners(key, communities)
            return owners_of[key]

        def core_of(community: Community, key: object) -> set[str]:
            at = (key, id(community))
            if at not in cores:
                cores[at] = self._core(community, key, owned)
            return cores[at]

        candidates: set[str] = set()
        for key in keys:
            candidates |= self._owned_by_key.get(key, set())
            carriers = self._carriers.get(key)
            if not carriers:
                continue
            for community in owners(key):
                core = core_of(community, key)
                if len(carriers & core) < OWNED_FRAME_CARRIERS:
                    continue
                outside = self._outsiders(carriers, core, community, communities,
                                          owned, 1)
                if len(outside) == 1:
                    candidates.update(outside)
                elif not outside:
                    candidates |= carriers - core
        population = len(self._carried)
        for aid in sorted(candidates):
            state = states.get(aid)
            mine = communities.get(aid)
            linked: set[Pair] = set()
            used: set[object] = set()
            if state is not None and state.count <= GROUP_COSTART_SAMPLE:
                for key in self._carried.get(aid, ()):
                    carriers = self._carriers[key]
                    for community in owners(key):
                        # In a community already: only in the one its frame linked it to.
                        if mine is not None and (mine is not community
                                                 or aid not in owned):
                            continue
                        core = core_of(community, key) - {aid}
                        inside = carriers & core
                        if (len(inside) < OWNED_FRAME_CARRIERS
                                or population - len(core) < OWNED_FRAME_POPULATION
                                or self._outsiders(carriers - {aid}, core, community,
                                                   communities, owned, 0)):
                            continue
                        linked.update(_pair(aid, m) for m in inside)
                        used.add(key)
            old = self._owned.get(aid, set())
            if linked != old:
                self._owned_dirty |= linked ^ old
            _reindex(self._owned_by_key, self._owned_keys, aid, used)
            if linked:
                self._owned[aid] = linked
            else:
                self._owned.pop(aid, None)
                self._owned_keys.pop(aid, None)

    def community_costarts(self, communities: Mapping[str, Community], *,
                           now: bool = False) -> None:
        """Link two communities whose members started sessions in the same
        COMMUNITY_COSTART_BUCKET_S buckets far more often than a shifted copy of one
        community's starts meets the other's (run once per COMMUNITY_COSTART_EVERY_S of
        trace time, or ``now``: at the end of a trace; links applied at the next
        :meth:`refresh`).

        A scheduler that wakes a few of its many quiet accounts at once, spread over a
        few minutes, makes too few co-starts within seconds for the pair and group tests,
        and its accounts, each with a different part of the harness's frames, fall into
        several template communities. Each of those starts sessions at the scheduler's
        ticks, so two of them share the buckets of many ticks. Two unrelated communities
        share buckets too, the more the busier they are and the more their activity
        follows the same daily rhythm: the chance is therefore not modelled but measured,
        as the mean overlap of one community's buckets with the other's shifted by 10 to
        60 minutes either way (COMMUNITY_COSTART_SHIFTS), a shift that keeps both
        rhythms and breaks only what happens at the same moment. A pair of communities
        whose overlap reaches COMMUNITY_COSTART_MIN buckets, with a Poisson tail at that
        mean of at most ``community_costart_alpha`` over the number of community pairs,
        is linked: in each shared bucket, the first member of one that started there to
        the first of the other, as lockstep.

        Links stay once made (their communities are then one, and there is nothing left
        to test between them) until one of the two accounts has no session start left
        in the kept window (:meth:`_starts_kept_from`).

        Every pair of communities is compared, so a run's work and memory grow with the
        square of their number: beyond COMMUNITY_COSTART_MAX communities only that many
        are tested, those with the fewest starts per member."""
        width = COMMUNITY_COSTART_BUCKET_S // BURST_BUCKET_S
        newest = self._newest_start
        if (not now and self._community_tested_at is not None
                and newest - self._community_tested_at
                < COMMUNITY_COSTART_EVERY_S // BURST_BUCKET_S):
            return
        self._community_tested_at = newest
        own = self._own_starts
        gone = {p for p in self._community_costart if p[0] not in own or p[1] not in own}
        if gone:
            self._community_costart -= gone
            self._community_dirty |= gone
        # The buckets from the oldest start kept (COSTART_PAIR_TTL_S back, and up to an
        # hour more until the next prune) to the newest. Until they span
        # COMMUNITY_COSTART_HISTORY shifts, a shift moves too much of one community's
        # starts off the ends for its overlap to measure the chance.
        first = min((starts[0] for starts in own.values() if starts), default=newest) // width
        span = newest // width - first + 1
        if span < COMMUNITY_COSTART_HISTORY * max(COMMUNITY_COSTART_SHIFTS):
            return
        groups: dict[int, Community] = {}
        for community in communities.values():
            if community.size >= 2:
                groups.setdefault(id(community), community)
        ordered = sorted(groups.values(), key=lambda c: min(c.members))
        if len(ordered) > COMMUNITY_COSTART_MAX:
            # The quietest communities (fewest starts kept per member): a scheduler's
            # pieces are made of accounts of a few exchanges a day.
            def starts_per_member(c: Community) -> float:
                return sum(len(own.get(m, ())) for m in c.members) / c.size
            quiet = sorted(ordered, key=lambda c: (starts_per_member(c), min(c.members)))
            kept = {id(c) for c in quiet[:COMMUNITY_COSTART_MAX]}
            ordered = [c for c in ordered if id(c) in kept]
        if len(ordered) < 2:
            return
        # Per community: its buckets (a row of a 0/1 matrix), and in each bucket the
        # first member (by id) that started there.
        occupied = np.zeros((len(ordered), span), dtype=np.float32)
        starter: list[dict[int, str]] = []
        for row, community in enumerate(ordered):
            firsts: dict[int, str] = {}
            for m in sorted(community.members):
                for b in own.get(m, ()):
                    c = b // width - first
                    if 0 <= c < span:
                        firsts.setdefault(c, m)
            starter.append(firsts)
            occupied[row, list(firsts)] = 1.0
        shared = occupied @ occupied.T
        bar = self.community_costart_alpha / (len(ordered) * (len(ordered) - 1) / 2)
        # The chance is taken as at least 1: a pair that would not pass even then is not
        # worth its shifted overlaps.
        least = COMMUNITY_COSTART_MIN
        while pdtrc(least - 1.0, 1.0) > bar:
            least += 1
        rows, cols = np.nonzero(np.triu(shared, 1) >= least)
        if not len(rows):
            return
        # One community's buckets against the other's shifted by s, summed over the
        # shifts: the first's rows times the sum of the second's shifted rows. A shift
        # by s leaves span - |s| buckets where both have data, so its overlap counts
        # span / (span - |s|) times.
        moved = np.zeros_like(occupied)
        for shift in COMMUNITY_COSTART_SHIFTS:
            scale = np.float32(span / (span - abs(shift)))
            if shift > 0:
                moved[:, shift:] += occupied[:, :-shift] * scale
            else:
                moved[:, :shift] += occupied[:, -shift:] * scale
        shifted = np.einsum("ij,ij->i", occupied[rows], moved[cols])
        chance = np.maximum(shifted / len(COMMUNITY_COSTART_SHIFTS), 1.0)
        # P(X >= k) for X ~ Poisson(chance), for every pair at once
        passed = pdtrc(shared[rows, cols] - 1.0, chance) <= bar
        for i, j in zip(rows[passed].tolist(), cols[passed].tolist(), strict=True):
            mine, theirs = starter[i], starter[j]
            for c in sorted(mine.keys() & theirs.keys()):
                pair = _pair(mine[c], theirs[c])
                if pair not in self._community_costart:
                    self._community_costart.add(pair)
                    self._community_dirty.add(pair)

    def retest_partners(self, joined: Iterable[str], states: Mapping[str, AccountState]
                        ) -> None:
        """Have :meth:`group_costarts` test again the quiet co-start partners of accounts
        that have just joined a community. A quiet account is otherwise tested only when
        it or a partner starts; the partners it met may be linked into its operator's
        community only later, and the account, which starts rarely, would not be tested
        against that community. Only partners with starts enough for the test to pass
        (FRAMED_COSTART_MIN) are tested again."""
        tested, partners = self._group_tested, self._partners
        for aid in joined:
            for other in partners.get(aid, ()):
                st = states.get(other)
                if (st is not None and st.count <= GROUP_COSTART_SAMPLE
                        and st.session_starts >= FRAMED_COSTART_MIN):
                    tested.add(other)

    @property
    def costart_pairs(self) -> int:
        """Pairs of accounts whose co-started sessions are being counted. Every session
        start is paired with every other start within COSTART_NEIGHBOURS buckets, so the
        count grows with the square of the accounts active at once (pairs unseen for
        COSTART_PAIR_TTL_S and not linked are forgotten); with about 6,000 accounts
        active in a day their structures were already a third of the detector's memory
        (docs/benchmarks.md, "Detector memory and pace as the population grows")."""
        return len(self._costarts)

    @property
    def links_pending(self) -> bool:
        """Whether :meth:`group_costarts`, :meth:`owned_frames` or
        :meth:`community_costarts` found links that the next :meth:`refresh` has yet to
        apply."""
        return bool(self._group_dirty or self._community_dirty or self._owned_dirty)

    def starts_of(self, members: Iterable[str]) -> GroupStarts:
        """The recent session starts of a group's members: distinct buckets in order, and
        how many members started in each."""
        own = self._own_starts
        buckets = [b for m in members for b in own.get(m, ())]
        if not buckets:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        distinct, counts = np.unique(np.array(buckets, np.int64), return_counts=True)
        return distinct, counts

    def _local_start_chance(self, aid: str, group: GroupStarts) -> float | None:
        """The chance that one of the account's starts meets a start of the group by
        coincidence, read off the group's starts around the account's own: the share of
        the 10-second buckets within GROUP_COSTART_LOCAL_S of each of its last
        GROUP_COSTART_SAMPLE starts (its own start's window left out) that lie within
        COSTART_NEIGHBOURS of another member's start. Measured, not modelled: a
        scheduler that wakes several members at once covers one window with all of
        them, and a group busy by day is as busy around a day-time start as it is.
        None when the account has no recent start with a window to measure."""
        own = self._own_starts.get(aid)
        if not own:
            return None
        distinct, counts = group
        theirs = distinct
        if len(distinct):
            # The account's own starts, if it is a member, are not the group's.
            mine, times = np.unique(np.array(own, np.int64), return_counts=True)
            at = np.searchsorted(distinct, mine)
            inside = at < len(distinct)
            inside[inside] = distinct[at[inside]] == mine[inside]
            others = counts.copy()
            others[at[inside]] -= times[inside]
            theirs = distinct[others > 0]
        reach = int(GROUP_COSTART_LOCAL_S // BURST_BUCKET_S)
        near = COSTART_NEIGHBOURS
        kept_from = self._starts_kept_from()
        covered = length = 0
        for start in own[-GROUP_COSTART_SAMPLE:]:
            lo = max(start - reach, kept_from + near)
            hi = min(start + reach, self._newest_start - near)
            if hi < lo:
                continue
            mid_lo, mid_hi = max(start - near, lo), min(start + near, hi)
            length += hi - lo + 1 - max(0, mid_hi - mid_lo + 1)
            covered += (_coverage(theirs, lo, hi)
                        - (_coverage(theirs, mid_lo, mid_hi) if mid_lo <= mid_hi else 0))
        return covered / length if length else None

    def costart_pair_alpha(self) -> float:
        """The pair test's alpha now: ``costart_alpha`` for up to COSTART_POPULATION
        active accounts, and ``costart_alpha * (COSTART_POPULATION / N) ** 2`` among N
        beyond. Every pair of accounts is compared, N * N / 2 of them, so the chance links
        this allows stay as many as among COSTART_POPULATION accounts, however large the
        service. Shrinking it only in proportion to N (each account's chance to be linked
        kept constant) still let chance links grow with N: on the ``large`` preset's
        first million exchanges, casual users of two to four exchanges joined to campaign
        accounts by two coincidental starts were half the benign accounts flagged."""
        scale = min(1.0, COSTART_POPULATION / max(len(self._active), 1))
        return self.costart_alpha * scale * scale

    def _costart_linked(self, states: dict[str, AccountState], pair: Pair,
                        alpha: float) -> bool:
        k = self._costarts.get(pair, 0)
        return k >= 2 and poisson_tail(costart_chance(
            states[pair[0]], states[pair[1]]), k) <= alpha

    def _lockstep_candidates(self, state: AccountState) -> None:
        if self._lsh is None:
            self._lsh = MinHashLSH(threshold=self.lockstep_threshold,
                                   num_perm=len(state.activity.hashvalues))
        lsh = self._lsh
        aid = state.account_id
        if aid in self._in_lsh:
            lsh.remove(aid)
        self._dirty_pairs.update((aid, o) if aid < o else (o, aid)
                                 for o in lsh.query(state.activity))
        self._dirty_pairs.update(self._lockstep_of.get(aid, ()))
        lsh.insert(aid, state.activity)
        self._in_lsh.add(aid)

    def _ring(self, group: tuple[str, object]) -> set[Pair]:
        """The group's edges: each active member to its next neighbours on the ring."""
        kind, key = group
        if len(self.groups[kind].get(key, ())) > self.max_group:
            return set()
        if kind == "exit" and str(key) not in self._exits_linking:
            return set()
        ring = [pos[-1] for pos in self._rings.get(group, ())]
        n = len(ring)
        out: set[Pair] = set()
        steps = range(1, min(RING_NEIGHBOURS, n - 1) + 1)
        for i, a in enumerate(ring):
            for step in steps:
                b = ring[(i + step) % n]
                out.add((a, b) if a < b else (b, a))
        return out

    def frame_overlap(self, a: str, b: str) -> tuple[float, float] | None:
        """How much of two accounts' dominant template frames is common, None unless both
        have some: (shared frames over the smaller set, over the union).

        The first decides whether they are linked: an account whose traffic put one of
        its operator's frames just under the dominance share still matches, and one
        operator's accounts use the same harness, while two operators who copied one
        public instruction share that frame and differ in the rest of theirs. The second
        (Jaccard) is the link's strength: two accounts that hold the same frames weigh
        more in the account graph than two that share one frame of four, so Louvain
        keeps apart operators joined only by a public frame."""
        fa = self.member_keys.get(a, {}).get("template")
        fb = self.member_keys.get(b, {}).get("template")
        if not fa or not fb:
            return None
        common = len(fa & fb)
        return (round(common / min(len(fa), len(fb)), 6),
                round(common / (len(fa) + len(fb) - common), 6))

    def refresh(self, states: dict[str, AccountState]) -> set[Pair]:
        """Re-link changed groups and lockstep candidates; returns the pairs whose edge
        really changed: appeared, went, or changed kinds or similarity (``self.edges``
        then holds ``(a, b) -> {kind: weight}``, a < b)."""
        changed: set[Pair] = set()
        # Exit /24s that started or stopped linking change the count of shared ones of
        # every pair of their rotating holders, on whichever ring the pair met.
        for kind, key in self._dirty_groups:
            if kind != "exit":
                continue
            prefix = str(key)
            linking = (self._settled_on(prefix) <= EXIT_MAX_SETTLED
                       and bool(self.groups["exit"].get(prefix)))
            if linking != (prefix in self._exits_linking):
                if linking:
                    self._exits_linking.add(prefix)
                else:
                    self._exits_linking.discard(prefix)
                self._exits_moved.update(self.groups["exit"].get(prefix, ()))
        # Every group and pair is handled on its own, so the order does not matter.
        for group in self._dirty_groups:
            kind, key = group
            old = self._group_edges.pop(group, set())
            new = self._ring(group)
            if new:
                self._group_edges[group] = new
            for pair in old - new:
                counts = self._counts[pair]
                counts[kind] -= 1
                if not counts[kind]:
                    del counts[kind]
                changed.add(pair)
            for pair in new - old:
                self._counts.setdefault(pair, {})
                self._counts[pair][kind] = self._counts[pair].get(kind, 0) + 1
                changed.add(pair)
        self._dirty_groups.clear()
        # An account whose set of frames changed has a new template similarity to every
        # account it is paired with, whatever evidence paired them (a /24 or payment
        # ring, an LSH band, lockstep), in groups that did not change as well.
        for aid in self._frames_moved:
            changed.update(self._pairs_of.get(aid, ()))
        self._frames_moved.clear()
        # Only a pair that met on an exit ring can hold an exit link.
        counts_of = self._counts
        for aid in self._exits_moved:
            changed.update(pair for pair in self._pairs_of.get(aid, ())
                           if "exit" in counts_of.get(pair, ()))
        self._exits_moved.clear()
        self._prune_starts()
        alpha = self.costart_pair_alpha()
        for pair in sorted(self._costart_dirty):
            if self._costart_linked(states, pair, alpha):
                if pair not in self._costart:
                    self._costart.add(pair)
                    _index_pair(self._costart_of, pair)
                    changed.add(pair)
            elif pair in self._costart:
                self._costart.discard(pair)
                _unindex_pair(self._costart_of, pair)
                changed.add(pair)
        self._costart_dirty.clear()
        changed |= self._group_dirty
        changed |= self._owned_dirty
        self._owned_dirty.clear()
        self._group_dirty.clear()
        changed |= self._community_dirty
        self.joining = self._community_dirty & self._community_costart
        self._community_dirty = set()
        if self._dirty_pairs:
            pairs = list(self._dirty_pairs)
            sims = _jaccards(states, pairs)
            threshold = self.lockstep_threshold
            margin = self.lockstep_margin
            for pair, sim in zip(pairs, sims.tolist(), strict=True):
                if sim >= threshold and sim - chance_jaccard(
                        states[pair[0]], states[pair[1]]) >= margin:
                    if pair not in self._lockstep:
                        _index_pair(self._lockstep_of, pair)
                    self._lockstep[pair] = sim
                    changed.add(pair)
                elif pair in self._lockstep:
                    del self._lockstep[pair]
                    _unindex_pair(self._lockstep_of, pair)
                    changed.add(pair)
        self._dirty_pairs.clear()
        moved: set[Pair] = set()
        for pair in changed:
            counts = self._counts.get(pair, {})
            kinds: dict[str, float] = {k: 1.0 for k in sorted(counts) if k != "lsh"}
            kinds.pop("template", None)
            if "exit" in kinds and self._exits_shared(*pair) < EXIT_MIN_SHARED:
                del kinds["exit"]
            costart = (pair in self._costart or self._in_group_costart(pair)
                       or pair in self._community_costart)
            owned = self._in_owned(pair)
            # Frames give the strength of a link that current evidence makes (a shared
            # group's ring, lockstep); a pair that a ring once held and no longer does is
            # not linked by frames alone, or a public frame's group would end up complete.
            paired = bool(counts) or pair in self._lockstep or costart
            overlap = self.frame_overlap(*pair) if paired else None
            if overlap is not None:
                share, strength = overlap
                if share >= MIN_FRAME_SIMILARITY:
                    kinds["template"] = strength
            # One shared 16-bit SimHash band happens by chance between unrelated accounts;
            # near copies of one prompt share several bands.
            elif counts.get("lsh", 0) >= MIN_SHARED_BANDS:
                kinds["template"] = 1.0
            # One of the two sends a frame that only the other's community sends.
            if owned and "template" not in kinds:
                kinds["template"] = 1.0
            if pair in self._lockstep:
                kinds["lockstep"] = self._lockstep[pair]
            if costart:
                kinds["lockstep"] = 1.0
            # A shared sign-up window alone is coincidence; keep it only beside others.
            if kinds and set(kinds) != {"signup"}:
                if self.edges.get(pair) != kinds:
                    self.edges[pair] = kinds
                    moved.add(pair)
            elif self.edges.pop(pair, None) is not None:
                moved.add(pair)
            if not self._counts.get(pair):
                self._counts.pop(pair, None)
            if pair in self.edges or pair in self._counts:
                _index_pair(self._pairs_of, pair)
            elif pair in self._pairs_of.get(pair[0], ()):
                _unindex_pair(self._pairs_of, pair)
        return moved
