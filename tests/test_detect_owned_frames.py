"""Owned frames: a quiet account that sends a frame only one community's members send is
linked to them (``LinkIndex.owned_frames``)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from distillguard.detect.calibration import Calibration
from distillguard.detect.engine import Detector
from distillguard.detect.graph import Community
from distillguard.detect.linking import (
    GROUP_COSTART_SAMPLE,
    OWNED_FRAME_CARRIERS,
    OWNED_FRAME_POPULATION,
    LinkIndex,
)
from tests.factories import make_features

T0 = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
DAY = 86_400.0
OWN = 424_242          # the operator's frame
SECOND = 777           # another frame of its harness

Event = tuple[float, str, tuple[int, ...]]


def _world(strangers: int, extra: list[Event], *, operators: int = 12,
           span: float = 2 * DAY, seed: int = 5) -> list[Event]:
    """``operators`` accounts each send eight exchanges framed with OWN and SECOND, at
    random times over the first ``span`` seconds (so each holds the frames as dominant
    ones and they are one community); ``strangers`` accounts each send one to three
    exchanges of frames of their own, over two days. Plus ``extra``."""
    rng = random.Random(seed)
    events: list[Event] = []
    for i in range(operators):
        events += [(T0 + rng.uniform(0, span), f"op{i:02d}", (OWN, SECOND))
                   for _ in range(8)]
    for k in range(strangers):
        events += [(T0 + rng.uniform(0, 2 * DAY), f"free{k:04d}",
                    (rng.getrandbits(30) + 1_000_000,)) for _ in range(rng.randint(1, 3))]
    return sorted(events + extra)


def _run(events: list[Event], *, until: float | None = None) -> Detector:
    detector = Detector(Calibration.read())
    for ts, aid, keys in events:
        if until is not None and ts > until:
            return detector
        detector.observe(make_features(aid, ts, template_keys=keys))
    detector.finish()
    return detector


def _late(at: float) -> list[Event]:
    """A quiet account whose first prompt carries the operator's frame and whose second
    does not, and one as quiet whose prompts carry frames of its own."""
    return [(at, "late", (OWN, 55)), (at + 7_200, "late", (56,)),
            (at + 60, "plain", (57,)), (at + 7_300, "plain", (58,))]


def test_a_quiet_account_sending_a_communitys_own_frame_is_linked_to_its_members() -> None:
    detector = _run(_world(600, _late(T0 + 1.5 * DAY)))
    graph, links = detector.graph, detector.links
    operators = {f"op{i:02d}" for i in range(12)}
    community = graph.of["op00"]
    assert community.members >= operators
    assert detector.states["late"].count == 2 <= GROUP_COSTART_SAMPLE
    # the frame is the community's alone: no other account sent it
    assert links._carriers[OWN] == operators | {"late"}
    assert graph.of.get("late") is community
    assert links._owned["late"] == {tuple(sorted(("late", m))) for m in operators}
    assert all(links.edges[pair] == {"template": 1.0} for pair in links._owned["late"])
    assert "plain" not in graph.of and "plain" not in links._owned


def test_a_frame_two_outsiders_send_links_neither() -> None:
    """A stranger sent the operator's frame too: it is not the community's own, and
    neither account is linked by it."""
    stranger: list[Event] = [(T0 + 0.3 * DAY, "copycat", (OWN,)),
                             (T0 + 0.9 * DAY, "copycat", (90,))]
    detector = _run(_world(600, _late(T0 + 1.5 * DAY) + stranger))
    links = detector.links
    assert links._carriers[OWN] >= {"late", "copycat"}
    assert not links._owned
    assert "late" not in detector.graph.of and "copycat" not in detector.graph.of


def test_the_link_ends_when_another_outsider_sends_the_frame() -> None:
    """Linked while it was the only outsider to send the frame; when a stranger sends it
    later, the link goes and the account leaves the community. The linked account does
    not count as one of the community's senders of the frame, or the stranger would be
    the only outsider in turn, and linked, and so would every later sender."""
    late_at = T0 + 1.0 * DAY
    stranger: list[Event] = [(T0 + 1.6 * DAY, "copycat", (OWN,)),
                             (T0 + 1.7 * DAY, "copycat", (91,))]
    events = _world(1_000, _late(late_at) + stranger, span=0.9 * DAY)
    before = _run(events, until=late_at + 3 * 3_600)
    assert before.links._owned.get("late")
    assert "late" in before.graph.of
    after = _run(events)
    assert not after.links._owned
    assert "late" not in after.graph.of


def test_among_few_accounts_no_frame_counts_as_owned() -> None:
    """With fewer than OWNED_FRAME_POPULATION accounts outside the community, that none
    of them sent the frame says little: the account is not linked."""
    few = OWNED_FRAME_POPULATION // 2
    detector = _run(_world(few, _late(T0 + 1.5 * DAY)))
    assert len(detector.links._carried) - detector.graph.of["op00"].size \
        < OWNED_FRAME_POPULATION
    assert not detector.links._owned and "late" not in detector.graph.of


def test_too_few_members_sending_the_frame_make_it_no_ones_own() -> None:
    """A community of fewer than OWNED_FRAME_CARRIERS members sending it."""
    detector = _run(_world(600, _late(T0 + 1.5 * DAY),
                           operators=OWNED_FRAME_CARRIERS - 1))
    assert not detector.links._owned and "late" not in detector.graph.of


def test_a_frame_another_community_sends_is_neither_communitys_own() -> None:
    """Two operators picked the same fragment for their harnesses, and an account of the
    second once started a session beside one of the first: a co-start partner of the
    first community. Partners in no community are left out of the frame's outsiders
    (the operator's accounts not linked yet); one in a community of its own is not, so
    the frame is not the first community's own."""
    links = LinkIndex()
    first = Community(frozenset({f"a{i}" for i in range(6)}))
    second = Community(frozenset({"b0", "b1"}))
    links._partners = {"b0": {"a0": [1]}, "a0": {"b0": [1]}, "c0": {"a1": [2]},
                       "a1": {"c0": [2]}}
    communities = dict.fromkeys(first.members, first) | dict.fromkeys(second.members, second)
    core = set(first.members)
    carriers = core | {"b0", "c0", "late"}
    # b0: a partner, but in a community of its own; c0: a partner in none
    assert links._outsiders(carriers - {"late"}, core, first, communities, frozenset(),
                            0) == ["b0"]
    del communities["b0"], communities["b1"]
    assert links._outsiders(carriers - {"late"}, core, first, communities, frozenset(),
                            0) == []
    # accounts in no community that never started beside the first are outsiders
    assert sorted(links._outsiders(carriers | {"d0"}, core, first, communities,
                                   frozenset(), 5)) == ["d0", "late"]
