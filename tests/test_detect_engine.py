"""The detector's evaluation schedule."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

from distillguard.detect.calibration import Calibration
from distillguard.detect.engine import (
    DUE_GROWTH,
    DUE_SECONDS,
    MIN_OWN_EXCHANGES,
    CampaignStatus,
    Detector,
    new_campaign_id,
)
from distillguard.detect.scoring import FEATURES, AccountFacts
from distillguard.maildomains import operator_mail_domain
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
    # a and b co-start; c started alone, after both
    assert detector.stats()["costart_pairs"] == detector.links.costart_pairs == 1


def _flagging_calibration() -> Calibration:
    """The neutral model scores every row 0.5; a threshold of 0.5 makes every account over
    it as soon as it is judged (linked, or with MIN_OWN_EXCHANGES of its own)."""
    cal = Calibration.neutral()
    cal.threshold = 0.5
    return cal


def _session(detector: Detector, at: float) -> None:
    """Accounts a and b start a session together (their co-starts link them in time);
    c, an unrelated account, sends an hour later, which passes a tick between sessions."""
    detector.observe(make_features("a", at))
    detector.observe(make_features("b", at + 4.0))
    detector.observe(make_features("c", at + 3_600.0, template_keys=(7, 8, 9),
                                   simhash=2**64 - 1))


def test_young_accounts_are_flagged_only_when_over_twice_in_a_row() -> None:
    detector = Detector(_flagging_calibration(), tick_seconds=60.0, due_growth=0.0)
    t0 = 1_700_000_000.0
    history: list[tuple[int, bool, bool]] = []     # (a's volume, above, flagged) per session
    for session in range(MIN_OWN_EXCHANGES - 1):
        at = t0 + session * 7_200.0
        _session(detector, at)
        st = detector.status.get("a")
        if st is not None:
            history.append((_volume(detector, "a"), st.above_since is not None, st.flagged))
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



def _woken_with_a_pool_at_the_end(detector: Detector) -> None:
    """A scheduler wakes 6 of its 40 accounts hourly for two days, and a new account with
    them at the last four wake-ups, each time with members it has not met before (so no
    pair of it starts together twice: only the group test can link it)."""
    import random

    rng = random.Random(5)
    pool = [f"s{i:02d}" for i in range(40)]
    met: set[str] = set()
    events: list[tuple[float, str]] = []
    for tick in range(48):
        at = 1_700_000_000.0 + tick * 3_600 + rng.uniform(0, 300)
        woken = rng.sample(pool if tick < 44 else sorted(set(pool) - met), 6)
        if tick >= 44:
            met.update(woken)
            events.append((at + rng.uniform(0, 15), "late"))
        events += [(at + rng.uniform(0, 15), a) for a in woken]
    for ts, aid in sorted(events):
        detector.observe(make_features(aid, ts, template_keys=(), simhash=rng.getrandbits(64)))


def test_links_found_at_the_last_evaluation_are_applied_at_the_end() -> None:
    """The group co-start test's links count from the next evaluation; at the end of a
    trace there is none, so :meth:`Detector.finish` applies them at the same instant.
    That second evaluation sees no new traffic: a young account it links is not flagged
    on it (the hold wants evaluations at two times), while its pool is."""
    premise = Detector(_flagging_calibration(), tick_seconds=300.0)
    _woken_with_a_pool_at_the_end(premise)
    premise.evaluate(premise.last_ts, everyone=True)
    assert premise.links.links_pending and "late" not in premise.graph.of, (
        "not the case tested: the last evaluation's links should be pending")

    detector = Detector(_flagging_calibration(), tick_seconds=300.0)
    _woken_with_a_pool_at_the_end(detector)
    changes = detector.finish()
    assert detector.graph.of["late"] is detector.graph.of["s00"]
    assert not detector.links.links_pending
    late = detector.status["late"]
    assert not late.flagged and late.above_since == detector.last_ts
    assert detector.status["s00"].flagged
    assert changes is not None
    reported = [v.account_id for v in changes.accounts]
    assert "late" in reported and reported == sorted(set(reported))


def test_two_evaluations_at_one_instant_are_one_look_for_the_young_account_hold() -> None:
    """A young account found over at an evaluation, and again by a second evaluation at
    the same trace time (the end of a trace, an online flush), is not flagged: the hold
    wants evaluations at two times."""
    detector = Detector(_flagging_calibration(), tick_seconds=60.0, due_growth=0.0)
    t0 = 1_700_000_000.0
    for session in range(MIN_OWN_EXCHANGES - 1):
        at = t0 + session * 7_200.0
        _session(detector, at)
        st = detector.status.get("a")
        if st is not None and st.above_since is not None:
            break
    assert st is not None and st.above_since == at + 3_600.0 and not st.flagged
    detector.observe(make_features("a", at + 3_600.0))    # at the evaluation's instant
    detector.finish()
    assert detector._evaluated["a"] == (_volume(detector, "a"), at + 3_600.0)
    assert st.above_since == at + 3_600.0 and not st.flagged


def test_new_campaign_ids_come_from_the_traffic_not_a_counter() -> None:
    """The same finding gives the same id (batch, online, every run); a detector started
    afresh, or another replica's, finding other accounts or at another time, gives
    another id, instead of counting from c-1 again over campaigns already written."""
    flagged = ["acct_a", "acct_b"]
    first = new_campaign_id(1_772_000_000.5, flagged, set())
    assert first == new_campaign_id(1_772_000_000.5, flagged, set())
    assert first.startswith("c-") and len(first) == 12
    assert new_campaign_id(1_772_000_300.5, flagged, set()) != first
    assert new_campaign_id(1_772_000_000.5, ["acct_a", "acct_c"], set()) != first
    assert new_campaign_id(1_772_000_000.5, flagged, {first}) == f"{first}-2"
    assert new_campaign_id(1_772_000_000.5, flagged, {first, f"{first}-2"}) == f"{first}-3"


def test_a_flagged_account_found_under_the_threshold_says_when_it_was_flagged() -> None:
    """Flags are sticky. When a later evaluation finds a flagged account under the
    threshold (here the threshold is raised; its risk stays 0.5, less than a risk step
    from what was reported), its verdict is handed out again, and its first reason says
    when it was flagged and where its risk is now; once over again, the line goes."""
    detector = Detector(_flagging_calibration(), tick_seconds=60.0, due_growth=0.0)
    minute = 0

    def send(n: int) -> None:
        nonlocal minute
        for _ in range(n):
            minute += 1
            detector.observe(make_features("a", 1_700_000_000.0 + minute * 60.0))

    send(MIN_OWN_EXCHANGES + 1)
    st = detector.status["a"]
    assert st.flagged and not any(r.startswith("flagged") for r in st.reasons)
    assert st.first_flagged_at is not None
    when = datetime.fromtimestamp(st.first_flagged_at, UTC).strftime("%Y-%m-%d %H:%M")
    detector.calibration.threshold = 0.6
    changes = detector.observe(make_features("a", 1_700_000_000.0 + (minute + 1) * 60.0))
    assert changes is not None and [v.account_id for v in changes.accounts] == ["a"]
    verdict = changes.accounts[0]
    assert verdict.flagged and verdict.risk == 0.5
    assert verdict.reasons[0] == (
        f"flagged {when} UTC at {st.exchanges_before_flag} exchanges, risk up to 0.50; "
        "now 0.50, under the threshold 0.600")
    detector.calibration.threshold = 0.5
    send(2)
    assert st.flagged and not any(r.startswith("flagged") for r in st.reasons)


def test_a_campaign_counts_the_accounts_it_holds_that_are_no_longer_linked() -> None:
    """A campaign keeps the accounts flagged as its members after their links went (flags
    and campaign ids are sticky); its headline says so, from the account list it is
    handed out with."""
    campaign = CampaignStatus("c-1", ["a", "b", "c"], 0.9, 0.0, ["3 of 2 ..."],
                              linked=frozenset({"a", "b", "d"}), flagged=2)
    assert campaign.verdict().evidence[0] == (
        "3 linked accounts, 2 flagged; 1 more account flagged as a member earlier is no "
        "longer linked")
    campaign.accounts = ["a", "b", "c", "e"]
    assert campaign.verdict().evidence == [
        "3 linked accounts, 2 flagged; 2 more accounts flagged as members earlier are no "
        "longer linked", "3 of 2 ..."]
    campaign.accounts = ["a", "b"]
    assert campaign.verdict().evidence[0] == "3 linked accounts, 2 flagged"


def test_an_account_sending_a_flagged_groups_frames_is_flagged_with_it() -> None:
    """Four busy accounts and a quiet one send the same template frames from one /24; a
    fifth, quiet too, shares only the /24. The model scores volume alone, so the quiet
    accounts are far under the threshold on their own. The one that sends the group's
    frames is flagged when most of its template group is over (after two looks: it is
    young); the one that only shares the network is in the community, not the group."""
    cal = Calibration.neutral()
    cal.model.coef[0], cal.model.intercept, cal.threshold = 4.0, -10.0, 0.9   # log_volume
    detector = Detector(cal, tick_seconds=60.0, due_growth=0.0)
    t0 = 1_700_000_000.0
    net = "10.0.0.0/24"
    for minute in range(40):
        at = t0 + minute * 60.0
        for i in range(4):
            detector.observe(make_features(f"busy{i}", at + i, ip_prefix=net))
        if minute % 8 == 0:
            detector.observe(make_features("quiet", at + 5, ip_prefix=net))
            detector.observe(make_features("neighbour", at + 6, ip_prefix=net,
                                           template_keys=(7, 8, 9), simhash=2**64 - 1))
    detector.finish()
    community = detector.graph.of["quiet"]
    assert community is detector.graph.of["neighbour"] is detector.graph.of["busy0"]
    assert detector.graph.linked_within("quiet", "template") == {
        "quiet", "busy0", "busy1", "busy2", "busy3"}
    assert detector.graph.linked_within("neighbour", "template") == frozenset()
    quiet, neighbour = detector.status["quiet"], detector.status["neighbour"]
    assert quiet.own < 0.1 and neighbour.own < 0.1
    assert all(detector.status[f"busy{i}"].flagged for i in range(4))
    # Its frames are dominant from its third exchange; flagged at the second look after.
    assert quiet.flagged and quiet.exchanges_before_flag == 3 and quiet.risk > 0.9
    assert quiet.reasons[0].startswith("sends the template frames of 4 linked accounts "
                                       "whose median risk is 0.9")
    assert not neighbour.flagged and neighbour.risk < 0.1


def test_a_young_account_sharing_only_a_network_with_a_campaign_is_judged_alone() -> None:
    """The model scores the community's volume per member alone. A young account that
    shares the campaign's /24 (a carrier NAT, a VPN) is in its community but not tied to
    its evidence, and is judged as an unlinked young account: not at all. One that pays
    with the campaign's card is tied to it, and is flagged with it."""
    cal = Calibration.neutral()
    cal.model.coef[FEATURES.index("log_member_volume")] = 4.0
    cal.model.intercept, cal.threshold = -10.0, 0.9
    detector = Detector(cal, tick_seconds=60.0, due_growth=0.0)
    for aid in ("busy0", "busy1", "busy2", "cardholder"):
        detector.add_account(aid, AccountFacts(payment="card-1"))
    t0 = 1_700_000_000.0
    for minute in range(40):
        at = t0 + minute * 60.0
        for i in range(3):
            detector.observe(make_features(f"busy{i}", at + i, ip_prefix="10.0.0.0/24"))
        if minute % 10 == 5:
            detector.observe(make_features("stranger", at + 5, ip_prefix="10.0.0.0/24",
                                           template_keys=(7, 8, 9), simhash=2**64 - 1))
            detector.observe(make_features("cardholder", at + 6, ip_prefix="10.9.9.0/24",
                                           template_keys=(4, 5, 6), simhash=2**63))
    detector.finish()
    community = detector.graph.of["busy0"]
    assert detector.graph.of["stranger"] is community is detector.graph.of["cardholder"]
    stranger, cardholder = detector.status["stranger"], detector.status["cardholder"]
    assert stranger.own > 0.9 and cardholder.own > 0.9, "not the case tested"
    assert not stranger.flagged and stranger.risk == 0.0
    assert cardholder.flagged
    assert not detector.graph.has_link_within("stranger", ("template", "lockstep",
                                                           "payment"))


