"""Links to pages of accounts, campaigns, exchanges and review items whose ids hold the
characters a URL gives a meaning to (``/ ? # % & .. .``, a space): each link leads to its
own object's page, as a browser follows it."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
import pytest

from distillguard.dashboard.index import row_of, write_rows
from distillguard.serve import StackThread
from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts
from tests.factories import ADMIN_TOKEN, make_exchange, make_settings, start_stack
from tests.test_dashboard import ReviewQueueDouble, _sources, login

# account ids the admin API and traces accept (store/models.py refuses only NUL, blank
# and over-long ids); "a" and "b" are there so that a wrong link shows a wrong account
ODD = ["a/b", "a?x=1", "a#b", "a b", "..", ".", "a%2Fb", "a&b=c", "x/../a", "ü/%2e%2e"]
CAMPAIGNS = {"c/1": ODD[:5], "c?x=1#y": ODD[5:], "..": ["a", *ODD[:2]], ".": ["b"]}
# the first exchange of each account ("a", then ODD); the others are "ex/{i}?n={n}#"
EXCHANGES = ["..", ".", "e/1", "e?2", "e#3", "e 4", "e%2F5", "e&6", "ü", "e/../7", "e.8"]
PAGE_SIZE = 5
PAGED = "a%2Fb"     # the account with one page of exchanges more


def link(kind: str, ident: str) -> str:
    """The address of the page of ``ident`` (docs/dashboard.md): one encoded path
    segment, or ``?id=`` for the ids a browser would drop as a segment."""
    if ident in ("", ".", ".."):
        return f"/dashboard/{kind}/?id={quote(ident, safe='')}"
    return f"/dashboard/{kind}/{quote(ident, safe='')}"


def browser_path(href: str) -> str:
    """Where a browser goes for ``href`` (an absolute path on the dashboard's host): dot
    segments resolved as the URL standard does (``%2e`` is a dot), fragment dropped."""
    parts = urlsplit(html.unescape(href))
    out: list[str] = []
    segments = parts.path.split("/")[1:]
    for n, segment in enumerate(segments):
        dots = segment.lower().replace("%2e", ".")
        if dots in (".", ".."):
            if dots == ".." and out:
                out.pop()
            if n == len(segments) - 1:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out) + (f"?{parts.query}" if parts.query else "")


def hrefs(page: str, prefix: str) -> list[str]:
    """The links (and form targets) of ``page`` whose path starts with ``prefix``."""
    return [html.unescape(h) for h in re.findall(r'(?:href|action)="([^"]*)"', page)
            if html.unescape(h).startswith(prefix)]


def anchors(page: str, prefix: str) -> list[tuple[str, str]]:
    """``(href, text)`` of the links of ``page`` whose path starts with ``prefix``."""
    found = re.findall(r'<a href="([^"]*)"[^>]*>([^<]*)</a>', page)
    return [(html.unescape(h), html.unescape(t)) for h, t in found
            if html.unescape(h).startswith(prefix)]


def heading(page: str) -> str:
    """The page's <h1>, without an account's status badge."""
    h1 = re.search(r"<h1>(.*?)</h1>", page, re.S).group(1)  # type: ignore[union-attr]
    return html.unescape(h1.split(" <span", 1)[0])


@pytest.fixture
def odd(tmp_path: Path) -> Iterator[tuple[StackThread, httpx.Client]]:
    """A gateway whose accounts, campaigns and exchanges have odd ids, logged in."""
    verdicts = tmp_path / "verdicts.json"
    now = datetime.now(UTC)
    Verdicts(accounts=[AccountVerdict(a, risk=0.9, flagged=True, campaign_id=c)
                       for c, members in CAMPAIGNS.items() for a in members],
             campaigns=[CampaignVerdict(c, accounts=members, risk=0.9, detected_at=now,
                                        evidence=["test"])
                        for c, members in CAMPAIGNS.items()]).write(verdicts)
    stack = start_stack(make_settings(tmp_path, dashboard={"verdicts_path": str(verdicts),
                                                           "page_size": PAGE_SIZE}))
    try:
        with httpx.Client(base_url=stack.stack.admin_url,
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            for account_id in ["a", "b", *ODD]:
                admin.post("/admin/v1/accounts", json={"account_id": account_id}
                           ).raise_for_status()
        rows = []
        for i, account_id in enumerate(["a", *ODD]):
            for n in range(PAGE_SIZE + 1 if account_id == PAGED else 1):
                row = row_of(make_exchange(f"q {i} {n}", account_id=account_id,
                                           client_ip=f"198.51.100.{i}",
                                           ts=now - timedelta(minutes=i, seconds=n)))
                rows.append({**row, "exchange_id": f"ex/{i}?n={n}#" if n else EXCHANGES[i]})
        stack.call(write_rows(_sources(stack).engine, rows))
        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
            login(client)
            yield stack, client
    finally:
        stack.stop()


def open_link(client: httpx.Client, href: str) -> httpx.Response:
    path = browser_path(href)
    assert path.startswith("/dashboard/"), (href, path)
    r = client.get(path.removeprefix("/dashboard"))
    assert r.status_code == 200, (href, path, r.status_code)
    return r


def test_page_url_encodes_ids_and_query_values() -> None:
    from distillguard.dashboard.urls import page_url

    assert page_url("/d", "accounts", "a/b") == "/d/accounts/a%2Fb"
    assert page_url("/d", "accounts", "a?x=1#y") == "/d/accounts/a%3Fx%3D1%23y"
    assert page_url("/d", "accounts", "a%2Fb c") == "/d/accounts/a%252Fb%20c"
    assert page_url("/d", "accounts", "..") == "/d/accounts/?id=.."
    assert page_url("/d", "review", 7) == "/d/review/7"
    assert page_url("/d", "accounts", q="1.2.3.4&x=#") == "/d/accounts?q=1.2.3.4%26x%3D%23"
    assert page_url("/d", "ledger", exchange_id=None) == "/d/ledger"


def test_links_to_odd_ids_open_their_own_pages(odd: tuple[StackThread, httpx.Client]) -> None:
    """Ids went into links as they were: the link of account "a?x=1" or "a#b" opened
    account "a", the one of ".." the overview, the one of "a/b" no page at all."""
    _, client = odd
    listed = client.get("/campaigns").text
    links = hrefs(listed, "/dashboard/campaigns/")
    assert len(links) == len(CAMPAIGNS)
    seen_accounts: set[str] = set()
    for href in links:
        page = open_link(client, href).text
        campaign_id = heading(page).removeprefix("Campaign ")
        assert campaign_id in CAMPAIGNS, (href, campaign_id)
        members = CAMPAIGNS[campaign_id]
        account_links = set(hrefs(page, "/dashboard/accounts/"))
        assert account_links == {link("accounts", a) for a in members}
        for account_href in account_links:
            account = open_link(client, account_href).text
            shown = heading(account).removeprefix("Account ")
            assert shown in members, (account_href, shown)
            seen_accounts.add(shown)
            # its campaigns link back to the campaign (and its exchanges to theirs)
            back = [browser_path(h) for h in hrefs(account, "/dashboard/campaigns/")]
            assert browser_path(href) in back
            for exchange_href in hrefs(account, "/dashboard/exchanges/"):
                exchange = open_link(client, exchange_href).text
                assert heading(exchange).startswith("Exchange ")
                assert browser_path(link("accounts", shown)) in [
                    browser_path(h) for h in hrefs(exchange, "/dashboard/accounts/")]
    assert seen_accounts == set(ODD) | {"a", "b"}
    # search results, the busiest accounts of the overview and the addresses of a profile
    pages = [client.get("/").text]
    after = None
    while True:     # every page of the account list
        page = client.get("/accounts", params={"after": after} if after else {}).text
        pages.append(page)
        more = [h for h in hrefs(page, "/dashboard/accounts?") if "after=" in h]
        if not more:
            break
        after = re.search(r"after=([^&]*)", more[0]).group(1)  # type: ignore[union-attr]
        after = unquote(after.replace("+", " "))
    listed = [a for page in pages for a in anchors(page, "/dashboard/accounts/")]
    assert {text for _, text in listed} == set(ODD) | {"a", "b"}
    for href, text in listed:
        assert heading(open_link(client, href).text) == f"Account {text}", href
    # an account's addresses are links to the search for them
    for href, text in anchors(open_link(client, link("accounts", "a&b=c")).text,
                              "/dashboard/accounts?q="):
        assert link("accounts", "a&b=c") in hrefs(open_link(client, href).text,
                                                  "/dashboard/accounts/"), text


def test_pages_of_odd_ids_keep_their_id(odd: tuple[StackThread, httpx.Client]) -> None:
    """The next-page link of an account's exchanges, the range form of a campaign, an
    action's way back and the log-in's way on all stay on the same object."""
    _, client = odd
    url = link("accounts", PAGED)
    first = open_link(client, url).text
    [nxt] = [h for h in hrefs(first, "/dashboard/accounts/") if "before_ts=" in h]
    second = open_link(client, nxt).text
    assert heading(second) == f"Account {PAGED}", nxt
    assert first.count("/dashboard/exchanges/") == PAGE_SIZE
    assert second.count("/dashboard/exchanges/") == 1
    # the range form of the campaign ".." (whose id rides in ?id=) keeps the id
    page = open_link(client, link("campaigns", "..")).text
    form = re.search(r'<form class="search" method="get">(.*?)</form>', page, re.S).group(1)  # type: ignore[union-attr]
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form))
    r = client.get("/campaigns/", params={**fields, "range": "1h"})
    assert r.status_code == 200 and heading(r.text) == "Campaign .."
    # an action goes back to the page it was taken on
    csrf = re.search(r'name="csrf" value="([^"]+)"', first).group(1)  # type: ignore[union-attr]
    for account_id in ("a?x=1", "..", "a/b"):
        page = open_link(client, link("accounts", account_id)).text
        back = html.unescape(re.search(r'name="next" value="([^"]*)"', page).group(1))  # type: ignore[union-attr]
        r = client.post("/actions", data={"kind": "account", "target": account_id,
                                          "action": "suspend", "reason": "odd id",
                                          "csrf": csrf, "next": back})
        assert r.status_code == 303
        after = open_link(client, r.headers["location"]).text
        assert heading(after) == f"Account {account_id}", r.headers["location"]
        assert "suspend applied to 1 account(s)" in after
    # logged out, the log-in sends the browser on to the page it asked for
    client.headers.pop("cookie")
    r = client.get(url.removeprefix("/dashboard"))
    assert r.status_code == 303
    form = open_link(client, r.headers["location"]).text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    target = html.unescape(re.search(r'name="next" value="([^"]*)"', form).group(1))  # type: ignore[union-attr]
    assert target == url
    r = client.post("/login", data={"token": ADMIN_TOKEN, "login_token": token, "next": target})
    client.headers["cookie"] = "dg_session=" + r.cookies["dg_session"]
    assert heading(open_link(client, r.headers["location"]).text) == f"Account {PAGED}"
    # an address without an id is the list
    for path in ("/accounts/", "/campaigns/"):
        r = client.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard" + path[:-1]
    assert client.get("/exchanges/").status_code == 404


def test_review_decisions_reach_the_item_they_name(
        odd: tuple[StackThread, httpx.Client]) -> None:
    stack, client = odd
    csrf = login(client)

    class Queue(ReviewQueueDouble):
        async def review_items(self, *, status: str, after: str | None,
                               limit: int) -> list[Any]:
            if status != "open" or after:
                return []
            return [{"item_id": item, "kind": kind, "subject": subject, "risk": 0.9,
                     "status": "open", "opened_at": "2026-03-01T10:00:00Z", "action": "flag",
                     "evidence": []}
                    for item, kind, subject in (("r/1?x#", "account", "a#b"),
                                                ("..", "campaign", "c?x=1#y"),
                                                ("r 2", "account", ".."))]

    queue = Queue()
    _sources(stack).policy = queue
    page = client.get("/review").text
    subjects = [heading(open_link(client, h).text) for h in hrefs(page, "/dashboard/accounts/")
                + hrefs(page, "/dashboard/campaigns/")]
    assert subjects == ["Account a#b", "Account ..", "Campaign c?x=1#y"]
    for target in hrefs(page, "/dashboard/review/"):
        r = client.post(browser_path(target).removeprefix("/dashboard"),
                        data={"decision": "escalate", "reason": "odd ids", "csrf": csrf})
        assert r.status_code == 303, target
    assert [d[0] for d in queue.decisions] == ["r/1?x#", "..", "r 2"]
