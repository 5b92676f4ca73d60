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
