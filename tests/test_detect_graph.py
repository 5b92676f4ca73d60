"""The account graph kept evaluation by evaluation: each community's link kinds stay what
a walk over its members' links gives, however links appear, go or change kind."""

from __future__ import annotations

import random

from distillguard.detect.graph import AccountGraph
from distillguard.detect.linking import KINDS


def _walked_kinds(graph: AccountGraph, members: frozenset[str]) -> dict[str, int]:
    """The definition: per kind, the members holding a link of that kind to a member."""
    holders: dict[str, set[str]] = {}
    for a in members:
        for b, data in graph.graph[a].items():
            if b in members:
                for kind in data["kinds"]:
                    holders.setdefault(kind, set()).add(a)
    return {k: len(holders[k]) for k in sorted(holders)}


def test_community_kinds_follow_every_link_change() -> None:
    rng = random.Random(7)
    nodes = [f"acct-{i:02d}" for i in range(40)]
    edges: dict[tuple[str, str], dict[str, float]] = {}
    graph = AccountGraph()
    for _ in range(300):
        changed: set[tuple[str, str]] = set()
        for _ in range(rng.randint(1, 12)):
            a, b = sorted(rng.sample(nodes, 2))
            pair = (a, b)
            roll = rng.random()
            if roll < 0.25:
                edges.pop(pair, None)                        # the link goes
            elif roll < 0.5 and pair in edges:
                edges[pair] = {k: rng.random() for k in edges[pair]}   # strengths only
            else:
                kinds = rng.sample(KINDS, rng.randint(1, 3))
                edges[pair] = {k: rng.uniform(0.2, 1.0) for k in kinds}
            changed.add(pair)
        graph.update(edges, changed)
        assert set(graph.graph.nodes) == {n for pair in edges for n in pair}
        for community in graph.communities:
            assert community.kinds == _walked_kinds(graph, community.members)
            assert all(graph.of[m] is community for m in community.members)


def test_communities_are_revisited_when_links_fill_in() -> None:
    """One operator's two address clusters, joined at first by one template link, are
    two communities; when the other cross links come (no account added), the component
    is partitioned again and the operator is one community."""
    inside = {"prefix": 1.0, "template": 1.0}
    across = {"template": 0.75}
    clusters = (["a1", "a2", "a3"], ["b1", "b2", "b3"])
    edges: dict[tuple[str, str], dict[str, float]] = {}
    for cluster in clusters:
        for i, x in enumerate(cluster):
            for y in cluster[i + 1:]:
                edges[(x, y)] = dict(inside)
    edges[("a1", "b1")] = dict(across)
    graph = AccountGraph()
    graph.update(edges, set(edges))
    assert {c.members for c in graph.communities} == {frozenset(c) for c in clusters}
    more = {(a, b) for a in clusters[0] for b in clusters[1]} - {("a1", "b1")}
    for pair in more:
        edges[pair] = dict(across)
    graph.update(edges, more)
    assert [c.members for c in graph.communities] == [frozenset(clusters[0] + clusters[1])]
