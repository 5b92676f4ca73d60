"""Detection quality on small, hand-built traces: each test fails if the detector loses a
property the held-out results depend on (attribution of operators that share public
templates, lockstep that is more than chance, template evidence that ordinary users do
not share, risk that an unseen feature value cannot decide alone)."""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distillguard.benchdetect import score
from distillguard.detect.batch import run_batch
from distillguard.detect.calibration import Calibration
from distillguard.detect.engine import Detector
from distillguard.detect.evidence import campaign_evidence
from distillguard.detect.features import extract_many
from distillguard.detect.graph import AccountGraph, Community, edge_weight
from distillguard.detect.linking import (
    COSTART_MIN_SPAN_S,
    COSTART_NEIGHBOURS,
    COSTART_PAIR_TTL_S,
    EXIT_MIN_DISTINCT,
    EXIT_MIN_SHARED,
    FRAME_SHARE_FLOOR,
    FRAMED_COSTART_MIN,
    GROUP_COSTART_BURST,
    GROUP_COSTART_LOCAL_S,
    GROUP_COSTART_MIN,
    GROUP_COSTART_SAMPLE,
    MIN_FRAME_SIMILARITY,
    LinkIndex,
    _pair,
    _ring_position,
    chance_jaccard,
    poisson_tail,
)
from distillguard.detect.scoring import (
    ACCOUNT_FEATURES,
    COMMUNITY_FEATURES,
    FEATURES,
    OWN_EVIDENCE_PRIOR,
    Z_CLIP,
    Model,
    account_vector,
)
from distillguard.detect.sketches import (
    BURST_BUCKET_S,
    EXIT_SAMPLE,
    NETWORKS_CAP,
    AccountState,
    ExitSample,
)
from distillguard.errors import ConfigError
from distillguard.simulate import simulate
from distillguard.simulate.harness import Harness
from tests.factories import make_exchange, make_features

T0 = datetime(2026, 3, 2, tzinfo=UTC).timestamp()


def _link_operators(harness: dict[str, tuple[int, ...]], accounts: int,
                    prefix: Callable[[str, int], str], *, first: int = 0,
                    links: LinkIndex | None = None,
                    states: dict[str, AccountState] | None = None
                    ) -> tuple[LinkIndex, dict[str, AccountState]]:
    """Each operator's accounts (numbered from ``first``) send eight exchanges with its
    frames, from the /24 that ``prefix(operator, i)`` names; returns the refreshed link
    index and the states (``links`` and ``states`` if given, with the accounts added)."""
    links = LinkIndex() if links is None else links
    states = {} if states is None else states
    for op, keys in harness.items():
        for i in range(first, first + accounts):
            aid = f"{op}{i}"
            state = states[aid] = AccountState(aid)
            links.set_static(aid, None, None)
            for n in range(8):
                state.update(make_features(aid, T0 + 60 * n + i, template_keys=keys,
                                           ip_prefix=prefix(op, i)))
            state.flush()
            links.update(state)
    links.refresh(states)
    return links, states


def _communities(links: LinkIndex) -> set[frozenset[str]]:
    graph = AccountGraph()
    graph.update(links.edges, set(links.edges))
    return {frozenset(c.members) for c in graph.communities}


def test_operators_sharing_one_public_frame_are_not_template_linked() -> None:
    """Two operators each use their own harness (a system prompt and an instruction
    frame) around one public instruction they both copied: accounts of one operator are
    template-linked at full strength, accounts of the two operators not at all, and
    Louvain keeps the operators apart although their /24 clusters are joined only by
    their templates."""
    harness = {"a": (101, 201, 202), "b": (101, 301, 302)}   # frame 101 is public
    links, states = _link_operators(harness, 6, lambda op, i: f"{op}-net{i % 2}")
    assert links.frame_overlap("a0", "a1") == (1.0, 1.0)
    assert links.frame_overlap("a0", "b0") == pytest.approx((1 / 3, 1 / 5))
    kinds = {pair: k for pair, k in links.edges.items()}
    assert all(a[0] == b[0] for a, b in kinds), "a template link across operators"
    assert any(set(k) == {"template"} for k in kinds.values())   # across /24 clusters
    assert _communities(links) == {frozenset(a for a in states if a[0] == op)
                                   for op in harness}
    assert edge_weight({"template": 1 / 3}) < edge_weight({"template": 1.0}) / 2


def test_operators_sharing_two_of_three_frames_are_not_template_linked() -> None:
    """Operators who copied a public instruction often share one or two more frames
    from the pools their harnesses draw on; two thirds of the smaller frame set in common
    is not one harness."""
    harness = {"a": (101, 102, 201), "b": (101, 102, 301)}
    links, _states = _link_operators(harness, 6, lambda op, i: f"{op}{i}-net")
    assert links.frame_overlap("a0", "b0") == pytest.approx((2 / 3, 1 / 2))
    assert links.frame_overlap("a0", "a1") == (1.0, 1.0)
    assert any(a[0] == b[0] == "a" and "template" in k for (a, b), k in links.edges.items())
    assert all(a[0] == b[0] for a, b in links.edges), "a template link across operators"


def test_a_public_frame_group_links_each_operator_within_itself() -> None:
    """Two operators of twenty accounts each hold their own frame and three public ones,
    so any two of their accounts share three of their four frames and are
    template-linked. On each public frame's ring (and on each SimHash band's, all shared
    here), accounts with the same frame set sit together: only the pairs around the two
    places where one operator's block meets the other's cross (at most 1 + 2 + 3 each,
    however many accounts each has), and a cross pair, sharing three of five distinct
    frames, weighs three fifths of a pair within one operator. Louvain then finds the two
    operators."""
    harness = {"a": (101, 102, 103, 201), "b": (101, 102, 103, 301)}
    links, states = _link_operators(harness, 20, lambda op, i: f"{op}{i}-net")
    cross = {pair: kinds for pair, kinds in links.edges.items() if pair[0][0] != pair[1][0]}
    shared = [group for group in links._rings if len({a[0] for a in links.groups[group[0]][
        group[1]]}) == 2]
    assert shared
    for group in shared:
        assert len({p for p in links._ring(group) if p[0][0] != p[1][0]}) <= 2 * (1 + 2 + 3)
    assert 0 < len(cross) <= len(shared) * 2 * (1 + 2 + 3)
    assert all(kinds == {"template": pytest.approx(3 / 5)} for kinds in cross.values())
    assert _communities(links) == {frozenset(a for a in states if a[0] == op)
                                   for op in harness}


