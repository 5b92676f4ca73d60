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
    from distillguard.config import Settings
    from distillguard.serve import Extension


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
                          admin_routes=PolicyAdmin(settings, runtime).routes())
    extension.runtime = runtime  # type: ignore[attr-defined]
    return extension
