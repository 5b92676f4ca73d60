"""The request check that enforces the policy, from memory only.

Order, first refusal wins:

1. ``suspend`` action active: 403 ``account_suspended``.
2. ``require_verification`` active and the account's tier below
   ``actions.verification_tier``: 403 ``verification_required``.
3. The tier's model list (``tiers.<tier>.models``): 403 ``model_not_permitted``.
4. Jurisdiction rules in file order: 403 ``access_denied`` (deny) or ``tier_required``.

Allowed requests collect what shapes the answer: ``degrade`` (action, rules, the tier's
``reasoning`` capability) sets ``exchange.annotations["degrade"] = {"reasoning":
"strip"|"summarise", "fingerprint": bool}``, which the countermeasures response filter
applies. Throttling is :class:`distillguard.policy.limits.PolicyLimiter`, the next check.

Refusals are blocks, not rate limits: status 403 with ``x-should-retry: false`` so the
official clients do not retry, and a message that says what to do. Each one is counted
by the audit aggregator (``policy:request:deny``). What was decided is kept in
``exchange.annotations["policy"]``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from distillguard.exchange import Exchange
from distillguard.pipeline import Allowed, Decision, Denied
from distillguard.policy.actions import Action, ActiveActions
from distillguard.policy.audit import DenialAggregator
from distillguard.policy.jurisdiction import CompiledRule, deny_message
from distillguard.policy.schema import now_ts

if TYPE_CHECKING:
    from distillguard.policy.compiled import CompiledPolicy, PolicyHolder
    from distillguard.policy.runtime import PolicyRuntime

_REASONING_RANK = {"pass": 0, "summarise": 1, "strip": 2}
_clock: list[Any] = [0.0, ""]


def _now() -> str:
    """The current time as an action timestamp, formatted at most every 10 ms (formatting
    costs more than the rest of a typical check)."""
    tick = time.monotonic()
    if tick - _clock[0] > 0.01:
        _clock[0], _clock[1] = tick, now_ts()
    return str(_clock[1])


def _stricter(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if _REASONING_RANK[a] >= _REASONING_RANK[b] else b


class PolicyCheck:
    name = "policy"

    def __init__(self, holder: PolicyHolder, actions: ActiveActions,
                 denials: DenialAggregator, runtime: PolicyRuntime | None = None) -> None:
        self.holder = holder
        self.actions = actions
        self.denials = denials
        self.runtime = runtime
        self.denied = 0

    async def start(self) -> None:
        if self.runtime is not None:
            await self.runtime.start()

    async def close(self) -> None:
        if self.runtime is not None:
            await self.runtime.close()

    def _deny(self, exchange: Exchange, *, rule: str, code: str, message: str,
              notes: dict[str, Any]) -> Denied:
        self.denied += 1
        notes["denied"] = {"rule": rule, "code": code}
        exchange.annotations["policy"] = notes
        self.denials.note(account_id=exchange.account_id, rule=rule, code=code,
                          reason=message, model=exchange.model, client_ip=exchange.client_ip)
        return Denied(reason=message, code=code, status=403, retry=False)

    def visible_models(self, principal: Any, models: list[dict[str, Any]]
                       ) -> list[dict[str, Any]]:
        """Hide the models the account's tier may not call (``tiers.<tier>.models``)."""
        account = getattr(principal, "account", None)
        tier_policy = self.holder.current.tier(account.tier if account is not None else "")
        if tier_policy is None or tier_policy.models is None:
            return models
        return [m for m in models if tier_policy.models.fullmatch(str(m.get("id", "")))]

    async def check(self, exchange: Exchange) -> Decision:
        principal = exchange.principal
        if principal is None:
            return Allowed()
        return self.decide(exchange, self.holder.current)

    def decide(self, exchange: Exchange, policy: CompiledPolicy) -> Decision:
        account = exchange.principal.account if exchange.principal else None
        tier = account.tier if account is not None else ""
        active = self.actions.for_account(exchange.account_id, _now())
        by_kind: dict[str, Action] = {}
        for item in active:   # of several of a kind, the one that lasts longest
            held = by_kind.get(item.action)
            if held is None or (held.expires_at is not None and (
                    item.expires_at is None or item.expires_at > held.expires_at)):
                by_kind[item.action] = item
        notes: dict[str, Any] = {"tier": tier, "actions": sorted(by_kind)}
        contact = policy.contact
        suspended = by_kind.get("suspend")
        if suspended is not None:
            until = f" until {suspended.expires_at[:16].replace('T', ' ')} UTC" \
                if suspended.expires_at else ""
            return self._deny(exchange, rule="action:suspend", code="account_suspended",
                              notes=notes, message=(
                                  f"This account is suspended{until} following a review of "
                                  f"its usage. If you believe this is a mistake, contact "
                                  f"{contact} quoting reference {suspended.action_id}."))
        verify = by_kind.get("require_verification")
        needed = policy.document.actions.verification_tier
        if verify is not None and policy.rank(tier) < policy.rank(needed):
            how = (f"Complete verification at {policy.verification_url}" if
                   policy.verification_url else f"Contact {contact} to verify your identity")
            return self._deny(exchange, rule="action:require_verification",
                              code="verification_required", notes=notes, message=(
                                  f"This account must be verified before it can continue. "
                                  f"{how}; quote reference {verify.action_id}."))
        model = exchange.model or ""
        tier_policy = policy.tier(tier)
        if tier_policy is not None and tier_policy.models is not None \
                and not tier_policy.models.fullmatch(model):
            upgrade = (f"verify your account at {policy.verification_url}" if
                       policy.verification_url else f"contact {contact}")
            return self._deny(exchange, rule=f"tier:{tier}", code="model_not_permitted",
                              notes=notes, message=(
                                  f"The model '{model}' is not available to {tier} accounts. "
                                  f"To use it, {upgrade} to move to a higher tier."))
        outcome = None
        if policy.rules:
            outcome, facts = policy.judge(model, exchange.endpoint, tier,
                                          account.country if account else None,
                                          exchange.client_ip)
            if outcome.denied_by is not None:
                rule = outcome.denied_by
                code = "tier_required" if rule.effect == "require_tier" else "access_denied"
                return self._deny(exchange, rule=f"rule:{rule.name}", code=code, notes=notes,
                                  message=deny_message(rule, facts, contact,
                                                       policy.verification_url))
        reasons = _degrade(exchange, policy, tier_policy.reasoning if tier_policy else None,
                           by_kind.get("degrade"), outcome.degrade if outcome else ())
        if reasons is not None:
            notes["degrade"] = reasons or [f"tier:{tier}"]
        if "flag" in by_kind:
            notes["flagged"] = by_kind["flag"].action_id
        exchange.annotations["policy"] = notes
        return Allowed()