def test_frame_links_last_only_while_evidence_pairs_the_accounts() -> None:
    """Frames give a link its strength; they do not keep it. When more accounts join, the
    places where the operators' blocks meet on the shared rings move, and the cross pairs
    those rings no longer hold lose their link: otherwise every pair a ring ever held
    would stay linked, and a public frame's group would end up a complete graph."""
    harness = {"a": (101, 102, 103, 201), "b": (101, 102, 103, 301)}
    links, states = _link_operators(harness, 6, lambda op, i: f"{op}{i}-net")
    before = {pair for pair in links.edges if pair[0][0] != pair[1][0]}
    _link_operators(harness, 14, lambda op, i: f"{op}{i}-net", first=6, links=links,
                    states=states)
    held = set().union(*(links._ring(group) for group in links._rings))
    assert set(links.edges) <= held
    assert before - held, "every early cross pair is still on a ring: not the case tested"
    assert not (before - held) & set(links.edges)


def test_one_harness_on_several_rings_stays_one_community() -> None:
    """Forty accounts of one operator share three frames and a /24. Each ring orders them
    by its own hash, so their links knit one community; one order for every ring would
    give the same three neighbours on each side on every ring, a long chain that Louvain
    cuts into arcs."""
    links, states = _link_operators({"a": (101, 201, 202)}, 40, lambda op, i: "a-net")
    assert _communities(links) == {frozenset(states)}


def test_an_operator_of_several_harness_variants_on_one_card_stays_one_community() -> None:
    """Forty-eight accounts of one operator behind proxy exits (no /24 of their own) pay
    with one card and sign up on one mail domain of its own; they use six harness variants
    that share no frame. The card's and the domain's rings are ordered by hash, not by
    frame set, so their links cross the variants; ordered by frame set, both rings held
    the variants in the same six blocks, a chain Louvain cut along them."""
    links, states = LinkIndex(), {}
    for i in range(48):
        aid = f"op{i:02d}"
        variant = i % 6
        state = states[aid] = AccountState(aid)
        links.set_static(aid, "card-1", None, "ops-mail.example")
        for n in range(8):
            state.update(make_features(aid, T0 + 60 * n + i,
                                       template_keys=(1000 + 10 * variant + 1,
                                                      1000 + 10 * variant + 2),
                                       ip_prefix=f"10.{i}.{n}.0/24"))
        state.flush()
        links.update(state)
    links.refresh(states)
    assert _communities(links) == {frozenset(states)}


def test_a_prefix_links_only_the_accounts_that_mostly_send_from_it() -> None:
    """A rotating proxy sends each request from another exit, consumers' /24s among them.
    Whichever /24 it used most so far is not where the account lives, and linking it to
    the consumers there put harvesters and strangers in one community. Two consumers who
    send from one /24 are still linked by it."""
    links, states = LinkIndex(), {}
    prefixes = {"home1": ["10.0.1.0/24"] * 8, "home2": ["10.0.1.0/24"] * 7 + ["10.9.9.0/24"],
                "proxied": ["10.0.1.0/24"] * 3 + [f"10.0.{n}.0/24" for n in range(2, 7)]}
    for aid, seen in prefixes.items():
        state = states[aid] = AccountState(aid)
        links.set_static(aid, None, None)
        for n, prefix in enumerate(seen):
            state.update(make_features(aid, T0 + 60 * n, template_keys=(hash(aid),),
                                       ip_prefix=prefix))
        state.flush()
        links.update(state)
    links.refresh(states)
    assert states["proxied"].prefixes.first() == "10.0.1.0/24"
    assert states["proxied"].home_prefix is None
    assert states["home2"].home_prefix == "10.0.1.0/24"
    assert {pair for pair, kinds in links.edges.items() if "prefix" in kinds} == {
        ("home1", "home2")}


def test_template_strength_follows_frames_on_every_link() -> None:
    """x and y share a /24 and a frame group of twelve accounts. When x takes on frames of
    its own, its template similarity to y falls below the bar, and the pair's edge must
    lose its template kind, whatever evidence put the pair in the index."""
    members = [f"m{i}" for i in range(12)]
    x, y = members[0], members[6]
    links = LinkIndex()
    states = {a: AccountState(a) for a in members}
    clock = iter(range(100_000))

    def send(aid: str, keys: tuple[int, ...], n: int = 8) -> None:
        prefix = "net-xy" if aid in (x, y) else f"net-{aid}"
        for _ in range(n):
            states[aid].update(make_features(aid, T0 + 30 * next(clock), template_keys=keys,
                                             ip_prefix=prefix))
        states[aid].flush()
        links.update(states[aid])

    for aid in members:
        send(aid, (11, 12, 21, 22, 23) if aid == y else (11, 12))
    links.refresh(states)
    assert links.frame_overlap(x, y) == (1.0, 0.4)
    assert links.edges[_pair(x, y)] == {"prefix": 1.0, "template": 0.4}
    send(x, (11, 12, 31, 32, 33), n=40)    # x's own frames: 2 of its 5 are y's
    links.refresh(states)
    assert links.frame_overlap(x, y) == pytest.approx((0.4, 0.25))
    assert links.edges[_pair(x, y)] == {"prefix": 1.0}


@pytest.mark.parametrize(("others", "linked"), [(0, True), (2_000, False), (4_000, False)])
def test_costart_pair_test_is_stricter_among_more_accounts(others: int, linked: bool
                                                            ) -> None:
    """Two accounts with four session starts each over a day, two of them within seconds
    of each other: a Poisson tail of 3.6e-5, below the pair alpha among a thousand
    accounts, but not among two thousand (alpha 1e-4 x (1,000 / 2,002)^2 = 2.5e-5; in
    proportion to the accounts alone it would be 5e-5 and link them) nor four thousand,
    where there are four and sixteen times as many pairs."""
    links = LinkIndex()
    states: dict[str, AccountState] = {}

    def send(account: str, ts: float) -> None:
        state = states.setdefault(account, AccountState(account))
        state.update(make_features(account, ts, template_keys=()))
        state.flush()
        links.update(state)

    for n, (ta, tb) in enumerate([(0, 4), (21_600, 21_603), (43_200, 50_000),
                                  (64_800, 93_600)]):    # b's starts span over a day
        send("a", T0 + ta + n)
        send("b", T0 + tb)
    for i in range(others):                 # far from a's and b's starts
        send(f"o{i}", T0 + 100_000 + 7 * i)
    links.refresh(states)
    assert links._costarts[("a", "b")] == 2
    assert links.costart_pair_alpha() == pytest.approx(1e-4 * min(1.0, 1_000 / (2 + others)) ** 2)
    assert (("a", "b") in links._costart) is linked


def test_round_the_clock_accounts_are_not_in_lockstep() -> None:
    """Two integrations busy in every bucket share them by chance; two quiet accounts
    that wake up together are in lockstep."""
    links = LinkIndex()
    states = {a: AccountState(a) for a in ("busy1", "busy2", "q1", "q2")}
    for minute in range(0, 24 * 60, 2):
        for a in ("busy1", "busy2"):
            states[a].update(make_features(a, T0 + minute * 60 + 1))
    for hour in range(0, 24, 3):
        for a in ("q1", "q2"):
            states[a].update(make_features(a, T0 + hour * 3600 + 5))
    for state in states.values():
        state.flush()
        links.update(state)
    links.refresh(states)
    kinds = {pair: set(k) for pair, k in links.edges.items()}
    assert "lockstep" in kinds.get(("q1", "q2"), set())
    assert "lockstep" not in kinds.get(("busy1", "busy2"), set())
    assert chance_jaccard(states["busy1"], states["busy2"]) > 0.9
    assert chance_jaccard(states["q1"], states["q2"]) < 0.05


