"""TAXII 2.1: taxii2-client against our server, and our client against OASIS medallion."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from taxii2client.exceptions import AccessError
from taxii2client.v21 import Collection, Server, as_pages

from distillguard.cli import main
from distillguard.serve import StackThread, free_port
from tests import sharingworld as world
from tests.factories import make_settings, start_stack

MEDIA = "application/taxii+json;version=2.1"
OUT, IN = world.COLLECTIONS[0]["id"], world.COLLECTIONS[1]["id"]
SECRET = {name: p["token"] for name, p in world.PARTNERS.items()}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[StackThread, Path]]:
    settings = make_settings(tmp_path, sharing=world.sharing_section())
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"state": {"url": settings.state.url},
                                  "sharing": world.sharing_section()}))
    running = start_stack(settings)
    try:
        yield running, config
    finally:
        running.stop()


def _export(config: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    paths = world.write_world(tmp_path)
    out = tmp_path / "bundle.json"
    result = CliRunner().invoke(main, [
        "--config", str(config), "share", "export", "--verdicts", str(paths["verdicts"]),
        "--trace", str(paths["trace"]), "--accounts", str(paths["accounts"]),
        "--partner", "globex", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return dict(json.loads(out.read_text()))


def _root(running: StackThread) -> str:
    return f"{running.stack.admin_url}/taxii2/distillguard/"


def test_taxii2_client_reads_our_collections(served: tuple[StackThread, Path],
                                            tmp_path: Path) -> None:
    running, config = served
    bundle = _export(config, tmp_path, "--publish", "outbound")
    total = len(bundle["objects"])
    server = Server(f"{running.stack.admin_url}/taxii2/", user="globex",
                    password=SECRET["globex"])
    assert server.title == "distillguard TAXII server"
    (api_root,) = server.api_roots
    assert api_root.url == _root(running) and api_root.versions == [MEDIA]
    assert [c.id for c in api_root.collections] == [OUT]  # globex sees only what it reads
    collection = api_root.collections[0]
    assert collection.can_read and not collection.can_write

    pages = list(as_pages(collection.get_objects, per_request=7))
    assert len(pages) == -(-total // 7) and pages[-1]["more"] is False
    assert sorted(o["id"] for p in pages for o in p["objects"]) == sorted(
        o["id"] for o in bundle["objects"])
    manifest = [m for p in as_pages(collection.get_manifest, per_request=10)
                for m in p["objects"]]
    assert len(manifest) == total
    assert all(m["media_type"] == "application/stix+json;version=2.1" for m in manifest)
    later = collection.get_objects(added_after=manifest[9]["date_added"])
    assert len(later["objects"]) == total - 10
    assert len(collection.get_objects(**{"type": "indicator"})["objects"]) == 5
    campaign = next(o for o in bundle["objects"] if o["type"] == "campaign")
    assert collection.get_object(campaign["id"])["objects"] == [campaign]

    bundle2 = _export(config, tmp_path, "--publish", "outbound")  # new versions
    campaign2 = next(o for o in bundle2["objects"] if o["type"] == "campaign")
    assert campaign2["id"] == campaign["id"]
    assert collection.object_versions(campaign["id"])["versions"] == [
        v["version"] for v in sorted(
            (m for m in collection.get_manifest(id=campaign["id"], version="all")["objects"]),
            key=lambda m: m["version"])]
    assert len(collection.get_manifest(id=campaign["id"], version="all")["objects"]) == 2
    assert collection.get_object(campaign["id"])["objects"] == [campaign2]  # last

    raw = httpx.get(f"{_root(running)}collections/{OUT}/objects/?limit=3",
                    auth=("globex", SECRET["globex"]), headers={"accept": MEDIA})
    assert raw.headers["content-type"] == MEDIA
    assert raw.headers["x-taxii-date-added-first"] <= raw.headers["x-taxii-date-added-last"]
    assert raw.json()["more"] is True and raw.json()["next"]


def test_taxii2_client_writes_and_partner_objects_become_indicators(
        served: tuple[StackThread, Path], tmp_path: Path) -> None:
    running, config = served
    bundle = _export(config, tmp_path)
    inbound = Collection(f"{_root(running)}collections/{IN}/", user="acme",
                         password=SECRET["acme"])
    assert inbound.can_write and not inbound.can_read
    status = inbound.add_objects({"objects": bundle["objects"]})
    assert status.status == "complete"
    assert status.success_count == len(bundle["objects"]) and status.failure_count == 0
    again = inbound.add_objects({"objects": bundle["objects"][:3]})
    assert again.failure_count == 3  # the same versions are already there
    server = Server(f"{running.stack.admin_url}/taxii2/", user="acme", password=SECRET["acme"])
    assert server.api_roots[0].get_status(status.id).success_count == status.success_count
    with pytest.raises(AccessError):
        inbound.get_objects()

    result = CliRunner().invoke(main, ["--config", str(config), "share", "indicators"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert {r["partner"] for r in rows} == {"acme"} and len(rows) == 5
    result = CliRunner().invoke(main, ["--config", str(config), "share", "bundles"])
    prov = [json.loads(line) for line in result.output.splitlines()]
    assert [p["objects"] for p in prov] == [len(bundle["objects"]), 3]  # one per envelope
    assert all(p["source"] == "taxii:inbound" and p["partner"] == "acme" for p in prov)


def test_envelopes_sent_at_once_are_each_complete(served: tuple[StackThread, Path],
                                                 tmp_path: Path) -> None:
    """An object version was looked for, then inserted, with nothing held between: two
    envelopes carrying the same version at once (a client retrying after a timeout) made
    the second a 500, with every other object of it rolled back."""
    from concurrent.futures import ThreadPoolExecutor

    running, config = served
    objects = _export(config, tmp_path)["objects"]
    inbound = f"{_root(running)}collections/{IN}/objects/"

    def post(extra: dict[str, Any]) -> httpx.Response:
        return httpx.post(inbound, auth=("acme", SECRET["acme"]), timeout=30,
                          json={"objects": [objects[0], extra]},
                          headers={"accept": MEDIA, "content-type": MEDIA})
    envelopes = [dict(objects[0], id=f"{objects[0]['type']}--{n:08d}-1c1c-4d4d-8e8e-"
                      "9f9f9f9f9f9f") for n in range(12)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(post, envelopes))
    assert [r.status_code for r in replies] == [202] * 12, replies[-1].text
    assert sorted(r.json()["failure_count"] for r in replies) == [0] + [1] * 11


def test_authentication_permissions_and_error_bodies(served: tuple[StackThread, Path]
                                                     ) -> None:
    running, _ = served
    root = _root(running)
    objects = f"{root}collections/{OUT}/objects/"

    def get(url: str, who: str | None = "globex", **headers: str) -> httpx.Response:
        auth = (who, SECRET[who]) if who else None
        return httpx.get(url, auth=auth, headers={"accept": MEDIA, **headers})

    anonymous = get(objects, None)
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["www-authenticate"]
    assert anonymous.headers["content-type"] == MEDIA
    assert anonymous.json()["http_status"] == "401" and anonymous.json()["title"]
    wrong = httpx.get(objects, auth=("globex", SECRET["acme"]), headers={"accept": MEDIA})
    assert wrong.status_code == 401
    bearer = httpx.get(objects, headers={"accept": MEDIA,
                                         "authorization": f"Bearer {SECRET['globex']}"})
    assert bearer.status_code == 200
    assert get(f"{root}collections/{IN}/objects/").status_code == 404  # not globex's
    assert get(f"{root}collections/{IN}/objects/", "acme").status_code == 403  # write-only
    assert get(f"{running.stack.admin_url}/taxii2/other/", "acme").status_code == 404
    assert get(objects, accept="application/json").status_code == 406
    assert get(objects + "?added_after=yesterday").status_code == 400
    assert get(objects + "?next=garbage").status_code == 400
    # a time that is out of range once moved to UTC was a 500
    for query in ("added_after=0001-01-01T00:00:00%2B01:00",
                  "added_after=9999-12-31T23:59:59-01:00",
                  "match[version]=0001-01-01T00:00:00%2B01:00"):
        out_of_range = get(objects + "?" + query)
        assert out_of_range.status_code == 400, (query, out_of_range.text)
        assert "out of range" in out_of_range.json()["description"]
    assert get(f"{root}collections/").json() == {"collections": [
        {"id": OUT, "title": "Our campaigns", "can_read": True, "can_write": False,
         "media_types": ["application/stix+json;version=2.1"], "alias": "outbound"}]}

    inbound = f"{root}collections/{IN}/objects/"
    denied = httpx.post(objects, auth=("globex", SECRET["globex"]), content=b"{}",
                        headers={"accept": MEDIA, "content-type": MEDIA})
    assert denied.status_code == 403
    wrong_type = httpx.post(inbound, auth=("acme", SECRET["acme"]), content=b"{}",
                            headers={"accept": MEDIA, "content-type": "application/json"})
    assert wrong_type.status_code == 415
    unknown = {"objects": [{"type": "x-thing", "spec_version": "2.1",
                            "id": "x-thing--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f"}]}
    bad = httpx.post(inbound, auth=("acme", SECRET["acme"]), json=unknown,
                     headers={"accept": MEDIA, "content-type": MEDIA})
    assert bad.status_code == 422 and "unknown object type" in bad.json()["description"]
    assert bad.headers["content-type"] == MEDIA
    broken = httpx.post(inbound, auth=("acme", SECRET["acme"]), content=b"{not json",
                        headers={"accept": MEDIA, "content-type": MEDIA})
    assert broken.status_code == 400
    # a NUL in a filter or an id was a 500 on PostgreSQL, in the admin API's body
    for url in (objects + "?match[id]=%00", objects + "?match[type]=indicator%00",
                objects + "x%00/", f"{root}status/%00/"):
        nul = get(url)
        assert nul.status_code == 400 and "NUL" in nul.json()["description"], url
        assert nul.headers["content-type"] == MEDIA


def test_no_redirect_takes_its_host_from_the_host_header(served: tuple[StackThread, Path]
                                                         ) -> None:
    """An address without its final slash (/taxii2, /taxii2/distillguard) was answered by
    Starlette with a 307 to http://<Host>/taxii2/..., the Host header's value: a forged
    Host redirected the client to another site, on the admin port and with ``share
    serve``. Every TAXII address ends with "/"; one without it is a 404, no redirect."""
    from starlette.testclient import TestClient

    from distillguard.sharing.settings import parse_sharing_settings
    from distillguard.sharing.taxii import TaxiiServer

    running, _ = served
    forged = {"host": "evil.example", "accept": MEDIA}
    paths = ("/taxii2", "/taxii2/distillguard", "/taxii2/distillguard/collections",
             f"/taxii2/distillguard/collections/{OUT}/objects")
    for path in paths:
        r = httpx.get(running.stack.admin_url + path, headers=forged,
                      auth=("globex", SECRET["globex"]))
        assert r.status_code == 404 and "location" not in r.headers, (path, r.text)
    alone = TaxiiServer(parse_sharing_settings(world.sharing_section()), lambda: None)
    with TestClient(alone.app(), base_url="http://evil.example") as client:
        for path in paths:
            r = client.get(path, follow_redirects=False, auth=("globex", SECRET["globex"]))
            assert r.status_code == 404 and "location" not in r.headers, (path, r.text)
    r = httpx.get(running.stack.admin_url + "/taxii2/", headers=forged,
                  auth=("globex", SECRET["globex"]))
    assert r.status_code == 200 and r.json()["api_roots"]


def test_an_unexpected_failure_is_a_taxii_error(served: tuple[StackThread, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A TAXII client reads TAXII error bodies; a failure inside the server answered the
    admin API's OpenAI-style body."""
    running, _ = served

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr("distillguard.sharing.taxiistore.query", broken)
    r = httpx.get(f"{_root(running)}collections/{OUT}/objects/",
                  auth=("globex", SECRET["globex"]), headers={"accept": MEDIA})
    assert r.status_code == 500 and r.headers["content-type"] == MEDIA
    assert r.json()["http_status"] == "500" and "error" not in r.json()


