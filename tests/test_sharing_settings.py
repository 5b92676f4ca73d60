"""The sharing settings section: validated at start-up, with messages naming the option."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from distillguard.errors import ConfigError
from distillguard.sharing import component
from distillguard.sharing.settings import Action, parse_sharing_settings
from tests import sharingworld as world
from tests.factories import make_settings


@pytest.mark.parametrize(("section", "message"), [
    ({"action": "drop"}, "sharing.action"),
    ({"actions": {"email": "block"}}, "unknown indicator kinds"),
    ({"tlp": "purple"}, "sharing.tlp"),
    ({"partners": {"a": {"read": ["nope"]}}}, "sharing.partners.a: unknown collection 'nope'"),
    ({"partners": {"a": {"token": "short"}}}, "sharing.partners.a.token"),
    ({"taxii": {"collections": [{"id": "not-a-uuid"}]}}, "is not a UUID"),
    ({"surprise": 1}, "sharing.surprise"),
])
def test_bad_settings_fail_at_start_up(tmp_path: Path, section: dict[str, object],
                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        component(make_settings(tmp_path, sharing=section))


def test_component_parts_and_switching_off(tmp_path: Path) -> None:
    extension = component(make_settings(tmp_path, sharing=world.sharing_section()))
    assert extension is not None
    assert [c.name for c in extension.checks] == ["sharing"]
    assert [s.name for s in extension.stages] == ["sharing-matches"]
    assert extension.admin_routes  # TAXII, since partners are configured
    bare = component(make_settings(tmp_path))
    assert bare is not None and not bare.admin_routes
    assert component(make_settings(tmp_path, sharing={"enabled": False})) is None


def test_partner_secrets_and_actions() -> None:
    secret = "a-partner-secret-0001"
    options = parse_sharing_settings({
        "action": "flag", "actions": {"ip": "block"},
        "partners": {"a": {"token_sha256": hashlib.sha256(secret.encode()).hexdigest()},
                     "b": {"token": "b-partner-secret-0001"}}})
    assert options.partners["a"].accepts(secret)
    assert not options.partners["a"].accepts(secret + "x")
    assert options.partners["b"].accepts("b-partner-secret-0001")
    assert options.action_for("ip") is Action.BLOCK
    assert options.action_for("asn") is Action.FLAG
