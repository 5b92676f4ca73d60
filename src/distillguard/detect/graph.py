"""The account graph and its communities: candidate campaigns.

Nodes are accounts with at least one cross-account link (:mod:`.linking`); an edge's
weight adds its kinds' weights. The graph is a networkx graph, updated link by link;
communities are found with igraph's Louvain (multilevel) method, in C (seeded, so the
same graph always gives the same partition), run per connected
component: a component of two or three accounts is one community as it is, and a large
component (two campaigns sharing a hosting /24, say) is split.

A community whose members' infrastructure links (payment, /24, mail domain, proxy exit)
fall into two or more clusters of a few accounts, joined to each other by template links
(and sign-up windows) alone, is split into them (:func:`infrastructure_parts`):
operators copy the same public frames, not each other's cards and exits.

Communities are kept between evaluations: a component whose node and edge sets did not
change keeps its partition, so Louvain runs only where the graph moved.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import networkx as nx
import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

L = TypeVar("L", str, int)   # a part's or a community's label

# Infrastructure an operator controls (payment, addresses) outweighs shared templates,
# which unrelated campaigns may copy from the same public source.
KIND_WEIGHTS: dict[str, float] = {"template": 0.5, "lockstep": 1.0, "payment": 2.0,
                                  "prefix": 1.0, "signup": 0.4, "domain": 1.0,
                                  "exit": 1.0}
LOUVAIN_SEED = 20260301
# Below 1, so that one operator whose accounts fall into a few payment or address
# clusters stays one community (at 1.0 Louvain split such campaigns along them).
LOUVAIN_RESOLUTION = 0.5
# A community Louvain returns is partitioned again on its own; a part whose links leaving
# it weigh at most this share of its links (its conductance) becomes a community of its
# own. See :func:`split_apart`.
MAX_CONDUCTANCE = 0.05
# Two of Louvain's communities of one component whose links to each other weigh at least
# this share of the smaller one's links are one community (see Subgraph.louvain_parts).
MIN_JOIN_SHARE = 0.15
# The fewest accounts such a part may have (so a community is partitioned again only
# when it holds at least two of them).
MIN_PART = 4
# Links of infrastructure an operator holds or shares with its own accounts: two
# clusters of a community, each held together by such links of its own, that only
# template links join are two campaigns (see infrastructure_parts). Timing (lockstep)
# between them keeps them one.
INFRASTRUCTURE_KINDS = frozenset({"payment", "prefix", "domain", "exit"})


def edge_weight(kinds: Mapping[str, float]) -> float:
    """Each kind's weight times its strength (a template link's strength is how much of
    the two accounts' frames is common: see :meth:`.linking.LinkIndex.frame_overlap`)."""
    # Summed in kind order: the total must not depend on the order the kinds were added.
    return sum(KIND_WEIGHTS.get(kind, 0.5) * min(1.0, kinds[kind]) for kind in sorted(kinds))


@contextmanager
def _seeded_igraph() -> Iterator[None]:
    """igraph draws the order in which Louvain visits vertices from one process-wide
    generator; a fresh seeded one for each run makes every run repeat itself."""
    # Imported here, not at the top: igraph imports matplotlib's pyplot (a second or so),
    # which the trace reader process and the gateway never need.
    import igraph as ig

    ig.set_random_number_generator(random.Random(LOUVAIN_SEED))
    try:
        yield
    finally:
        ig.set_random_number_generator(random)


