"""Overview: traffic, denials, rate limits, open review items, active campaigns."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from distillguard.dashboard import charts, queries
from distillguard.dashboard.views.common import range_param
from distillguard.gateway.admin import json_response

if TYPE_CHECKING:
    from distillguard.dashboard.app import Dashboard


async def _data(dash: Dashboard, range_name: str) -> dict[str, object]:
    engine = dash.sources.engine
    end = await queries.latest_minute(engine) or datetime.now(UTC)
    b = queries.bucketing(end, range_name)
    t = await queries.traffic(engine, b, range_name)
    policy, verdicts = dash.sources.policy, dash.sources.verdicts
    review_open = queries.open_over_time(await policy.review_intervals(), b)
    campaigns_active = queries.open_over_time(await verdicts.campaign_intervals(), b)
    return {"bucketing": b, "traffic": t, "review_open": review_open,
            "campaigns_active": campaigns_active}


async def page(dash: Dashboard, request: Request) -> Response:
    range_name = range_param(request)
    data = await _data(dash, range_name)
    b: queries.Bucketing = data["bucketing"]  # type: ignore[assignment]
    t: dict[str, list[int]] = data["traffic"]  # type: ignore[assignment]
    traffic_chart = charts.stacked_bars(
        [charts.Series("served", t["ok"], "s0"), charts.Series("denied", t["denied"], "s1"),
         charts.Series("rate-limited", t["limited"], "s2"),
         charts.Series("errors", t["errors"], "s3")],
        b.labels, title="Requests per bucket by outcome", ident="traffic")
    state_chart = charts.lines(
        [charts.Series("open review items", data["review_open"], "s5"),  # type: ignore[arg-type]
         charts.Series("active campaigns", data["campaigns_active"], "s1")],  # type: ignore[arg-type]
        b.labels, title="Open review items and active campaigns", ident="state")
    totals = await queries.totals(dash.sources.engine)
    window = {k: sum(v) for k, v in t.items()}
    return dash.render(
        request, "overview.html", title="Overview", section="overview",
        range_name=range_name, ranges=list(queries.RANGES), totals=totals, window=window,
        traffic_chart=traffic_chart, state_chart=state_chart,
        open_review=data["review_open"][-1] if data["review_open"] else 0,  # type: ignore[index]
        active_campaigns=data["campaigns_active"][-1] if data["campaigns_active"] else 0,  # type: ignore[index]
        rows=list(zip(b.labels, t["total"], t["ok"], t["denied"], t["limited"], t["errors"],
                      strict=True)),
        review_available=getattr(dash.sources.policy, "review_available", False),
        busiest=await queries.busiest_accounts(dash.sources.engine, b.starts[0])
        if b.starts else [])


async def traffic_json(dash: Dashboard, request: Request) -> Response:
    """The overview's numbers as JSON (for scripts and other tools)."""
    range_name = range_param(request)
    data = await _data(dash, range_name)
    b: queries.Bucketing = data["bucketing"]  # type: ignore[assignment]
    return json_response({"range": range_name, "buckets": [s.isoformat() for s in b.starts],
                          **data["traffic"],  # type: ignore[dict-item]
                          "review_open": data["review_open"],
                          "campaigns_active": data["campaigns_active"]})
