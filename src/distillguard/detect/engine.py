"""The detector: one logic for the batch command and the online stage.

:class:`Detector` takes :class:`~distillguard.detect.features.ExchangeFeatures` in time
order. Each updates the account's sketches; whenever the trace clock passes the next
evaluation time (every ``tick_seconds``), the detector *evaluates*: it refreshes the
cross-account links of the accounts that moved, updates the account graph and its
communities, scores every affected account, and flags those whose risk reaches the
calibrated threshold, or whose template group's median risk does
(:meth:`Detector._template_group_risks`). An evaluation sees only exchanges that came
before it, so ``first_flagged_at`` (the time of the exchange that triggered the
evaluation) and ``exchanges_before_flag`` (the account's exchanges seen by then) say
honestly how early a campaign was caught. Flags are sticky; risk and campaign
membership are kept up to date.

Evaluations are driven by the timestamps in the data, never by the wall clock, so the
batch path and the online path give the same verdicts on the same exchanges.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from distillguard.detect.calibration import Calibration
from distillguard.detect.evidence import (
    account_reasons,
    campaign_evidence,
    campaign_headline,
    group_reasons,
)
from distillguard.detect.features import ExchangeFeatures
from distillguard.detect.graph import AccountGraph, Community
from distillguard.detect.linking import LinkIndex
from distillguard.detect.scoring import (
    ACCOUNT_FEATURES,
    AccountFacts,
    account_vector,
    community_vector,
)
from distillguard.detect.sketches import AccountState
from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts

SIGNUP_WINDOW_S = 3_600
RISK_STEP = 0.05
MIN_OWN_EXCHANGES = 10
# The links that tie a young account to its community's evidence: what it sends, when,
# and what it pays with. A shared /24 (a carrier's NAT, a VPN) or sign-up window is as
# likely a stranger's; a young account joined by those alone is judged as an unlinked one.
TIE_KINDS = ("template", "lockstep", "payment")
# An account that sent exchanges since it was last evaluated is evaluated again once its
# volume has grown by this share, or once this long has passed (see Detector.evaluate).
DUE_GROWTH = 0.25
DUE_SECONDS = 3_600.0
# At the end of a trace, how many evaluations at the same instant may follow the last one
# to apply the group co-start links it found (see Detector.finish).
FINISH_ROUNDS = 3


def new_campaign_id(now: float, flagged: list[str], taken: Container[str]) -> str:
    """A new campaign's id, from when it was found and its flagged members (sorted): the
    same traffic gives the same ids on the batch and the online path and in every run,
    and a detector started afresh (a new detector process, another gateway replica) does
    not hand out an id already written for another campaign, as a counter from 1 did."""
    digest = hashlib.blake2b(f"{now!r}|{'|'.join(flagged)}".encode(), digest_size=5)
    cid = base = f"c-{digest.hexdigest()}"
    n = 1
    while cid in taken:
        n += 1
        cid = f"{base}-{n}"
    return cid


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(slots=True)
class AccountStatus:
    risk: float = 0.0
    peak: float = 0.0
    peak_group: float = 0.0
    # Its own risk at its latest evaluation, whatever route flagged it: what the median of
    # its template group reads for it (Detector._template_group_risks).
    own: float = 0.0
    reported: float = 0.0      # the risk of the last verdict handed out (online rows)
    # Whether the evaluation behind the last verdict handed out found it over a threshold.
    reported_over: bool = False
    flagged: bool = False
    # When the run of evaluations that found its risk over a threshold began (None: its
    # last evaluation did not).
    above_since: float | None = None
    campaign_id: str | None = None
    first_flagged_at: float | None = None
    exchanges_before_flag: int | None = None
    reasons: list[str] = field(default_factory=list)

    def verdict(self, account_id: str) -> AccountVerdict:
        return AccountVerdict(account_id=account_id, risk=self.risk, flagged=self.flagged,
                              campaign_id=self.campaign_id,
                              first_flagged_at=_dt(self.first_flagged_at),
                              exchanges_before_flag=self.exchanges_before_flag,
                              reasons=list(self.reasons))


@dataclass(slots=True)
class CampaignStatus:
    campaign_id: str
    accounts: list[str]
    risk: float
    detected_at: float
    evidence: list[str]          # after the headline (see :meth:`headline`)
    # The community's members, and how many of them were flagged, when the evidence
    # was written.
    linked: frozenset[str] = frozenset()
    flagged: int = 0

    def headline(self) -> str:
        return campaign_headline(len(self.linked), self.flagged,
                                 sum(a not in self.linked for a in self.accounts))

    def verdict(self) -> CampaignVerdict:
        return CampaignVerdict(campaign_id=self.campaign_id, accounts=list(self.accounts),
                               risk=self.risk, detected_at=_dt(self.detected_at),
                               evidence=[self.headline(), *self.evidence])


@dataclass
class Changes:
    """What one evaluation changed (the online stage writes these)."""

    at: float
    accounts: list[AccountVerdict] = field(default_factory=list)
    campaigns: list[CampaignVerdict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.accounts or self.campaigns)

    def then(self, later: Changes) -> Changes:
        """These changes followed by ``later`` ones, as one set of changes: an account's
        or a campaign's latest verdict only."""
        accounts = {v.account_id: v for v in (*self.accounts, *later.accounts)}
        campaigns = {v.campaign_id: v for v in (*self.campaigns, *later.campaigns)}
        return Changes(later.at, [accounts[a] for a in sorted(accounts)],
                       list(campaigns.values()))