@dataclass(slots=True)
class Subgraph:
    """``nodes`` and the links among them, numbered in sorted order for igraph (a view
    over the networkx graph would iterate a set, in string-hash order, different in every
    process, and the seeded Louvain would then not repeat itself across runs)."""

    names: list[str]
    sources: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    @classmethod
    def of(cls, graph: nx.Graph, nodes: Set[str]) -> Subgraph:
        names = sorted(nodes)
        index = {n: i for i, n in enumerate(names)}
        adjacency = graph._adj
        sources: list[int] = []
        targets: list[int] = []
        weights: list[float] = []
        for i, a in enumerate(names):
            for b, data in adjacency[a].items():
                j = index.get(b)
                if j is not None and i < j:
                    sources.append(i)
                    targets.append(j)
                    weights.append(data["weight"])
        return cls(names, np.array(sources, dtype=np.int64), np.array(targets, dtype=np.int64),
                   np.array(weights, dtype=float))

    def louvain(self) -> list[np.ndarray]:
        """Louvain's communities (igraph's multilevel method, seeded), as arrays of node
        numbers."""
        import igraph as ig

        g = ig.Graph(n=len(self.names), edges=np.column_stack(
            [self.sources, self.targets]).tolist())
        with _seeded_igraph():
            membership = g.community_multilevel(
                weights=self.weights.tolist(), resolution=LOUVAIN_RESOLUTION).membership
        labels = np.asarray(membership)
        return [np.flatnonzero(labels == k) for k in range(int(labels.max()) + 1)] if len(
            labels) else []

    def louvain_parts(self) -> list[np.ndarray]:
        """Louvain's communities, with any two of them joined whose links to each other
        weigh at least :data:`MIN_JOIN_SHARE` of the smaller one's links (its volume).

        At resolution 0.5 modularity prefers two halves to one whole whenever a cut
        through fewer than a quarter of the links exists, and an operator's accounts,
        knit together by a few ring neighbours on each of their shared groups, form a
        graph close to a random one with such cuts: Louvain would split the operator in
        two arcs, each of whose links go a quarter to the other. Separate operators
        sharing a public frame or a hosting range put a few per cent of their links on
        each other."""
        parts = self.louvain()
        if len(parts) < 2:
            return parts
        n = len(self.names)
        label = np.empty(n, dtype=np.int64)
        for k, part in enumerate(parts):
            label[part] = k
        volume = (np.bincount(label[self.sources], self.weights, len(parts))
                  + np.bincount(label[self.targets], self.weights, len(parts)))
        ls, lt = label[self.sources], label[self.targets]
        across = ls != lt
        lo, hi = np.minimum(ls[across], lt[across]), np.maximum(ls[across], lt[across])
        pairs, where = np.unique(lo * len(parts) + hi, return_inverse=True)
        cut = np.bincount(where, self.weights[across], len(pairs))
        a, b = np.divmod(pairs, len(parts))
        join = cut >= MIN_JOIN_SHARE * np.minimum(volume[a], volume[b])
        # Parts joined directly or through others are one: connected components of the
        # graph whose nodes are the parts and whose edges are the joins (numbered by
        # their first part, so the order of the parts is kept).
        _, joined = connected_components(coo_array(
            (np.ones(int(join.sum())), (a[join], b[join])), shape=(len(parts), len(parts))),
            directed=False)
        return [np.sort(np.concatenate([parts[k] for k in np.flatnonzero(joined == c)]))
                for c in range(int(joined.max()) + 1)]

    def names_of(self, part: np.ndarray) -> set[str]:
        return {self.names[i] for i in part}

    def within(self, part: np.ndarray) -> Subgraph:
        """The nodes numbered ``part`` (ascending) and the links among them, numbered
        afresh: what :meth:`of` would build for them from the graph, without walking it
        again."""
        number = np.full(len(self.names), -1, dtype=np.int64)
        number[part] = np.arange(len(part))
        keep = (number[self.sources] >= 0) & (number[self.targets] >= 0)
        return Subgraph([self.names[i] for i in part], number[self.sources[keep]],
                        number[self.targets[keep]], self.weights[keep])


def split_apart(sub: Subgraph) -> list[set[str]]:
    """The nodes of ``sub`` (one of Louvain's communities of a larger graph), less the
    parts of it that are barely linked to the rest, each as a community of its own.

    Modularity cannot see communities much smaller than the graph they are in (its
    resolution limit): in a component of thousands of accounts, operators of twenty
    accounts whose only links to each other are a dozen weak template links (a public
    chain-of-thought instruction both copied) come out as one community, because a
    random placement of that component's links would put even fewer between them.
    Louvain run on the community alone finds them; a part is split off when the weight
    of its links to the rest of the community is at most :data:`MAX_CONDUCTANCE` of the
    weight of all its links there (its conductance). One operator's /24 or payment
    clusters, which Louvain on the community alone also finds, are joined by the
    operator's own template and payment links: 6 % of their weight or more on the
    development traces, against 0.3-4 % between operators."""
    group = set(sub.names)
    if len(group) < 2 * MIN_PART:
        return [group]
    parts = sub.louvain()
    if len(parts) < 2:
        return [group]
    n = len(sub.names)
    strength = (np.bincount(sub.sources, sub.weights, n)
                + np.bincount(sub.targets, sub.weights, n))
    total = float(strength.sum())
    apart: list[set[str]] = []
    rest = set(group)
    for part in sorted(parts, key=lambda p: sub.names[p[0]]):
        inside = np.zeros(n, dtype=bool)
        inside[part] = True
        volume = float(strength[part].sum())
        cut = float(sub.weights[inside[sub.sources] != inside[sub.targets]].sum())
        if len(part) >= MIN_PART and cut <= MAX_CONDUCTANCE * min(volume, total - volume):
            names = sub.names_of(part)
            apart.append(names)
            rest -= names
    return [rest, *apart] if rest else apart


