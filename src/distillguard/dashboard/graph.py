"""The account graph of a campaign: what ties its accounts together, drawn as SVG.

Links come from detection when it records them (``campaign.extra["edges"]``: a list of
``{"a", "b", "type", "detail"}``). Otherwise, and in addition, the dashboard derives them
from what the state store and its exchange index hold:

* ``payment``   accounts with the same payment fingerprint,
* ``network``   accounts that sent traffic from the same /24 (IPv4) or /48 (IPv6),
* ``asn``       accounts whose addresses map to the same autonomous system
                (:mod:`distillguard.geoip`, when installed),
* ``signup``    accounts created within ``SIGNUP_WINDOW`` of each other,
* ``org``       accounts with the same e-mail domain, unless anyone can get an address
                there (:mod:`distillguard.maildomains`: gmail.com, a disposable service),
* ``lockstep``  pairs of accounts active in largely the same seconds (Jaccard >= 0.5
                over the seconds with traffic in the campaign's last hour, at least 3
                shared),
* ``template``  accounts whose prompts share the same leading words (from detection's
                edges only).

Attributes shared by a group (one payment fingerprint, one /24, ...) are drawn as a small
labelled hub joined to each member, so a group of n costs n edges, not n²; lockstep and
detection edges join accounts directly. The drawing is capped at ``MAX_NODES`` accounts
(the highest-risk first); the page says how many were left out.
"""

from __future__ import annotations

import ipaddress
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from html import escape
from typing import Any

from markupsafe import Markup

from distillguard.exchange import parse_ts
from distillguard.maildomains import operator_mail_domain

MAX_NODES = 80
SIGNUP_WINDOW = timedelta(minutes=30)
EDGE_TYPES = {
    "payment": "shared payment fingerprint", "network": "shared /24 network",
    "asn": "shared ASN", "signup": "sign-up window", "org": "shared e-mail domain",
    "lockstep": "lockstep timing", "template": "shared prompt template",
}


@dataclass(slots=True)
class AccountGraph:
    accounts: list[str]
    hubs: dict[str, tuple[str, str]] = field(default_factory=dict)  # hub id -> (type, label)
    edges: list[tuple[str, str, str, str]] = field(default_factory=list)  # a, b, type, detail
    left_out: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for _a, _b, kind, _d in self.edges:
            out[kind] += 1
        return dict(out)


