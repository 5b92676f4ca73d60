"""Runs a preset: builds the world, writes accounts and labels, then streams the trace.

Every actor yields its exchanges in time order; :func:`heapq.merge` interleaves them, so
the trace comes out globally time-ordered while only one pending exchange per actor is
held in memory (memory does not grow with the number of exchanges or days).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distillguard.simulate.network import NetworkAllocator
from distillguard.simulate.parallel import generate
from distillguard.simulate.presets import PRESETS, build_actors
from distillguard.simulate.timing import timing_model
from distillguard.simulate.world import DAY, World
from distillguard.traceio import write_accounts, write_jsonl

DEFAULT_START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
LABELS_VERSION = 1
# Longer spans are refused: ten years of a preset's traffic is beyond any disk, and far
# longer ones would carry timestamps past what RFC 3339 can write.
MAX_DAYS = 3653.0


@dataclass(frozen=True, slots=True)
class SimulationResult:
    trace: Path
    accounts: Path
    labels: Path
    exchanges: int
    account_count: int


def make_world(preset: str, seed: int, days: float | None,
               start: datetime = DEFAULT_START) -> tuple[World, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    rng = random.Random(f"distillguard-simulate:{p.seed_salt}:{seed}")
    span = float(days if days is not None else p.days)
    if not 0 < span < math.inf:           # false for NaN too
        raise ValueError("--days must be a positive number")
    if span > MAX_DAYS:
        raise ValueError(f"--days must be at most {MAX_DAYS:g} (ten years)")
    world = World(seed=seed, start=start.timestamp(), days=span, split=p.split,
                  timing=timing_model(), net=NetworkAllocator(random.Random(rng.random())),
                  rng=rng)
    world.release_ts = world.start + span * DAY * 0.5
    return world, p


def run(out_dir: str | Path, preset: str = "smoke", seed: int = 0, scale: float = 1.0,
        days: float | None = None, progress: bool = False,
        workers: int = 1) -> SimulationResult:
    if not 0 < scale < math.inf:          # false for NaN too
        raise ValueError("--scale must be a positive number")
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world, p = make_world(preset, seed, days)
    actors = build_actors(world, p, scale)
    order = sorted(range(len(world.accounts)), key=lambda i: world.accounts[i].account_id)
    paths = (out / "trace.jsonl", out / "accounts.jsonl", out / "labels.jsonl")
    write_accounts((world.accounts[i] for i in order), paths[1])
    write_jsonl((world.labels[i].to_json() for i in order), paths[2])
    if workers > 1:
        count = generate(actors, paths[0], workers, progress, f"simulate {preset}")
        return SimulationResult(trace=paths[0], accounts=paths[1], labels=paths[2],
                                exchanges=count, account_count=len(order))
    merged: Iterator[tuple[float, dict[str, Any]]] = heapq.merge(
        *(a.events() for a in actors), key=lambda e: e[0])
    bar = tqdm(unit=" ex", unit_scale=True, disable=not progress, mininterval=0.5,
               desc=f"simulate {preset}")

    def lines() -> Iterator[dict[str, Any]]:
        for _, line in merged:
            bar.update(1)
            yield line

    try:
        count = write_jsonl(lines(), paths[0])
    finally:
        bar.close()
    return SimulationResult(trace=paths[0], accounts=paths[1], labels=paths[2],
                            exchanges=count, account_count=len(order))
