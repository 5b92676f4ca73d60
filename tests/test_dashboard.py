"""The dashboard over HTTP: log-in, sessions, CSRF, pages; its index, graph and charts."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from distillguard.dashboard import charts, dashboard_extension, graph, queries
from distillguard.dashboard.index import (
    INDEX_TEXT_MAX,
    IndexStage,
    create_schema,
    row_of,
    write_rows,
)
from distillguard.errors import ConfigError
from distillguard.serve import StackThread
from distillguard.store import open_state_store
from tests.factories import ADMIN_TOKEN, make_exchange, make_settings, start_stack


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[tuple[StackThread, httpx.Client]]:
    stack = start_stack(make_settings(tmp_path))
    with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
        try:
            yield stack, client
        finally:
            stack.stop()


def login(client: httpx.Client) -> str:
    """Log in; returns the CSRF token and sets the session cookie on the client."""
    form = client.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    r = client.post("/login", data={"token": ADMIN_TOKEN, "login_token": token,
                                    "next": "/dashboard/accounts"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/accounts"
    cookie = r.headers["set-cookie"]
    for part in ("HttpOnly", "Secure", "SameSite=strict", "Path=/dashboard"):
        assert part in cookie
    # httpx keeps Secure cookies for https only; send it by hand over the test's http.
    client.headers["cookie"] = "dg_session=" + r.cookies["dg_session"]
    page = client.get("/accounts").text
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]


def test_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dashboard.session_secret"):
        dashboard_extension(make_settings(tmp_path, dashboard={"session_secret": "short"}))
    with pytest.raises(ConfigError, match="dashboard.colour"):
        dashboard_extension(make_settings(tmp_path, dashboard={"colour": "blue"}))
    assert dashboard_extension(make_settings(tmp_path, dashboard={"enabled": False})) is None


def test_pages_need_a_session(dash: tuple[StackThread, httpx.Client]) -> None:
    _, client = dash
    r = client.get("/campaigns?x=1")
    assert r.status_code == 303
    assert r.headers["location"] == "/dashboard/login?next=/dashboard/campaigns%3Fx%3D1"
    assert client.post("/actions", data={"kind": "account"}).status_code == 403
    client.headers["cookie"] = "dg_session=forged.value.sig"
    assert client.get("/").status_code == 303
    # the admin API's bearer token is not a session
    assert client.get("/", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 303



def test_without_an_admin_token_no_cookie_opens_the_dashboard(tmp_path: Path) -> None:
    """With no admin token configured the log-in form refuses everyone, but the pages
    took any cookie signed with the key derived from the empty token, which anyone can
    compute from the source: a forged cookie opened every page and its form token
    (chosen by the forger) applied actions."""
    from itsdangerous import URLSafeTimedSerializer

    from distillguard.dashboard import DashboardSettings

    stack = start_stack(make_settings(tmp_path, admin={"token": None}))
    try:
        key = DashboardSettings().signing_key("")
        forged = URLSafeTimedSerializer(key, salt="dashboard-session").dumps(
            {"sid": "forged", "csrf": "chosen", "iat": int(time.time())})
        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard",
                          headers={"cookie": f"dg_session={forged}"}) as client:
            for path in ("/", "/accounts", "/audit", "/api/traffic"):
                r = client.get(path)
                assert r.status_code == 303, path
                assert r.headers["location"].startswith("/dashboard/login")
            r = client.post("/actions", data={"csrf": "chosen", "kind": "account",
                                              "target": "acct_1", "action": "suspend",
                                              "reason": "forged"})
            assert r.status_code == 403
            form = client.get("/login").text
            token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
            r = client.post("/login", data={"token": "x" * 20, "login_token": token})
            assert r.status_code == 403 and "no admin token is configured" in r.text
    finally:
        stack.stop()

def test_login_logout_and_headers(dash: tuple[StackThread, httpx.Client]) -> None:
    _, client = dash
    csrf = login(client)
    r = client.get("/")
    assert r.status_code == 200
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    assert "https://" not in r.text and "http://" not in r.text.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    r = client.post("/logout", data={"csrf": csrf})
    assert r.status_code == 303 and 'dg_session=""' in r.headers["set-cookie"]


def test_login_rejects_bad_tokens_and_throttles(dash: tuple[StackThread, httpx.Client]) -> None:
    _, client = dash
    form = client.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    assert client.post("/login", data={"token": ADMIN_TOKEN, "login_token": "x"}
                       ).status_code == 403
    for _ in range(10):
        r = client.post("/login", data={"token": "nope", "login_token": token})
        assert r.status_code == 401 and "set-cookie" not in r.headers
    r = client.post("/login", data={"token": ADMIN_TOKEN, "login_token": token})
    assert r.status_code == 429  # even the right token waits out the minute



def test_behind_a_proxy_failed_logins_count_against_the_browsers_address(
        tmp_path: Path) -> None:
    """Failed log-ins were counted against the TCP peer: behind the TLS-terminating proxy
    the documentation describes (in server.trusted_proxies), that is the proxy, so ten
    wrong tokens a minute from anyone refused every analyst's log-in. They now count
    against the browser's address as the proxy forwards it (X-Forwarded-For, believed
    only from a trusted proxy)."""
    stack = start_stack(make_settings(tmp_path, server={"trusted_proxies": ["127.0.0.1/32"]}))
    try:
        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
            form = client.get("/login").text
            token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
            guesser = {"x-forwarded-for": "192.0.2.66"}
            for _ in range(10):
                r = client.post("/login", data={"token": "nope", "login_token": token},
                                headers=guesser)
                assert r.status_code == 401
            right = {"token": ADMIN_TOKEN, "login_token": token}
            assert client.post("/login", data=right, headers=guesser).status_code == 429
            # the guesser cannot step out of its count by naming another address itself
            spoofed = {"x-forwarded-for": "203.0.113.9, 192.0.2.66"}
            assert client.post("/login", data=right, headers=spoofed).status_code == 429
            analyst = {"x-forwarded-for": "198.51.100.5"}
            assert client.post("/login", data=right, headers=analyst).status_code == 303
    finally:
        stack.stop()

def test_login_never_redirects_off_site(dash: tuple[StackThread, httpx.Client]) -> None:
    _, client = dash
    form = client.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    for target in ("//evil.example/", "https://evil.example/", "/dashboard//evil.example"):
        r = client.post("/login", data={"token": ADMIN_TOKEN, "login_token": token,
                                        "next": target})
        assert r.headers["location"] == "/dashboard/"



def test_a_form_body_is_refused_past_its_limit(dash: tuple[StackThread, httpx.Client]) -> None:
    """The log-in form, which anyone who reaches the admin port can post, read the whole
    body before checking anything: up to a thousand fields of 1 MB each into the gateway's
    memory, or a multipart file of any size to disk. A body longer than any dashboard
    form is now refused with a 413 as soon as it is read past the limit."""
    from distillguard.dashboard.security import MAX_FORM_BYTES

    stack, client = dash
    form = client.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    pad = "x" * MAX_FORM_BYTES
    r = client.post("/login", data={"token": "nope", "login_token": token, "pad": pad})
    assert r.status_code == 413 and "larger than any" in r.text
    assert r.headers["cache-control"] == "no-store"

    def chunks() -> Iterator[bytes]:   # no Content-Length: counted as it arrives
        yield f"token=nope&login_token={token}&pad=".encode()
        for _ in range(MAX_FORM_BYTES // 1024 + 1):
            yield b"x" * 1024

    r = client.post("/login", content=chunks(),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    r = client.post("/login", data={"token": "nope", "login_token": token},
                    files={"f": ("f.bin", b"x" * (MAX_FORM_BYTES + 1))})
    assert r.status_code == 413
    # forms of any ordinary size still work, the longest reason included
    csrf = login(client)
    with httpx.Client(base_url=stack.stack.admin_url,
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        admin.post("/admin/v1/accounts", json={"account_id": "acct_l"}).raise_for_status()
        form = {"kind": "account", "target": "acct_l", "action": "suspend", "csrf": csrf}
        r = client.post("/actions", data={**form, "reason": "\u00e9" * 500})
        assert r.status_code == 303
        r = client.post("/actions", data={**form, "action": "reinstate", "reason": pad})
        assert r.status_code == 413
        assert admin.get("/admin/v1/accounts/acct_l").json()["status"] == "suspended"

def test_logout_ends_the_session_for_a_copied_cookie(
        dash: tuple[StackThread, httpx.Client]) -> None:
    """Logging out only deleted the browser's cookie: a copy of it (another browser, a
    proxy's log, a stolen laptop's profile) still opened every page and still suspended
    accounts with the old form token, for the rest of the 8 hours."""
    stack, client = dash
    csrf = login(client)
    copied = client.headers["cookie"]
    with httpx.Client(base_url=stack.stack.admin_url,
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        admin.post("/admin/v1/accounts", json={"account_id": "acct_y"}).raise_for_status()
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard",
                          headers={"cookie": copied}) as copy:
            for path in ("/", "/accounts", "/api/traffic"):
                r = copy.get(path)
                assert r.status_code == 303, path
                assert r.headers["location"].startswith("/dashboard/login?next=")
            r = copy.post("/actions", data={"kind": "account", "target": "acct_y",
                                            "action": "suspend", "reason": "after log-out",
                                            "csrf": csrf})
            assert r.status_code == 403
        assert admin.get("/admin/v1/accounts/acct_y").json()["status"] == "active"
    # logging in again makes a new session that works
    login(client)
    assert client.get("/").status_code == 200


@pytest.mark.postgres
def test_logout_ends_the_session_on_every_replica(tmp_path: Path, pg_url: str) -> None:
    """A session logged out through one gateway replica went on working on the others
    sharing the state store."""
    replicas = [start_stack(make_settings(tmp_path / name, state={"url": pg_url}))
                for name in ("a", "b")]
    try:
        with httpx.Client(base_url=replicas[0].stack.admin_url + "/dashboard") as here, \
                httpx.Client(base_url=replicas[1].stack.admin_url + "/dashboard") as there:
            csrf = login(here)
            there.headers["cookie"] = here.headers["cookie"]
            assert there.get("/").status_code == 200   # one session, any replica
            assert here.post("/logout", data={"csrf": csrf}).status_code == 303
            assert here.get("/").status_code == 303
            deadline = time.monotonic() + 1.0
            while there.get("/").status_code == 200:
                assert time.monotonic() < deadline, "the other replica still takes it"
                time.sleep(0.05)
    finally:
        for replica in replicas:
            replica.stop()


def test_a_session_left_unused_ends(dash: tuple[StackThread, httpx.Client]) -> None:
    """A dashboard left logged in on an unattended screen stayed usable for the whole
    8 hours. Now a session unused for session_idle_s (30 minutes) ends; using it keeps it
    going (its cookie is signed again), up to session_max_age_s from log-in."""
    from itsdangerous import TimestampSigner, URLSafeTimedSerializer

    from distillguard.dashboard import DashboardSettings

    _, client = dash
    login(client)
    key = DashboardSettings().signing_key(ADMIN_TOKEN)
    cookie = client.headers["cookie"].removeprefix("dg_session=")
    data = URLSafeTimedSerializer(key, salt="dashboard-session").loads(cookie)

    def signed(payload: dict[str, object], ago: int) -> str:
        class Earlier(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(time.time()) - ago

        return "dg_session=" + str(URLSafeTimedSerializer(
            key, salt="dashboard-session", signer=Earlier).dumps(payload))

    r = client.get("/", headers={"cookie": signed(data, 31 * 60)})
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")
    r = client.get("/", headers={"cookie": signed(data, 29 * 60)})
    assert r.status_code == 200 and "dg_session=" in r.headers["set-cookie"]  # signed anew
    assert client.get("/").status_code == 200   # signed just now: no new cookie needed
    assert "set-cookie" not in client.get("/").headers
    old = {**data, "iat": int(time.time()) - 8 * 3600 - 5}
    assert client.get("/", headers={"cookie": signed(old, 0)}).status_code == 303
    assert client.get("/", headers={"cookie": signed({"sid": data["sid"], "csrf": data["csrf"]},
                                                     0)}).status_code == 303


def test_status_banner_shows_only_the_dashboards_own_messages(
        dash: tuple[StackThread, httpx.Client]) -> None:
    """Any text in ?done= was shown as the green status banner, on the log-in page too,
    so a link could greet an analyst with "The dashboard moved: log in at
    https://evil.example" in the dashboard's own voice."""
    stack, client = dash
    lure = "The dashboard moved: log in at https://evil.example"
    banner = 'class="flash ok"'
    for page in (client.get("/login", params={"done": lure}).text,
                 client.get("/login?done=verification+finished").text):
        assert banner not in page and "evil.example" not in page
    csrf = login(client)
    page = client.get("/accounts", params={"done": lure}).text
    assert banner not in page and "evil.example" not in page
    with httpx.Client(base_url=stack.stack.admin_url,
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        admin.post("/admin/v1/accounts", json={"account_id": "acct_z"}).raise_for_status()
    r = client.post("/actions", data={"kind": "account", "target": "acct_z",
                                      "action": "suspend", "reason": "abuse report 9",
                                      "csrf": csrf, "next": "/dashboard/accounts/acct_z"})
    assert r.status_code == 303
    page = client.get(r.headers["location"].removeprefix("/dashboard")).text
    assert f'<p {banner} role="status">suspend applied to 1 account(s)</p>' in page
    # the message is for the session whose action it reports, not for a link's reader
    login(client)
    assert banner not in client.get(r.headers["location"].removeprefix("/dashboard")).text


def test_login_next_cannot_climb_out_of_the_dashboard(
        dash: tuple[StackThread, httpx.Client]) -> None:
    """next=/dashboard/../../admin/v1/accounts passed the check for "starts with
    /dashboard/", so the analyst, just logged in, was sent wherever the dot segments
    led once the browser resolved them (%2e%2e too); an action form's next= the same."""
    stack, client = dash
    form = client.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    outside = ("/dashboard/../../admin/v1/accounts", "/dashboard/%2e%2e/admin/v1/accounts",
               "/dashboard/.%2E/admin", "/dashboard/accounts/../../admin", "/dashboard/..",
               "/dashboard/%2E%2E", "/dashboard/\t/evil", "/dashboard/x/..//evil.example",
               "/dashboard/\\evil.example")
    for target in outside:
        r = client.post("/login", data={"token": ADMIN_TOKEN, "login_token": token,
                                        "next": target})
        assert r.headers["location"] == "/dashboard/", target
    r = client.get("/login", params={"next": "/dashboard/../admin/v1/accounts"})
    assert 'name="next" value="/dashboard/"' in r.text
    inside = {"/dashboard/accounts/../campaigns?x=1": "/dashboard/campaigns?x=1",
              "/dashboard/./accounts/acct%20a": "/dashboard/accounts/acct%20a",
              "/dashboard/accounts?q=a/../b": "/dashboard/accounts?q=a/../b"}
    for target, expected in inside.items():
        r = client.post("/login", data={"token": ADMIN_TOKEN, "login_token": token,
                                        "next": target})
        assert r.headers["location"] == expected, target
    csrf = login(client)
    with httpx.Client(base_url=stack.stack.admin_url,
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        admin.post("/admin/v1/accounts", json={"account_id": "acct_n"}).raise_for_status()
    r = client.post("/actions", data={"kind": "account", "target": "acct_n",
                                      "action": "suspend", "reason": "dots", "csrf": csrf,
                                      "next": "/dashboard/%2e%2e/admin/v1/accounts"})
    assert r.status_code == 303 and r.headers["location"].split("?")[0] == "/dashboard/"


def test_every_dashboard_response_has_the_security_headers(
        dash: tuple[StackThread, httpx.Client]) -> None:
    """/dashboard/api/traffic (the overview's numbers as JSON) came without the
    dashboard's headers: no Cache-Control: no-store, so a browser or proxy could keep the
    logged-in answer, and no nosniff, CSP or X-Frame-Options."""
    _, client = dash

    def check(r: httpx.Response) -> None:
        assert r.headers.get("cache-control") == "no-store", r.url
        assert r.headers.get("x-content-type-options") == "nosniff", r.url
        assert r.headers.get("x-frame-options") == "DENY", r.url
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), r.url
        assert r.headers.get("referrer-policy") == "same-origin", r.url

    login(client)
    r = client.get("/api/traffic?range=1h")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    check(r)
    check(client.get("/static/dashboard.css"))
    for path in ("/", "/accounts/nobody", "/no-such-page"):
        check(client.get(path))
    check(client.get("/logout"))                # 405
    client.headers.pop("cookie")
    check(client.get("/api/traffic"))           # the redirect to log in
    check(client.get("/login"))


def test_action_forms_need_csrf_same_origin_and_a_reason(
        dash: tuple[StackThread, httpx.Client]) -> None:
    stack, client = dash
    csrf = login(client)
    admin = httpx.Client(base_url=stack.stack.admin_url,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    admin.post("/admin/v1/accounts", json={"account_id": "acct_x"}).raise_for_status()
    form = {"kind": "account", "target": "acct_x", "action": "suspend",
            "reason": "abuse report 7", "next": "/dashboard/accounts/acct_x"}
    assert client.post("/actions", data=form).status_code == 403
    assert client.post("/actions", data={**form, "csrf": "wrong"}).status_code == 403
    assert client.post("/actions", data={**form, "csrf": csrf},
                       headers={"origin": "http://evil.example"}).status_code == 403
    assert client.post("/actions", data={**form, "csrf": csrf, "reason": ""}).status_code == 400
    assert client.post("/actions", data={**form, "csrf": csrf, "action": "nuke"}
                       ).status_code == 400
    r = client.post("/actions", data={**form, "csrf": csrf, "target": "acct_nobody"})
    assert r.status_code == 404 and "There is no account &#39;acct_nobody&#39;." in r.text
    assert admin.get("/admin/v1/accounts/acct_x").json()["status"] == "active"
    r = client.post("/actions", data={**form, "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].startswith(
        "/dashboard/accounts/acct_x?done=")
    assert admin.get("/admin/v1/accounts/acct_x").json()["status"] == "suspended"
    page = client.get("/accounts/acct_x").text
    assert "dashboard:account:suspend" in page and "abuse report 7" in page
    r = client.post("/actions", data={**form, "csrf": csrf, "action": "reinstate",
                                      "reason": "appeal upheld"})
    assert r.status_code == 303
    assert admin.get("/admin/v1/accounts/acct_x").json()["status"] == "active"
    trail = client.get("/audit?subject=account:acct_x").text
    assert trail.index("dashboard:account:reinstate") < trail.index("dashboard:account:suspend")
    admin.close()


def test_forms_take_only_the_dashboards_own_origin(
        dash: tuple[StackThread, httpx.Client]) -> None:
    """The Origin check compared only the host and port: a form from https://host:port
    (another origin: another scheme) was taken by the plain-HTTP admin port."""
    stack, client = dash
    csrf = login(client)
    own = stack.stack.admin_url
    host, port = own.removeprefix("http://").rsplit(":", 1)
    with httpx.Client(base_url=own, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        admin.post("/admin/v1/accounts", json={"account_id": "acct_o"}).raise_for_status()
        form = {"kind": "account", "target": "acct_o", "action": "suspend",
                "reason": "origin test", "csrf": csrf}
        other = ["https://" + own.removeprefix("http://"), f"http://{host}:{int(port) + 1}",
                 f"http://{host}", f"http://localhost:{port}", "http://evil.example",
                 f"http://{host}:{port}.evil.example", f"{own}/", f"http://u@{host}:{port}",
                 "null", ""]
        for origin in other:
            r = client.post("/actions", data=form, headers={"origin": origin})
            assert r.status_code == 403, origin
        # X-Forwarded-Proto is believed only from server.trusted_proxies (none here)
        r = client.post("/actions", data=form, headers={"origin": other[0],
                                                        "x-forwarded-proto": "https"})
        assert r.status_code == 403
        assert admin.get("/admin/v1/accounts/acct_o").json()["status"] == "active"
        # the dashboard's own origin, and no Origin at all (the CSRF token decides)
        for origin, action in ((own, "suspend"), (None, "reinstate")):
            r = client.post("/actions", data={**form, "action": action},
                            headers={"origin": origin} if origin else {})
            assert r.status_code == 303, origin
        assert admin.get("/admin/v1/accounts/acct_o").json()["status"] == "active"
        assert "dashboard:account:suspend" in client.get("/audit").text
    # the log-in form is checked the same way
    client.headers.pop("cookie")
    page = client.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    for origin, status in ((other[0], 403), (own, 303)):
        r = client.post("/login", data={"token": ADMIN_TOKEN, "login_token": token},
                        headers={"origin": origin})
        assert r.status_code == status, origin


def test_behind_a_tls_proxy_the_dashboards_origin_is_https() -> None:
    """A TLS-terminating proxy speaking HTTP to the admin port: the browser's origin is
    https://..., which the proxy says in X-Forwarded-Proto; that header is believed from a
    proxy in server.trusted_proxies and from no one else."""
    from starlette.requests import Request

    from distillguard.dashboard.security import OwnOrigin

    def same(peer: str, origin: str, proto: str | None = None, scheme: str = "http",
             host: str = "dash.example") -> bool:
        headers = [(b"host", host.encode()), (b"origin", origin.encode())]
        if proto is not None:
            headers.append((b"x-forwarded-proto", proto.encode()))
        return OwnOrigin(["10.0.0.0/8"]).same(Request({
            "type": "http", "method": "POST", "scheme": scheme, "path": "/dashboard/actions",
            "query_string": b"", "headers": headers, "client": (peer, 50000)}))

    assert same("10.1.2.3", "https://dash.example", "https")
    assert same("::ffff:10.1.2.3", "https://dash.example", "HTTPS, http")
    assert not same("10.1.2.3", "http://dash.example", "https")
    assert not same("10.1.2.3", "https://evil.example", "https")
    assert same("10.1.2.3", "http://dash.example", "gopher")     # not a scheme: the socket's
    assert not same("192.0.2.1", "https://dash.example", "https")   # not a trusted proxy
    assert same("192.0.2.1", "http://dash.example", "https")
    # HTTPS on the admin port itself (server.tls_cert_file)
    assert same("192.0.2.1", "https://dash.example", scheme="https")
    assert same("192.0.2.1", "https://dash.example", scheme="https", host="dash.example:443")
    assert not same("192.0.2.1", "http://dash.example", scheme="https")
    assert same("192.0.2.1", "https://dash.example:8443", scheme="https",
                host="dash.example:8443")
    assert not same("192.0.2.1", "https://dash.example", scheme="https",
                    host="dash.example:8443")
    assert not same("192.0.2.1", "https://dash.example", scheme="https", host="")


def test_redirects_stay_on_the_dashboards_own_site(
        dash: tuple[StackThread, httpx.Client]) -> None:
    """GET /dashboard (no final slash) was answered by Starlette with a redirect to an
    absolute address built from the request's Host header: a forged Host sent the browser,
    or a cache between it and the gateway, to another site. So did /dashboard/campaigns/
    and every other page's address with a final slash."""
    stack, client = dash
    forged = {"host": "evil.example"}
    r = httpx.get(stack.stack.admin_url + "/dashboard", headers=forged)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard/"
    assert r.headers["cache-control"] == "no-store"
    assert httpx.get(stack.stack.admin_url + "/dashboard?x=1", headers=forged,
                     follow_redirects=True).url.path == "/dashboard/login"
    paths = ("/campaigns/", "/accounts/", "/ledger/", "/login/", "/api/traffic/", "/audit/")
    for logged_in in (False, True):
        if logged_in:
            login(client)
        for path in paths:
            r = client.get(path, headers=forged)
            location = r.headers.get("location", "")
            assert "evil.example" not in location and r.status_code != 307, (path, location)
            assert not location or location.startswith("/dashboard/"), (path, location)
    r = client.get("/campaigns/", headers=forged)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/campaigns"


def test_unknown_things_are_404_pages(dash: tuple[StackThread, httpx.Client]) -> None:
    _, client = dash
    login(client)
    for path in ("/accounts/nobody", "/campaigns/c-none", "/exchanges/ex_nothing"):
        r = client.get(path)
        assert r.status_code == 404 and "<h1>404</h1>" in r.text


def test_a_failing_page_is_a_500_page_and_the_connection_lives_on(
        dash: tuple[StackThread, httpx.Client], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A page that fails answers the 500 page once; the keep-alive connection it came on
    stays usable (it was dropped, so the client's next request failed)."""
    _, client = dash
    csrf = login(client)

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(queries, "search_accounts", broken)
    with caplog.at_level("ERROR"):
        for _ in range(3):
            r = client.get("/accounts", params={"q": "x"})
            assert r.status_code == 500 and "This page failed" in r.text
    assert [rec.getMessage() for rec in caplog.records] == [
        "dashboard page /dashboard/accounts failed"] * 3
    assert client.get("/accounts/nobody").status_code == 404
    # a NUL, which PostgreSQL fails on in a query, is a 400 page before any query runs
    for r in (client.get("/accounts/a%00b"), client.get("/audit", params={"subject": "\x00"}),
              client.post("/actions", data={"csrf": csrf, "kind": "account", "target": "a",
                                            "action": "suspend", "reason": "a\x00b"})):
        assert r.status_code == 400 and "NUL character" in r.text, r.text


# -- index, queries, graph, charts ----------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'i.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


async def _engine(url: str):  # type: ignore[no-untyped-def]
    store = open_state_store(url)
    await store.migrate()
    await create_schema(store.engine)  # type: ignore[attr-defined]
    return store


async def test_index_rollups_and_keyset_pages(state_url: str) -> None:
    store = await _engine(state_url)
    engine = store.engine  # type: ignore[attr-defined]
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    rows = []
    for i in range(230):
        ex = make_exchange(f"q {i}", account_id=f"acct_{i % 3}", ts=t0 + timedelta(seconds=i),
                           status=(429 if i % 10 == 0 else 403 if i % 25 == 1 else 200),
                           client_ip=f"198.51.100.{i % 3}")
        rows.append(row_of(ex))
    assert await write_rows(engine, rows[:100]) == 100
    assert await write_rows(engine, rows) == 130  # already indexed rows are not counted twice
    b = queries.bucketing(t0 + timedelta(minutes=3), "1h")
    t = await queries.traffic(engine, b, "1h")
    assert sum(t["total"]) == 230
    assert sum(t["limited"]) == 23 and sum(t["denied"]) == 10
    assert sum(t["ok"]) == 230 - 23 - 10
    for name in queries.RANGES:  # the SQL bucket keys agree with the Python ones
        wide = queries.bucketing(t0 + timedelta(minutes=3), name)
        assert sum((await queries.traffic(engine, wide, name))["total"]) == 230, name
    seen: list[str] = []
    before = None
    while True:
        page = await queries.exchanges_page(engine, column="account_id", values=["acct_1"],
                                            before=before, limit=20)
        if not page:
            break
        seen += [r["exchange_id"] for r in page]
        before = (page[-1]["ts"], page[-1]["exchange_id"])
    expected = sorted((r for r in rows if r["account_id"] == "acct_1"),
                      key=lambda r: (r["ts"], r["exchange_id"]), reverse=True)
    assert seen == [r["exchange_id"] for r in expected]
    # the per-account roll-ups agree with the rows
    profile = await queries.account_profile(engine, "acct_1")
    assert profile["exchanges"] == len(expected) and profile["ips"] == 1
    assert profile["by_hour"][12] == len(expected) and profile["first"] == expected[-1]["ts"]
    ids = ["acct_0", "acct_1", "acct_2"]
    last = await queries.group_last_hour(engine, ids)
    assert last == datetime(2026, 3, 1, 12, 59, 59, tzinfo=UTC)
    for name in ("1h", "7d"):
        stats = await queries.group_stats(engine, ids, queries.bucketing(last, name), name)
        assert sum(stats["series"]) == 230 and dict(stats["models"]) == {"demo-chat-1": 230}
    examples = await queries.group_examples(engine, ids, last, limit=5)
    assert [r["exchange_id"] for r in examples] == [r["exchange_id"] for r in sorted(
        rows, key=lambda r: r["ts"], reverse=True)[:5]]
    assert await queries.group_ips(engine, ["acct_2"]) == {"acct_2": {"198.51.100.2"}}
    seconds = await queries.group_seconds(engine, ["acct_0"], "2026-03-01T12:03")
    assert len(seconds["acct_0"]) == len([r for r in rows if r["account_id"] == "acct_0"
                                          and r["ts"] >= "2026-03-01T12:03"])
    assert (await queries.totals(engine))["exchanges"] == 230
    busiest = await queries.busiest_accounts(engine, datetime(2026, 3, 1, 12, tzinfo=UTC), 2)
    assert [(r["account_id"], int(r["total"])) for r in busiest] == [("acct_0", 77),
                                                                    ("acct_1", 77)]
    assert await queries.latest_minute(engine) == datetime(2026, 3, 1, 12, 3, tzinfo=UTC)
    await store.close()


async def test_a_row_the_database_refuses_loses_only_itself(state_url: str) -> None:
    """A client names the model it asks for: a NUL in that name (which PostgreSQL cannot
    keep in text) made the index drop its whole batch of exchanges. Names are now kept
    with U+FFFD and cut short; and a row the database refuses for any other reason is
    retried alone, so the rest of its batch is indexed."""
    store = await _engine(state_url)
    engine = store.engine  # type: ignore[attr-defined]
    stage = IndexStage(lambda: engine, batch=1000)
    plain = [make_exchange(f"q {i}", account_id="acct_n") for i in range(20)]
    odd = make_exchange("odd", account_id="acct_n", model="demo\x00chat" + "x" * 1000)
    for ex in [*plain[:10], odd, *plain[10:]]:
        await stage.on_exchange(ex)
    poison = {**row_of(make_exchange("poison")), "status": None}    # NOT NULL
    stage._rows.insert(5, poison)
    await stage.flush()
    assert (await queries.totals(engine))["exchanges"] == 21
    page = await queries.exchanges_page(engine, column="account_id", values=["acct_n"],
                                        before=None, limit=50)
    assert {r["exchange_id"] for r in page} == {ex.id for ex in [*plain, odd]}
    [kept] = [r["model"] for r in page if r["exchange_id"] == odd.id]
    assert kept == ("demo\ufffdchat" + "x" * 1000)[:INDEX_TEXT_MAX]
    await store.close()


async def test_index_writers_at_once_on_the_same_exchanges_each_count_them_once(
        state_url: str) -> None:
    """``distillguard dashboard index TRACE`` beside the gateway's own indexer, on
    exchanges both had: each looked for the rows already indexed before either wrote,
    and the later one failed on the duplicates with its whole batch (20 of 20 pairs;
    3000 of 4000 exchanges indexed)."""
    from collections import Counter

    from sqlalchemy import text

    stores = [await _engine(state_url), open_state_store(state_url)]
    engines = [s.engine for s in stores]  # type: ignore[attr-defined]
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    errors: Counter[str] = Counter()
    written = 0
    for trial in range(10):
        rows = [row_of(make_exchange(f"q {i}", account_id=f"acct_{i % 3}",
                                     client_ip=f"198.51.100.{i % 5}",
                                     ts=t0 + timedelta(minutes=trial, seconds=i / 5)))
                for i in range(200)]
        outcomes = await asyncio.gather(write_rows(engines[0], rows[:150]),
                                        write_rows(engines[1], rows[50:]),
                                        return_exceptions=True)
        errors.update(type(o).__name__ for o in outcomes if isinstance(o, BaseException))
        written += sum(o for o in outcomes if isinstance(o, int))
    async with engines[0].connect() as conn:
        counts = [(await conn.execute(text(sql))).scalar_one() for sql in (
            "SELECT COUNT(*) FROM dashboard_exchanges",
            "SELECT SUM(total) FROM dashboard_minutes",
            "SELECT SUM(total) FROM dashboard_account_hours",
            "SELECT SUM(n) FROM dashboard_account_mix",
            "SELECT SUM(n) FROM dashboard_account_ips")]
    for store in stores:
        await store.close()
    assert errors == Counter()
    assert [written, *counts] == [2000] * 6


@pytest.mark.postgres
async def test_exchanges_wait_while_the_database_is_away(pg_url: str) -> None:
    """The state database cut off: the index dropped every exchange of the outage (each
    row retried alone, each failing). Rows now wait in memory and are written, by the
    stage's own retries, once the database answers."""
    from tests.tcp_proxy import CuttableProxy

    pg = CuttableProxy(5432).start()
    store = await _engine(pg_url.replace(":5432/", f":{pg.port}/"))
    engine = store.engine  # type: ignore[attr-defined]
    stage = IndexStage(lambda: engine, batch=1000, flush_s=0.05)
    try:
        for i in range(3):
            await stage.on_exchange(make_exchange(f"before {i}", account_id="acct_w"))
        await stage.flush()
        pg.cut()
        for i in range(5):
            await stage.on_exchange(make_exchange(f"away {i}", account_id="acct_w"))
        await stage.flush()
        assert stage.waiting_since is not None and len(stage._rows) == 5
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(stage.metrics)
        assert b"distillguard_dashboard_index_waiting 5.0" in generate_latest(registry)
        pg.restore()
        deadline = time.monotonic() + 20
        while stage._rows or stage.waiting_since is not None:
            assert time.monotonic() < deadline, "the waiting rows were not written"
            await asyncio.sleep(0.05)
        assert (await queries.totals(engine))["exchanges"] == 8 and stage.dropped == 0
    finally:
        await stage.close()
        await store.close()
        pg.close()


async def test_account_search_by_ip_and_key(state_url: str) -> None:
    from tests.factories import make_account

    store = await _engine(state_url)
    for name in ("acct_a", "acct_b", "acct_c"):
        await store.put_account(make_account(name, org=f"Org {name}"))
    key, _secret = await store.create_key("acct_b")
    await write_rows(store.engine, [  # type: ignore[attr-defined]
        row_of(make_exchange(account_id="acct_a", client_ip="203.0.113.9")),
        row_of(make_exchange(account_id="acct_c", client_ip="203.0.113.44")),
    ])
    engine = store.engine  # type: ignore[attr-defined]

    async def ids(q: str, after: str | None = None) -> list[str]:
        return [r["account_id"] for r in await queries.search_accounts(engine, q, after=after,
                                                                       limit=10)]
    assert await ids("203.0.113.9") == ["acct_a"]
    assert await ids("203.0.113.") == ["acct_a", "acct_c"]
    assert await ids(key.key_id) == ["acct_b"]
    assert await ids("Org acct_c") == ["acct_c"]
    assert await ids("", after="acct_a") == ["acct_b", "acct_c"]
    await store.close()


def test_graph_links_what_accounts_share() -> None:
    base = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    accounts = [{"account_id": f"a{i}", "payment_fingerprint": "pf_1" if i < 3 else f"pf_{i}",
                 "created_at": (base + timedelta(minutes=5 * i if i < 3 else 3000 * i)
                                ).isoformat()} for i in range(5)]
    # a domain of their own links a3 and a4; gmail.com links no one
    for a, domain in zip(accounts, ("gmail.com", "gmail.com", None, "mail9e62.xyz",
                                    "Mail9e62.xyz"), strict=True):
        a["email_domain"] = domain
    ips = {"a0": {"198.51.100.7"}, "a1": {"198.51.100.200"}, "a4": {"203.0.113.1"}}
    seconds = {a: {f"2026-03-01T10:00:0{s}" for s in range(6)} for a in ("a2", "a3")}
    g = graph.build_graph(accounts, ips, seconds, detected=[
        {"a": "a3", "b": "a4", "type": "template", "detail": "same 6 leading words"}])
    kinds = {(a, b, k) for a, b, k, _ in g.edges}
    assert {("payment:pf_1", m, "payment") for m in ("a0", "a1", "a2")} <= kinds
    assert {("network:198.51.100.0/24", m, "network") for m in ("a0", "a1")} <= kinds
    assert ("a2", "a3", "lockstep") in kinds and ("a3", "a4", "template") in kinds
    signup = [e for e in g.edges if e[2] == "signup"]
    assert sorted(e[1] for e in signup) == ["a0", "a1", "a2"]
    assert {("org:mail9e62.xyz", m, "org") for m in ("a3", "a4")} <= kinds
    assert not any(k == "org" and "a0" in (a, b) for a, b, k, _ in g.edges)
    assert not any("a4" in (a, b) for a, b, k, _ in g.edges if k not in ("template", "org"))
    svg = graph.render_svg(g, flagged={"a0"}, href=lambda a: f"/dashboard/accounts/{a}")
    assert svg.count("<circle") == 5 and 'class="n flagged"' in svg
    assert 'href="/dashboard/accounts/a3"' in svg


def test_charts_draw_every_bucket() -> None:
    svg = charts.stacked_bars([charts.Series("ok", [1, 0, 3], "s0"),
                               charts.Series("denied", [1, 2, 0], "s1")],
                              ["a", "b", "c"], title="T<1>", ident="x")
    assert svg.count("<rect") == 4 + 2  # four non-zero segments and two legend swatches
    assert "<title id=\"x-t\">T&lt;1&gt;</title>" in svg
    line = charts.lines([charts.Series("open", [0, 1, 2])], ["a", "b", "c"], title="L",
                        ident="y")
    assert line.count("<polyline") == 1


def test_open_over_time_counts_intervals() -> None:
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    b = queries.bucketing(t0 + timedelta(minutes=5), "1h")
    counts = queries.open_over_time(
        [(t0, None), (t0 + timedelta(minutes=2), t0 + timedelta(minutes=3, seconds=30))], b)
    assert counts[-6:] == [1, 1, 2, 1, 1, 1]


def test_login_throttle_is_per_address() -> None:
    from distillguard.gateway.adminauth import FailedAuthThrottle

    throttle = FailedAuthThrottle(2)

    async def go() -> None:
        await throttle.failed("1.1.1.1")
        await throttle.failed("1.1.1.1")
        assert await throttle.blocked("1.1.1.1") and not await throttle.blocked("2.2.2.2")
    asyncio.run(go())


def test_cli_indexes_trace_files_once(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from distillguard.cli import main
    from distillguard.traceio import write_trace

    config = tmp_path / "dg.yaml"
    config.write_text(yaml.safe_dump({"state": {"url": f"sqlite:///{tmp_path / 's.sqlite'}"}}))
    trace = tmp_path / "trace.jsonl"
    write_trace([make_exchange(f"p{i}", account_id=f"acct_{i % 4}") for i in range(25)], trace)
    runner = CliRunner()
    result = runner.invoke(main, ["-c", str(config), "dashboard", "index", str(trace)])
    assert result.exit_code == 0, result.output
    assert "indexed 25 of 25 exchanges" in result.output
    again = runner.invoke(main, ["-c", str(config), "dashboard", "index", str(trace)])
    assert "indexed 0 of 25 exchanges (25 were already indexed)" in again.output


def test_network_of() -> None:
    assert graph.network_of("198.51.100.7") == "198.51.100.0/24"
    assert graph.network_of("2001:db8:1:2::1") == "2001:db8:1::/48"
    assert graph.network_of("1.2.3.999") is None and graph.network_of("bogus") is None
    assert graph.network_of("1.2.3.²") is None      # str.isdigit() takes "²", int() does not


def test_every_dashboard_option_is_documented() -> None:
    from distillguard.dashboard.settings import DashboardSettings

    text = (Path(__file__).resolve().parents[1] / "docs" / "dashboard.md").read_text()
    for option in DashboardSettings.model_fields:
        assert f"| `{option}` |" in text, f"dashboard.{option} missing from docs/dashboard.md"


async def test_verdicts_from_detection_tables(state_url: str) -> None:
    """Detection's campaigns / account_verdicts tables are read by their column names."""
    from sqlalchemy import text as sql

    from distillguard.dashboard.adapters import FileVerdicts, open_verdicts

    store = await _engine(state_url)
    engine = store.engine  # type: ignore[attr-defined]
    settings = make_settings(Path("/nonexistent"))
    assert isinstance(await open_verdicts(settings, engine), FileVerdicts)
    async with engine.begin() as conn:
        await conn.execute(sql("CREATE TABLE campaigns (campaign_id TEXT PRIMARY KEY,"
                               " risk REAL, detected_at TEXT, evidence TEXT, status TEXT)"))
        await conn.execute(sql("CREATE TABLE account_verdicts (account_id TEXT, risk REAL,"
                               " flagged BOOLEAN, campaign_id TEXT, first_flagged_at TEXT,"
                               " exchanges_before_flag INTEGER, reasons TEXT, updated_at TEXT)"))
        await conn.execute(sql("INSERT INTO campaigns VALUES (:c, :r, :d, :e, :s)"), [
            {"c": "c-1", "r": 0.9, "d": "2026-03-01T10:00:00Z", "e": '["shared pf"]',
             "s": "open"},
            {"c": "c-2", "r": 0.99, "d": "2026-03-02T10:00:00Z", "e": "[]", "s": "closed"}])
        await conn.execute(sql("INSERT INTO account_verdicts VALUES (:a, :r, :f, :c, :t, :n,"
                               " :why, :u)"), [
            {"a": "a1", "r": 0.9, "f": True, "c": "c-1", "t": "2026-03-01T10:00:00Z", "n": 5,
             "why": '["templates"]', "u": "2026-03-01T10:00:00Z"},
            {"a": "a2", "r": 0.4, "f": False, "c": "c-1", "t": None, "n": None, "why": "[]",
             "u": "2026-03-01T10:00:00Z"},
            {"a": "a3", "r": 0.97, "f": True, "c": "c-2", "t": None, "n": None, "why": "[]",
             "u": "2026-03-02T10:00:00Z"}])
    verdicts = await open_verdicts(settings, engine)
    assert type(verdicts).__name__ == "SQLVerdicts"
    listed = await verdicts.campaigns(after=None, limit=10)
    assert [(c["campaign_id"], c["size"]) for c in listed] == [("c-2", 1), ("c-1", 2)]
    c1 = await verdicts.campaign("c-1")
    assert c1.accounts == ["a1", "a2"] and c1.evidence == ["shared pf"]
    assert await verdicts.flagged({"a1", "a2"}) == {"a1"}
    assert await verdicts.campaigns_of("a1") == ["c-1"]
    history = await verdicts.account_history("a1")
    assert history[0]["reasons"] == ["templates"] and history[0]["exchanges_before_flag"] == 5
    intervals = sorted(await verdicts.campaign_intervals())
    assert intervals[0][1] is None and intervals[1][1] is not None  # c-2 is closed
    await store.close()


class ReviewQueueDouble:
    """A stand-in PolicySource (the interface in dashboard/adapters.py): it lets this test
    drive the review and ledger templates through states (escaped evidence, failing and
    not yet checkpointed proofs) that the real components produce only rarely. The real
    ones are exercised in tests/test_dashboard_browser.py."""

    ladder = ["flag", "throttle", "require_verification", "degrade", "suspend"]
    review_available = True

    def __init__(self) -> None:
        self.decisions: list[tuple[str, str, str]] = []

    async def review_items(self, *, status: str, after: str | None, limit: int) -> list:
        if status != "open" or after:
            return []
        return [{"item_id": "r-1", "kind": "account", "subject": "acct_q", "risk": 0.91,
                 "status": "open", "opened_at": "2026-03-01T10:00:00Z", "action": "throttle",
                 "evidence": ["<b>2,400</b> templated prompts in 1 h"]}]

    async def review_intervals(self) -> list:
        return [(datetime(2026, 3, 1, 10, tzinfo=UTC), None)]

    async def decide(self, item_id: str, decision: str, reason: str, actor: str) -> str:
        self.decisions.append((item_id, decision, reason))
        return f"{decision} recorded"

    async def actions(self, subject: str) -> list:
        return []

    async def audit(self, subject: str | None = None, limit: int = 50) -> list:
        return []


class LedgerDouble:
    spooled = 0

    async def checkpoint(self) -> dict:
        return {"tree_size": 230, "root_hash": "ab" * 32, "timestamp": "2026-03-01T12:00:00Z"}

    async def verify(self) -> dict:
        return {"ok": True, "checked_at": "2026-03-01T12:01:00Z", "entries": 230}

    async def proof(self, exchange_id: str) -> dict:
        signed = {"ex_1": True, "ex_new": False, "ex_bad": True}
        if exchange_id not in signed:
            raise LookupError(f"no exchange {exchange_id}")
        return {"leaf_index": 7, "tree_size": 230, "root_hash": "ab" * 32,
                "path": ["cd" * 32, "ef" * 32], "valid": exchange_id == "ex_1",
                "signed": signed[exchange_id]}

    async def exchange(self, exchange_id: str) -> dict | None:
        return None


def _sources(stack: StackThread):  # type: ignore[no-untyped-def]
    return next(s for e in stack.stack.extensions for s in e.stages
                if getattr(s, "name", "") == "dashboard").sources


def test_review_queue_and_ledger_pages_render(dash: tuple[StackThread, httpx.Client]) -> None:
    stack, client = dash
    csrf = login(client)
    queue, sources = ReviewQueueDouble(), _sources(stack)
    sources.policy, sources.ledger = queue, LedgerDouble()
    page = client.get("/review").text
    assert "acct_q" in page and "&lt;b&gt;2,400&lt;/b&gt;" in page  # evidence is escaped
    assert 'value="escalate"' in page
    assert client.post("/review/r-1", data={"decision": "escalate", "reason": "ok"}
                       ).status_code == 403  # no CSRF token
    r = client.post("/review/r-1", data={"decision": "escalate", "reason": "needs legal",
                                         "csrf": csrf})
    assert r.status_code == 303 and queue.decisions == [("r-1", "escalate", "needs legal")]
    overview = client.get("/?range=1h").text
    assert re.search(r'<span class="n">1</span><span class="l"><a href="/dashboard/review">',
                     overview)
    ledger = client.get("/ledger?exchange_id=ex_1").text
    assert "proof checks out" in ledger and "cd" * 32 in ledger and "230" in ledger
    assert "no exchange ex_2" in client.get("/ledger?exchange_id=ex_2").text
    newest = client.get("/ledger?exchange_id=ex_new").text  # not under a checkpoint yet
    assert "not yet checkpointed" in newest and "does NOT" not in newest
    assert "proof does NOT check out" in client.get("/ledger?exchange_id=ex_bad").text
    r = client.post("/ledger/verify", data={"csrf": csrf})
    assert r.status_code == 303
    assert "verified" in client.get("/ledger").text


@pytest.mark.postgres
def test_pages_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    stack = start_stack(make_settings(tmp_path, state={"url": pg_url},
                                      server={"trusted_proxies": ["127.0.0.1/32"]}))
    try:
        admin = httpx.Client(base_url=stack.stack.admin_url,
                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        admin.post("/admin/v1/accounts", json={"account_id": "acct_pg", "org": "PG Org"}
                   ).raise_for_status()
        key = admin.post("/admin/v1/accounts/acct_pg/keys", json={}).json()["key"]
        for i in range(5):
            httpx.post(stack.stack.base_url + "/chat/completions",
                       headers={"authorization": f"Bearer {key}",
                                "x-forwarded-for": "192.0.2.44"},
                       json={"model": "demo-chat-1",
                             "messages": [{"role": "user", "content": f"Solve {i} + 1"}]})
        stack.call(stack.stack.gateway.settle())
        with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
            csrf = login(client)
            for path in ("/", "/?range=30d", "/campaigns", "/accounts?q=192.0.2.",
                         "/accounts/acct_pg", "/review", "/ledger", "/audit"):
                r = client.get(path)
                assert r.status_code == 200, (path, r.text[:500])
            assert "acct_pg" in client.get("/accounts?q=192.0.2.").text
            assert "5 (0 refused or failed)" in client.get("/accounts/acct_pg").text
            r = client.post("/actions", data={"kind": "account", "target": "acct_pg",
                                              "action": "suspend", "reason": "pg test",
                                              "csrf": csrf})
            assert r.status_code == 303
            assert "dashboard:account:suspend" in client.get("/audit").text
        admin.close()
    finally:
        stack.stop()


def test_the_dashboard_asks_for_https_only_over_https() -> None:
    """Strict-Transport-Security on what went out over TLS, and not over plain HTTP,
    where a browser ignores it (the dashboard is behind a TLS-terminating proxy then,
    whose own header it is)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from distillguard.dashboard.security import SecurityHeaders

    app = SecurityHeaders(Starlette(routes=[Route("/", lambda _r: PlainTextResponse("ok"))]))
    over_tls = TestClient(app, base_url="https://dash.example").get("/")
    assert over_tls.headers["strict-transport-security"] == "max-age=31536000"
    assert over_tls.headers["x-frame-options"] == "DENY"
    plain = TestClient(app, base_url="http://dash.example").get("/")
    assert "strict-transport-security" not in plain.headers
    assert plain.headers["x-frame-options"] == "DENY"
