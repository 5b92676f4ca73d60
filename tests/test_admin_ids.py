"""Ids in the admin API's paths: any id an account may have reaches that account."""

from __future__ import annotations

import socket
from urllib.parse import quote, urlsplit

import httpx
import orjson
import pytest

from distillguard.gateway.adminpaths import IdRoute, id_segment, raw_route_path
from distillguard.serve import StackThread

# ids a path segment cannot carry as they are; "a%2Fb" is not "a/b", "a/b/keys" is not
# the keys of "a/b", "." and ".." are not the segments clients resolve
ODD_IDS = ("a/b", "a?x=1", "a#b", "a b", "a%2Fb", "ü", "a/b/keys", ".", "..")
DECOYS = ("a", "b")


def _segment(account_id: str) -> str:
    """The id as one path segment, encoded here rather than by the code under test."""
    if account_id in (".", ".."):
        return account_id.replace(".", "%2E")
    return quote(account_id, safe="")


def _org(account_id: str) -> str:
    return f"org of {account_id!r}"


def _create(admin: httpx.Client, how: str, ids: tuple[str, ...]) -> None:
    if how == "api":
        for account_id in ids:
            r = admin.post("/admin/v1/accounts",
                           json={"account_id": account_id, "org": _org(account_id)})
            assert r.status_code == 201, (account_id, r.text)
    else:
        lines = [orjson.dumps({"account_id": i, "org": _org(i)}) for i in ids]
        r = admin.post("/admin/v1/accounts/import", content=b"\n".join(lines))
        assert r.status_code == 200 and r.json()["imported"] == len(ids), r.text


