"""Settings: file, environment, validation, and the documented reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distillguard.config import Settings, load_settings
from distillguard.errors import ConfigError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  base_url: http://a/v1\n  timeout_s: 10\n")
    s = load_settings(path, environ={"DISTILLGUARD_UPSTREAM__TIMEOUT_S": "3",
                                     "DISTILLGUARD_ADMIN_TOKEN": "t" * 16,
                                     "DISTILLGUARD_SERVER__TRUSTED_PROXIES": '["10.0.0.0/8"]'})
    assert s.upstream.base_url == "http://a/v1" and s.upstream.timeout_s == 3
    assert s.admin.token == "t" * 16 and s.server.trusted_proxies == ["10.0.0.0/8"]


@pytest.mark.parametrize("text,problem", [
    ("server:\n  trusted_proxies: [nonsense]\n", "server.trusted_proxies"),
    ("state:\n  url: mysql://x\n", "state.url"),
    ("counters:\n  backend: memcached\n", "counters.backend"),
    ("server:\n  prot: 1\n", "server.prot"),
    ("- a list\n", "mapping"),
    ("admin:\n  token: short\n", "admin.token"),
])
def test_bad_settings_fail_at_start_with_the_option_named(tmp_path: Path, text: str,
                                                           problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(path, environ={})


def test_every_core_option_is_documented() -> None:
    text = DOCS.read_text()
    for section, model in Settings.model_fields.items():
        if section == "extensions":
            continue
        sub = model.annotation
        for option in sub.model_fields:  # type: ignore[union-attr]
            assert f"`{section}.{option}`" in text, f"{section}.{option} missing from docs"


def test_a_default_tier_without_limits_is_refused(tmp_path: Path) -> None:
    """``limits.tiers`` replaces the default tiers. Given without the default tier (the
    reference's own example listed only ``unverified``), every account of a tier without an
    entry, ``standard`` included, was served without any limit."""
    path = tmp_path / "c.yaml"
    path.write_text("limits:\n  tiers:\n    unverified: {requests_per_minute: 60}\n")
    with pytest.raises(ConfigError, match=r"limits\.default_tier: .*'standard'"):
        load_settings(path, environ={})
    path.write_text("limits:\n  default_tier: unverified\n"
                    "  tiers:\n    unverified: {requests_per_minute: 60}\n")
    settings = load_settings(path, environ={})
    assert settings.limits_for_tier("standard").requests_per_minute == 60


def test_the_reference_example_is_valid() -> None:
    """The example settings file at the top of the reference loads as it is."""
    import yaml

    example = DOCS.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    settings = load_settings(overrides=yaml.safe_load(example), environ={})
    assert settings.limits.default_tier in settings.limits.tiers