def _lockstep_pair(links: LinkIndex, buckets: dict[str, list[int]]) -> bool:
    states = {a: AccountState(a) for a in buckets}
    for a, active in buckets.items():
        for b in active:
            states[a].update(make_features(a, T0 + b * 120 + 1, template_keys=()))
    for state in states.values():
        state.flush()
        links.update(state)
    links.refresh(states)
    return "lockstep" in links.edges.get(("a", "b"), {})


def test_a_busy_first_hour_together_is_not_lockstep() -> None:
    """Two accounts that began together, each active in every other two-minute bucket
    of the same hour and a half (20 buckets, 17 shared), look in lockstep by their
    Jaccard (0.74 against 0.33 by chance); over so few buckets that happens by chance
    among thousands of accounts, so the link waits for more. Two accounts that wake
    together every 20 minutes for a day are linked."""
    first_hour = {"a": list(range(0, 40, 2)), "b": list(range(6, 46, 2))}
    assert not _lockstep_pair(LinkIndex(), first_hour)
    assert _lockstep_pair(LinkIndex(lockstep_min_buckets=12), first_hour)
    every_20_minutes = list(range(0, 720, 10))
    assert _lockstep_pair(LinkIndex(), {"a": every_20_minutes, "b": every_20_minutes})


def _replay_starts(events: list[tuple[str, float]], days: int, rng: Any, *,
                   group: bool = False,
                   frames: Callable[[str, int], tuple[int, ...]] | None = None
                   ) -> tuple[LinkIndex, dict[str, AccountState], AccountGraph]:
    """Feed (account, time) events through the links in 5-minute evaluations, as the
    detector does; with ``group``, the account graph and the group co-start test too.
    ``frames(account, n)``: the template keys of the account's n-th exchange (none)."""
    links = LinkIndex()
    graph = AccountGraph()
    states = {a: AccountState(a) for a, _ in events}
    for t0 in range(int(T0), int(T0) + days * 86_400, 300):
        window = sorted((ts, a) for a, ts in events if t0 <= ts < t0 + 300)
        for ts, a in window:
            keys = () if frames is None else frames(a, states[a].count)
            states[a].update(make_features(a, ts, template_keys=keys,
                                           simhash=rng.getrandbits(64)))
        for a in sorted({a for _, a in window}):
            states[a].flush()
            links.update(states[a])
        changed = links.refresh(states)
        if group:
            graph.update(links.edges, changed)
            links.retest_partners(sorted(graph.joined), states)
            links.group_costarts(states, graph.of)
    return links, states, graph


def test_accounts_a_scheduler_starts_together_are_linked() -> None:
    """Quiet accounts (a few exchanges a day) of which a scheduler wakes a different few
    at each tick, within seconds of each other, share too few activity buckets for the
    MinHash; their repeated co-starts link them. Quiet accounts with as many sessions at
    independent times, and a chat whose follow-up turns fall beside the scheduler's
    sends, do not link."""
    import random

    rng = random.Random(3)
    pool = [f"s{i}" for i in range(6)]
    events: list[tuple[str, float]] = []
    for tick in range(20):
        at = T0 + tick * 8_640 + rng.uniform(0, 600)
        events += [(a, at + rng.uniform(0, 20)) for a in rng.sample(pool, 3)]
        events += [("chat", at - 60 + 60 * i) for i in range(3)]
    for n in range(10):
        events += [("free1", T0 + n * 17_280 + 3_000.0), ("free2", T0 + n * 17_280 + 5_000.0)]
    links, states, _ = _replay_starts(events, 2, rng)
    linked = set(links.edges)
    graph = AccountGraph()
    graph.update(links.edges, set(links.edges))
    assert set(graph.of) >= set(pool) and len({id(graph.of[a]) for a in pool}) == 1
    assert all(a.startswith("s") and b.startswith("s") for a, b in linked)
    assert states["chat"].session_starts == 20
    assert not links._lockstep   # the activity MinHash alone links none of them


def test_a_scheduler_pool_too_large_for_pairs_is_linked_as_a_group() -> None:
    """A scheduler wakes 3 of its 60 accounts at a time, so two of them rarely start
    together twice and the pair test links them only into pieces; but each account starts
    with *some* of the others again and again, which the group test (its co-starts with
    a community, against the Poisson count by chance) links into one community. Accounts
    with as many sessions at independent times stay unlinked."""
    import random

    import networkx as nx

    rng = random.Random(5)
    pool = [f"s{i:02d}" for i in range(60)]
    events: list[tuple[str, float]] = []
    for tick in range(150):
        at = T0 + tick * 2_880 + rng.uniform(0, 600)
        events += [(a, at + rng.uniform(0, 15)) for a in rng.sample(pool, 3)]
    for n in range(10):
        events += [(f"free{k}", T0 + n * 25_920 + rng.uniform(0, 25_000)) for k in range(6)]
    links, _, graph = _replay_starts(events, 5, rng, group=True)
    pairs_only = nx.Graph(list(links._costart))
    largest = max((len(c) for c in nx.connected_components(pairs_only)), default=0)
    assert largest < 30            # the pair test alone leaves the pool in pieces
    assert all(a.startswith("s") and b.startswith("s") for a, b in links.edges)
    biggest = max(graph.communities, key=lambda c: c.size)
    # accounts with only a few starts may stay out
    assert biggest.size >= 40 and biggest.size >= largest + 10
    assert "lockstep" in biggest.kinds


def _start_density(states: dict[str, AccountState], members: Any) -> float:
    """The members' session starts per co-start window, each over its own span (at least
    a day), added up: the group test's model of members that start on their own."""
    import math

    window = (2 * COSTART_NEIGHBOURS + 1) * BURST_BUCKET_S
    return math.fsum(states[m].session_starts * window / max(
        states[m].last_ts - states[m].first_ts, COSTART_MIN_SPAN_S) for m in sorted(members))