def network_of(ip: str) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) an address is in, or None if it is not an address."""
    parts = ip.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() and len(p) <= 3 and int(p) < 256
                               for p in parts):
        return f"{parts[0]}.{parts[1]}.{parts[2]}.0/24"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _hub(graph: AccountGraph, kind: str, value: str, members: Iterable[str]) -> None:
    members = sorted(set(members))
    if len(members) < 2:
        return
    hub = f"{kind}:{value}"
    graph.hubs[hub] = (kind, value)
    for m in members:
        graph.edges.append((hub, m, kind, value))


def build_graph(accounts: Sequence[dict[str, Any]], ips: dict[str, set[str]],
                active: dict[str, set[str]], *, detected: Sequence[dict[str, Any]] = (),
                asn_of: Callable[[str], str | None] | None = None,
                total: int | None = None) -> AccountGraph:
    ids = [a["account_id"] for a in accounts]
    graph = AccountGraph(accounts=ids, left_out=max(0, (total or len(ids)) - len(ids)))
    shown = set(ids)
    groups: dict[tuple[str, str], set[str]] = defaultdict(set)
    for a in accounts:
        if a.get("payment_fingerprint"):
            groups[("payment", a["payment_fingerprint"])].add(a["account_id"])
        domain = operator_mail_domain(a.get("email_domain"))
        if domain:
            groups[("org", domain)].add(a["account_id"])
        for ip in ips.get(a["account_id"], ()):
            net = network_of(ip)
            if net:
                groups[("network", net)].add(a["account_id"])
            asn = asn_of(ip) if asn_of else None
            if asn:
                groups[("asn", asn)].add(a["account_id"])
    for (kind, value), members in sorted(groups.items()):
        _hub(graph, kind, value, members)
    _signup_links(graph, accounts)
    _lockstep_links(graph, ids, active)
    for link in detected:
        one, two = str(link.get("a", "")), str(link.get("b", ""))
        if one in shown and two in shown and one != two:
            graph.edges.append((one, two, str(link.get("type", "template")),
                                str(link.get("detail", ""))))
    return graph


def _signup_links(graph: AccountGraph, accounts: Sequence[dict[str, Any]]) -> None:
    """Accounts created within SIGNUP_WINDOW of the first of a run share a sign-up hub."""
    dated = sorted((parse_ts(a["created_at"]), str(a["account_id"])) for a in accounts
                   if a.get("created_at"))
    run: list[str] = []
    start: datetime | None = None
    for ts, acct in dated:
        if start is not None and ts - start <= SIGNUP_WINDOW:
            run.append(acct)
            continue
        if start is not None and len(run) >= 2:
            _hub(graph, "signup", start.strftime("%Y-%m-%d %H:%M") + " +30m", run)
        run, start = [acct], ts
    if start is not None and len(run) >= 2:
        _hub(graph, "signup", start.strftime("%Y-%m-%d %H:%M") + " +30m", run)


def _lockstep_links(graph: AccountGraph, ids: Sequence[str],
                    active: dict[str, set[str]], per_account: int = 2) -> None:
    """Join each account to its (at most) ``per_account`` most similar lockstep partners,
    so a lockstep group of n accounts costs at most 2n edges."""
    best: dict[str, list[tuple[float, str, int]]] = defaultdict(list)
    for i, a in enumerate(ids):
        ma = active.get(a) or set()
        if len(ma) < 3:
            continue
        for b in ids[i + 1:]:
            mb = active.get(b) or set()
            shared = len(ma & mb)
            if shared >= 3 and shared / len(ma | mb) >= 0.5:
                score = shared / len(ma | mb)
                best[a].append((score, b, shared))
                best[b].append((score, a, shared))
    seen: set[tuple[str, str]] = set()
    for a in ids:
        for _score, b, shared in sorted(best[a], reverse=True)[:per_account]:
            pair = (min(a, b), max(a, b))
            if pair not in seen:
                seen.add(pair)
                graph.edges.append((pair[0], pair[1], "lockstep",
                                    f"{shared} shared active seconds"))


def render_svg(graph: AccountGraph, *, flagged: set[str], href: Callable[[str], str],
               width: int = 900, height: int = 560) -> Markup:
    """Lay the graph out (networkx spring layout, fixed seed) and draw it."""
    if not graph.accounts:
        return Markup('<p class="note">No accounts to draw.</p>')
    pos = _layout(tuple(graph.accounts) + tuple(graph.hubs),
                  tuple(sorted({(a, b) for a, b, _k, _d in graph.edges})))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0

    def xy(node: str) -> tuple[float, float]:
        x, y = pos[node]
        return (40 + (x - min(xs)) / span_x * (width - 80),
                30 + (y - min(ys)) / span_y * (height - 60))

    out = [f'<svg class="graph" viewBox="0 0 {width} {height}" role="img" '
           f'aria-labelledby="graph-t" xmlns="http://www.w3.org/2000/svg">'
           f'<title id="graph-t">Account graph: {len(graph.accounts)} accounts, '
           f'{len(graph.edges)} links</title>']
    for a, b, kind, detail in graph.edges:
        (x1, y1), (x2, y2) = xy(a), xy(b)
        out.append(f'<line class="e {escape(kind)}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" '
                   f'y2="{y2:.1f}"><title>{escape(EDGE_TYPES.get(kind, kind))}: '
                   f'{escape(detail)}</title></line>')
    for hub, (kind, label) in graph.hubs.items():
        x, y = xy(hub)
        out.append(f'<g class="hub"><rect class="s{_hub_colour(kind)}" x="{x - 5:.1f}" '
                   f'y="{y - 5:.1f}" width="10" height="10"/>{_label(x, y - 8, width)}'
                   f'{escape(kind)}: {escape(label[:24])}</text>'
                   f'<title>{escape(EDGE_TYPES.get(kind, kind))}: {escape(label)}</title></g>')
    for acct in graph.accounts:
        x, y = xy(acct)
        cls = "n flagged" if acct in flagged else "n"
        out.append(f'<a href="{escape(href(acct))}"><circle class="{cls}" cx="{x:.1f}" '
                   f'cy="{y:.1f}" r="7"/>{_label(x, y + 4, width)}'
                   f'{escape(acct)}</text><title>account {escape(acct)}</title></a>')
    out.append("</svg>")
    return Markup("".join(out))


@lru_cache(maxsize=64)
def _layout(nodes: tuple[str, ...], edges: tuple[tuple[str, str], ...]
            ) -> dict[str, tuple[float, float]]:
    """Spring layout (networkx, fixed seed), cached: the same graph is drawn the same way
    and a reload does not pay for the layout again."""
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    pos = nx.spring_layout(g, seed=7, k=1.6 / math.sqrt(len(nodes)), iterations=50)
    return {n: (float(p[0]), float(p[1])) for n, p in pos.items()}


def _label(x: float, y: float, width: int) -> str:
    """Open a text element beside a node, on the side with room for it."""
    if x > width * 0.6:
        return f'<text x="{x - 10:.1f}" y="{y:.1f}" text-anchor="end">'
    return f'<text x="{x + 10:.1f}" y="{y:.1f}">'


def _hub_colour(kind: str) -> int:
    return {"payment": 1, "network": 0, "asn": 4, "signup": 3, "org": 3,
            "template": 5, "lockstep": 2}.get(kind, 3)
