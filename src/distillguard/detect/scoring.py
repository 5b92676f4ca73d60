"""Risk from combined evidence: each account's own behaviour and its community's.

An account is described by :data:`ACCOUNT_FEATURES` (from its sketches) and
:data:`COMMUNITY_FEATURES` (from the community it belongs to in the account graph: its
size, how its members are linked, and the *average* behaviour of its members). The
second half is what catches a campaign of individually clean accounts: forty accounts
that each send a modest volume of reasoning-eliciting prompts from hosting networks,
linked by shared templates and lockstep timing, score as a campaign.

The risk is a logistic model over the standardised features whose weights are fitted by
``distillguard detect calibrate`` on labelled benign and attack traffic and stored in the
calibration file (:mod:`.calibration`); its output is a probability, and the flag
threshold on it is set from a target false-positive rate on benign accounts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from distillguard.detect.graph import Community
from distillguard.detect.sketches import AccountState

ACCOUNT_FEATURES = (
    "log_volume", "log_rate", "template_reuse", "diversity", "concentration",
    "reasoning_share", "rubric_share", "tool_share", "harvest_share", "multi_turn_share",
    "log_output_ratio", "timing_regularity", "diurnal_entropy", "hosting_share",
    "model_switch_rate", "log_age_days", "error_share", "log_completion_limit",
    "log_completion_tokens", "log_networks",
)
_MEAN_OF = ("template_reuse", "concentration", "reasoning_share", "rubric_share",
            "tool_share", "harvest_share", "multi_turn_share", "hosting_share",
            "diurnal_entropy", "log_age_days", "timing_regularity")
# Every community feature is bounded whatever the group's size (a share of members, a
# mean over members, or 1 - 1/size), so a large community of ordinary users cannot push
# the model outside the range it was fitted on.
COMMUNITY_FEATURES = (
    "group_size", "template_linked", "lockstep_linked", "payment_linked", "prefix_linked",
    "signup_linked", "log_member_volume", "same_asn",
    *(f"mean_{name}" for name in _MEAN_OF),
)
FEATURES = ACCOUNT_FEATURES + COMMUNITY_FEATURES

# The direction some features may push the risk, whatever the calibration traffic says.
# Elicitation content, shared infrastructure and requests spread over many networks (a
# proxy pool's exits) are evidence of harvesting by what they mean (+1: the weight is
# never negative); conversation and an account's age are evidence of ordinary use (-1:
# never positive). Without these bounds, a signal that no attack in the calibration
# traffic showed (tool-use prompts, say) gets whatever weight its accidental correlation
# with benign traffic gives it, and a campaign of a new kind that shows it mostly would
# be let off by it. Unlisted features are unconstrained.
#
# What an account record says that costs an adversary nothing to type in (the
# organisation, the mail domain) is not a feature at all: a name shared by a group's
# members would otherwise be read as a company and let a campaign off.
SIGNS: dict[str, int] = {
    **dict.fromkeys(("reasoning_share", "rubric_share", "tool_share", "harvest_share",
                     "template_linked", "lockstep_linked", "payment_linked", "prefix_linked",
                     "signup_linked", "mean_reasoning_share", "mean_rubric_share",
                     "mean_tool_share", "mean_harvest_share", "log_networks"), 1),
    **dict.fromkeys(("multi_turn_share", "mean_multi_turn_share", "log_age_days",
                     "mean_log_age_days"), -1),
}
_NO_AGE_DAYS = 30.0


@dataclass(slots=True)
class AccountFacts:
    """What the account record says (accounts file or state store)."""

    created_at: float | None = None
    payment: str | None = None
    email_domain: str | None = None


def account_vector(state: AccountState, facts: AccountFacts | None) -> np.ndarray:
    c = max(1, state.count)
    age = _NO_AGE_DAYS
    if facts is not None and facts.created_at is not None:
        age = max(0.0, (state.first_ts - facts.created_at) / 86_400.0)
    return np.array([
        math.log1p(state.count), math.log1p(state.rate_per_hour), state.template_reuse,
        state.diversity, state.concentration, state.reasoning / c, state.rubric / c,
        state.tool_use / c, state.harvest / c, state.multi_turn / c,
        state.log_ratio_sum / c, state.timing_regularity, state.diurnal_entropy,
        state.hosting / c, state.model_switches / c, math.log1p(age), state.errors / c,
        math.log1p(state.completion_limit_sum / c), math.log1p(state.completion_sum / c),
        math.log1p(len(state.networks)),
    ], dtype=float)


_MEAN_INDEX = [ACCOUNT_FEATURES.index(n) for n in _MEAN_OF]


def community_vector(community: Community | None, vectors: Mapping[str, np.ndarray],
                     states: Mapping[str, AccountState]) -> np.ndarray:
    """Community features; a singleton (``None``) is its own community of one."""
    if community is None:
        return np.zeros(len(COMMUNITY_FEATURES))
    members = sorted(community.members)
    size = len(members)
    rows = np.array([vectors[m] for m in members])
    linked = [community.kinds.get(k, 0) / size
              for k in ("template", "lockstep", "payment", "prefix", "signup")]
    volume = sum(states[m].count for m in members)
    asns = [states[m].top_asn for m in members]
    same_asn = max((asns.count(a) for a in set(asns) if a), default=0) / size
    return np.array([1.0 - 1.0 / size, *linked, math.log1p(volume / size), same_asn,
                     *rows[:, _MEAN_INDEX].mean(axis=0)], dtype=float)


# Standardised features are clipped to this many standard deviations. A feature that
# barely varied in the calibration traffic (tool-use prompts, say) has a tiny scale, so an
# unseen value would otherwise stand dozens of deviations out and decide the risk alone,
# in whichever direction its weight happened to point.
Z_CLIP = 4.0


# What an account's own exchanges measure as a share or a mean per exchange. Measured on a
# handful of exchanges these say little: one exchange always shows template reuse and
# diversity 1.0 and a multi-turn share of 0 or 1, and its completion limit is whatever
# that one request asked for. So their standardised values count in proportion to
# ``count / (count + OWN_EVIDENCE_PRIOR)``, as if every account had first sent
# OWN_EVIDENCE_PRIOR exchanges of the calibration traffic's average: an account's first
# exchange counts a fifth of its full weight, its twentieth five sixths. Volume, rate,
# age and networks are counts, not means, and are left as they are.
PER_EXCHANGE_FEATURES = (
    "template_reuse", "diversity", "concentration", "reasoning_share", "rubric_share",
    "tool_share", "harvest_share", "multi_turn_share", "log_output_ratio",
    "timing_regularity", "diurnal_entropy", "hosting_share", "model_switch_rate",
    "error_share", "log_completion_limit", "log_completion_tokens",
)
OWN_EVIDENCE_PRIOR = 4.0


@functools.cache
def _weighed_columns(features: tuple[str, ...]
                     ) -> tuple[tuple[np.ndarray, int, int | None], ...]:
    """The columns :func:`standardise` weighs, as (columns, volume column, group size
    column or None): the account's per-exchange features by its exchanges, and the
    community's means over its members (``mean_*``) by the community's exchanges. Found
    once per feature list: standardise runs at every evaluation."""
    def index(columns: list[int]) -> np.ndarray:
        out = np.array(columns, dtype=np.intp)
        out.setflags(write=False)
        return out

    found: list[tuple[np.ndarray, int, int | None]] = []
    own = [features.index(f) for f in PER_EXCHANGE_FEATURES if f in features]
    if own and "log_volume" in features:
        found.append((index(own), features.index("log_volume"), None))
    means = [i for i, f in enumerate(features) if f.startswith("mean_")]
    if means and "log_member_volume" in features and "group_size" in features:
        found.append((index(means), features.index("log_member_volume"),
                      features.index("group_size")))
    return tuple(found)


def standardise(x: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                features: tuple[str, ...] = ()) -> np.ndarray:
    """Standardised features, clipped at Z_CLIP. Given the feature names, the means per
    exchange are weighed by how many exchanges they were measured on
    (:data:`PER_EXCHANGE_FEATURES`): an account's own by its volume, its community's
    members' means by the community's (three colleagues of one exchange each are three
    exchanges of evidence, a campaign of forty accounts of fifty each two thousand)."""
    z = np.asarray(np.clip((x - mean) / scale, -Z_CLIP, Z_CLIP), dtype=float)
    for columns, volume, group_size in _weighed_columns(features):
        count = np.expm1(x[..., volume])
        if group_size is not None:
            # group_size is 1 - 1/size, log_member_volume log1p(exchanges per member);
            # a singleton's community row is all zeros, so no evidence.
            members = 1.0 / np.maximum(1.0 - x[..., group_size], 1e-9)
            count = members * count
        z[..., columns] *= (count / (count + OWN_EVIDENCE_PRIOR))[..., None]
    return z


@dataclass(slots=True)
class Model:
    """Standardise (clipped), then logistic: ``risk = 1 / (1 + exp(-(w . z + b)))``."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    # The feature names (FEATURES or COMMUNITY_FEATURES): with them the per-exchange
    # features are weighed by volume as :func:`standardise` says.
    features: tuple[str, ...] = ()

    def margins(self, x: np.ndarray) -> np.ndarray:
        z = standardise(x, self.mean, self.scale, self.features)
        return np.asarray(z @ self.coef + self.intercept, dtype=float)

    def risk(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(self.margins(x), -40, 40))))

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Each feature's share of the margin for one row (positive: towards attack)."""
        return np.asarray(standardise(x, self.mean, self.scale, self.features) * self.coef,
                          dtype=float)
