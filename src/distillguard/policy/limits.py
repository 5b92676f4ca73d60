"""Throttling: tighter limits for throttled accounts and for tiers the policy limits.

:class:`PolicyLimiter` is the gateway's own :class:`~distillguard.ratelimit.RateLimiter`
with different limit sets, so it counts on the same counter store (in-process or Redis,
shared by every replica), answers with the same 429 body and ``x-ratelimit-*`` headers,
and charges tokens the same way (as an inline stage). Its counters are separate
(``throttle:<account>:...`` and ``policytier:<account>:...``): they apply on top of the
tier's ordinary limits, so the effective limit is the tighter of the two. Limits of a
``throttle`` action come from the action's ``detail.limits`` if an analyst set them, else
``actions.throttle.limits`` in the policy file; under several throttles at once, each
limit is the lowest of theirs (:func:`tightest`).

A throttled client is rate limited, not blocked: the 429 carries ``Retry-After`` and
clients may retry after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distillguard.config import LimitSet, Settings
from distillguard.exchange import Exchange
from distillguard.pipeline import Decision, Denied
from distillguard.policy.actions import ActiveActions
from distillguard.policy.audit import DenialAggregator
from distillguard.policy.check import _now
from distillguard.ratelimit import CounterStore, RateLimiter

if TYPE_CHECKING:
    from distillguard.auth import Principal
    from distillguard.policy.compiled import PolicyHolder


class _Limits(dict[str, int | None]):
    """A limit set readable both as a mapping and by attribute, as the rate limiter's
    ``_requests`` reads it."""

    def __init__(self, limits: dict[str, int | None]) -> None:
        super().__init__(limits)

    def __getattr__(self, name: str) -> int | None:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def tightest(limit_sets: list[LimitSet]) -> dict[str, int | None]:
    """Each limit at its lowest over ``limit_sets`` (None: no set has it). An account under
    several throttles at once (from verdicts, and from an analyst with limits of their
    own) was held to whichever its replica happened to list first."""
    out: dict[str, int | None] = {}
    for limits in limit_sets:
        for name, value in limits.model_dump().items():
            if value is not None and (out.get(name) is None or value < out[name]):
                out[name] = value
            else:
                out.setdefault(name, None)
    return out


class PolicyLimiter(RateLimiter):
    name = "policy-limits"
    inline = True

    def __init__(self, settings: Settings, counters: CounterStore, holder: PolicyHolder,
                 actions: ActiveActions, denials: DenialAggregator) -> None:
        super().__init__(settings, counters)
        self.holder = holder
        self.actions = actions
        self.denials = denials
        self._closed = False

    async def close(self) -> None:
        """The pipeline closes checks and stages; this is both, so close once."""
        if not self._closed:
            self._closed = True
            await self.counters.close()

    def _limit_sets(self, principal: Principal) -> list[tuple[str, str, Any]]:
        account = principal.account
        policy = self.holder.current
        sets: list[tuple[str, str, Any]] = []
        tier = policy.tier(account.tier)
        if tier is not None and tier.limits is not None:
            sets.append(("policytier", account.account_id,
                         _Limits(tier.limits.model_dump())))
        throttles: list[LimitSet] = []
        for item in self.actions.for_account(account.account_id, _now()):
            if item.action == "throttle":
                custom = item.detail.get("limits")
                throttles.append(LimitSet(**custom) if isinstance(custom, dict)
                                 else policy.document.actions.throttle.limits)
        if throttles:
            sets.append(("throttle", account.account_id, _Limits(tightest(throttles))))
        return sets

    async def check(self, exchange: Exchange) -> Decision:
        decision = await super().check(exchange)
        if isinstance(decision, Denied):
            scope = str(exchange.annotations.get("ratelimited", "throttle")).split(":")[0]
            reason = decision.reason
            if scope == "throttle":
                reason = reason.replace("on this throttle", "on this account (temporarily "
                                        "reduced limits)")
            elif scope == "policytier":
                reason = reason.replace("on this policytier", "for this account's tier")
            decision = Denied(reason=reason, code=decision.code, status=429, retry=True,
                              retry_after_s=decision.retry_after_s, headers=decision.headers)
            self.denials.note(account_id=exchange.account_id, rule=f"limits:{scope}",
                              code=decision.code, reason=reason, model=exchange.model,
                              client_ip=exchange.client_ip)
        return decision