def _raw_get(base: str, target: bytes, authorization: str) -> tuple[int, bytes]:
    """GET ``target`` as these bytes (no client's URL parsing in between)."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname or "", url.port or 80), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: " + url.netloc.encode()
                     + b"\r\nAuthorization: " + authorization.encode()
                     + b"\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("how", ["api", "import"])
def test_every_account_id_is_one_path_segment(admin: httpx.Client, how: str) -> None:
    """An account id may hold "/", "?", "#", "%", a space or any letter; created by the
    API or imported, it was then out of reach: the server decodes "a%2Fb" to "a/b" before
    routing, so /admin/v1/accounts/a%2Fb matched no route, and a%2Fb/keys was taken for
    the account "a/b/keys". Each id, encoded as one segment, reaches its own account and
    no other (the decoys "a" and "b" would show a wrong match)."""
    _create(admin, "api", DECOYS)
    _create(admin, how, ODD_IDS)
    for account_id in ODD_IDS:
        path = f"/admin/v1/accounts/{_segment(account_id)}"
        r = admin.get(path)
        assert r.status_code == 200, (account_id, path, r.text)
        assert r.json()["account_id"] == account_id and r.json()["org"] == _org(account_id)

        r = admin.patch(path, json={"org": "changed " + account_id})
        assert r.status_code == 200, (account_id, path, r.text)
        assert r.json()["account_id"] == account_id
        assert admin.get(path).json()["org"] == "changed " + account_id

        r = admin.post(path + "/keys", json={"name": "k"})
        assert r.status_code == 201, (account_id, path, r.text)
        key = r.json()
        assert key["account_id"] == account_id
        listed = admin.get(path + "/keys").json()["data"]
        assert [(k["key_id"], k["account_id"]) for k in listed] == [
            (key["key_id"], account_id)]
        r = admin.delete(f"/admin/v1/keys/{key['key_id']}")
        assert r.status_code == 200 and r.json()["revoked_at"], r.text

    for decoy in DECOYS:
        path = f"/admin/v1/accounts/{decoy}"
        assert admin.get(path).json()["org"] == _org(decoy)
        assert admin.get(path + "/keys").json()["data"] == []
    exported = {a["account_id"]: a["org"] for a in map(
        orjson.loads, admin.get("/admin/v1/accounts/export").content.splitlines())}
    assert exported == {**{d: _org(d) for d in DECOYS},
                        **{i: "changed " + i for i in ODD_IDS}}


def test_an_id_is_decoded_however_the_client_encoded_it(stack: StackThread,
                                                        admin: httpx.Client) -> None:
    """Clients encode differently: lower-case hex, a letter left as it is or encoded, a
    ".." sent as it is (requests decodes "%2E%2E").
    Each form names the same account."""
    _create(admin, "api", ("a/b", "ü", "..", *DECOYS))
    for path, account_id in (("a%2fb", "a/b"), ("%61%2F%62", "a/b"), ("%c3%bc", "ü"),
                             ("%2e%2e", ".."), (".%2E", "..")):
        r = admin.get("/admin/v1/accounts/" + path)
        assert r.status_code == 200 and r.json()["account_id"] == account_id, (path, r.text)
    # as sent by a client that sends the bytes it is given (no dot-segment resolution)
    status, body = _raw_get(stack.stack.admin_url, b"/admin/v1/accounts/../keys",
                            admin.headers["authorization"])
    assert status == 200 and orjson.loads(body) == {"object": "list", "data": []}, body
    assert admin.get("/admin/v1/accounts/a/b").json()["error"]["code"] == "unknown_url"


def test_ids_of_keys_review_items_and_ledger_entries_are_segments_too(
        admin: httpx.Client) -> None:
    """A key, review item or ledger entry id with an encoded "/" reached no route (404
    unknown_url); now it reaches the route, which says there is no such thing."""
    for method, path, code in (("DELETE", "/admin/v1/keys/key%2Fx", "not_found"),
                               ("GET", "/admin/v1/review/rv%2Fx", "not_found"),
                               ("POST", "/admin/v1/review/rv%2Fx", "not_found"),
                               ("GET", "/admin/v1/ledger/entries/ex%2Fx", "entry_not_found"),
                               ("GET", "/admin/v1/ledger/proof/ex%2Fx", "entry_not_found")):
        body = {"decision": "dismiss", "reason": "no such item"} if method == "POST" else None
        r = admin.request(method, path, json=body)
        error = r.json()["error"]
        assert r.status_code == 404 and error["code"] == code, (method, path, r.text)
        assert "/x" in error["message"], (method, path, r.text)  # the id, decoded


def test_id_segment_is_one_segment_no_client_resolves() -> None:
    assert [id_segment(i) for i in ODD_IDS] == [
        "a%2Fb", "a%3Fx%3D1", "a%23b", "a%20b", "a%252Fb", "%C3%BC", "a%2Fb%2Fkeys", "%2E",
        "%2E%2E"]
    assert id_segment("acct_17") == "acct_17" and id_segment("...") == "..."
    assert str(httpx.URL("http://h/x/" + id_segment("..") + "/keys")) == (
        "http://h/x/%2E%2E/keys")


def _scope(path: str, raw: bytes | None, root_path: str = "") -> dict[str, object]:
    scope: dict[str, object] = {"type": "http", "method": "GET", "path": path,
                                "root_path": root_path}
    if raw is not None:
        scope["raw_path"] = raw
    return scope


def test_the_raw_path_behind_a_root_path_or_when_the_server_gives_none() -> None:
    """The route matches the path as sent, less the app's root path; a server that does
    not give ``raw_path`` leaves only the decoded path ("/" in an id is a "/" then)."""
    assert raw_route_path(_scope("/gw/admin/v1/accounts/a/b", b"/gw/admin/v1/accounts/a%2Fb",
                                 "/gw")) == "/admin/v1/accounts/a%2Fb"
    assert raw_route_path(_scope("/admin/v1/accounts/a/b", b"/admin/v1/accounts/a%2Fb?x=1")
                          ) == "/admin/v1/accounts/a%2Fb"
    assert raw_route_path(_scope("/admin/v1/accounts/a b", None)) == "/admin/v1/accounts/a%20b"
    route = IdRoute("/admin/v1/accounts/{account_id}/keys", lambda request: None)
    _, child = route.matches(_scope("/gw/admin/v1/accounts/a/b/keys",
                                    b"/gw/admin/v1/accounts/a%2Fb/keys", "/gw"))
    assert child["path_params"] == {"account_id": "a/b"}
    with pytest.raises(ValueError, match="one path segment"):
        IdRoute("/admin/v1/accounts/{account_id:path}", lambda request: None)