def _group_costart_by_definition(links: LinkIndex, states: dict[str, AccountState],
                                 communities: dict[str, Any], aid: str) -> set[tuple[str, str]]:
    """The group co-start test as its docstring defines it, with every union built: the
    oracle for the short cuts of :meth:`LinkIndex.group_costarts`."""
    import math

    partners = links._partners.get(aid, {})
    found: dict[int, tuple[Any, list[str]]] = {}
    for other in sorted(partners.keys() & communities.keys()):
        c = communities[other]
        if c.size - (aid in c.members) >= 2:
            found.setdefault(id(c), (c, []))[1].append(other)
    groups = sorted(found.values(), key=lambda g: min(g[1]))
    candidates = [([c], mates) for c, mates in groups]
    scheduled = [g for g in groups if "lockstep" in g[0].kinds]
    if len(scheduled) >= 2:
        candidates.append(([c for c, _ in scheduled], [m for _, ms in scheduled for m in ms]))
    own = _start_density(states, [aid])
    linked: set[tuple[str, str]] = set()
    for group, mates in candidates:
        k = len(set().union(*[partners[m] for m in mates]))
        total = sum(_start_density(states, c.members) - (own if aid in c.members else 0.0)
                    for c in group)
        starts = states[aid].session_starts
        chance = starts * -math.expm1(-max(total, 0.0))
        members = set().union(*[c.members for c in group]) - {aid}
        quiet = states[aid].count <= GROUP_COSTART_SAMPLE and len(
            links._own_starts.get(aid, [])) == starts
        local = _measured_chance(links, aid, members) if quiet and len(group) == 1 else None
        alpha, need = links.group_costart_alpha, GROUP_COSTART_MIN
        if quiet and len(group) == 1:
            share = _frame_share(links, states, group[0].members)
            if share is not None and not share[0].isdisjoint(states[aid].templates.counts):
                alpha /= max(share[1], FRAME_SHARE_FLOOR)
                need = FRAMED_COSTART_MIN
        if k >= need and (poisson_tail(chance, k) <= alpha or (
                local is not None and poisson_tail(
                    max(chance / GROUP_COSTART_BURST, local * starts), k) <= alpha)):
            linked.update((min(aid, m), max(aid, m)) for m in mates)
    return linked


def _frame_share(links: LinkIndex, states: dict[str, AccountState], members: Any
                 ) -> tuple[set[object], float] | None:
    """A community's dominant frames and the share of the accounts seen outside it, and
    that never started a session beside a member's start, whose frame sketches hold any
    of them, counted with one carrier more than seen, as defined (None: it has no
    dominant frame)."""
    frames = {f for m in members for f in links.member_keys.get(m, {}).get("template", ())}
    if not frames:
        return None
    near = COSTART_NEIGHBOURS
    theirs = {b for m in members for b in links._own_starts.get(m, [])}
    outside = [st for a, st in states.items() if st.count and a not in members
               and not any(b + d in theirs for b in links._own_starts.get(a, [])
                           for d in range(-near, near + 1))]
    carry = sum(not frames.isdisjoint(st.templates.counts) for st in outside)
    return frames, (carry + 1) / (len(outside) + 1)


