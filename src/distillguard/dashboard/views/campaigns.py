"""Campaigns: the list, and one campaign with its account graph and the action ladder."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from distillguard.dashboard import charts, graph, queries
from distillguard.dashboard.urls import object_id, page_url
from distillguard.dashboard.views.common import links, range_param
from distillguard.exchange import format_ts

if TYPE_CHECKING:
    from distillguard.dashboard.app import Dashboard


async def list_page(dash: Dashboard, request: Request) -> Response:
    limit = dash.options.page_size
    after = request.query_params.get("after")
    rows = await dash.sources.verdicts.campaigns(after=after, limit=limit)
    cursor = {"after": rows[-1]["campaign_id"]} if rows else None
    return dash.render(request, "campaigns.html", title="Campaigns", section="campaigns",
                       rows=rows, page=links(request, rows, limit, cursor),
                       available=getattr(dash.sources.verdicts, "available", True))


def _asn_lookup() -> Any:
    try:
        from distillguard import geoip  # type: ignore[attr-defined]
    except ImportError:
        return None
    fn = getattr(geoip, "asn_of", None) or getattr(geoip, "lookup_asn", None)
    if fn is None:
        return None

    def asn(ip: str) -> str | None:
        try:
            value = fn(ip)
        except Exception:
            return None
        if value is None:
            return None
        number = getattr(value, "asn", value)
        return f"AS{number}" if isinstance(number, int) else str(number)

    return asn


async def detail_page(dash: Dashboard, request: Request) -> Response:
    campaign_id = object_id(request, "campaign_id")
    if campaign_id is None:             # /dashboard/campaigns/: the list
        return dash.redirect(page_url(dash.base, "campaigns"))
    campaign = await dash.sources.verdicts.campaign(campaign_id)
    if campaign is None:
        raise HTTPException(404, f"There is no campaign {campaign_id!r}.")
    engine = dash.sources.engine
    members = list(campaign.accounts)
    info = await queries.accounts_by_id(engine, members)
    flagged = await dash.sources.verdicts.flagged(set(members))
    shown = sorted(members, key=lambda a: (a not in flagged, a))[:graph.MAX_NODES]
    last = await queries.group_last_hour(engine, members)
    since = format_ts(last - timedelta(hours=1)) if last else ""
    ips = await queries.group_ips(engine, shown)
    seconds = await queries.group_seconds(engine, shown, since)
    g = graph.build_graph([info.get(a) or {"account_id": a} for a in shown], ips, seconds,
                          detected=campaign.extra.get("edges") or [], asn_of=_asn_lookup(),
                          total=len(members))
    svg = graph.render_svg(g, flagged=flagged,
                           href=lambda a: page_url(dash.base, "accounts", a))
    range_name = range_param(request, "7d")
    end = last or datetime.now(UTC)
    b = queries.bucketing(end, range_name)
    stats = await queries.group_stats(engine, members, b, range_name)
    examples = await queries.group_examples(engine, members, end)
    subject = f"campaign:{campaign_id}"
    policy = dash.sources.policy
    return dash.render(
        request, "campaign.html", title=f"Campaign {campaign_id}", section="campaigns",
        c=campaign, status=str(campaign.extra.get("status") or "open"), graph_svg=svg, g=g,
        edge_types=graph.EDGE_TYPES, edge_counts=g.counts(),
        hub_members=_hub_members(g), direct=[e for e in g.edges if e[0] not in g.hubs][:100],
        timeline=charts.stacked_bars([charts.Series("requests", stats["series"], "s0")],
                                     b.labels, title="Campaign requests over time",
                                     ident="timeline"),
        capabilities=charts.hbars(stats["capabilities"], title="Capability mix",
                                  ident="caps"),
        models=stats["models"], examples=examples, range_name=range_name,
        ranges=list(queries.RANGES), members=sorted(members), info=info, flagged=flagged,
        ladder=policy.ladder, audit=await policy.actions(subject),
        next=page_url(dash.base, "campaigns", campaign_id))


def _hub_members(g: graph.AccountGraph) -> list[tuple[str, str, list[str]]]:
    out: dict[str, list[str]] = defaultdict(list)
    for hub, member, _kind, _detail in g.edges:
        if hub in g.hubs:
            out[hub].append(member)
    return [(g.hubs[h][0], g.hubs[h][1], sorted(m)) for h, m in sorted(out.items())]
