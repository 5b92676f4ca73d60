"""The policy file: its schema (version 1), validation with errors that name the option,
and loading. :mod:`distillguard.policy.compiled` turns a validated document into the
immutable value the request check reads. The format is documented in docs/policy.md.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

import pycountry
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distillguard.config import LimitSet
from distillguard.errors import ConfigError

POLICY_VERSION = 1
LADDER = ("flag", "throttle", "require_verification", "degrade", "suspend")
ReasoningLevel = Literal["pass", "summarise", "strip"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


# The longest duration taken: a key's expiry is bounded alike (36,500 days). Far longer
# ones ("99999999999d") overflowed the expiry date: a 500 from the admin API.
MAX_DURATION_S = 36_500 * 86_400.0


def parse_duration(value: Any) -> float | None:
    """``90``, ``"45s"``, ``"30m"``, ``"24h"``, ``"7d"``, ``"2w"`` -> seconds; None = never."""
    if value is None or value == "never":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a duration (use 45s, 30m, 24h, 7d or never)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds != seconds:     # NaN, as YAML's .nan
        raise ValueError(f"{value!r} is not a duration (use 45s, 30m, 24h, 7d or never)")
    if seconds <= 0:
        raise ValueError("a duration must be positive (or 'never')")
    if seconds > MAX_DURATION_S:           # longer ones overflowed the expiry date
        raise ValueError(f"{value!r} is longer than 100 years; use 'never' for an action "
                         "that does not expire")
    return seconds


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ISO 3166-1 alpha-2 (pycountry's copy of the standard), and XK, which the geo-IP
# databases give Kosovo. Other two letters were taken and never matched: "UK" (the
# databases say GB) left the United Kingdom out of a rule that named it.
COUNTRY_CODES = frozenset(c.alpha_2 for c in pycountry.countries) | {"XK"}
_NOT_CODES = {"UK": "the United Kingdom is GB", "EL": "Greece is GR",
              "EU": "the European Union is no country; list its members' codes"}


def _countries(value: list[str]) -> list[str]:
    out = []
    for code in value:
        if not isinstance(code, str) or not re.fullmatch(r"[A-Za-z]{2}", code):
            raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 country code")
        upper = code.upper()
        if upper not in COUNTRY_CODES:
            hint = _NOT_CODES.get(upper, "no country has it")
            raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 country code ({hint})")
        out.append(upper)
    return out


def _cidrs(value: list[str]) -> list[str]:
    for item in value:
        try:
            ipaddress.ip_network(str(item).strip(), strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return value


class Messages(_Model):
    contact: str = "your account manager"
    verification_url: str | None = None


class TierPolicy(_Model):
    models: list[str] | None = None          # glob patterns; None = every model
    reasoning: ReasoningLevel | None = None  # capability: what of the reasoning is shown
    limits: LimitSet | None = None           # tighter limits for this tier (added counters)


class Networks(_Model):
    hosting_cidrs: list[str] = Field(default_factory=list)
    anonymizer_cidrs: list[str] = Field(default_factory=list)
    anonymizer_files: list[str] = Field(default_factory=list)
    maxmind_country_db: str | None = None
    maxmind_asn_db: str | None = None
    maxmind_anonymous_db: str | None = None

    # Checked here: the hosting networks were parsed only when the geo-IP database
    # opened, so a bad one passed `policy check` and failed the start or a reload.
    _nets = field_validator("hosting_cidrs", "anonymizer_cidrs")(
        classmethod(lambda cls, v: _cidrs(v)))


class Condition(_Model):
    """Every field given must hold for the rule to match (an empty condition always does)."""

    model: list[str] | None = None
    endpoint: list[str] | None = None
    country: list[str] | None = None             # client IP country or declared country
    country_not: list[str] | None = None
    ip_country: list[str] | None = None
    ip_country_not: list[str] | None = None
    declared_country: list[str] | None = None
    declared_country_not: list[str] | None = None
    # a public client address the geo-IP database cannot place (true), or can (false)
    ip_country_unknown: bool | None = None
    hosting: bool | None = None
    anonymizer: bool | None = None
    networks: list[str] | None = None
    asn_name: list[str] | None = None             # case-insensitive substrings
    tier: list[str] | None = None

    _codes = field_validator("country", "country_not", "ip_country", "ip_country_not",
                             "declared_country", "declared_country_not")(
        classmethod(lambda cls, v: None if v is None else _countries(v)))


class DegradeSpec(_Model):
    reasoning: Literal["summarise", "strip"] = "strip"
    fingerprint: bool = True


class Rule(_Model):
    name: str = Field(min_length=1)
    when: Condition = Field(default_factory=Condition)
    deny: str | None = None                  # message shown to the client
    require_tier: str | None = None
    degrade: DegradeSpec | None = None

    def effect(self) -> str:
        given = [n for n in ("deny", "require_tier", "degrade") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of deny, require_tier or degrade")
        return given[0]


class ThrottleSpec(_Model):
    limits: LimitSet = Field(default_factory=lambda: LimitSet(
        requests_per_minute=10, tokens_per_minute=10_000, tokens_per_day=200_000))


class ActionSettings(_Model):
    default_expiry: str | float | None = "7d"
    throttle: ThrottleSpec = Field(default_factory=ThrottleSpec)
    degrade: DegradeSpec = Field(default_factory=DegradeSpec)
    verification_tier: str = "verified"
    suspend_sets_account_status: bool = True

    _expiry = field_validator("default_expiry")(
        classmethod(lambda cls, v: (parse_duration(v), v)[1]))


class VerdictCondition(_Model):
    risk_at_least: float | None = Field(None, ge=0.0, le=1.0)
    flagged: bool | None = None
    in_campaign: bool | None = None
    campaign_status: list[str] | None = None   # campaign rules only
    campaign_risk_at_least: float | None = Field(None, ge=0.0, le=1.0)


class VerdictRule(_Model):
    name: str = Field(min_length=1)
    when: VerdictCondition = Field(default_factory=VerdictCondition)
    action: Literal["flag", "throttle", "require_verification", "degrade", "suspend",
                    "review"]
    propose: Literal["flag", "throttle", "require_verification", "degrade",
                     "suspend"] | None = None      # for action: review
    expires_in: str | float | None = "default"

    @field_validator("expires_in")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        if v != "default":
            parse_duration(v)
        return v


def _default_verdict_rules() -> list[VerdictRule]:
    return [
        VerdictRule(name="flagged-accounts", when=VerdictCondition(flagged=True),
                    action="flag"),
        VerdictRule(name="high-risk-review", when=VerdictCondition(risk_at_least=0.9),
                    action="review", propose="suspend"),
    ]


class VerdictSettings(_Model):
    enabled: bool = True
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    rules: list[VerdictRule] = Field(default_factory=_default_verdict_rules)


class ScreeningSettings(_Model):
    lists: list[str] = Field(default_factory=list)
    threshold: float = Field(90.0, ge=50.0, le=100.0)
    fields: list[str] = Field(default_factory=lambda: ["org", "name", "legal_name"])
    interval_s: float = Field(300.0, gt=0)
    propose: Literal["flag", "throttle", "require_verification", "degrade",
                     "suspend"] | None = "suspend"


class AuditSettings(_Model):
    flush_interval_s: float = Field(5.0, gt=0, le=300)


class PolicyDocument(_Model):
    version: Literal[1] = 1
    messages: Messages = Field(default_factory=Messages)
    tier_order: list[str] = Field(
        default_factory=lambda: ["unverified", "standard", "verified", "trusted"])
    tiers: dict[str, TierPolicy] = Field(default_factory=dict)
    networks: Networks = Field(default_factory=Networks)
    rules: list[Rule] = Field(default_factory=list)
    actions: ActionSettings = Field(default_factory=ActionSettings)
    verdicts: VerdictSettings = Field(default_factory=VerdictSettings)
    screening: ScreeningSettings = Field(default_factory=ScreeningSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    refresh_s: float = Field(1.0, gt=0, le=60)

    def cross_check(self) -> list[str]:
        """Problems pydantic cannot see: references between sections."""
        problems = []
        known = set(self.tier_order)
        if len(known) != len(self.tier_order):
            problems.append("tier_order: a tier is listed twice")
        for name in self.tiers:
            if name not in known:
                problems.append(f"tiers.{name}: not in tier_order {self.tier_order}")
        if self.actions.verification_tier not in known:
            problems.append(f"actions.verification_tier: unknown tier "
                            f"{self.actions.verification_tier!r} (tier_order: "
                            f"{', '.join(self.tier_order)})")
        names = set()
        for i, rule in enumerate(self.rules):
            where = f"rules.{i} ({rule.name})"
            if rule.name in names:
                problems.append(f"{where}: duplicate rule name")
            names.add(rule.name)
            try:
                rule.effect()
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
            if rule.require_tier is not None and rule.require_tier not in known:
                problems.append(f"{where}.require_tier: unknown tier {rule.require_tier!r} "
                                f"(tier_order: {', '.join(self.tier_order)})")
            for t in rule.when.tier or []:
                if t not in known:
                    problems.append(f"{where}.when.tier: unknown tier {t!r}")
        for i, vr in enumerate(self.verdicts.rules):
            if vr.action == "review" and vr.propose is None:
                problems.append(f"verdicts.rules.{i} ({vr.name}): action review needs "
                                "'propose' (the action an analyst confirms)")
        return problems


def parse_document(data: Any, origin: str = "policy") -> PolicyDocument:
    """Validate a parsed policy mapping; raises ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the policy file must hold a mapping at top level")
    try:
        doc = PolicyDocument.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"  {where}: {msg}")
        raise ConfigError(f"{origin}: invalid policy:\n" + "\n".join(problems)) from None
    problems = doc.cross_check()
    if problems:
        raise ConfigError(f"{origin}: invalid policy:\n" +
                          "\n".join("  " + p for p in problems))
    return doc


def load_document(path: str | Path | None) -> PolicyDocument:
    """Read and validate the policy file (YAML or JSON); ``None`` gives the defaults."""
    if path is None:
        return PolicyDocument()
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"policy.file: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy file {path} is not valid YAML: {exc}") from None
    if raw is None:
        # A file caught empty (an editor or a deployment truncating it before writing it
        # again) was read as the defaults, and a reload then dropped every rule.
        raise ConfigError(f"policy file {path} is empty; write 'version: 1' for the "
                          "defaults, or leave policy.file unset") from None
    return parse_document(raw, f"policy file {path}")