def _measured_chance(links: LinkIndex, aid: str, members: set[str]) -> float | None:
    """The measured chance of the group test as defined: the share of buckets around the
    account's last starts, its own start's window left out, near a member's start."""
    near = COSTART_NEIGHBOURS
    reach = int(GROUP_COSTART_LOCAL_S // BURST_BUCKET_S)
    theirs = {b for m in members for b in links._own_starts.get(m, [])}
    first, last = links._starts_kept_from() + near, links._newest_start - near
    around = [y for s in links._own_starts.get(aid, [])[-GROUP_COSTART_SAMPLE:]
              for y in range(s - reach, s + reach + 1)
              if first <= y <= last and abs(y - s) > near]
    if not around:
        return None
    return sum(any(y + d in theirs for d in range(-near, near + 1)) for y in around) / len(around)


def test_group_costart_short_cuts_decide_as_the_whole_test() -> None:
    """The group test skips building a group's union of met starts when even the most
    it could hold would not pass; on a pool with chance partners beside it, every
    account's links come out as the full test's."""
    import random

    rng = random.Random(11)
    pool = [f"s{i:02d}" for i in range(40)]
    others = [f"o{i:02d}" for i in range(30)]
    events: list[tuple[str, float]] = []
    for tick in range(120):
        at = T0 + tick * 2_880 + rng.uniform(0, 600)
        events += [(a, at + rng.uniform(0, 15)) for a in rng.sample(pool, 3)]
        events += [(a, at + rng.uniform(-30, 30)) for a in rng.sample(others, 1)]
        events += [(a, T0 + tick * 2_880 + rng.uniform(0, 2_880)) for a in rng.sample(others, 4)]
    links, states, graph = _replay_starts(events, 4, rng, group=True)
    links._group_tested.update(links._partners)
    links.group_costarts(states, graph.of)
    tested = sorted(links._partners)
    assert len(tested) >= 60
    expected = {a: _group_costart_by_definition(links, states, graph.of, a) for a in tested}
    assert any(expected.values())      # the pool is linked as a group ...
    assert any(not v for v in expected.values())  # ... and some accounts are not
    assert {a: links._group_costart.get(a, set()) for a in tested} == expected


def test_group_chance_is_measured_so_a_schedulers_bursts_count_once() -> None:
    """A scheduler wakes six of its 40 accounts at once, hourly: the model of independent
    starts puts the chance of meeting the pool at about six times what the pool's start
    windows really cover. An account woken with the pool at 4 of its 4 starts is linked
    on the measured chance, where the model alone would not link it; an account with
    as many starts at times of its own is not, and its measured chance is the pool's
    coverage, not the model's."""
    import math
    import random

    rng = random.Random(5)
    pool = [f"s{i:02d}" for i in range(40)]
    events: list[tuple[str, float]] = []
    wakes = []
    for tick in range(48):
        at = T0 + tick * 3_600 + rng.uniform(0, 300)
        wakes.append(at)
        events += [(a, at + rng.uniform(0, 15)) for a in rng.sample(pool, 6)]
    events += [("woken", at + rng.uniform(0, 15)) for at in rng.sample(wakes[20:], 4)]
    events += [("own", T0 + rng.uniform(0, 2 * 86_400)) for _ in range(30)]
    links, states, graph = _replay_starts(events, 2, rng, group=True)
    community = graph.of["s00"]
    assert "woken" in community.members and "own" not in community.members
    modelled = -math.expm1(-_start_density(states, community.members - {"woken"}))
    alpha = links.group_costart_alpha
    assert poisson_tail(4 * modelled, 4) > alpha
    assert any("woken" in pair for pair in links._group_costart.get("woken", ()))
    assert "own" not in links._group_costart
    for aid in ("woken", "own"):
        measured = links._local_start_chance(aid, links.starts_of(community.members))
        assert measured == _measured_chance(links, aid, community.members - {aid})
        assert measured is not None and measured < modelled / 3
        if aid == "own":
            assert measured > modelled / 8
    assert states["own"].session_starts > GROUP_COSTART_SAMPLE


def _framed_pool(strays: int, starts: int = 3, woken: int = 6
                 ) -> tuple[LinkIndex, dict[str, AccountState], AccountGraph]:
    """A scheduler wakes ``woken`` of its 40 accounts hourly; every prompt of theirs
    carries one frame. Two late accounts are each woken with the pool at all their ``starts``
    starts, each time with members they have not met (so only the group test can link
    them); one ("framed") sends that frame in its first two prompts (too few for a frame
    of its own), the other ("plain") never. ``strays`` more accounts of the scheduler are woken
    with the pool once each, and send the frame: one start links no account. 300
    accounts start at random times."""
    import random

    rng = random.Random(0)
    pool = [f"s{i:02d}" for i in range(40)]
    met: dict[str, set[str]] = {"framed": set(), "plain": set()}
    late = ({40 + 2 * i: "framed" for i in range(starts)}
            | {41 + 2 * i: "plain" for i in range(starts)})
    events: list[tuple[str, float]] = []
    for tick in range(48):
        at = T0 + tick * 3_600 + rng.uniform(0, 300)
        who = late.get(tick)
        wake = rng.sample(pool if who is None else sorted(set(pool) - met[who]), woken)
        if who is not None:
            met[who].update(wake)
            events.append((who, at + rng.uniform(0, 15)))
        events += [(a, at + rng.uniform(0, 15)) for a in wake]
        # two strays at each of the first ticks
        events += [(f"stray{i:02d}", at + 15.0) for i in (2 * tick, 2 * tick + 1)
                   if i < strays]
    events += [(f"free{k:03d}", T0 + rng.uniform(0, 2 * 86_400)) for k in range(300)]

    def frames(aid: str, n: int) -> tuple[int, ...]:
        if aid.startswith(("s", "stray")) or (aid == "framed" and n < 2):
            return (101,)
        return (zlib.crc32(f"{aid}{n}".encode()) + 1_000,)

    return _replay_starts(events, 2, rng, group=True, frames=frames)


def _framed_tail(links: LinkIndex, states: dict[str, AccountState],
                 community: Community) -> float:
    """The group test's tail for "framed" against the rest of its community: the larger
    of the modelled chance over GROUP_COSTART_BURST and the measured one."""
    import math

    others = community.members - {"framed"}
    modelled = 3 * -math.expm1(-_start_density(states, others))
    measured = _measured_chance(links, "framed", set(others))
    assert measured is not None
    return poisson_tail(max(modelled / GROUP_COSTART_BURST, 3 * measured), 3)


def test_a_quiet_account_carrying_its_groups_frame_is_tested_at_that_frames_chance(
        ) -> None:
    """Co-starting like "framed" and carrying the frame would happen by chance with the
    co-start tail times the share of accounts carrying it (see _framed_pool): the first
    account is linked, the second, with the same timing evidence, is not."""
    links, states, graph = _framed_pool(strays=0)
    community = graph.of["s00"]
    assert links.community_frames(community)[0] == {101}
    share = links.community_frames(community)[1]
    by_definition = _frame_share(links, states, community.members)
    assert by_definition is not None and share == by_definition[1] < 0.2
    # no account outside the community sends its frame: the chance is one in as many
    # outsiders as were seen that never started beside a member, plus one (its
    # members, which all send it, do not count)
    outsiders = [a for a, st in states.items() if st.count and a not in community.members]
    assert share > 1 / (len(outsiders) + 1)
    assert "framed" in community.members and "plain" not in graph.of
    assert links._group_costart.get("framed") and not links._group_costart.get("plain")
    # the timing alone would not link it, at the model's or the measured chance
    alpha = links.group_costart_alpha
    p = _framed_tail(links, states, community)
    assert alpha < p <= alpha / max(share, FRAME_SHARE_FLOOR)
    for aid in ("framed", "plain"):
        assert links._group_costart.get(aid, set()) == _group_costart_by_definition(
            links, states, graph.of, aid)


def test_a_quiet_account_carrying_its_groups_frame_is_linked_on_two_co_starts() -> None:
    """"framed" and "plain" each start twice, both times with the pool, which wakes 4
    at a time (see _framed_pool). Two co-starts and the frame would happen by chance
    with their tail times the frame's chance, which passes the group test's alpha:
    "framed" is linked. "plain", without the frame, needs GROUP_COSTART_MIN co-starts,
    and is not."""
    links, states, graph = _framed_pool(strays=0, starts=2, woken=4)
    assert states["framed"].session_starts == states["plain"].session_starts == 2
    assert "framed" in graph.of["s00"].members and "plain" not in graph.of
    for aid in ("framed", "plain"):
        assert links._group_costart.get(aid, set()) == _group_costart_by_definition(
            links, states, graph.of, aid)


def test_a_frames_chance_leaves_out_accounts_that_started_beside_its_community() -> None:
    """Sixty more of the scheduler's accounts, woken with the pool once each, send its
    frame and are in no community (see _framed_pool). Counted among the accounts that
    could carry the frame by chance they would make it look common enough that "framed"
    would not be linked; they started beside members, so they are not counted, and it
    is."""
    links, states, graph = _framed_pool(strays=60)
    community = graph.of["s00"]
    strays = [a for a in states if a.startswith("stray")]
    assert len(strays) == 60 and not any(a in graph.of for a in strays)
    share = links.community_frames(community)[1]
    by_definition = _frame_share(links, states, community.members)
    assert by_definition is not None and share == by_definition[1]
    # every outsider counted: the strays carry the frame
    outsiders = [a for a, st in states.items() if st.count and a not in community.members]
    counted_all = (len(strays) + 1) / (len(outsiders) + 1)
    p = _framed_tail(links, states, community)
    alpha = links.group_costart_alpha
    assert p <= alpha / max(share, FRAME_SHARE_FLOOR)
    assert p > alpha / counted_all
    assert "framed" in community.members
    assert links._group_costart.get("framed") == _group_costart_by_definition(
        links, states, graph.of, "framed")


def test_a_quiet_account_is_tested_again_when_its_partners_community_forms() -> None:
    """A scheduler wakes 6 of its 40 accounts hourly; its first five wake-ups each wake
    members not woken before, so no two of them have co-started yet. One more account is
    woken at each of those five and starts no more: when it was tested, none of its
    partners was in a community. Once the pool's co-starts link the pool, it is tested
    again against the pool's community and linked. An account with as many starts at
    independent times in the same hours is not."""
    import random

    rng = random.Random(2)
    pool = [f"s{i:02d}" for i in range(40)]
    events: list[tuple[float, str]] = []
    for tick in range(48):
        at = T0 + tick * 3_600 + rng.uniform(0, 300)
        woken = pool[6 * tick:6 * tick + 6] if tick < 5 else rng.sample(pool, 6)
        events += [(at + rng.uniform(0, 15), a) for a in woken]
        if tick < 5:
            events.append((at + rng.uniform(0, 15), "early"))
    events += [(T0 + rng.uniform(0, 5 * 3_600), "own") for _ in range(5)]
    detector = Detector(Calibration.read())
    for ts, aid in sorted(events):
        detector.observe(make_features(aid, ts, simhash=rng.getrandbits(64),
                                       template_keys=(rng.getrandbits(30),)))
    detector.finish()
    assert "early" in detector.graph.of
    assert detector.graph.of["early"].members <= {*pool, "early"}
    assert detector.links._group_costart.get("early")
    assert "own" not in detector.graph.of


def test_measured_chance_does_not_carry_a_union_of_pools() -> None:
    """Two schedulers' pools, each a lockstep community. An account woken with pool a at
    5 of its 6 starts, which once started beside pool b, is linked to a's accounts on
    the measured chance; the union of both pools, which the model fails, is not tried on
    the measured chance, or a's pass would link it to b's accounts too."""
    import random

    rng = random.Random(5)
    pools = {p: [f"{p}{i:02d}" for i in range(40)] for p in "ab"}
    events: list[tuple[str, float]] = []
    wakes: dict[str, list[float]] = {"a": [], "b": []}
    for tick in range(48):
        for p, shift in (("a", 0), ("b", 1_800)):
            at = T0 + tick * 3_600 + shift + rng.uniform(0, 300)
            wakes[p].append(at)
            events += [(x, at + rng.uniform(0, 15)) for x in rng.sample(pools[p], 6)]
    events += [("woken", at + rng.uniform(0, 15)) for at in rng.sample(wakes["a"][20:], 5)]
    events += [("woken", wakes["b"][10] + 5.0)]
    links, _, graph = _replay_starts(events, 2, rng, group=True)
    assert graph.of["a00"] is not graph.of["b00"]
    assert all("lockstep" in graph.of[p].kinds for p in ("a00", "b00"))
    assert any(m.startswith("b") for m in links._partners["woken"])
    mates = {m for pair in links._group_costart.get("woken", ()) for m in pair} - {"woken"}
    assert len(mates) >= 10 and all(m.startswith("a") for m in mates)


def test_follow_up_turns_make_no_template_evidence() -> None:
    """Users who never met send the same short follow-ups; only opening turns count."""
    follow = "Can you give me a concrete example?"
    states = []
    for n, opener in enumerate(("How do tides work?", "Best pasta recipe for four people?")):
        state = AccountState(f"user{n}")
        history = [{"role": "user", "content": opener},
                   {"role": "assistant", "content": "Here is an answer."}]
        for i in range(6):
            ex = make_exchange(follow, account_id=state.account_id,
                               ts=datetime(2026, 3, 2, 10, i, tzinfo=UTC))
            ex.request["messages"] = [*history, {"role": "user", "content": follow}]
            state.update(extract_many([ex])[0])
        states.append(state)
    assert all(s.dominant_keys(0.25, 3) == [] for s in states)


def test_an_unseen_feature_value_cannot_decide_the_risk_alone() -> None:
    """A feature that never varied in calibration (tiny scale) is clipped, so a value far
    outside what the model saw moves the margin by at most Z_CLIP times its weight."""
    model = Model(mean=np.array([0.0, 0.5]), scale=np.array([0.001, 0.2]),
                  coef=np.array([-1.0, 2.0]), intercept=0.0)
    x = np.array([[1.0, 0.9]])
    assert model.margins(x)[0] == pytest.approx(-Z_CLIP + 2.0 * 2.0)
    assert model.contributions(x[0])[0] == pytest.approx(-Z_CLIP)


def test_what_one_exchange_shows_counts_a_fraction_of_what_many_show() -> None:
    """A share measured on one exchange (multi-turn 0, template reuse 1.0) moves the
    account model's margin OWN_EVIDENCE_PRIOR + 1 times less than the same share over
    many exchanges. The members' means of a community are weighed by the community's
    exchanges: three colleagues of one exchange each count 3 / (3 + prior), a campaign
    of forty accounts of fifty exchanges nearly fully. Counts (age) are not weighed."""
    n = len(FEATURES)
    coef = np.zeros(n)
    for name in ("multi_turn_share", "template_reuse", "log_age_days", "mean_harvest_share"):
        coef[FEATURES.index(name)] = 1.0
    model = Model(mean=np.zeros(n), scale=np.ones(n), coef=coef, intercept=0.0,
                  features=FEATURES)
    prior = OWN_EVIDENCE_PRIOR

    def row(count: int, members: int = 1, per_member: int = 0, **values: float
            ) -> np.ndarray:
        x = np.zeros(n)
        x[FEATURES.index("log_volume")] = math.log1p(count)
        x[FEATURES.index("group_size")] = 1.0 - 1.0 / members
        x[FEATURES.index("log_member_volume")] = math.log1p(per_member)
        for name, value in values.items():
            x[FEATURES.index(name)] = value
        return x

    for name in ("multi_turn_share", "template_reuse"):
        one, many = (model.contributions(row(c, **{name: 1.0}))[FEATURES.index(name)]
                     for c in (1, 10_000))
        assert one == pytest.approx(1.0 / (1.0 + prior))
        assert many == pytest.approx(1.0, abs=1e-3)
    assert model.margins(row(1, log_age_days=1.0)[None, :])[0] == pytest.approx(1.0)
    harvest = FEATURES.index("mean_harvest_share")
    colleagues = model.contributions(row(1, 3, 1, mean_harvest_share=1.0))[harvest]
    campaign = model.contributions(row(1, 40, 50, mean_harvest_share=1.0))[harvest]
    assert colleagues == pytest.approx(3 / (3 + prior))
    assert campaign == pytest.approx(2000 / (2000 + prior))
    # The community model weighs its members' means the same way, and nothing else.
    k = len(COMMUNITY_FEATURES)
    group = Model(mean=np.zeros(k), scale=np.ones(k), coef=np.ones(k), intercept=0.0,
                  features=COMMUNITY_FEATURES)
    x = np.full(k, 0.5)
    x[COMMUNITY_FEATURES.index("group_size")] = 1.0 - 1.0 / 3
    x[COMMUNITY_FEATURES.index("log_member_volume")] = math.log1p(1)
    means = sum(f.startswith("mean_") for f in COMMUNITY_FEATURES)
    assert group.margins(x[None, :])[0] == pytest.approx(
        x.sum() - 0.5 * means + 0.5 * means * 3 / (3 + prior))


def test_a_calibration_file_of_the_earlier_version_is_refused_with_the_reason(
        tmp_path: Path) -> None:
    """A version 1 file was fitted without the volume weighing; read as version 2 it
    would score every account differently from how it was fitted, so it is refused."""
    data = Calibration.read().to_json()
    data["version"] = 1
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="version 1 calibration file.*calibrate"):
        Calibration.read(old)


