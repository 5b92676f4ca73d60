"""Where an export reads campaigns, accounts and exchanges from.

* Files: a verdicts document (``distillguard detect``), a trace and an accounts file, all
  in the public formats of ``docs/formats.md``.
* A running system: campaigns from detection's ``campaigns`` / ``account_verdicts``
  tables, accounts from the state store, exchanges from a trace file when one is given
  (the ledger exports one) or else from the dashboard's exchange index
  (``dashboard_exchanges``: addresses and times, no user agents or prompts).

Which campaigns: the ones named, or else every campaign that is confirmed (``status``
``confirmed``) or, when detection records no status, whose risk reaches ``min_risk``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from distillguard.errors import DistillguardError
from distillguard.exchange import parse_ts
from distillguard.geoip import GeoIP
from distillguard.sharing.evidence import CampaignEvidence, EvidenceCollector
from distillguard.store import StateStore, all_accounts
from distillguard.traceio import read_accounts, read_trace
from distillguard.verdicts import CampaignVerdict, Verdicts

CLOSED = {"closed", "dismissed", "resolved", "false_positive"}


class ExportInputError(DistillguardError):
    """The inputs of an export are missing or name no campaign."""


def choose(campaigns: Iterable[CampaignVerdict], wanted: list[str] | None,
           min_risk: float) -> list[CampaignVerdict]:
    found = list(campaigns)
    if wanted:
        by_id = {c.campaign_id: c for c in found}
        missing = [w for w in wanted if w not in by_id]
        if missing:
            raise ExportInputError(f"unknown campaign(s): {', '.join(missing)}")
        return [by_id[w] for w in wanted]
    out = []
    for c in found:
        status = str(c.extra.get("status") or "").lower()
        if status in CLOSED:
            continue
        if status == "confirmed" or (not status or status == "open") and c.risk >= min_risk:
            out.append(c)
    if not out:
        raise ExportInputError(f"no confirmed campaign (status 'confirmed' or risk >= "
                               f"{min_risk}); name one with --campaign")
    return out


def collect_from_files(verdicts: str | Path, trace: str | Path, accounts: str | Path | None,
                       *, campaigns: list[str] | None, min_risk: float,
                       geoip: GeoIP | None) -> list[CampaignEvidence]:
    try:
        doc = Verdicts.read(verdicts)
    except OSError as exc:
        raise ExportInputError(f"cannot read verdicts {verdicts}: {exc.strerror}") from None
    except ValueError as exc:
        raise ExportInputError(f"{verdicts}: {exc}") from None
    chosen = choose(doc.campaigns, campaigns, min_risk)
    people = list(read_accounts(accounts)) if accounts else []
    collector = EvidenceCollector(chosen, people, geoip)
    for ex in read_trace(trace):
        collector.add(ts=ex.ts, account_id=ex.account_id, client_ip=ex.client_ip,
                      user_agent=ex.user_agent, request=ex.request)
    return collector.result()


async def state_campaigns(engine: AsyncEngine) -> list[CampaignVerdict]:
    from distillguard.dashboard.sqlverdicts import SQLVerdicts, tables

    found = await tables(engine)
    if "campaign_id" not in found.get("campaigns", []):
        raise ExportInputError("the state store has no campaigns table yet "
                               "(detection writes it); export from a verdicts file instead")
    source = SQLVerdicts(engine, found)
    rows = await source.campaigns(after=None, limit=1_000_000)
    out = []
    for row in rows:
        campaign = await source.campaign(row["campaign_id"])
        if campaign is not None:
            campaign.extra.setdefault("status", row.get("status"))
            out.append(campaign)
    return out


async def collect_from_state(store: StateStore, *, trace: str | Path | None,
                             campaigns: list[str] | None, min_risk: float,
                             geoip: GeoIP | None) -> list[CampaignEvidence]:
    engine: AsyncEngine = store.engine  # type: ignore[attr-defined]
    chosen = choose(await state_campaigns(engine), campaigns, min_risk)
    collector = EvidenceCollector(chosen, await all_accounts(store), geoip)
    if trace is not None:
        for ex in read_trace(trace):
            collector.add(ts=ex.ts, account_id=ex.account_id, client_ip=ex.client_ip,
                          user_agent=ex.user_agent, request=ex.request)
        return collector.result()
    async with engine.connect() as conn:
        has_index = await conn.run_sync(
            lambda c: "dashboard_exchanges" in inspect(c).get_table_names())
        if has_index:
            result = await conn.stream(text(
                "SELECT ts, account_id, client_ip FROM dashboard_exchanges"))
            async for ts, account_id, client_ip in result:
                collector.add(ts=parse_ts(ts), account_id=account_id, client_ip=client_ip)
    return collector.result()
