"""The ``ledger:`` section: defaults, validation at start-up, documentation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distillguard.errors import ConfigError
from distillguard.ledger.settings import LedgerSection, parse_settings
from distillguard.ledger.stage import component
from tests.factories import make_settings

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_defaults_next_to_the_state_store(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings.extensions.pop("ledger")
    config = parse_settings(settings)
    assert config.url == f"sqlite:///{tmp_path / 'state-ledger' / 'ledger.sqlite'}"
    assert config.key_path == tmp_path / "state-ledger" / "ledger.key"
    assert config.durability == "fsync" and config.enabled
    extension = component(settings)
    assert extension is not None and [s.name for s in extension.stages] == ["ledger"]
    assert getattr(extension.stages[0], "inline", False)


def test_switched_off(tmp_path: Path) -> None:
    assert component(make_settings(tmp_path, ledger={"enabled": False})) is None


@pytest.mark.parametrize("section,problem", [
    ({"durability": "never"}, "ledger.durability"),
    ({"url": "mysql://x"}, "ledger.url"),
    ({"origin": "has space"}, "ledger.origin"),
    ({"max_batch": 0}, "ledger.max_batch"),
    ({"bogus": 1}, "ledger.bogus"),
])
def test_bad_settings_fail_at_start(tmp_path: Path, section: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        component(make_settings(tmp_path, ledger=section))


def test_every_option_is_documented() -> None:
    reference = (DOCS / "configuration.md").read_text()
    guide = (DOCS / "ledger.md").read_text()
    for option in LedgerSection.model_fields:
        assert f"`ledger.{option}`" in reference, option
        assert f"`ledger.{option}`" in guide, option
