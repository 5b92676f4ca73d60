"""The ``countermeasures`` settings section, validated at start-up.

```yaml
countermeasures:
  enabled: true
  reasoning:
    default: strip              # pass | summarise | strip, for tiers not listed below
    tiers: {trusted: pass, verified: summarise}
    summary_words: 40
    leak_action: flag           # off | flag | annotate | strip
    leak_threshold: 0.6         # share of an answer unit's trigrams found in the reasoning
  fingerprint:
    enabled: true               # active only with a secret
    secret: null                # >= 16 characters; or set the variable named by secret_env
    secret_env: DISTILLGUARD_FINGERPRINT_SECRET
    tiers: [unverified, standard, verified]
    global_share: 0.5           # share of slots carrying the model-wide (global) mark
```
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distillguard.config import validate_section
from distillguard.countermeasures.reasoning import LeakAction, ReasoningMode
from distillguard.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _default_reasoning_tiers() -> dict[str, ReasoningMode]:
    return {"trusted": ReasoningMode.PASS, "verified": ReasoningMode.SUMMARISE}


class ReasoningSettings(_Section):
    default: ReasoningMode = ReasoningMode.STRIP
    tiers: dict[str, ReasoningMode] = Field(default_factory=_default_reasoning_tiers)
    summary_words: int = Field(40, ge=5, le=500)
    leak_action: LeakAction = LeakAction.FLAG
    leak_threshold: float = Field(0.6, gt=0.0, le=1.0)

    def mode_for(self, tier: str | None) -> ReasoningMode:
        return self.tiers.get(tier or "", self.default)


class FingerprintSettings(_Section):
    enabled: bool = True
    secret: str | None = Field(None, min_length=16)
    secret_env: str = "DISTILLGUARD_FINGERPRINT_SECRET"
    tiers: list[str] = Field(default_factory=lambda: ["unverified", "standard", "verified"])
    global_share: float = Field(0.5, ge=0.0, le=1.0)

    def resolved_secret(self, environ: dict[str, str] | None = None) -> str | None:
        if self.secret:
            return self.secret
        value = (os.environ if environ is None else environ).get(self.secret_env)
        if value is not None and len(value) < 16:
            raise ConfigError(f"countermeasures.fingerprint: the secret in {self.secret_env} "
                              "must be at least 16 characters")
        return value or None


class CountermeasuresSettings(_Section):
    enabled: bool = True
    reasoning: ReasoningSettings = Field(default_factory=ReasoningSettings)
    fingerprint: FingerprintSettings = Field(default_factory=FingerprintSettings)


def parse_settings(raw: Any) -> CountermeasuresSettings:
    return validate_section(CountermeasuresSettings, raw, "countermeasures")
