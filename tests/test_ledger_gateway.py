"""End to end through the running gateway: every exchange lands in the ledger, proofs
and checkpoints come from the admin API and verify with only the public key; audit
events of other components share the ledger; the dashboard's view reads it."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import httpx
import orjson

from distillguard.exchange import canonical_json
from distillguard.ledger import writer_for
from distillguard.ledger.checkpoint import VerifierKey
from distillguard.ledger.verifier import verify_consistency_bundle, verify_inclusion_bundle
from distillguard.serve import StackThread


def _wait_entry(admin: httpx.Client, exchange_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = admin.get(f"/admin/v1/ledger/entries/{exchange_id}")
        if r.status_code == 200:
            return r.json()  # type: ignore[no-any-return]
        assert r.status_code == 404, r.text
        time.sleep(0.02)
    raise AssertionError(f"{exchange_id} never reached the ledger")


def test_exchanges_are_recorded_and_provable(stack: StackThread, admin: httpx.Client,
                                             account_key: tuple[str, str]) -> None:
    account_id, key = account_key
    url = stack.stack.base_url + "/chat/completions"
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 30}
    plain = httpx.post(url, json=body, headers=auth)
    assert plain.status_code == 200
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=auth) as streamed:
        assert streamed.status_code == 200
        b"".join(streamed.iter_bytes())
        stream_id = streamed.headers["x-distillguard-exchange-id"]
    plain_id = plain.headers["x-distillguard-exchange-id"]

    stored = _wait_entry(admin, plain_id)
    record = stored["entry"]
    assert stored["kind"] == "exchange" and record["account_id"] == account_id
    assert record["status"] == 200 and record["model"] == "demo-chat-1"
    assert record["response"] == plain.json()
    assert record["response_sha256"] == hashlib.sha256(
        canonical_json(plain.json())).hexdigest()
    first = admin.post("/admin/v1/ledger/checkpoint").json()
    _wait_entry(admin, stream_id)

    key_text = admin.get("/admin/v1/ledger/key").text
    verifier = VerifierKey.parse(key_text)
    second = admin.post("/admin/v1/ledger/checkpoint").json()
    assert second["tree_size"] >= 2
    for exchange_id in (plain_id, stream_id):
        proof = admin.get(f"/admin/v1/ledger/proof/{exchange_id}").json()
        assert proof["checkpoint"] == second["note"]
        checked = verify_inclusion_bundle(proof, verifier)
        assert checked["entry"]["id"] == exchange_id
    # the proof against the older checkpoint still checks out, and the two are consistent
    old = admin.get(f"/admin/v1/ledger/proof/{plain_id}",
                    params={"tree_size": first["tree_size"]}).json()
    verify_inclusion_bundle(old, verifier, checkpoint=first["note"])
    consistency = admin.get("/admin/v1/ledger/consistency",
                            params={"old": first["tree_size"],
                                    "new": second["tree_size"]}).json()
    assert (consistency["old_checkpoint"], consistency["new_checkpoint"]) == \
        (first["note"], second["note"])
    verify_consistency_bundle(consistency, verifier)

    assert admin.get("/admin/v1/ledger/proof/ex_nope").status_code == 404
    assert httpx.get(stack.stack.admin_url + "/admin/v1/ledger/checkpoint").status_code == 401


def test_audit_events_share_the_gateway_ledger(stack: StackThread, admin: httpx.Client,
                                               account_key: tuple[str, str]) -> None:
    settings = stack.stack.settings
    writer = writer_for(settings)
    stage = next(s for s in stack.stack.gateway.pipeline.stages if s.name == "ledger")
    assert getattr(stage, "writer", None) is writer  # one writer per ledger, per process
    index = stack.call(writer.append_event("policy:account:suspend", "account:acct_9",
                                           "analyst@example", "campaign c-3",
                                           {"campaign_id": "c-3"}))
    event = admin.get(f"/admin/v1/ledger/entries/{index}").json()
    assert event["kind"] == "event" and event["entry"]["name"] == "policy:account:suspend"
    assert event["entry"]["detail"] == {"campaign_id": "c-3"}

    from distillguard.dashboard.adapters import open_ledger

    view = stack.call(open_ledger(settings))
    assert view is not None
    _, key = account_key
    r = httpx.post(stack.stack.base_url + "/chat/completions",
                   json={"model": "demo-chat-1", "messages": [{"role": "user",
                                                               "content": "x"}]},
                   headers={"authorization": f"Bearer {key}"})
    exchange_id = r.headers["x-distillguard-exchange-id"]
    _wait_entry(admin, exchange_id)
    proof = stack.call(view.proof(exchange_id))  # no checkpoint covers it yet: one is signed
    assert proof["valid"] and proof["signed"] and proof["tree_size"] > proof["leaf_index"]
    assert stack.call(view.exchange(exchange_id))["exchange_id"] == exchange_id
    checkpoint = stack.call(view.checkpoint())
    assert checkpoint["signature"] == "valid"
    assert checkpoint["signed_by"] == f"{checkpoint['current_key']} (the current key)"
    verified = stack.call(view.verify())
    assert verified["ok"] and verified["entries"] >= 2, orjson.dumps(verified)


def test_dashboard_ledger_page_on_the_real_ledger(stack: StackThread, admin: httpx.Client,
                                                  account_key: tuple[str, str]) -> None:
    from tests.test_dashboard import login

    _, key = account_key
    r = httpx.post(stack.stack.base_url + "/chat/completions",
                   json={"model": "demo-chat-1", "messages": [{"role": "user",
                                                               "content": "page"}]},
                   headers={"authorization": f"Bearer {key}"})
    exchange_id = r.headers["x-distillguard-exchange-id"]
    _wait_entry(admin, exchange_id)
    checkpoint = admin.post("/admin/v1/ledger/checkpoint").json()
    with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
        csrf = login(client)
        page = client.get("/ledger", params={"exchange_id": exchange_id}).text
        assert "proof checks out" in page and checkpoint["root_hash"] in page
        assert "no ledger entry &#39;ex_missing&#39;" in client.get(
            "/ledger", params={"exchange_id": "ex_missing"}).text
        client.post("/ledger/verify", data={"csrf": csrf})
        deadline = time.monotonic() + 20
        while "verified" not in (page := client.get("/ledger").text):
            assert time.monotonic() < deadline, page
            time.sleep(0.1)
        assert "FAILED" not in page


def test_dashboard_proof_look_up_takes_the_id_as_given(stack: StackThread,
                                                       admin: httpx.Client) -> None:
    """The ledger page trimmed the exchange id and cut it at 100 characters: an id longer
    than that, or with spaces around it, was not found, or the proof shown was another
    exchange's. Ids are looked up as given, up to the longest id an exchange may have."""
    from tests.factories import make_exchange
    from tests.test_dashboard import login

    writer = writer_for(stack.stack.settings)
    long_id = "ex_" + "x" * 150
    ids = [long_id[:100], long_id, "ex_padded", " ex_padded ", "ex_" + "y" * 253]
    index = {}
    for exchange_id in ids:
        ex = make_exchange(f"prompt {exchange_id}")
        ex.id = exchange_id
        index[exchange_id] = stack.call(writer.append_exchange(ex))
    admin.post("/admin/v1/ledger/checkpoint")
    with httpx.Client(base_url=stack.stack.admin_url + "/dashboard") as client:
        login(client)
        for exchange_id in ids:
            page = client.get("/ledger", params={"exchange_id": exchange_id}).text
            assert "proof checks out" in page, (exchange_id, page)
            leaf = re.search(r"<dt>leaf index</dt><dd><code>(\d+)</code>", page)
            assert leaf is not None and int(leaf.group(1)) == index[exchange_id], exchange_id
            assert f'value="{exchange_id}"' in page
        too_long = client.get("/ledger", params={"exchange_id": "ex_" + "z" * 254}).text
        assert "This exchange id is 257 characters long; exchange ids are at most 256" \
            in too_long
        assert "proof checks out" not in too_long