def place_by_weight(graph: nx.Graph, placed: dict[str, L], pending: list[str]) -> list[str]:
    """Put each of ``pending`` (in order, round after round) with the label its links to
    accounts already in ``placed`` weigh most towards (ties: the smallest label), adding
    it to ``placed``; returns those linked to none of them, only to each other."""
    while pending:
        rest = []
        for node in pending:
            weights: dict[L, float] = {}
            for nb, data in graph._adj[node].items():
                label = placed.get(nb)
                if label is not None:
                    weights[label] = weights.get(label, 0.0) + data["weight"]
            if weights:
                placed[node] = max(sorted(weights), key=weights.__getitem__)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            return rest
        pending = rest
    return []


def infrastructure_parts(graph: nx.Graph, group: set[str]) -> list[set[str]]:
    """``group`` (a community) split into the clusters its members' infrastructure links
    make, when two or more clusters of at least MIN_PART accounts are joined by nothing
    but template links (and the sign-up windows that count only beside others); else the
    group as it is.

    Template frames come from public sources several operators copy (an instruction
    format, a chain-of-thought prompt), while a card, a mail domain of one's own, a proxy
    pool or a hosting /24 is the operator's. Two operators of a few dozen accounts each,
    held together by their own cards and exits, put hundreds of template links on each
    other when they use the same frames, as many as their own, so Louvain and
    :func:`split_apart` keep them one community. A lockstep link between two clusters
    (accounts that start sessions together) keeps them together: one operator's
    clusters of cards or addresses run on one schedule. Members in no large cluster go
    with the one their links weigh most towards (:func:`place_by_weight`, as new accounts
    are placed between Louvain runs)."""
    if len(group) < 2 * MIN_PART:
        return [group]
    adjacency = graph._adj
    held = nx.Graph()
    held.add_nodes_from(group)
    held.add_edges_from((a, b) for a in group for b, data in adjacency[a].items()
                        if b in group and not INFRASTRUCTURE_KINDS.isdisjoint(data["kinds"]))
    clusters = [c for c in nx.connected_components(held) if len(c) >= MIN_PART]
    if len(clusters) < 2:
        return [group]
    # Large clusters that lockstep links join are one.
    cluster_of = {n: i for i, members in enumerate(clusters) for n in members}
    timed = nx.Graph()
    timed.add_nodes_from(range(len(clusters)))
    timed.add_edges_from((i, cluster_of[b]) for a, i in cluster_of.items()
                         for b, data in adjacency[a].items()
                         if cluster_of.get(b, i) != i and "lockstep" in data["kinds"])
    if nx.number_connected_components(timed) < 2:
        return [group]
    # Each part is known by its first member (by id), which orders them.
    joined = (set().union(*(clusters[i] for i in c)) for c in nx.connected_components(timed))
    parts = {min(members): members for members in joined}
    part_of = {n: key for key, members in parts.items() for n in members}
    # Those linked to no part, only to each other, go with the first.
    rest = place_by_weight(graph, part_of, sorted(n for n in group if n not in part_of))
    part_of.update((n, min(parts)) for n in rest)
    out: dict[str, set[str]] = {}
    for n, key in part_of.items():
        out.setdefault(key, set()).add(n)
    return [out[key] for key in sorted(out)]


