"""What the detection tests share: a small simulated world, its batch verdicts, account
records in a state store, and a collector's samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.registry import Collector

from distillguard.detect.batch import run_batch
from distillguard.detect.calibration import Calibration
from distillguard.simulate import simulate
from distillguard.verdicts import Verdicts

TICK = 600.0

World = tuple[Path, Path, Path]     # trace, accounts, labels


def make_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return simulate(tmp_path_factory.mktemp("detect"), preset="smoke", seed=5, days=0.5)


def batch_verdicts(world: World) -> Verdicts:
    trace, accounts, _ = world
    result, _detector = run_batch(trace, Calibration.read(), accounts=accounts,
                                  tick_seconds=TICK)
    return result.verdicts


async def import_accounts(state_url: str, accounts: Path) -> None:
    """The accounts file's records into the state store (as `accounts import` does)."""
    from distillguard.store import open_state_store
    from distillguard.traceio import read_accounts

    store = open_state_store(state_url)
    await store.migrate()
    await store.import_accounts(read_accounts(accounts))
    await store.close()


def samples(collector: Collector) -> dict[tuple[str, tuple[str, ...]], float]:
    """A collector's samples: (name, label values) -> value."""
    return {(x.name, tuple(x.labels.values())): x.value
            for family in collector.collect() for x in family.samples}