def test_accounts_on_a_mail_domain_of_their_own_are_linked_but_not_on_a_public_one() -> None:
    """A mail domain outside the free-mail and disposable-address lists is held by one
    party (an operator's throwaway domain, a company's own): its accounts are linked, in
    any letter case. Accounts that share gmail.com or a disposable-address service are
    strangers, and are not."""
    detector = Detector(Calibration.neutral(), tick_seconds=60.0, due_growth=0.0)
    domains = {"own0": "mail9e62.xyz", "own1": "MAIL9E62.xyz.", "free0": "gmail.com",
               "free1": "gmail.com", "tmp0": "mailinator.com", "tmp1": "mailinator.com"}
    for aid, domain in domains.items():
        detector.add_account(aid, AccountFacts(email_domain=domain))
    rng = random.Random(5)
    t0 = 1_700_000_000.0
    # nothing else in common: own times, networks, frames and SimHashes, no payment
    sent = sorted((t0 + rng.uniform(0, 86_400.0), i, aid)
                  for i, aid in enumerate(sorted(domains)) for _ in range(60))
    for ts, i, aid in sent:
        detector.observe(make_features(aid, ts, ip_prefix=f"10.{i}.0.0/24",
                                       template_keys=(10 * i + 1, 10 * i + 2, 10 * i + 3),
                                       simhash=(i + 1) << 50))
    detector.finish()
    assert detector.links.edges.get(("own0", "own1")) == {"domain": 1.0}
    assert detector.graph.of["own0"] is detector.graph.of["own1"]
    assert detector.graph.of["own0"].kinds == {"domain": 2}
    assert not {"free0", "free1", "tmp0", "tmp1"} & detector.graph.of.keys()


