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


def _clique(names: list[str], kinds: dict[str, float]) -> dict[tuple[str, str], dict[str, float]]:
    return {(a, b): dict(kinds) for i, a in enumerate(names) for b in names[i + 1:]}


def test_small_operators_in_a_large_component_are_split_apart() -> None:
    """Modularity's resolution limit: two operators of eight accounts, each a clique of
    template and /24 links, joined by two weak template links, sit in a component with
    a large campaign of 120 accounts they touch by one link each. Louvain on the whole
    component puts the two operators in one community (a random placement of so many
    links would put fewer between them); partitioned on its own, that community falls
    apart into the two, each linked to the other by a small share of its links."""
    import networkx as nx

    from distillguard.detect.graph import Subgraph, edge_weight

    inside = {"prefix": 1.0, "template": 1.0}
    a = [f"a{i}" for i in range(8)]
    b = [f"b{i}" for i in range(8)]
    big = [f"z{i:03d}" for i in range(120)]
    edges = {**_clique(a, inside), **_clique(b, inside)}
    edges.update(((x, y), {"payment": 1.0, "prefix": 1.0, "template": 1.0})
                 for i, x in enumerate(big) for y in big[i + 1:i + 30])
    edges[("a0", "b0")] = {"template": 0.2}
    edges[("a1", "b1")] = {"template": 0.2}
    edges[("a2", "z000")] = {"template": 0.2}
    edges[("b2", "z001")] = {"template": 0.2}

    whole = nx.Graph()
    whole.add_nodes_from(sorted({n for pair in edges for n in pair}))
    whole.add_edges_from((x, y, {"weight": edge_weight(k)}) for (x, y), k in sorted(edges.items()))
    sub = Subgraph.of(whole, set(whole))
    louvain = [frozenset(sub.names_of(c)) for c in sub.louvain()]
    assert frozenset(a + b) in louvain, "no resolution limit here"

    graph = AccountGraph()
    graph.update(edges, set(edges))
    found = {c.members for c in graph.communities}
    assert frozenset(a) in found and frozenset(b) in found


def test_subgraph_within_is_subgraph_of_those_nodes() -> None:
    """Cutting a part out of a numbered subgraph gives what building it from the graph
    for those nodes gives: the same names, links and weights, in the same order."""
    import networkx as nx
    import numpy as np

    from distillguard.detect.graph import Subgraph

    rng = random.Random(3)
    graph = nx.Graph()
    names = [f"n{i:02d}" for i in range(40)]
    for _ in range(150):
        a, b = rng.sample(names, 2)
        graph.add_edge(a, b, weight=rng.random())
    whole = Subgraph.of(graph, set(graph))
    for _ in range(20):
        part = np.array(sorted(rng.sample(range(len(whole.names)), rng.randint(1, 30))))
        cut, built = whole.within(part), Subgraph.of(graph, whole.names_of(part))
        assert cut.names == built.names
        assert cut.sources.tolist() == built.sources.tolist()
        assert cut.targets.tolist() == built.targets.tolist()
        assert cut.weights.tolist() == built.weights.tolist()


def test_links_that_move_without_growing_make_louvain_run_again() -> None:
    """Links within groups move (a ring re-ordered, a lockstep window passing) while the
    component keeps its accounts and its number of links. Two operators' links move
    from one pairing of four address triangles to the other, two links at a time (each
    step well under the re-run share); the partition follows them rather than keeping
    the communities Louvain found before the links moved."""
    inside = {"prefix": 1.0, "template": 1.0}
    t = [[f"x{3 * i + j:02d}" for j in range(3)] for i in range(4)]
    before = _clique(t[0] + t[1], inside) | _clique(t[2] + t[3], inside)
    after = _clique(t[0] + t[2], inside) | _clique(t[1] + t[3], inside)
    weak = {("x00", "x11"): {"template": 0.2}}    # keeps the four triangles one component
    edges = {**before, **weak}
    graph = AccountGraph()
    graph.update(edges, set(edges))
    assert {c.members for c in graph.communities} == {frozenset(t[0] + t[1]),
                                                      frozenset(t[2] + t[3])}
    going, coming = sorted(set(before) - set(after)), sorted(set(after) - set(before))
    assert len(going) == len(coming) == 18
    for old, new in zip(going, coming, strict=True):
        del edges[old]
        edges[new] = dict(inside)
        graph.update(edges, {old, new})
        assert len(graph.graph) == 12
    assert {c.members for c in graph.communities} == {frozenset(t[0] + t[2]),
                                                      frozenset(t[1] + t[3])}


