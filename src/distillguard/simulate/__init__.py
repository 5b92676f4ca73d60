"""Realistic multi-day API traffic with ground truth, for measuring detection.

``simulate(out_dir, preset="smoke", seed=0)`` writes ``trace.jsonl``, ``accounts.jsonl``
and ``labels.jsonl`` (formats in docs/formats.md and docs/simulator.md) and returns the
three paths. Same preset, seed, scale and days give byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

from distillguard.simulate.campaigns import CAMPAIGN_TYPES
from distillguard.simulate.engine import SimulationResult, run
from distillguard.simulate.presets import PRESETS
from distillguard.simulate.world import Label

__all__ = ["CAMPAIGN_TYPES", "PRESETS", "Label", "SimulationResult", "run", "simulate"]


def simulate(out_dir: str | Path, preset: str = "smoke", seed: int = 0, *,
             scale: float = 1.0, days: float | None = None, progress: bool = False,
             workers: int = 1) -> tuple[Path, Path, Path]:
    """Write a simulated trace, its accounts and labels; return (trace, accounts, labels).
    ``workers`` > 1 generates in that many processes (same bytes as one)."""
    result = run(out_dir, preset=preset, seed=seed, scale=scale, days=days,
                 progress=progress, workers=workers)
    return result.trace, result.accounts, result.labels