def test_a_mail_domain_is_a_link_key_unless_anyone_can_get_an_address_there() -> None:
    assert operator_mail_domain(" Acme-Labs.example. ") == "acme-labs.example"
    for public in ("gmail.com", "Proton.me", "web.de", "mailinator.com", "", None):
        assert operator_mail_domain(public) is None


def test_a_scheduler_spread_over_minutes_joins_its_template_communities() -> None:
    """A scheduler wakes one account of each of two harness variants at each tick, one to
    four minutes apart: never within the seconds of a co-start, so nothing but the
    community co-start test (LinkIndex.community_costarts) can tie the two template
    communities together. Two other communities, busy in the same four hours of each day
    but at their own moments, share many more five-minute buckets than two that start
    at any hour would (the test's chance is measured on shifted copies, which keep the
    rhythm), and stay apart."""
    rng = random.Random(7)
    t0 = 1_700_000_000.0
    groups = {g: [f"{g}{i}" for i in range(6 if g in "ab" else 12)] for g in "abcd"}
    frames = {"a": (11, 12, 13), "b": (21, 22, 23), "c": (31, 32, 33), "d": (41, 42, 43)}
    simhash = {g: rng.getrandbits(64) for g in groups}
    events: list[tuple[float, str, str]] = []
    at = t0
    for _ in range(45):               # ticks about every 64 minutes, for two days
        at += rng.uniform(2_000.0, 5_600.0)
        first, second = rng.choice(groups["a"]), rng.choice(groups["b"])
        events.append((at, first, "a"))
        events.append((at + rng.uniform(60.0, 240.0), second, "b"))
    for g in "cd":                    # busy, in the same hours, each on its own
        for _ in range(150):
            day = rng.randrange(2)
            events.append((t0 + day * 86_400.0 + rng.uniform(0.0, 4 * 3_600.0),
                           rng.choice(groups[g]), g))
    detector = Detector(Calibration.neutral(), tick_seconds=300.0)
    for ts, account, g in sorted(events):
        detector.observe(make_features(account, ts, template_keys=frames[g],
                                       simhash=simhash[g]))
    detector.finish()
    of = detector.graph.of
    assert of["a0"] is of["b0"], "the scheduler's two variants are apart"
    assert of["a0"].members == frozenset(groups["a"] + groups["b"])
    assert of["c0"].members == frozenset(groups["c"])
    assert of["d0"].members == frozenset(groups["d"])
