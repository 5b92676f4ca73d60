"""The review queue: opening (with de-duplication), listing, decisions and their audit."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from distillguard.policy import audit
from distillguard.policy.review import decide_item, get_item, list_items, open_item


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'r.sqlite'}")
    yield eng
    await eng.dispose()


async def test_open_item_deduplicates_while_open(engine) -> None:  # type: ignore[no-untyped-def]
    a = await open_item(engine, kind="account", subject="acct_1", risk=0.4,
                        evidence=["indicator ip 198.51.100.7"], source="taxii:partner")
    b = await open_item(engine, kind="account", subject="acct_1", risk=0.9,
                        evidence=["indicator ip 198.51.100.7", "indicator ua x"],
                        source="taxii:partner")
    other = await open_item(engine, kind="account", subject="acct_1", risk=0.2,
                            evidence=["name match"], source="screening")
    assert a == b and other != a
    item = await get_item(engine, a)
    assert item is not None
    assert item.risk == 0.9 and item.evidence == ["indicator ip 198.51.100.7", "indicator ua x"]
    assert [i.item_id for i in await list_items(engine)] == [a, other]
    with pytest.raises(ValueError):
        await open_item(engine, kind="", subject="x", risk=None, evidence=[], source="s")


async def test_decisions_need_reasons_and_are_audited(engine) -> None:  # type: ignore[no-untyped-def]
    item_id = await open_item(engine, kind="account", subject="acct_2", risk=0.5,
                              evidence=["e"], source="screening", action="suspend")
    with pytest.raises(ValueError, match="reason"):
        await decide_item(engine, item_id, "dismiss", "", "analyst@x")
    with pytest.raises(ValueError, match="decision"):
        await decide_item(engine, item_id, "approve", "fine", "analyst@x")
    escalated = await decide_item(engine, item_id, "escalate", "needs legal", "analyst@x")
    assert escalated.status == "escalated"
    dismissed = await decide_item(engine, item_id, "dismiss", "different company", "lead@x")
    assert dismissed.status == "dismissed" and dismissed.decision_reason == "different company"
    with pytest.raises(ValueError, match="already dismissed"):
        await decide_item(engine, item_id, "confirm", "late", "lead@x")
    with pytest.raises(LookupError):
        await decide_item(engine, "rv_nope", "confirm", "x", "a")
    # A new item for the same subject opens once the old one is closed.
    again = await open_item(engine, kind="account", subject="acct_2", risk=0.5,
                            evidence=["e"], source="screening")
    assert again != item_id
    names = [e["name"] for e in await audit.query(engine, "account:acct_2")]
    assert names == ["review:item:open", "review:item:dismiss", "review:item:escalate",
                     "review:item:open"]
    assert [i.item_id for i in await list_items(engine, status="dismissed")] == [item_id]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def either_engine(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    from distillguard.store.sql import async_url

    url = (f"sqlite:///{tmp_path / 'r.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    eng = create_async_engine(async_url(url))
    yield eng
    await eng.dispose()


async def test_items_raised_and_decided_at_once_are_one_item_and_one_decision(
        either_engine) -> None:  # type: ignore[no-untyped-def]
    """Both stores read first and wrote after: raised at once, a subject got several
    open items; decided at once, an item took every decision and audited each."""
    import asyncio

    engine = either_engine
    await open_item(engine, kind="account", subject="acct_0", risk=None, evidence=[],
                    source="screening")         # the schema, made before the race
    ids = await asyncio.gather(*(
        open_item(engine, kind="account", subject="acct_3", risk=0.1 * i,
                  evidence=[f"e{i}"], source="verdicts") for i in range(8)))
    assert len(set(ids)) == 1
    item = await get_item(engine, ids[0])
    assert item is not None and sorted(item.evidence) == [f"e{i}" for i in range(8)]
    outcomes = await asyncio.gather(*(
        decide_item(engine, ids[0], decision, "checked twice", f"analyst{i}@x")
        for i, decision in enumerate(["confirm", "dismiss"] * 3)), return_exceptions=True)
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, ValueError) and "already" in str(o)
               for o in outcomes if isinstance(o, BaseException))
    names = [e["name"] for e in await audit.query(engine, "account:acct_3")]
    assert len([n for n in names if n in ("review:item:confirm", "review:item:dismiss")]) == 1