def test_an_account_counts_the_networks_it_sends_from_up_to_a_cap() -> None:
    """Distinct AS names per account, bounded: a proxy pool's exits count up to
    NETWORKS_CAP, and the risk of the same traffic is higher when it comes from many
    networks than from one (the shipped calibration weighs the count)."""
    home, rotating = AccountState("home"), AccountState("rotating")
    for n in range(3 * NETWORKS_CAP):
        home.update(make_features("home", T0 + 600 * n, asn="Home ISP"))
        rotating.update(make_features("rotating", T0 + 600 * n, asn=f"ISP {n}"))
    assert len(home.networks) == 1 and len(rotating.networks) == NETWORKS_CAP
    column = FEATURES.index("log_networks")
    home_row, rotating_row = (np.hstack([account_vector(s, None),
                                         np.zeros(len(FEATURES) - len(ACCOUNT_FEATURES))])
                              for s in (home, rotating))
    assert rotating_row[column] == pytest.approx(math.log1p(NETWORKS_CAP))
    model = Calibration.read().model
    assert model.coef[column] > 0
    assert model.risk(rotating_row[None, :])[0] > model.risk(home_row[None, :])[0]


def test_a_campaign_through_residential_proxy_exits_is_caught_without_its_content_in_calibration(
        tmp_path: Path) -> None:
    """``tool_harvest`` is a campaign type the calibration world does not hold: agentic
    prompts, each request from another residential proxy exit. The shipped calibration
    learnt what many networks per account mean from the calibration world's proxied
    ``hydra`` operator, so the campaign is caught (without that feature, 6 of its 15
    accounts on this world), and no benign account is flagged."""
    trace, accounts, labels = simulate(tmp_path, preset="heldout", seed=3, scale=0.3,
                                       days=1.0)
    result, _ = run_batch(trace, Calibration.read(), accounts=accounts)
    scored = score(trace, accounts, labels, result.verdicts, 1.0).to_json()
    tool = scored["campaign_types"]["tool_harvest"]
    assert tool["accounts"] == 15 and tool["recall"] >= 0.8
    assert scored["overall"]["benign_accounts"] > 100
    assert scored["overall"]["benign_flagged"] == 0