class Detector:
    def __init__(self, calibration: Calibration, *, tick_seconds: float = 300.0,
                 collect: bool = False, links: LinkIndex | None = None,
                 due_growth: float = DUE_GROWTH, due_seconds: float = DUE_SECONDS) -> None:
        if not 0.0 < tick_seconds < math.inf:
            raise ValueError(f"tick_seconds must be a positive number of seconds, not "
                             f"{tick_seconds!r}")
        self.calibration = calibration
        self.tick_seconds = tick_seconds
        self.due_growth = due_growth
        self.due_seconds = due_seconds
        # Each account's volume and trace time when it was last evaluated.
        self._evaluated: dict[str, tuple[int, float]] = {}
        self.states: dict[str, AccountState] = {}
        self.facts: dict[str, AccountFacts] = {}
        self.links = links or LinkIndex()
        self.graph = AccountGraph()
        self.status: dict[str, AccountStatus] = {}
        self.campaigns: dict[str, CampaignStatus] = {}
        self.vectors: dict[str, np.ndarray] = {}
        self.dirty: set[str] = set()
        self.next_tick: float | None = None
        self.last_ts = 0.0
        self.exchanges = 0
        self.evaluations = 0
        self.collect = collect
        self.snapshots: list[tuple[str, np.ndarray]] = []
        self._marks: dict[str, int] = {}
        self.group_snapshots: list[tuple[frozenset[str], np.ndarray]] = []
        self._groups_seen: set[frozenset[str]] = set()

    # -- input ------------------------------------------------------------------------

    def add_account(self, account_id: str, facts: AccountFacts) -> None:
        """Register what the account record says (before or after its first exchange)."""
        self.facts[account_id] = facts
        bucket = None if facts.created_at is None else int(facts.created_at // SIGNUP_WINDOW_S)
        self.links.set_static(account_id, facts.payment, bucket, facts.email_domain)

    def observe(self, f: ExchangeFeatures) -> Changes | None:
        """Take one exchange (in time order); returns what an evaluation it triggered
        changed, evaluated *before* this exchange is counted."""
        changes = None
        if self.next_tick is None:
            self.next_tick = (math.floor(f.ts / self.tick_seconds) + 1) * self.tick_seconds
        elif f.ts >= self.next_tick:
            changes = self.evaluate(f.ts)
            self.next_tick = (math.floor(f.ts / self.tick_seconds) + 1) * self.tick_seconds
        state = self.states.get(f.account_id)
        if state is None:
            state = self.states[f.account_id] = AccountState(f.account_id)
        state.update(f)
        self.dirty.add(f.account_id)
        self.last_ts = max(self.last_ts, f.ts)
        self.exchanges += 1
        return changes

    def finish(self) -> Changes | None:
        """Evaluate what came after the last evaluation (end of a trace).

        Links the group co-start test finds in an evaluation are applied at the next one
        (:meth:`LinkIndex.group_costarts`). At the end there is no next tick, so while an
        evaluation found some, another at the same instant applies them (at most
        FINISH_ROUNDS more: an account those links bring into a community has its quiet
        partners tested again, which may find a few more). These see no new traffic, so
        they are not a second look for the young-account hold (which needs evaluations
        at two times, see :meth:`_apply`)."""
        if not self.dirty:
            return None
        changes = self.evaluate(self.last_ts, everyone=True)
        for _ in range(FINISH_ROUNDS):
            if not self.links.links_pending:
                break
            changes = changes.then(self.evaluate(self.last_ts, everyone=True))
        return changes

    # -- evaluation -------------------------------------------------------------------

    def _due(self, now: float) -> list[str]:
        """The accounts with new exchanges that are due for evaluation: new ones, and
        those whose volume grew by ``due_growth`` or that waited ``due_seconds`` since
        they were last evaluated. Once an account has sent a few hundred exchanges, the
        next few move none of its features by much; re-evaluating it, its links and its
        community at every tick was most of an evaluation's work."""
        growth, wait = 1.0 + self.due_growth, self.due_seconds
        evaluated, states = self._evaluated, self.states
        due = []
        for aid in self.dirty:
            last = evaluated.get(aid)
            if (last is None or states[aid].count >= growth * last[0]
                    or now - last[1] >= wait):
                due.append(aid)
        return due

    def evaluate(self, now: float, *, everyone: bool = False) -> Changes:
        """Evaluate the accounts that are due (``everyone``: all that sent exchanges since
        they were last evaluated, as at the end of a trace)."""
        self.evaluations += 1
        dirty = sorted(self.dirty if everyone else self._due(now))
        self.dirty.difference_update(dirty)
        # Session starts are indexed at every tick, due or not: a co-start is counted
        # only against the starts of the last few minutes (linking.COSTART_KEEP_S), so
        # starts indexed an hour late would meet none of their partners'.
        states = self.states
        for aid in sorted(a for a in self.dirty if states[a].pending_starts):
            self.links.index_starts(states[aid])
        for aid in dirty:
            state = self.states[aid]
            self._evaluated[aid] = (state.count, now)
            state.flush()
            self.links.update(state)
            self.vectors[aid] = account_vector(state, self.facts.get(aid))
        changed = self.links.refresh(self.states)
        regrouped = self.graph.update(self.links.edges, changed, rerun=self.links.joining)
        touched = set(dirty) | regrouped
        self.links.retest_partners(sorted(self.graph.joined), self.states)
        self.links.group_costarts(self.states, self.graph.of)
        self.links.owned_frames(self.states, self.graph.of, regrouped)
        # At the end of a trace (everyone), communities that formed in the last hour are
        # tested too.
        self.links.community_costarts(self.graph.of, now=everyone)
        for aid in dirty:
            community = self.graph.of.get(aid)
            if community is not None:
                touched |= community.members
        ids = sorted(a for a in touched if a in self.states)
        if not ids:
            return Changes(now)
        community_rows: dict[int, np.ndarray] = {}
        community_risk: dict[int, float] = {}
        group_model = self.calibration.community
        keys = []
        for aid in ids:
            community = self.graph.of.get(aid)
            key = id(community)
            keys.append(key)
            if key not in community_rows:
                crow = community_vector(community, self.vectors, self.states)
                community_rows[key] = crow
                community_risk[key] = float(group_model.risk(crow[None, :])[0]) if (
                    group_model is not None and community is not None) else 0.0
                if self.collect and community is not None:
                    self._group_snapshot(community.members, crow)
        # Each row: the account's own features, then its community's.
        matrix = np.hstack([np.vstack([self.vectors[aid] for aid in ids]),
                            np.vstack([community_rows[key] for key in keys])])
        risks = self.calibration.model.risk(matrix)
        group_risks = np.array([community_risk[key] for key in keys])
        template_groups = self._template_group_risks(ids, risks)
        if self.collect:
            self._snapshot(ids, matrix)
        return self._apply(now, ids, matrix, risks, group_risks, template_groups)

    def _template_group_risks(self, ids: list[str], risks: np.ndarray
                              ) -> list[tuple[float, int]]:
        """For each account, its template group's median risk and size ((0, 0) without
        one). The group is the members of its community it reaches through template
        links: the accounts that send its operator's frames. Each member counts with its
        risk of this evaluation or, if it was not evaluated now, of its latest one.

        An account is also flagged when this median reaches the account threshold: when
        most of the accounts sending the same frames would be flagged on their own, the
        rest are the same campaign, however little traffic each has sent. Template links
        only: a community also holds accounts joined to it by a shared /24, a sign-up
        window or one chance co-start, and a benign integration that shares a cloud /24
        with a campaign is not one of its accounts."""
        latest = dict(zip(ids, risks.tolist(), strict=True))
        group_of: dict[str, frozenset[str]] = {}
        medians: dict[frozenset[str], float] = {}
        out: list[tuple[float, int]] = []
        for aid in ids:
            group = group_of.get(aid)
            if group is None:
                group = self.graph.linked_within(aid, "template")
                group_of.update(dict.fromkeys(group, group))
            if not group:
                out.append((0.0, 0))
                continue
            median = medians.get(group)
            if median is None:
                median = medians[group] = statistics.median(
                    [latest[m] if m in latest else self.status[m].own
                     for m in group if m in latest or m in self.status])
            out.append((median, len(group)))
        return out

    def _group_snapshot(self, members: frozenset[str], row: np.ndarray) -> None:
        """A community's row, once per distinct membership."""
        if members not in self._groups_seen:
            self._groups_seen.add(members)
            self.group_snapshots.append((members, row))

    def _snapshot(self, ids: list[str], matrix: np.ndarray) -> None:
        """Keep feature rows for fitting: an account's row when its volume passes 1, 2, 4,
        8, ... and every 50 exchanges after that (bounded per account)."""
        for aid, row in zip(ids, matrix, strict=True):
            count = self.states[aid].count
            mark = self._marks.get(aid, 0)
            if count >= mark:
                self.snapshots.append((aid, row))
                self._marks[aid] = count * 2 if count < 50 else count + 50

    def _apply(self, now: float, ids: list[str], matrix: np.ndarray, risks: np.ndarray,
               group_risks: np.ndarray, template_groups: list[tuple[float, int]]
               ) -> Changes:
        changes = Changes(now)
        cal = self.calibration
        changed: set[str] = set()
        for aid, row, risk, group, (template_median, template_size) in zip(
                ids, matrix, risks, group_risks, template_groups, strict=True):
            st = self.status.setdefault(aid, AccountStatus())
            young = self.states[aid].count < MIN_OWN_EXCHANGES
            # An unlinked account is judged on its own traffic only once there is enough of
            # it: a few single-turn prompts from a new account are how many people start.
            # So is a young one linked by a shared /24 or sign-up window only (TIE_KINDS).
            tied = not young or self.graph.has_link_within(aid, TIE_KINDS)
            own = float(risk) if tied else 0.0
            g = float(group)
            st.own = float(risk)
            # The peak is what the account threshold was compared with, so calibration
            # sets it from benign accounts' template groups too.
            st.peak = max(st.peak, own, template_median)
            st.peak_group = max(st.peak_group, g)
            r = max(own, g, template_median)
            by_template_group = template_median >= cal.threshold > own
            over = own >= cal.threshold or by_template_group or g >= cal.community_threshold
            # A young account is flagged only when evaluations in a row at two times find
            # it over: a chance link to a campaign in someone's first few exchanges rarely
            # lasts.
            held = st.above_since is not None and st.above_since < now
            newly = not st.flagged and over and (held or not young)
            if not over:
                st.above_since = None
            elif st.above_since is None:
                st.above_since = now
            if newly:
                st.flagged = True
                st.first_flagged_at = now
                st.exchanges_before_flag = self.states[aid].count
            if newly or abs(r - st.reported) >= RISK_STEP or (st.flagged and (
                    not st.reasons or over != st.reported_over)):
                st.reported, st.reported_over = r, over
                st.reasons = account_reasons(cal.model, row, aid in self.graph.of)
                if by_template_group:
                    st.reasons = [f"sends the template frames of {template_size - 1} linked "
                                  f"accounts whose median risk is {template_median:.2f}",
                                  *st.reasons][:6]
                if cal.community is not None and g >= cal.community_threshold:
                    st.reasons = [f"its linked group scores {g:.2f} as a campaign",
                                  *group_reasons(cal.community, row[len(ACCOUNT_FEATURES):]),
                                  *st.reasons][:6]
                if st.flagged and not over:
                    st.reasons = [self._flagged_before(aid, st, own, g), *st.reasons][:6]
                changed.add(aid)
            if abs(r - st.risk) >= 1e-6:
                st.risk = r
        moved, changes.campaigns = self._campaigns(now, set(ids))
        changes.accounts = [self.status[a].verdict(a) for a in sorted(changed | moved)]
        return changes

    def _flagged_before(self, aid: str, st: AccountStatus, own: float, group: float
                        ) -> str:
        """The first reason of a flagged account whose latest evaluation found it under
        the thresholds: flags are sticky (policy may have acted, and an analyst decides
        on a release), so the verdict says when it was flagged and that its evidence has
        weakened since, rather than listing only what its risk is made of now."""
        assert st.first_flagged_at is not None
        when = datetime.fromtimestamp(st.first_flagged_at, UTC).strftime("%Y-%m-%d %H:%M")
        cal = self.calibration
        line = (f"flagged {when} UTC at {st.exchanges_before_flag} exchanges, risk up to "
                f"{max(st.peak, st.peak_group):.2f}; now {own:.2f}, under the threshold "
                f"{cal.threshold:.3f}")
        if cal.community is not None:
            line += f", its group {group:.2f} under {cal.community_threshold:.3f}"
        if st.campaign_id is not None and aid not in self.graph.of:
            line += ", no longer linked to its campaign's accounts"
        return line

    def _campaigns(self, now: float, touched: set[str]
                   ) -> tuple[set[str], list[CampaignVerdict]]:
        """Give flagged accounts of each community a stable campaign id."""
        out: list[CampaignVerdict] = []
        changed: set[str] = set()
        claimed: set[str] = set()
        communities = sorted(
            (c for c in self.graph.communities if c.size >= 2 and not touched.isdisjoint(
                c.members)), key=lambda c: (-c.size, min(c.members)))
        for community in communities:
            flagged = sorted(m for m in community.members
                             if m in self.status and self.status[m].flagged)
            if not flagged:
                continue
            old: Counter[str] = Counter(
                c for m in flagged
                if (c := self.status[m].campaign_id) is not None and c not in claimed)
            cid: str
            if old:
                cid = max(sorted(old), key=lambda k: old[k])
            else:
                cid = new_campaign_id(now, flagged, self.campaigns)
            claimed.add(cid)
            for m in flagged:
                if self.status[m].campaign_id != cid:
                    self.status[m].campaign_id = cid
                    changed.add(m)
            update = self._update_campaign(now, cid, community, flagged)
            if update is not None:
                out.append(update)
        return changed, out

    def _update_campaign(self, now: float, cid: str, community: Community,
                         flagged: list[str]) -> CampaignVerdict | None:
        members = sorted(community.members)
        risk = float(np.mean([self.status[m].risk if m in self.status else 0.0
                              for m in members]))
        existing = self.campaigns.get(cid)
        accounts = sorted(set(flagged) | set(existing.accounts if existing else []))
        accounts = [a for a in accounts if self.status[a].campaign_id == cid]
        if existing is None:
            evidence = campaign_evidence(community, self.states, flagged)
            existing = self.campaigns[cid] = CampaignStatus(
                cid, accounts, risk, now, evidence, community.members, len(flagged))
            return existing.verdict()
        # The evidence (a walk over every member) is written out only when the campaign's
        # verdict changes: its members, its risk by a step, or its headline.
        headline = campaign_headline(community.size, len(flagged),
                                     sum(a not in community.members for a in accounts))
        if (existing.accounts != accounts or abs(existing.risk - risk) >= RISK_STEP
                or existing.headline() != headline):
            existing.accounts, existing.risk = accounts, risk
            existing.linked, existing.flagged = community.members, len(flagged)
            existing.evidence = campaign_evidence(community, self.states, flagged)
            return existing.verdict()
        return None

    # -- output -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """What the detector holds and has done (logs, metrics)."""
        return {"exchanges": self.exchanges, "accounts": len(self.states),
                "records": len(self.facts), "evaluations": self.evaluations,
                "costart_pairs": self.links.costart_pairs}

    def verdicts(self, account_ids: list[str] | None = None) -> Verdicts:
        """The verdicts document: every account seen (and every listed one) once."""
        ids = sorted(set(self.states) | set(self.facts) | set(account_ids or []))
        accounts = [self.status.get(a, AccountStatus()).verdict(a) for a in ids]
        for cid, campaign in self.campaigns.items():
            campaign.accounts = sorted(a for a in campaign.accounts
                                       if self.status[a].campaign_id == cid)
        campaigns = [c.verdict() for c in sorted(self.campaigns.values(),
                                                  key=lambda c: c.detected_at)
                     if c.accounts]
        return Verdicts(accounts=accounts, campaigns=campaigns)
