"""The detector's evaluation schedule."""

from __future__ import annotations

import math

from distillguard.detect.calibration import Calibration
from distillguard.detect.engine import DUE_GROWTH, DUE_SECONDS, MIN_OWN_EXCHANGES, Detector
from tests.factories import make_features


def _volume(detector: Detector, account: str) -> int:
    """The volume the account's last evaluation saw (its first feature is log1p of it)."""
    return round(math.expm1(float(detector.vectors[account][0])))


def test_accounts_are_evaluated_again_when_due() -> None:
    """An account with new exchanges is evaluated again at a tick once its volume grew by
    DUE_GROWTH or DUE_SECONDS passed since it was last evaluated; the end of a trace
    evaluates every account with exchanges not yet evaluated."""
    tick = 60.0
    detector = Detector(Calibration.neutral(), tick_seconds=tick)
    seen: list[int] = []
    for i in range(1, 201):      # one exchange a minute: every exchange passes a tick
        detector.observe(make_features("a", i * tick))
        if "a" in detector.vectors and (not seen or _volume(detector, "a") != seen[-1]):
            seen.append(_volume(detector, "a"))
    assert seen[:4] == [1, 2, 3, 4]
    for before, after in zip(seen, seen[1:], strict=False):
        grown = after >= before * (1 + DUE_GROWTH)
        waited = (after - before) * tick >= DUE_SECONDS
        assert grown or waited, (before, after)
        assert after - before <= max(before * DUE_GROWTH + 1, DUE_SECONDS / tick), "late"
    assert len(seen) < 30, "evaluated at almost every tick"
    assert _volume(detector, "a") < 200
    detector.finish()
    assert _volume(detector, "a") == 200
    assert not detector.dirty


def test_due_growth_zero_evaluates_at_every_tick() -> None:
    detector = Detector(Calibration.neutral(), tick_seconds=60.0, due_growth=0.0)
    for i in range(1, 51):
        detector.observe(make_features("a", i * 60.0))
        if i > 1:
            assert _volume(detector, "a") == i - 1


def test_session_starts_are_indexed_at_every_tick_due_or_not() -> None:
    """Two accounts that a scheduler wakes together, session after session, are linked
    by their co-starts while neither is due for evaluation: co-starts are counted only
    against the last few minutes of starts, so each tick indexes every new start."""
    detector = Detector(Calibration.neutral(), tick_seconds=60.0, due_growth=100.0,
                        due_seconds=1e9)
    t0 = 1_700_000_000.0
    for session in range(20):       # a session every two hours, for 40 hours
        at = t0 + session * 7_200.0
        detector.observe(make_features("a", at))
        detector.observe(make_features("b", at + 4.0))
    detector.observe(make_features("c", t0 + 20 * 7_200.0))   # passes the last tick
    assert detector._evaluated["a"][0] == 1, "a was evaluated again: not the case tested"
    assert "lockstep" in detector.links.edges.get(("a", "b"), {})
    assert detector.graph.of["a"] is detector.graph.of["b"]


def _flagging_calibration() -> Calibration:
    """The neutral model scores every row 0.5; a threshold of 0.5 makes every account over
    it as soon as it is judged (linked, or with MIN_OWN_EXCHANGES of its own)."""
    cal = Calibration.neutral()
    cal.threshold = 0.5
    return cal


def test_young_accounts_are_flagged_only_when_over_twice_in_a_row() -> None:
    detector = Detector(_flagging_calibration(), tick_seconds=60.0, due_growth=0.0)
    t0 = 1_700_000_000.0
    history: list[tuple[int, bool, bool]] = []     # (a's volume, above, flagged) per session
    for session in range(MIN_OWN_EXCHANGES - 1):
        at = t0 + session * 7_200.0
        detector.observe(make_features("a", at))
        detector.observe(make_features("b", at + 4.0))
        detector.observe(make_features("c", at + 3_600.0, template_keys=(7, 8, 9),
                                       simhash=2**64 - 1))   # passes a tick between sessions
        st = detector.status.get("a")
        if st is not None:
            history.append((_volume(detector, "a"), st.above, st.flagged))
    first_over = next(i for i, (_, above, _) in enumerate(history) if above)
    assert history[first_over][2] is False, "flagged at its first evaluation over"
    assert history[first_over + 1][1:] == (True, True)
    flagged_at = history[first_over + 1][0]
    assert flagged_at < MIN_OWN_EXCHANGES
    assert detector.status["a"].exchanges_before_flag == flagged_at
    assert not detector.status["c"].flagged, "an unlinked young account is not judged"


def test_accounts_with_enough_traffic_are_flagged_at_once() -> None:
    detector = Detector(_flagging_calibration(), tick_seconds=60.0, due_growth=0.0)
    for i in range(1, MIN_OWN_EXCHANGES + 2):
        detector.observe(make_features("a", i * 60.0))
    st = detector.status["a"]
    assert st.flagged and st.exchanges_before_flag == MIN_OWN_EXCHANGES