def test_links_named_to_rerun_partition_their_component_again() -> None:
    """Two fragments of one operator sit in a component of over a thousand links. A
    dozen links joining them are far under the re-run share, so the update alone keeps
    the partition it had and places no account anew; named as ``rerun`` (links that
    join two communities), they make Louvain partition the component again, and the
    fragments are one community."""
    import copy

    inside = {"prefix": 1.0, "template": 1.0}
    a = [f"a{i}" for i in range(8)]
    b = [f"b{i}" for i in range(8)]
    big = [f"z{i:03d}" for i in range(120)]
    edges = {**_clique(a, {"template": 1.0}), **_clique(b, {"template": 1.0})}
    edges.update(((x, y), dict(inside)) for i, x in enumerate(big) for y in big[i + 1:i + 12])
    edges[("a0", "z000")] = {"template": 0.2}
    edges[("b0", "z001")] = {"template": 0.2}
    graph = AccountGraph()
    graph.update(edges, set(edges))
    assert graph.of["a1"] is not graph.of["b1"]
    joining = {(x, y) for x, y in zip(a, b, strict=True)} | {
        (x, y) for x, y in zip(a, b[1:] + b[:1], strict=True)}
    for pair in joining:
        edges[pair] = {"lockstep": 1.0}
    assert len(joining) < 0.1 * len(graph.graph.edges)
    kept = copy.deepcopy(graph)
    kept.update(edges, joining)
    assert kept.of["a1"] is not kept.of["b1"], "re-partitioned without being asked"
    graph.update(edges, joining, rerun=joining)
    assert graph.of["a1"] is graph.of["b1"]
    assert graph.of["a1"].members == frozenset(a + b)


def _two_operators_on_one_frame(*, lockstep_between: bool) -> list[frozenset[str]]:
    """Two operators of eight accounts, one held together by its cards, the other by its
    proxy exits, each sending the same public frame, so that every account of one is
    template-linked to every account of the other as strongly as to its own; and an
    account linked by that frame alone to three of the first operator's."""
    a = [f"a{i}" for i in range(8)]
    b = [f"b{i}" for i in range(8)]
    frame = {"template": 1.0}
    edges = {**_clique(a, {"payment": 1.0, "template": 1.0}),
             **_clique(b, {"exit": 1.0, "template": 1.0})}
    edges.update(((x, y), dict(frame)) for x in a for y in b)
    edges.update(((x, "c0"), dict(frame)) for x in a[:3])
    if lockstep_between:
        edges[("a0", "b0")] = {"lockstep": 1.0, "template": 1.0}
    graph = AccountGraph()
    graph.update(edges, set(edges))
    return sorted((c.members for c in graph.communities), key=min)


def test_operators_joined_only_by_a_public_frame_are_two_campaigns() -> None:
    """Each operator's own infrastructure holds it together and only the frame joins
    them: two communities, the frame-only account with the operator it is linked to.
    Louvain alone keeps them one (the frame links weigh as much as their own)."""
    found = _two_operators_on_one_frame(lockstep_between=False)
    assert found == [frozenset({*(f"a{i}" for i in range(8)), "c0"}),
                     frozenset(f"b{i}" for i in range(8))]


def test_clusters_that_start_sessions_together_stay_one_campaign() -> None:
    """A lockstep link between the two clusters (their accounts start sessions together,
    as one operator's clusters of cards and exits on one schedule do): one community."""
    found = _two_operators_on_one_frame(lockstep_between=True)
    assert len(found) == 1 and len(found[0]) == 17
