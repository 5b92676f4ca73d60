"""Named configurations: ``smoke``, ``tune``, ``heldout``, ``test`` and ``large``.

A preset says how many actors of each kind to build (before ``--scale``), for how many
days, from which half of the prompt pools, and which campaign types to include.
``heldout`` draws from the other half of every pool, uses its own seed stream and adds
the ``tool_harvest`` campaign, which ``tune`` does not contain. ``test`` is ``heldout``
on a seed stream of its own: detection's constants are chosen on ``tune`` and
``heldout``, and ``test`` is scored once they are fixed, for the reported figures.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from distillguard.simulate import campaigns as c
from distillguard.simulate.populations import Casual, Company, EvalRunner, Saas
from distillguard.simulate.prompts import Split
from distillguard.simulate.world import World


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    days: float
    split: Split
    seed_salt: int
    casual: int
    saas: int
    saas_per_day: float
    eval_runners: int
    eval_questions: int
    companies: int
    company_size: int
    campaign_size: int          # accounts in a typical multi-account campaign
    per_account_day: float      # harvest requests per account-day
    campaigns: tuple[str, ...]
    campaign_copies: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


ALL_TUNE = ("hydra", "reseller", "heavy_single", "slow_low", "cot_elicitation",
            "rubric_grading", "model_switch")
HELDOUT = Preset("heldout", days=7.0, split="heldout", seed_salt=2, casual=600, saas=8,
                 saas_per_day=1500, eval_runners=3, eval_questions=250, companies=6,
                 company_size=15, campaign_size=25, per_account_day=120,
                 campaigns=(*ALL_TUNE, "tool_harvest"), campaign_copies=2)
PRESETS: dict[str, Preset] = {
    "smoke": Preset("smoke", days=1.0, split="dev", seed_salt=0, casual=24, saas=2,
                    saas_per_day=150, eval_runners=1, eval_questions=40, companies=1,
                    company_size=5, campaign_size=5, per_account_day=40, campaigns=ALL_TUNE),
    "tune": Preset("tune", days=7.0, split="dev", seed_salt=1, casual=600, saas=8,
                   saas_per_day=1500, eval_runners=3, eval_questions=250, companies=6,
                   company_size=15, campaign_size=25, per_account_day=120,
                   campaigns=ALL_TUNE, campaign_copies=2),
    "heldout": HELDOUT,
    # The same world on a seed stream of its own, for figures scored once.
    "test": replace(HELDOUT, name="test", seed_salt=4),
    "large": Preset("large", days=14.0, split="all", seed_salt=3, casual=6000, saas=60,
                    saas_per_day=3000, eval_runners=20, eval_questions=500, companies=60,
                    company_size=20, campaign_size=60, per_account_day=200,
                    campaigns=(*ALL_TUNE, "tool_harvest"), campaign_copies=6),
}


def n(value: float, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(value * scale))


def build_campaign(kind: str, world: World, rng: random.Random, p: Preset,
                   size: int, copy: int = 0) -> c.Campaign:
    """One campaign of ``kind``; ``copy`` numbers the preset's campaigns of that kind (every
    second ``hydra`` operator sends through residential proxies)."""
    rate = p.per_account_day
    start = rng.choice((0.0, 0.0, rng.uniform(0.1, 0.4)))
    builders: dict[str, Callable[[], c.Campaign]] = {
        "hydra": lambda: c.Hydra(world, rng, size * 2, rate * 0.35, start,
                                 proxied=copy % 2 == 1),
        "reseller": lambda: c.Reseller(world, rng, rng.randint(1, 2), max(3, size // 2),
                                       rate * 6, start),
        "heavy_single": lambda: c.HeavySingle(world, rng, rate * 25, start),
        "slow_low": lambda: c.SlowLow(world, rng, size * 2, max(24.0, size * 2.0), start),
        "cot_elicitation": lambda: c.CotElicitation(world, rng, max(2, size // 3), rate,
                                                    start),
        "rubric_grading": lambda: c.RubricGrading(world, rng, max(2, size // 4), rate * 1.5,
                                                  start),
        "model_switch": lambda: c.ModelSwitch(world, rng, max(2, size // 3), rate, 0.0),
        "tool_harvest": lambda: c.ToolHarvest(world, rng, size, rate * 0.3, start),
    }
    if kind not in builders:
        raise ValueError(f"unknown campaign type {kind!r}")
    return builders[kind]()


def build_actors(world: World, p: Preset, scale: float) -> list[Any]:
    """Every population and campaign of the preset, each with its own random stream."""
    actors: list[Any] = []

    def stream() -> random.Random:
        return random.Random(world.rng.getrandbits(64))

    for _ in range(n(p.casual, scale)):
        actors.append(Casual(world, stream()))
    for _ in range(n(p.saas, scale)):
        actors.append(Saas(world, stream(), p.saas_per_day))
    for _ in range(n(p.eval_runners, scale)):
        actors.append(EvalRunner(world, stream(), p.eval_questions))
    for _ in range(n(p.companies, scale)):
        actors.append(Company(world, stream(), n(p.company_size, 1.0, 2)))
    # Campaign accounts grow linearly with the scale: more campaigns above 1, smaller
    # ones below (a campaign keeps at least two accounts).
    copies = n(p.campaign_copies, scale)
    size = n(p.campaign_size * p.campaign_copies * scale / copies, 1.0, 2)
    for kind in p.campaigns:
        for copy in range(copies):
            actors.append(build_campaign(kind, world, stream(), p, size, copy))
    return actors