# -- our client against OASIS medallion ---------------------------------------------------

MED_COLLECTION = "91a7b528-80eb-42ed-a74d-c6fbd5a26116"


@pytest.fixture
def medallion(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = {
        "/discovery": {"title": "peer", "description": "a partner's TAXII server",
                       "default": f"{base}/peer/", "api_roots": [f"{base}/peer/"]},
        "peer": {"information": {"title": "peer", "versions": [MEDIA],
                                 "max_content_length": 10_000_000},
                 "status": [],
                 "collections": [{"id": MED_COLLECTION, "title": "shared", "can_read": True,
                                  "can_write": True, "objects": [], "manifest": [],
                                  "media_types": ["application/stix+json;version=2.1"]}]}}
    (tmp_path / "medallion-data.json").write_text(json.dumps(data))
    (tmp_path / "medallion.json").write_text(json.dumps({
        "backend": {"module": "medallion.backends.memory_backend",
                    "module_class": "MemoryBackend",
                    "filename": str(tmp_path / "medallion-data.json")},
        "users": {"peer": "peer-secret-123"}, "taxii": {"max_page_size": 20}}))
    log = open(tmp_path / "medallion.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "medallion.scripts.run", "--port",
                             str(port), "--log-level", "ERROR",
                             str(tmp_path / "medallion.json")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((tmp_path / "medallion.log").read_text()) from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_our_client_pushes_to_and_polls_medallion(medallion: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"state": {"url": f"sqlite:///{tmp_path}/state.sqlite"},
                                  "sharing": world.sharing_section()}))
    bundle = _export(config, tmp_path)
    path = tmp_path / "bundle.json"
    creds = ["--user", "peer", "--password", "peer-secret-123"]

    def share(*args: str) -> Any:
        result = CliRunner().invoke(main, ["--config", str(config), "share", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    pushed = share("push", str(path), "--server", f"{medallion}/taxii2/",
                   "--collection", MED_COLLECTION, *creds)
    assert pushed["status"] == "complete"
    assert pushed["success_count"] == len(bundle["objects"])
    # The peer holds what we pushed (read back with the reference client).
    peer = Collection(f"{medallion}/peer/collections/{MED_COLLECTION}/", user="peer",
                      password="peer-secret-123")
    held = [o for p in as_pages(peer.get_objects, per_request=20) for o in p["objects"]]
    assert sorted(o["id"] for o in held) == sorted(o["id"] for o in bundle["objects"])

    polled = share("poll", "--server", f"{medallion}/peer/", "--collection", MED_COLLECTION,
                   "--partner", "acme", *creds)
    assert polled["objects"] == len(bundle["objects"]) and polled["indicators"] == 5
    assert sum(polled["active"].values()) == 5
    nothing = share("poll", "--server", f"{medallion}/peer/", "--collection", MED_COLLECTION,
                    "--partner", "acme", *creds)
    assert nothing["objects"] == 0  # the cursor moved past everything

    newer = _export(config, tmp_path)  # new versions of the same objects
    share("push", str(path), "--server", f"{medallion}/peer/", "--collection",
          MED_COLLECTION, *creds)
    again = share("poll", "--server", f"{medallion}/peer/", "--collection", MED_COLLECTION,
                  "--partner", "acme", *creds)
    # Versioned objects come again; the identity is unchanged and observables are immutable.
    versioned = [o for o in newer["objects"] if "modified" in o and o["type"] != "identity"]
    assert again["objects"] == len(versioned)
    assert again["new_or_updated"] == again["objects"]

    wrong = CliRunner().invoke(main, ["--config", str(config), "share", "poll", "--server",
                                      f"{medallion}/peer/", "--collection", MED_COLLECTION,
                                      "--partner", "acme", "--user", "peer",
                                      "--password", "nope"])
    assert wrong.exit_code == 2 and "401" in wrong.output


def test_failed_partner_credentials_are_throttled(tmp_path: Path) -> None:
    """Partner secrets are guessed at the same admin port as the admin token, and count
    against the same throttle: past the limit a client gets TAXII's 429, even with a
    right secret, and its failures at the admin API count too."""
    settings = make_settings(tmp_path, sharing=world.sharing_section(),
                             admin={"failed_auth_per_minute": 3})
    running = start_stack(settings)
    try:
        objects = f"{_root(running)}collections/{OUT}/objects/"
        right = ("globex", SECRET["globex"])
        assert httpx.get(objects, auth=right, headers={"accept": MEDIA}).status_code == 200
        for _ in range(2):
            r = httpx.get(objects, auth=("globex", "not-the-secret-at-all"),
                          headers={"accept": MEDIA})
            assert r.status_code == 401
        assert httpx.get(running.stack.admin_url + "/admin/v1/accounts").status_code == 401
        r = httpx.get(objects, auth=right, headers={"accept": MEDIA})
        assert r.status_code == 429 and r.headers["content-type"] == MEDIA
        assert r.json()["http_status"] == "429" and 1 <= int(r.headers["retry-after"]) <= 60
    finally:
        running.stop()


def test_share_serve_throttles_failed_partner_credentials(tmp_path: Path) -> None:
    """``share serve`` runs the TAXII server alone, without the admin app and its count
    of failed authentications: there, partner secrets could be guessed without limit."""
    from starlette.testclient import TestClient

    from distillguard.sharing.settings import parse_sharing_settings
    from distillguard.sharing.taxii import TaxiiServer

    alone = TaxiiServer(parse_sharing_settings(world.sharing_section()), lambda: None)
    with TestClient(alone.app(failed_auth_per_minute=3)) as client:
        right = ("globex", SECRET["globex"])
        assert client.get("/taxii2/", auth=right).status_code == 200
        for _ in range(3):
            assert client.get("/taxii2/", auth=("globex", "guess-0123456789")
                              ).status_code == 401
        r = client.get("/taxii2/", auth=right)
        assert r.status_code == 429 and r.headers["content-type"] == MEDIA
        assert 1 <= int(r.headers["retry-after"]) <= 60


def test_an_envelope_is_read_up_to_the_limit_and_checked_off_the_event_loop(
        served: tuple[StackThread, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A body without Content-Length (chunked) was read whole into memory before its
    size was looked at; and a large envelope's validation (stix2 and the pattern parser,
    seconds for megabytes) ran on the event loop, holding every other request of the
    port, the gateway's included."""
    import asyncio

    from distillguard.sharing import taxii
    from distillguard.sharing.settings import parse_sharing_settings

    alone = taxii.TaxiiServer(parse_sharing_settings(world.sharing_section(
        max_bundle_bytes=5_000_000)), lambda: None).app()
    chunks = 0

    async def receive() -> dict[str, Any]:
        nonlocal chunks
        chunks += 1
        if chunks > 50:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b" " * 1_000_000, "more_body": True}

    answer: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        answer.append(message)

    auth = "Bearer " + SECRET["acme"]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "server": ("127.0.0.1", 8443),
             "client": ("127.0.0.1", 5000), "root_path": "", "query_string": b"",
             "path": f"/taxii2/distillguard/collections/{IN}/objects/",
             "headers": [(b"authorization", auth.encode()), (b"accept", MEDIA.encode()),
                         (b"content-type", MEDIA.encode()),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(alone(scope, receive, send))  # type: ignore[arg-type]
    assert answer[0]["status"] == 413 and chunks <= 6, (answer[0], chunks)

    where: list[str] = []
    real = taxii.parse_envelope

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(taxii, "parse_envelope", spy)
    running, config = served
    objects = _export(config, tmp_path)["objects"]
    r = httpx.post(f"{_root(running)}collections/{IN}/objects/", timeout=30,
                   auth=("acme", SECRET["acme"]), json={"objects": objects},
                   headers={"accept": MEDIA, "content-type": MEDIA})
    assert r.status_code == 202 and where == ["worker thread"]


# -- our client against a hostile server ---------------------------------------------------


@pytest.fixture
def hostile() -> Iterator[tuple[str, dict[str, Any]]]:
    """A TAXII server whose manifest never ends (``more`` always true) and whose object
    page is as large as ``behaviour["object_bytes"]``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    behaviour: dict[str, Any] = {"requests": 0, "object_bytes": 100, "endless": True,
                                 "hosts": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            behaviour["requests"] += 1
            behaviour["hosts"].append(self.headers.get("Host"))
            path = self.path.split("?")[0]
            port = self.server.server_address[1]
            if path == "/taxii2/":    # discovery naming an API root on another origin
                body: Any = {"title": "t", "default": f"http://localhost:{port}/api/",
                             "api_roots": [f"http://localhost:{port}/api/"]}
            elif path.endswith("/manifest/"):
                body = {"more": behaviour["endless"]
                             and behaviour["requests"] < 3000, "next": "again",
                             "objects": [{"id": "note--1", "date_added":
                                          "2026-01-01T00:00:00.000Z", "version": "1"}]}
            elif path.endswith("/objects/"):
                pad = "x" * behaviour["object_bytes"]
                body = {"more": False, "objects": [{
                    "type": "note", "spec_version": "2.1", "content": pad,
                    "id": "note--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f",
                    "created": "2026-01-01T00:00:00Z", "modified": "2026-01-01T00:00:00Z",
                    "object_refs": ["note--1f6e3b0a-1c1c-4d4d-8e8e-9f9f9f9f9f9f"]}]}
            else:
                body = {"id": MED_COLLECTION, "title": "c", "can_read": True,
                        "can_write": False, "media_types": [MEDIA]}
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", MEDIA)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/", behaviour
    finally:
        server.shutdown()
        server.server_close()


def test_a_hostile_server_cannot_keep_a_poll_reading(
        hostile: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    """A partner's server that always answered ``more: true`` kept ``share poll`` reading
    pages without end, and an answer of any size was read whole into memory."""
    url, behaviour = hostile
    config = _config_file(tmp_path, max_bundle_bytes=200_000)

    def poll() -> Any:
        return CliRunner().invoke(main, ["--config", str(config), "share", "poll",
                                         "--server", url, "--collection", MED_COLLECTION,
                                         "--partner", "acme", "--token", "t" * 20])

    endless = poll()
    assert endless.exit_code == 2 and "again" in endless.output, endless.output
    assert behaviour["requests"] < 10
    behaviour.update(endless=False, object_bytes=300_000, requests=0)
    huge = poll()
    assert huge.exit_code == 2 and "200000" in huge.output, huge.output
    behaviour.update(object_bytes=100)
    assert json.loads(poll().output)["objects"] == 1


def _config_file(tmp_path: Path, **changes: Any) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"state": {"url": f"sqlite:///{tmp_path}/state.sqlite"},
                                  "sharing": world.sharing_section(**changes)}))
    return config


def test_a_discovery_cannot_send_our_credentials_to_another_origin(
        hostile: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    """``share poll`` sent the partner's credentials to whatever API root a discovery
    answer named; a server (or anyone on the path of a plain-HTTP URL) could name its
    own. An API root on another origin than the discovery URL is refused."""
    url, behaviour = hostile
    config = _config_file(tmp_path)
    discovery = url.replace("/api/", "/taxii2/")
    result = CliRunner().invoke(main, ["--config", str(config), "share", "poll",
                                       "--server", discovery, "--collection",
                                       MED_COLLECTION, "--partner", "acme",
                                       "--token", "t" * 20])
    assert result.exit_code == 2 and "another origin" in result.output, result.output
    assert all(host.startswith("127.0.0.1:") for host in behaviour["hosts"]), behaviour
    assert "localhost" in result.output


def test_unknown_addresses_and_methods_get_taxii_errors(served: tuple[StackThread, Path]
                                                        ) -> None:
    """Starlette answered an unknown address under /taxii2 or a method a resource does
    not take in plain text, which a TAXII client cannot read; both are TAXII error
    bodies now, after authentication as everything else."""
    running, _ = served
    objects = f"{_root(running)}collections/{OUT}/objects/"
    auth = ("globex", SECRET["globex"])
    headers = {"accept": MEDIA}
    r = httpx.get(f"{_root(running)}nothing-here/", auth=auth, headers=headers)
    assert r.status_code == 404 and r.headers["content-type"].startswith(MEDIA), r.text
    assert r.json()["http_status"] == "404"
    r = httpx.delete(objects, auth=auth, headers=headers)
    assert r.status_code == 405 and r.headers["content-type"].startswith(MEDIA), r.text
    assert r.json()["http_status"] == "405" and "POST" in r.headers["allow"]
    assert httpx.delete(objects, headers=headers).status_code == 401
