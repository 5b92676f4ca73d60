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
