"""The policy component's factory and its settings section.

```yaml
policy:
  enabled: true
  file: /etc/distillguard/policy.yaml   # the policy file (docs/policy.md); none = defaults
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from distillguard.config import validate_section
from distillguard.errors import ConfigError

if TYPE_CHECKING:
    from distillguard.components import StatusKeeper
    from distillguard.config import Settings
    from distillguard.serve import Extension
    from distillguard.store import Account, StateStore
    from distillguard.store.models import AccountImport


class PolicySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    file: str | None = None


def parse_settings(raw: Any) -> PolicySettings:
    return validate_section(PolicySettings, raw, "policy")


def policy_tiers(settings: Settings) -> list[str]:
    """The policy file's ``tier_order`` (for :func:`distillguard.components.known_tiers`);
    none when the component is off. A file that does not load names no tiers here: its
    own errors are reported where it is used (start-up, ``policy check``)."""
    from distillguard.policy.document import load_document

    try:
        ps = parse_settings(settings.extensions.get("policy"))
        return load_document(ps.file).tier_order if ps.enabled else []
    except ConfigError:
        return []


def status_keeper(settings: Settings) -> StatusKeeper | None:
    """For :data:`distillguard.components.STATUS_KEEPERS`: the action ladder keeps an
    account's status when the component is on and its suspensions set the status
    (``actions.suspend_sets_account_status``), as the running policy says (the process's
    :func:`~distillguard.policy.compiled.shared_holder`, read from the file in a command)."""
    from distillguard.policy.compiled import shared_holder

    ps = parse_settings(settings.extensions.get("policy"))
    if not ps.enabled or not \
            shared_holder(ps.file).current.document.actions.suspend_sets_account_status:
        return None
    return LADDER_KEEPS_STATUS


class LadderKeepsStatus:
    """A :class:`~distillguard.components.StatusKeeper`: the status by hand on the ladder
    (:func:`distillguard.policy.byhand.create_account`,
    :func:`~distillguard.policy.byhand.update_account` and
    :func:`~distillguard.policy.byhand.import_accounts`)."""

    async def create_account(self, store: StateStore, account: Account, *, actor: str,
                             reason: str | None, channel: str) -> None:
        from distillguard.policy.byhand import create_account

        await create_account(store.engine,  # type: ignore[attr-defined]
                             account, by=actor, reason=reason, event_source=channel)

    async def update_account(self, store: StateStore, account_id: str,
                             changes: dict[str, Any], *, actor: str, reason: str | None,
                             channel: str) -> None:
        from distillguard.policy.byhand import update_account

        await update_account(store.engine,  # type: ignore[attr-defined]
                             account_id, changes, by=actor, reason=reason,
                             event_source=channel)

    async def import_accounts(self, store: StateStore, batch: AccountImport, *, actor: str,
                              reason: str | None, channel: str) -> dict[str, int]:
        from distillguard.policy.byhand import import_accounts

        return await import_accounts(store.engine,  # type: ignore[attr-defined]
                                     batch, by=actor, reason=reason, event_source=channel)


LADDER_KEEPS_STATUS = LadderKeepsStatus()


def component(settings: Settings) -> Extension | None:
    """Factory for :data:`distillguard.components.DEFAULT_COMPONENTS`; validates the
    policy file now, so a bad file stops start-up with an error naming the option."""
    from distillguard.policy.admin import PolicyAdmin
    from distillguard.policy.check import PolicyCheck
    from distillguard.policy.compiled import shared_holder
    from distillguard.policy.limits import PolicyLimiter
    from distillguard.policy.runtime import PolicyRuntime
    from distillguard.ratelimit import open_counter_store
    from distillguard.serve import Extension

    ps = parse_settings(settings.extensions.get("policy"))
    if not ps.enabled:
        return None
    holder = shared_holder(ps.file)
    runtime = PolicyRuntime(settings, holder)
    check = PolicyCheck(holder, runtime.actions, runtime.denials, runtime)
    limiter = PolicyLimiter(settings, open_counter_store(settings.counters), holder,
                            runtime.actions, runtime.denials)
    extension = Extension(checks=[check, limiter], stages=[limiter],
                          admin_routes=PolicyAdmin(settings, runtime).routes(),
                          on_accounts_changed=[runtime.refresh_actions])
    extension.runtime = runtime  # type: ignore[attr-defined]
    return extension
