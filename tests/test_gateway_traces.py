"""Trace export (the trace log stage), trace import (replay into stages) and the key
look-up that concurrent requests share."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from click.testing import CliRunner

from distillguard.auth import Authenticator
from distillguard.cli import main
from distillguard.exchange import Retention
from distillguard.gateway.tracecli import import_traces
from distillguard.serve import Extension
from distillguard.store import open_state_store
from distillguard.traceio import read_trace
from tests.factories import (
    ADMIN_TOKEN,
    Recorder,
    make_account,
    make_exchange,
    make_settings,
    new_api_key,
    start_stack,
)


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "demo-chat-1", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Name a prime."}], **extra}


@pytest.mark.parametrize("suffix,retention", [("jsonl", "full"), ("jsonl.gz", "hash")])
def test_trace_log_records_every_exchange(tmp_path: Path, suffix: str, retention: str
                                          ) -> None:
    settings = make_settings(tmp_path, server={"replica_id": "r7"},
                             pipeline={"trace_path": str(tmp_path / f"t-{{replica}}.{suffix}"),
                                       "retention": retention})
    stack = start_stack(settings)
    try:
        admin = httpx.Client(base_url=stack.stack.admin_url,
                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        admin.post("/admin/v1/accounts", json={"account_id": "tr"}).raise_for_status()
        key = admin.post("/admin/v1/accounts/tr/keys", json={}).json()["key"]
        auth = {"authorization": f"Bearer {key}"}
        url = stack.stack.base_url + "/chat/completions"
        assert httpx.post(url, json=_chat(), headers=auth).status_code == 200
        with httpx.stream("POST", url, json=_chat(stream=True), headers=auth) as r:
            streamed = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert streamed[-1] == "data: [DONE]"
        assert httpx.post(url, json=_chat()).status_code == 401
    finally:
        stack.stop()  # shutdown flushes the log
    path = tmp_path / f"t-r7.{suffix}"
    if suffix.endswith(".gz"):
        assert gzip.decompress(path.read_bytes()).count(b"\n") == 3
    lines = list(read_trace(path))
    assert [ex.status for ex in lines] == [200, 200, 401]
    plain, stream, refused = lines
    assert plain.account_id == stream.account_id == "tr" and refused.account_id is None
    assert key not in path.read_bytes().decode("latin-1")
    assert plain.usage is not None and plain.usage.total_tokens > 0
    assert stream.usage is not None and stream.usage.total_tokens > 0
    if retention == "full":
        assert plain.request == _chat()
        assert stream.response["choices"][0]["message"]["content"]
    else:
        assert plain.request is None and plain.response is None
        assert plain.request_sha256 and plain.response_sha256 and plain.model == "demo-chat-1"


async def test_import_replays_into_stages_in_order(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    monkeypatch.setattr("distillguard.components.load_extensions",
                        lambda settings: [Extension(stages=[recorder])])
    exchanges = [make_exchange(f"q{i}", account_id=f"a{i % 3}") for i in range(20)]
    settings = make_settings(tmp_path, pipeline={"retention": "hash"})
    result = await import_traces(settings, iter(exchanges))
    assert result.imported == 20 and result.stage_errors == {}
    assert [ex.id for ex in recorder.exchanges] == [ex.id for ex in exchanges]
    assert all(ex.retention is Retention.HASH and ex.request_sha256
               for ex in recorder.exchanges)


async def test_an_import_shares_ledger_commits_and_keeps_the_order(tmp_path: Path) -> None:
    """Each exchange of an import waited for its own ledger commit (one disk sync per
    line: 10,000 lines took 13 s). Batches now share one, and the ledger and the
    stages after it still see the file's order; a line repeated within a batch is
    recorded once."""
    from distillguard.components import load_extensions
    from distillguard.ledger.writer import writer_for

    settings = make_settings(tmp_path)
    recorder = Recorder()
    extensions = [*load_extensions(settings), Extension(stages=[recorder])]
    writer = writer_for(settings)
    exchanges = [make_exchange(f"q{i}", account_id=f"a{i % 5}") for i in range(1200)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("distillguard.components.load_extensions", lambda s: extensions)
        result = await import_traces(settings, iter([*exchanges[:600], exchanges[599],
                                                     *exchanges[600:]]))
    assert result.imported == 1200 and result.already_in_ledger == 1
    assert result.stage_errors == {}
    assert writer.batches <= 10, writer.batches      # was 1,200: one commit per exchange
    assert [ex.id for ex in recorder.exchanges] == [ex.id for ex in exchanges]
    assert [ex.annotations["ledger"]["index"] for ex in recorder.exchanges] == list(
        range(1200))


def test_traces_cli_check_and_import_with_default_components(tmp_path: Path) -> None:
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(make_exchange(f"p{i}").to_trace()) + b"\n"
                               for i in range(12)))
    cfg = tmp_path / "dg.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"url": f"sqlite:///{tmp_path / 's.sqlite'}"},
                                   "ledger": {"path": str(tmp_path / "ledger")}}))
    runner = CliRunner()
    checked = runner.invoke(main, ["traces", "check", str(trace)], catch_exceptions=False)
    assert checked.exit_code == 0 and "12 exchanges, 1 accounts" in checked.stdout
    # times as the formats write them (RFC 3339, UTC as Z), not Python's isoformat
    times = sorted(orjson.loads(line)["ts"] for line in trace.read_bytes().splitlines())
    assert f"{times[0]} to {times[-1]}" in checked.stdout and "+00:00" not in checked.stdout
    done = runner.invoke(main, ["-c", str(cfg), "traces", "import", "--sort", str(trace)],
                         catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "imported 12 exchanges" in done.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ts": "2026-03-01T00:00:00Z"}\n{"account_id": "x"}\n')
    failed = runner.invoke(main, ["traces", "check", str(bad)])
    assert failed.exit_code == 2 and f"{bad}:2" in failed.stderr
    # a bad line refuses the whole import, before its first exchange: lines before it
    # were imported, and importing the mended file again recorded them twice
    good = trace.read_bytes().splitlines(keepends=True)
    for name, line in (("nul", b'{"ts": "2026-03-01T00:00:00Z", "exchange_id": "e\\u0000"}\n'),
                       ("no-ts", b'{"account_id": "x"}\n')):
        partial = tmp_path / f"{name}.jsonl"
        partial.write_bytes(b"".join(good[:5]) + line + b"".join(good[5:]))
        for sort in ([], ["--sort"]):
            refused = runner.invoke(main, ["-c", str(cfg), "traces", "import", *sort,
                                           str(partial)])
            assert refused.exit_code == 2 and f"{partial}:6: " in refused.stderr, (
                refused.output)
    # the file imported again (with one new line): only the new line is recorded
    again = tmp_path / "again.jsonl"
    again.write_bytes(trace.read_bytes() + orjson.dumps(make_exchange("new").to_trace())
                      + b"\n")
    done = runner.invoke(main, ["-c", str(cfg), "traces", "import", str(again)])
    assert done.exit_code == 0 and (
        "imported 1 exchanges (12 already in the ledger were skipped)" in done.stderr)
    # lines of the public format carry no exchange_id: they are named by their content,
    # so a second import of such a file records nothing again
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(b"".join(orjson.dumps({k: v for k, v in orjson.loads(line).items()
                                             if k != "exchange_id"}) + b"\n"
                               for line in (good[0], good[1], good[2])))
    for expected in ("imported 3 exchanges\n",
                     "imported 0 exchanges (3 already in the ledger were skipped)"):
        done = runner.invoke(main, ["-c", str(cfg), "traces", "import", str(plain)])
        assert done.exit_code == 0 and expected in done.stderr, done.output
    # a request nested deeper than the ledger's JSON can be written: recorded without it
    line = orjson.loads(orjson.dumps(make_exchange("deep").to_trace()))
    deep = orjson.dumps(line).replace(b'"messages":', b'"x":' + b"[" * 300 + b"]" * 300
                                      + b',"messages":', 1)
    (tmp_path / "deep.jsonl").write_bytes(deep + b"\n")
    done = runner.invoke(main, ["-c", str(cfg), "traces", "import",
                                str(tmp_path / "deep.jsonl")])
    assert done.exit_code == 0 and "imported 1 exchanges" in done.stderr, done.output
    verified = runner.invoke(main, ["-c", str(cfg), "ledger", "verify"])
    assert verified.exit_code == 0 and verified.stdout.startswith("17 entries"), (
        verified.output)


class CountingStore:
    """The real SQLite store, counting and slowing key look-ups."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.key_lookups = 0

    async def get_key(self, key_id: str) -> Any:
        self.key_lookups += 1
        await asyncio.sleep(0.05)
        return await self.inner.get_key(key_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_concurrent_requests_share_one_key_lookup(tmp_path: Path) -> None:
    inner = open_state_store(f"sqlite:///{tmp_path / 'auth.sqlite'}")
    await inner.migrate()
    try:
        await inner.put_account(make_account("acct_sf"))
        _, secret = await inner.create_key("acct_sf")
        store = CountingStore(inner)
        auth = Authenticator(store, cache_ttl_s=0.2)  # type: ignore[arg-type]
        header = f"Bearer {secret}"
        # One caller gives up mid look-up; the others still get their answer.
        quitter = asyncio.ensure_future(auth.authenticate(header))
        others = [asyncio.ensure_future(auth.authenticate(header)) for _ in range(50)]
        await asyncio.sleep(0.01)
        quitter.cancel()
        principals = await asyncio.gather(*others)
        assert {p.account.account_id for p in principals} == {"acct_sf"}
        assert store.key_lookups == 1
        await auth.authenticate(header)  # cached
        assert store.key_lookups == 1
        await asyncio.sleep(0.25)  # expired: one more look-up for the next burst
        await asyncio.gather(*(auth.authenticate(header) for _ in range(20)))
        assert store.key_lookups == 2
    finally:
        await inner.close()


def test_several_choices_reach_the_client_and_the_record_whole(tmp_path: Path) -> None:
    """``n`` and prompt arrays, through the gateway with the official client: every
    choice reaches the client, streamed or not, and the exchange record holds each one
    under its own index (streamed choices arrive interleaved)."""
    import openai

    stack = start_stack(make_settings(tmp_path, pipeline={
        "trace_path": str(tmp_path / "t.jsonl")}))
    try:
        client = openai.OpenAI(base_url=stack.stack.base_url,
                               api_key=new_api_key(stack, "nn"), max_retries=0)
        messages: Any = [{"role": "user", "content": "Name three primes."}]
        one = client.chat.completions.create(model="demo-chat-1", messages=messages)
        three = client.chat.completions.create(model="demo-chat-1", messages=messages, n=3)
        texts = [c.message.content for c in three.choices]
        assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) == 3
        assert texts[0] == one.choices[0].message.content
        streamed: dict[int, str] = {}
        usage = None
        for chunk in client.chat.completions.create(
                model="demo-chat-1", messages=messages, n=3, stream=True,
                stream_options={"include_usage": True}):
            for c in chunk.choices:
                streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            usage = chunk.usage or usage
        assert [streamed[i] for i in range(3)] == texts
        assert usage is not None and usage.completion_tokens == three.usage.completion_tokens  # type: ignore[union-attr]
        listed = client.completions.create(model="demo-instruct-1", prompt=["a", "b"], n=2)
        assert [c.index for c in listed.choices] == [0, 1, 2, 3]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="demo-chat-1", messages=messages, n=129)
        assert refused.value.code == "integer_above_max_value"
    finally:
        stack.stop()
    records = list(read_trace(tmp_path / "t.jsonl"))
    assert [r.status for r in records] == [200, 200, 200, 200, 400]
    stream = records[2].response
    assert [c["message"]["content"] for c in stream["choices"]] == texts
    assert len(records[3].response["choices"]) == 4