def test_each_operator_writes_its_own_harness() -> None:
    import random

    harnesses = {Harness.draw(random.Random(seed)) for seed in range(40)}
    assert len({h.cot for h in harnesses}) >= 35
    assert len({h.system for h in harnesses}) >= 25
    assert all("{q}" in t for h in harnesses for t in h.cot)
    assert all("{q}" in t and "{a}" in t for h in harnesses for t in h.rubric)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Detector]:
    trace, accounts, labels = simulate(tmp_path_factory.mktemp("quality"), preset="smoke",
                                       seed=11, scale=2.0)
    result, detector = run_batch(trace, Calibration.read(), accounts=accounts)
    return score(trace, accounts, labels, result.verdicts, 1.0).to_json(), detector


@pytest.fixture(scope="module")
def scored(smoke_run: tuple[dict[str, object], Detector]) -> dict[str, object]:
    return smoke_run[0]


def test_every_edge_agrees_with_its_accounts_frames(
        smoke_run: tuple[dict[str, object], Detector]) -> None:
    """After a whole trace, each edge's template kind is what the two accounts' frames
    say now, whichever link made the pair (on this world, 13 of 291 edges disagreed when
    only ring neighbours in a shared frame group were re-judged)."""
    links = smoke_run[1].links
    checked = 0
    for (a, b), kinds in links.edges.items():
        overlap = links.frame_overlap(a, b)
        if overlap is None:
            continue
        checked += 1
        share, strength = overlap
        if share >= MIN_FRAME_SIMILARITY:
            assert kinds.get("template") == strength, (a, b, kinds)
        else:
            assert "template" not in kinds, (a, b, kinds, share)
    assert checked > 100


def test_shipped_calibration_on_a_small_world(scored: dict[str, object]) -> None:
    """The shipped calibration on a smoke world it was not fitted on: no benign account
    flagged, most campaign accounts caught early, campaigns attributed. (The calibration
    fitted before the calibration traffic held integrations of every size flags one of
    this world's evaluation runners.)"""
    overall = scored["overall"]
    assert isinstance(overall, dict)
    assert overall["benign_accounts"] > 20 and overall["benign_flagged"] == 0
    assert overall["recall"] >= 0.8
    assert overall["ari"] >= 0.6
    assert overall["campaigns_detected"] >= overall["campaigns"] - 2
    assert overall["campaign_exchanges_before_first_flag_median"] <= 100


def test_costart_counts_of_unlinked_pairs_are_forgotten() -> None:
    """Two accounts that start together once and then never again leave no count behind
    after three quiet days, so co-start counts stay bounded by recent traffic; a linked
    pair keeps its count."""
    links = LinkIndex()
    states = {a: AccountState(a) for a in ("a", "b", "c", "d", "clock")}

    def send(account: str, ts: float) -> None:
        states[account].update(make_features(account, ts, template_keys=()))
        states[account].flush()
        links.update(states[account])

    send("a", T0)
    send("b", T0 + 5)
    for n in range(6):                      # c and d: a scheduler's pair, many times
        send("c", T0 + 100 + n * 7_200)
        send("d", T0 + 104 + n * 7_200)
    links.refresh(states)
    assert links._costarts[("a", "b")] == 1 and ("c", "d") in links._costart
    for hour in range(1, 4 * 24):          # four days of another account's hourly sessions
        send("clock", T0 + hour * 3_600 + 2_000.0 * (hour % 2))
        links.refresh(states)
    assert ("a", "b") not in links._costarts
    assert links._costarts[("c", "d")] == 6 and ("c", "d") in links._costart
    # The starts kept for the group test's measured chance go after three days too.
    assert not {"a", "b", "c", "d"} & links._own_starts.keys()
    newest = links._newest_start
    assert 0 < len(links._own_starts["clock"]) < states["clock"].session_starts
    assert min(links._own_starts["clock"]) >= newest - COSTART_PAIR_TTL_S // BURST_BUCKET_S - 360


def test_a_request_without_a_completion_limit_counts_as_uncapped() -> None:
    """Leaving max_tokens out gets the longest answer the model gives: it counts as the
    uncapped limit, not as asking for none, so omitting it cannot look like an
    integration that asks for short answers."""
    from distillguard.detect.scoring import ACCOUNT_FEATURES, account_vector
    from distillguard.detect.sketches import UNCAPPED_COMPLETION_LIMIT

    limit = ACCOUNT_FEATURES.index("log_completion_limit")
    answers = ACCOUNT_FEATURES.index("log_completion_tokens")
    capped, uncapped = AccountState("capped"), AccountState("uncapped")
    for n in range(4):
        ts = datetime(2026, 3, 2, 10, n, tzinfo=UTC)
        for state, max_tokens in ((capped, 256), (uncapped, None)):
            ex = make_exchange("Classify this ticket.", account_id=state.account_id, ts=ts)
            ex.request.pop("max_tokens", None)
            if max_tokens is not None:
                ex.request["max_tokens"] = max_tokens
            state.update(extract_many([ex])[0])
    low, high = account_vector(capped, None), account_vector(uncapped, None)
    assert low[limit] == pytest.approx(math.log1p(256))
    assert high[limit] == pytest.approx(math.log1p(UNCAPPED_COMPLETION_LIMIT))
    assert low[answers] == high[answers] > 0.0