def _degrade(exchange: Exchange, policy: CompiledPolicy, tier_reasoning: str | None,
             action: Action | None, rules: tuple[CompiledRule, ...]) -> list[str] | None:
    """Combine the tier's reasoning capability, a degrade action and degrade rules (the
    strictest wins) into ``exchange.annotations["degrade"]``; returns the reasons, or None
    when the answer passes untouched."""
    reasoning = None if tier_reasoning == "pass" else tier_reasoning
    fingerprint = False
    reasons = []
    specs: list[tuple[str, dict[str, Any]]] = []
    if action is not None:
        specs.append(("action:degrade", action.detail.get("degrade")
                      or policy.document.actions.degrade.model_dump()))
    specs += [(f"rule:{rule.name}", rule.degrade or {}) for rule in rules]
    for why, spec in specs:
        reasoning = _stricter(reasoning, spec.get("reasoning", "strip"))
        fingerprint = fingerprint or bool(spec.get("fingerprint", True))
        reasons.append(why)
    if reasoning is None and not fingerprint:
        return None
    current = exchange.annotations.get("degrade")
    if isinstance(current, dict):
        reasoning = _stricter(reasoning, current.get("reasoning"))
        fingerprint = fingerprint or bool(current.get("fingerprint"))
    exchange.annotations["degrade"] = {"reasoning": reasoning or "pass",
                                       "fingerprint": fingerprint}
    return reasons