@dataclass
class Community:
    members: frozenset[str]
    kinds: dict[str, int] = field(default_factory=dict)   # evidence kind -> member count

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class AccountGraph:
    """Partition of linked accounts into communities, updated evaluation by evaluation.

    The networkx graph is updated pair by pair. Louvain re-runs on a changed connected
    component only when its accounts have grown or shrunk by more than ``rerun_share``
    since its last run (10 %), or when more than that share of its links appeared, went
    or changed kind since then, counted over every evaluation in between; smaller changes
    place each new account in the community it is most strongly linked to. Links count
    too: one operator's two address clusters, joined at first by a single template link,
    were split then, and stayed split when the other cross links came, because no
    account was added. And they count as moves, not as a net total: links within a group
    move all the time (a ring re-ordered as members join, a lockstep window passing), and
    a component whose links had all moved but whose count had not kept the partition of
    weeks before."""

    rerun_share: float = 0.1
    graph: nx.Graph = field(default_factory=nx.Graph)
    of: dict[str, Community] = field(default_factory=dict)
    _label: dict[str, int] = field(default_factory=dict)
    _members: dict[int, set[str]] = field(default_factory=dict)
    _communities: dict[int, Community] = field(default_factory=dict)
    # label -> (accounts, links) of its connected component when it was partitioned
    _base: dict[int, tuple[int, int]] = field(default_factory=dict)
    # label -> links of its component that appeared, went or changed since Louvain last
    # partitioned it (a net count misses churn: ring links that move within a group)
    _churn: dict[int, int] = field(default_factory=dict)
    _next_label: int = 0
    _previous: dict[str, int] = field(default_factory=dict)
    _neighbours: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    # The accounts the last update put into a community that were in none before.
    joined: set[str] = field(default_factory=set)

    @property
    def communities(self) -> list[Community]:
        return [self._communities[k] for k in sorted(self._communities)]

    def update(self, edges: Mapping[tuple[str, str], Mapping[str, float]],
               changed: set[tuple[str, str]],
               rerun: Iterable[tuple[str, str]] = ()) -> set[str]:
        """Apply the changed pairs; returns the accounts whose community changed (joined,
        left, or other members or link kinds). Louvain and the re-placement run over each
        connected component a changed pair touches, but an account whose community came
        out as it was is not returned, so nothing downstream re-scores it. Those of them
        that were in no community before are :attr:`joined`.

        The components of the pairs in ``rerun`` are partitioned by Louvain again however
        little they changed: links that join two communities (see
        :meth:`.linking.LinkIndex.community_costarts`) change none of their accounts, and
        a few dozen of them in a component of a thousand links would otherwise leave
        the two as they were."""
        self.joined = set()
        graph = self.graph
        adjacency = graph._adj
        touched: set[str] = set()
        # account -> how many of its links appeared, went or changed kind
        moved_at: dict[str, int] = {}
        for a, b in sorted(changed):
            kinds = edges.get((a, b))
            old = adjacency[a].get(b) if a in adjacency else None
            had = old["kinds"].keys() if old is not None else set()
            has = kinds.keys() if kinds else set()
            if had != has:
                moved_at[a] = moved_at.get(a, 0) + 1
                moved_at[b] = moved_at.get(b, 0) + 1
                self._index_kinds(a, b, had, has)
            if kinds:
                graph.add_edge(a, b, weight=edge_weight(kinds), kinds=dict(kinds))
            elif old is not None:
                graph.remove_edge(a, b)
            touched.update((a, b))
        for node in sorted(touched):
            if node in graph and graph.degree(node) == 0:
                graph.remove_node(node)
        if not touched:
            return set()
        components: list[set[str]] = []
        seen: set[str] = set()
        for node in sorted(touched):
            if node not in seen and node in graph:
                nodes = nx.node_connected_component(graph, node)
                seen |= nodes
                components.append(nodes)
        touched |= seen
        forced = {n for pair in rerun for n in pair}
        self._previous = {}
        earlier: dict[int, Community] = {}
        for label in sorted({self._label[n] for n in touched if n in self._label}):
            for node in self._members.pop(label, set()):
                self._previous[node] = label
                self._label.pop(node, None)
                touched.add(node)
            community = self._communities.pop(label, None)
            if community is not None:
                earlier[label] = community
        fresh: set[int] = set()
        for nodes in components:
            # links that appeared, went or changed kind, each counted once from each end
            # it has in the component
            moves = (sum(moved_at.get(n, 0) for n in nodes) + 1) // 2
            partition = self._partition(graph, nodes, moves,
                                        rerun=not forced.isdisjoint(nodes))
            for n, label in partition.items():
                self._label[n] = label
                self._members.setdefault(label, set()).add(n)
                fresh.add(label)
        for label in sorted(fresh):
            members = self._members[label]
            kept = earlier.get(label)
            # A community with the same members and no link among them gained, lost or
            # changed in kind is as it was (its kinds do not depend on link strengths).
            if kept is not None and kept.members == members and moved_at.keys().isdisjoint(members):
                self._communities[label] = kept
            else:
                self._communities[label] = self._community(members)
        moved: set[str] = set()
        for node in touched:
            before = self.of.get(node)
            after: Community | None = None
            if node in self._label:
                after = self.of[node] = self._communities[self._label[node]]
            else:
                self.of.pop(node, None)
            if after != before:     # a Community compares by members and kinds
                moved.add(node)
                if before is None:
                    self.joined.add(node)
        return moved

    def _partition(self, graph: nx.Graph, nodes: set[str], moves: int, *,
                   rerun: bool = False) -> dict[str, int]:
        old = [] if rerun else [self._previous[n] for n in nodes if n in self._previous]
        size = len(nodes)
        adjacency = graph._adj
        links = sum(len(adjacency[n]) for n in nodes) // 2
        if old:
            labels = set(old)
            base = max(self._base[k][0] for k in labels)
            base_links = max(self._base[k][1] for k in labels)
            share = self.rerun_share
            churn = max(self._churn.get(k, 0) for k in labels) + moves
            if (abs(size - base) <= share * max(base, 1)
                    and churn <= share * max(base_links, 1)
                    and len(old) >= 0.5 * size):
                placed = self._extend(graph, nodes, links)
                for label in set(placed.values()):
                    self._churn[label] = churn
                return placed
        if size <= 3:
            groups = [set(nodes)]
        else:
            whole = Subgraph.of(graph, nodes)
            groups = [apart for group in whole.louvain_parts()
                      for part in split_apart(whole.within(group))
                      for apart in infrastructure_parts(graph, part)]
        out: dict[str, int] = {}
        for group in sorted(groups, key=min):
            label = self._next_label
            self._next_label += 1
            self._base[label] = (size, links)
            self._churn[label] = 0
            out.update((n, label) for n in group)
        return out

    def _extend(self, graph: nx.Graph, nodes: set[str], links: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in sorted(nodes):
            if n in self._previous:
                out[n] = self._previous[n]
        rest = place_by_weight(graph, out, sorted(n for n in nodes if n not in out))
        if rest:
            label = self._next_label
            self._next_label += 1
            self._base[label] = (len(rest), links)
            out.update((n, label) for n in rest)
        return out

    def has_link_within(self, account_id: str, kinds: Iterable[str]) -> bool:
        """Whether the account has a link of one of ``kinds`` to another member of its
        community."""
        community = self.of.get(account_id)
        if community is None:
            return False
        for kind in kinds:
            mine = self._neighbours.get(kind, {}).get(account_id)
            if mine is not None and not mine.isdisjoint(community.members):
                return True
        return False

    def linked_within(self, account_id: str, kind: str) -> frozenset[str]:
        """The members of the account's community it reaches through links of ``kind``
        among them, itself included; empty when it has no such link."""
        community = self.of.get(account_id)
        by_node = self._neighbours.get(kind, {})
        if community is None or account_id not in by_node:
            return frozenset()
        members = community.members
        reached, pending = {account_id}, [account_id]
        while pending:
            for other in by_node.get(pending.pop(), ()):
                if other in members and other not in reached:
                    reached.add(other)
                    pending.append(other)
        return frozenset(reached) if len(reached) > 1 else frozenset()

    def _index_kinds(self, a: str, b: str, before: Set[str], after: Set[str]) -> None:
        """Keep ``_neighbours`` (kind -> account -> accounts it is linked to by that kind)
        in step with one pair's kinds."""
        for kind in before - after:
            by_node = self._neighbours[kind]
            for x, y in ((a, b), (b, a)):
                mine = by_node[x]
                mine.discard(y)
                if not mine:
                    del by_node[x]
        for kind in after - before:
            by_node = self._neighbours.setdefault(kind, {})
            for x, y in ((a, b), (b, a)):
                by_node.setdefault(x, set()).add(y)

    def _community(self, group: set[str]) -> Community:
        """The community of ``group``: for each link kind, how many members hold a link of
        that kind to another member. Each member's neighbours by kind are kept as sets,
        so the test is a set intersection rather than a walk over every member's links
        (communities of a few hundred accounts, each with dozens of links, are re-counted
        whenever a link among them appears or goes)."""
        counts: dict[str, int] = {}
        for kind in sorted(self._neighbours):
            by_node = self._neighbours[kind]
            n = 0
            for a in group:
                mine = by_node.get(a)
                if mine is not None and not mine.isdisjoint(group):
                    n += 1
            if n:
                counts[kind] = n
        return Community(frozenset(group), counts)
