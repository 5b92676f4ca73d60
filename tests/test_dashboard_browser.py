"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

A gateway is started with simulated traffic (tests/dashboard_seed.py); the tests log in,
open a campaign, take an action with a reason, find it in the audit trail, and save a
screenshot of every page to tests/artifacts/dashboard/. Every request the browser makes
is recorded: the last test checks that none went anywhere but the gateway.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dashboard_seed import BENIGN, CAMPAIGN, seed
from tests.factories import ADMIN_TOKEN, make_settings, start_stack
from tests.test_dashboard import _sources

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts" / "dashboard"
pytestmark = pytest.mark.slow

if not Path(CHROMIUM).exists():  # the CI install script installs Debian's chromium
    pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dash")
    settings = make_settings(tmp, server={"trusted_proxies": ["127.0.0.1/32"]},
                             dashboard={"verdicts_path": str(tmp / "verdicts.json")},
                             ledger={"checkpoint_interval_s": 0.5})
    stack = start_stack(settings)
    admin = httpx.Client(base_url=stack.stack.admin_url,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    keys = seed(admin, stack.stack.base_url, tmp / "verdicts.json")
    stack.call(stack.stack.gateway.settle())
    profile = tempfile.mkdtemp(prefix="dg-chromium-")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True,
            viewport={"width": 1280, "height": 900},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        requests: list[str] = []
        browser.on("request", lambda r: requests.append(r.url))
        try:
            yield {"stack": stack, "admin": admin, "keys": keys, "browser": browser,
                   "url": stack.stack.admin_url + "/dashboard", "requests": requests}
        finally:
            browser.close()
            admin.close()
            stack.stop()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(env: dict[str, Any]) -> Any:
    """A logged-in page (the log-in itself is checked in test_login)."""
    page = env["browser"].new_page()
    page.goto(env["url"] + "/")
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(env["url"] + "/")
    return page


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"{name}: the page is wider than the window {width}"


def test_login(env: dict[str, Any]) -> None:
    page = env["browser"].new_page()
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(env["url"]) else external.append(r.url))
    page.goto(env["url"] + "/campaigns")
    assert "/login" in page.url
    shot(page, "login")
    page.fill("#token", "wrong-token")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").inner_text() == "That is not the admin token."
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(env["url"] + "/campaigns")  # back where the user wanted to go
    cookie = next(c for c in page.context.cookies() if c["name"] == "dg_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    page.click("text=Log out")
    page.wait_for_url("**/login")
    page.goto(env["url"] + "/")
    assert "/login" in page.url
    assert external == []  # nothing loaded from outside the gateway
    page.close()


def test_overview(env: dict[str, Any], page: Any) -> None:
    page.goto(env["url"] + "/?range=1h")
    cards = page.locator(".card").all_inner_texts()
    requests = int(cards[0].split()[0].replace(",", ""))
    assert requests >= 14 * len(CAMPAIGN)
    assert int(cards[2].split()[0]) >= 1  # the rate-limited campaign account
    assert page.locator("svg.chart rect.s0").count() > 0
    shot(page, "overview")


def test_campaign_action_is_audited(env: dict[str, Any], page: Any) -> None:
    page.goto(env["url"] + "/campaigns")
    shot(page, "campaigns")
    page.click("text=c-1")
    page.wait_for_url("**/campaigns/c-1")
    graph = page.locator("svg.graph").first
    assert graph.locator("circle.n").count() == len(CAMPAIGN)
    for kind in ("payment", "network", "signup", "lockstep", "template"):
        assert page.locator(f"svg.graph line.e.{kind}").count() > 0, kind
    assert "pf_9f2c" in page.locator("svg.graph").first.inner_html()
    assert page.locator("text=Example exchanges").count() == 1
    shot(page, "campaign")
    box = page.locator("section[aria-labelledby=graph-h]").bounding_box()
    page.screenshot(path=str(ARTIFACTS / "campaign-graph.png"), full_page=True,
                    clip={"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"] + 16})
    page.click("text=Links as a list")  # the same links as text, detection's included
    listed = page.locator("section[aria-labelledby=graph-h] details").inner_text()
    assert "shared prompt template: acct_c0 and acct_c1 (same template:" in listed
    assert "lockstep timing:" in listed and "pf_9f2c" in listed
    page.once("dialog", lambda d: d.accept())  # the confirmation before suspending
    page.fill("#reason-campaign", "confirmed distillation campaign, ticket T-42")
    page.click("button.act.suspend")
    page.wait_for_url("**/campaigns/c-1?done=*")
    trail = page.locator(".audit").inner_text()
    assert "dashboard:campaign:suspend" in trail and "ticket T-42" in trail
    page.goto(env["url"] + "/audit")
    assert "ticket T-42" in page.locator("table").inner_text()
    shot(page, "audit")
    page.goto(env["url"] + f"/accounts/{CAMPAIGN[2]}")  # members show the campaign's actions
    assert "ticket T-42" in page.locator(".audit").inner_text()
    # the action took effect: the accounts are suspended and their keys stop working
    assert env["admin"].get(f"/admin/v1/accounts/{CAMPAIGN[3]}").json()["status"] == "suspended"
    r = httpx.post(env["stack"].stack.base_url + "/chat/completions",
                   headers={"authorization": f"Bearer {env['keys'][CAMPAIGN[3]]}"},
                   json={"model": "demo-chat-1", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code in (401, 403)


def test_account_search_and_pages(env: dict[str, Any], page: Any) -> None:
    page.goto(env["url"] + "/accounts")
    page.fill("#q", "198.51.100.")
    page.press("#q", "Enter")
    rows = page.locator("table tbody tr").all_inner_texts()
    assert len(rows) == len(CAMPAIGN) and all("acct_c" in r for r in rows)
    shot(page, "accounts")
    page.click(f"text={CAMPAIGN[1]}")
    page.wait_for_url(f"**/accounts/{CAMPAIGN[1]}")
    assert page.locator("main a[href$='/campaigns/c-1']").count() >= 1
    assert page.locator("table.nav tbody tr").count() == 14
    shot(page, "account")
    page.locator("table.nav tbody tr a").first.click()
    page.wait_for_url("**/exchanges/*")
    assert "Request" in page.inner_text("main") or "not" in page.inner_text("main")
    shot(page, "exchange")
    page.goto(env["url"] + f"/accounts?q={BENIGN[0]}")
    assert page.locator("table tbody tr").count() == 1
    page.goto(env["url"] + "/accounts?q=Shell 3 Ltd")  # by organisation
    assert page.locator("table tbody tr").all_inner_texts()[0].startswith(CAMPAIGN[3])
    key_id = env["admin"].get(f"/admin/v1/accounts/{BENIGN[2]}/keys").json()["data"][0]["key_id"]
    page.fill("#q", key_id)  # by key id
    page.press("#q", "Enter")
    assert page.locator("table tbody tr").all_inner_texts()[0].startswith(BENIGN[2])
    for name in ("review", "ledger"):
        page.goto(env["url"] + f"/{name}")
        assert page.locator("h1").count() == 1
        shot(page, name)


def test_keyboard(env: dict[str, Any], page: Any) -> None:
    page.goto(env["url"] + "/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    page.keyboard.press("g")
    page.keyboard.press("c")
    page.wait_for_url("**/campaigns")
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.textContent") == "c-1"
    page.keyboard.press("Enter")
    page.wait_for_url("**/campaigns/c-1")
    # the graph's account nodes are links in the tab order
    for _ in range(60):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.closest('svg.graph') !== null"):
            break
    else:
        raise AssertionError("Tab never reached the account graph")
    page.keyboard.press("Enter")
    page.wait_for_url("**/accounts/acct_c*")


def test_review_queue_and_ledger_by_keyboard(env: dict[str, Any], page: Any) -> None:
    """A review item opened through the policy component's interface is decided by
    keyboard; an exchange's inclusion proof is checked against the real ledger."""
    from distillguard.policy.review import open_item

    stack = env["stack"]
    stack.call(open_item(_sources(stack).engine, kind="account", subject=BENIGN[4],
                         risk=0.91, evidence=["<b>2,400</b> templated prompts in 1 h"],
                         source="test:browser", action="throttle"))
    page.goto(env["url"] + "/review")
    assert "<b>2,400</b> templated prompts" in page.inner_text("main")  # shown as text
    shot(page, "review-items")
    page.focus("#reason-1")
    page.keyboard.type("needs a second look by legal")
    for _ in range(3):  # the decisions follow the reason: confirm, dismiss, escalate
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.value") == "escalate"
    with page.expect_navigation():
        page.keyboard.press("Enter")
    page.goto(env["url"] + "/review?status=escalated")
    assert BENIGN[4] in page.inner_text("main")
    page.goto(env["url"] + "/audit")
    assert "needs a second look by legal" in page.inner_text("main")
    page.goto(env["url"] + f"/accounts/{BENIGN[0]}")
    page.locator("table.nav tbody tr a").first.click()
    page.wait_for_url("**/exchanges/*")
    exchange_id = page.url.rsplit("/", 1)[1]
    page.focus("text=Inclusion proof in the ledger")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/ledger?exchange_id={exchange_id}")
    assert "proof checks out" in page.inner_text("main"), page.inner_text("main")
    page.click("text=Verify the whole ledger now")
    for _ in range(50):
        page.goto(env["url"] + "/ledger?exchange_id=" + exchange_id)
        if "Verification is running" not in page.inner_text("main"):
            break
        page.wait_for_timeout(100)
    assert "verified at" in page.inner_text("main")
    shot(page, "ledger-proof")


def test_links_to_odd_account_ids(env: dict[str, Any], page: Any) -> None:
    """Account ids are almost any text; the browser's link to each opens its own page
    (it resolved "/accounts/.." to the overview, and "a?x=1#y" to account "a")."""
    odd = ["..", ".", "x/..", "a?x=1#y", "a b/c", "%2e%2e"]
    for account_id in ["a", *odd]:
        env["admin"].post("/admin/v1/accounts", json={"account_id": account_id,
                                                      "org": "Odd Ids Ltd"}).raise_for_status()
    search = env["url"] + "/accounts?q=Odd+Ids+Ltd"
    page.goto(search)
    names = page.locator("table tbody tr td:first-child a").all_inner_texts()
    assert sorted(names) == sorted(["a", *odd])
    for n, name in enumerate(names):
        page.goto(search)
        with page.expect_navigation():
            page.locator("table tbody tr td:first-child a").nth(n).click()
        assert page.locator("h1").inner_text() == f"Account {name} active", page.url


def test_nothing_loaded_from_elsewhere(env: dict[str, Any]) -> None:
    origin = env["url"].removesuffix("/dashboard")
    seen = env["requests"]
    assert any(u.endswith("/dashboard/static/dashboard.css") for u in seen)
    assert len(seen) > 20 and [u for u in seen if not u.startswith(origin + "/")] == []