def test_two_busy_communities_are_not_linked_on_less_history_than_the_shifts() -> None:
    """Two groups of accounts, strangers to each other, that start sessions in each of
    the same eight five-minute buckets (as at the beginning of a trace, when everyone is
    busy at once). A shift of up to an hour moves most of forty minutes off the ends, so
    the shifted overlaps say little of the chance; measured on them alone, the pair
    passed (8 buckets shared against a mean of 1.9 shifted). The community co-start
    test waits until the starts span four hours."""
    links, states = LinkIndex(), {}
    members: dict[str, list[str]] = {"a": [], "b": []}
    for group, second in (("a", 7.0), ("b", 150.0)):
        for j in range(16):
            aid = f"{group}{j:02d}"
            members[group].append(aid)
            state = states[aid] = AccountState(aid)
            links.set_static(aid, None, None)
            state.update(make_features(aid, T0 + (j % 8) * 300.0 + second))
            state.flush()
            links.update(state)
    communities = {}
    for aids in members.values():
        community = Community(frozenset(aids))
        communities.update((aid, community) for aid in aids)
    links.community_costarts(communities, now=True)
    assert not links.links_pending


def test_beyond_the_cap_the_quietest_communities_are_tested(monkeypatch: Any) -> None:
    """Only COMMUNITY_COSTART_MAX communities are compared in one run, those with the
    fewest starts per member: two pieces of a scheduler's quiet accounts, which start
    in the same buckets at forty ticks over two days, are still linked when a busy
    community (whose ids sort first) is left out, and were not when the first by id
    were kept."""
    from distillguard.detect import linking

    monkeypatch.setattr(linking, "COMMUNITY_COSTART_MAX", 2)
    rng = random.Random(5)
    links = LinkIndex()
    span = int(2 * 86_400 // BURST_BUCKET_S)
    ticks = sorted(rng.sample(range(0, span, 60), 40))
    members = {"a": [f"a{i}" for i in range(3)], "q": [f"q{i}" for i in range(3)],
               "r": [f"r{i}" for i in range(3)]}
    starts: dict[str, set[int]] = {m: set() for ms in members.values() for m in ms}
    for tick in ticks:
        starts[rng.choice(members["q"])].add(tick)
        starts[rng.choice(members["r"])].add(tick + 3)     # half a minute later
    for m in members["a"]:
        starts[m] = set(rng.sample(range(span), 300))
    for m, own in starts.items():
        links._own_starts[m] = sorted(own)
    links._newest_start = span
    communities = {}
    for ms in members.values():
        community = Community(frozenset(ms))
        communities.update((m, community) for m in ms)
    links.community_costarts(communities, now=True)
    linked = links._community_costart
    assert linked and all(a[0] == "q" and b[0] == "r" for a, b in linked)


def test_exit_samples_keep_the_smallest_hashes_whatever_the_order() -> None:
    """Two accounts that used the same 200 /24s in different orders hold the same
    EXIT_SAMPLE of them, those with the smallest CRC-32; one that used five holds all."""
    prefixes = [f"10.{i // 250}.{i % 250}" for i in range(200)]
    first, second, few = ExitSample(), ExitSample(), ExitSample()
    for p in prefixes:
        first.add(p)
    for p in reversed(prefixes):
        second.add(p)
        second.add(p)
    for p in prefixes[:5]:
        few.add(p)
    smallest = sorted(prefixes, key=lambda p: zlib.crc32(p.encode()))[:EXIT_SAMPLE]
    assert set(first.hashes) == set(second.hashes) == set(smallest)
    assert set(few.hashes) == set(prefixes[:5])


def _rotate(links: LinkIndex, states: dict[str, AccountState], aid: str,
            exits: list[str], keys: tuple[int, ...], at: float) -> None:
    state = states.setdefault(aid, AccountState(aid))
    links.set_static(aid, None, None)
    for n, prefix in enumerate(exits):
        state.update(make_features(aid, at + 60 * n, template_keys=keys, ip_prefix=prefix))
    state.flush()
    links.update(state)


def test_accounts_rotating_through_one_pool_of_exits_are_linked_across_harness_variants(
) -> None:
    """Two operators each send every request through another exit of a pool of /24s of
    their own and through five carrier NAT /24s they share with each other and with
    consumers who live there, and every account of both sends from the two carrier /24s
    of a country where no settled user does. Each operator gives every account one of
    three harness variants that share no frame. The pools link each operator across its
    variants into one community; the carrier /24s link neither operator to the other:
    the five because settled users share them, the two because two shared exits are too
    few (EXIT_MIN_SHARED)."""
    rng = random.Random(5)
    carrier = [f"100.64.{n}" for n in range(5)]
    unsettled = ["100.65.0", "100.65.1"]
    links, states = LinkIndex(), {}
    operators: dict[str, set[str]] = {}
    for op in ("a", "b"):
        pool = [f"{op}.{n}" for n in range(30)] + carrier
        operators[op] = set()
        for i in range(18):
            aid = f"{op}{i:02d}"
            variant = i % 3
            keys = (ord(op) * 100 + 10 * variant + 1, ord(op) * 100 + 10 * variant + 2)
            exits = unsettled + [rng.choice(pool) for _ in range(14)]
            _rotate(links, states, aid, exits, keys, T0 + i)
            operators[op].add(aid)
    for c, prefix in enumerate(carrier):
        _rotate(links, states, f"consumer{c}", [prefix] * 6, (9000 + c,), T0 + 100 + c)
    links.refresh(states)
    assert all(len(states[a].exits) >= EXIT_MIN_DISTINCT for a in operators["a"])
    crossing = [pair for pair in links.edges
                if not any(set(pair) <= members for members in operators.values())]
    assert crossing == []
    assert _communities(links) == {frozenset(members) for members in operators.values()}
    graph = AccountGraph()
    graph.update(links.edges, set(links.edges))
    evidence = campaign_evidence(graph.of["a00"], states, [])
    assert "18 of 18 accounts rotate through the same proxy exit /24s" in evidence


def test_an_exit_a_settled_account_moves_into_stops_linking() -> None:
    """Twelve rotating accounts send from one exit /24, and two of them, far apart on its
    ring, from two more. The two share EXIT_MIN_SHARED exits and are linked on the small
    rings. A consumer who then sends from the first /24 as home makes it an access
    network others use: the two share one exit too few, and their link goes, though
    nothing changed on the rings where they meet."""
    assert EXIT_MIN_SHARED == 3
    links, states = LinkIndex(), {}
    crowded, pair_only = "172.16.0", ["172.16.1", "172.16.2"]
    names = [f"r{i:02d}" for i in range(12)]
    ring = sorted(names, key=lambda a: _ring_position(("exit", crowded), a))
    a, b = sorted((ring[0], ring[6]))
    for aid in names:
        extra = pair_only if aid in (a, b) else []
        _rotate(links, states, aid, [crowded, *extra] + [f"{aid}net.{n}" for n in range(7)],
                (zlib.crc32(aid.encode()) % 1000,), T0)
    links.refresh(states)
    assert "exit" in links.edges.get((a, b), {})
    _rotate(links, states, "consumer", [crowded] * 4, (4242,), T0 + 1000)
    links.refresh(states)
    assert "exit" not in links.edges.get((a, b), {})
