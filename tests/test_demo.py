"""``distillguard demo``, the README's first command, end to end on embedded defaults."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from distillguard.cli import main

pytestmark = pytest.mark.slow


def test_demo_runs_every_part_on_embedded_defaults(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--dir", str(folder), "--minutes", "0.1"])
    assert result.exit_code == 0, result.output
    out = result.output
    # Simulated campaigns went through the gateway and were detected and scored.
    assert "statuses through the gateway, by population" in out
    assert "campaign type" in out and "all benign" in out
    verdicts = orjson.loads((folder / "verdicts.json").read_bytes())
    assert verdicts["version"] == 1 and verdicts["campaigns"]
    assert (folder / "detection-report.png").read_bytes()[:4] == b"\x89PNG"
    # Policy acted on the verdicts and enforced the jurisdiction rule.
    assert "x-ratelimit-limit-requests 10 (throttled" in out
    assert "embargoed country (2.176.0.1): HTTP 403, x-should-retry false" in out
    # Indicators were exported as STIX 2.1, and the ledger verifies.
    bundle = orjson.loads((folder / "campaigns.stix.json").read_bytes())
    assert bundle["type"] == "bundle"
    assert any(o["type"] == "indicator" for o in bundle["objects"])
    assert "full verification: ok" in out
    assert (folder / "proof.json").exists() and (folder / "ledger.pub").exists()
