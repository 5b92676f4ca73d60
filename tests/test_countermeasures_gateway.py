"""Countermeasures through the running gateway, driven by the official openai client."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from distillguard.countermeasures import Fingerprinter
from distillguard.serve import StackThread
from tests.factories import ADMIN_TOKEN, make_settings, start_recorded_stack

SECRET = "test-fingerprint-secret-0123456789"
MESSAGES = [{"role": "user", "content": "Why is the sky blue? Think it through."}]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[StackThread, object, httpx.Client]]:
    settings = make_settings(tmp_path, countermeasures={"fingerprint": {"secret": SECRET}})
    stack, recorder = start_recorded_stack(settings)
    admin = httpx.Client(base_url=stack.stack.admin_url,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        yield stack, recorder, admin
    finally:
        admin.close()
        stack.stop()


def _client(stack: StackThread, admin: httpx.Client, tier: str) -> tuple[str, openai.OpenAI]:
    account_id = f"acct_{tier}_{uuid.uuid4().hex[:4]}"
    admin.post("/admin/v1/accounts", json={"account_id": account_id, "country": "DE",
                                           "tier": tier}).raise_for_status()
    key = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "t"}).json()["key"]
    return account_id, openai.OpenAI(base_url=stack.stack.base_url, api_key=key, max_retries=0)


def _stream(client: openai.OpenAI, model: str) -> tuple[str, str]:
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                                 max_tokens=120))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)
    return content, reasoning


def test_reasoning_visible_to_trusted_only(running: tuple[StackThread, object, httpx.Client]
                                           ) -> None:
    stack, _, admin = running
    _, trusted = _client(stack, admin, "trusted")
    _, standard = _client(stack, admin, "standard")
    _, verified = _client(stack, admin, "verified")
    full = trusted.chat.completions.create(model="demo-reasoner-1", messages=MESSAGES,
                                           max_tokens=120)
    reasoning = getattr(full.choices[0].message, "reasoning_content", None)
    assert reasoning and len(reasoning.split()) > 20
    assert _stream(trusted, "demo-reasoner-1")[1] == reasoning

    stripped = standard.chat.completions.create(model="demo-reasoner-1", messages=MESSAGES,
                                                max_tokens=120)
    assert getattr(stripped.choices[0].message, "reasoning_content", None) is None
    assert stripped.choices[0].finish_reason in ("stop", "length")
    content, streamed_reasoning = _stream(standard, "demo-reasoner-1")
    assert streamed_reasoning == "" and content == stripped.choices[0].message.content

    summary = verified.chat.completions.create(model="demo-reasoner-1", messages=MESSAGES,
                                               max_tokens=120)
    text = summary.choices[0].message.reasoning_content  # type: ignore[attr-defined]
    assert text.startswith("[reasoning summarised from")
    assert len(text.split()) < len(reasoning.split())
    assert _stream(verified, "demo-reasoner-1")[1] == text


def test_fingerprint_differs_per_account_and_traces_back(
    running: tuple[StackThread, object, httpx.Client]
) -> None:
    stack, recorder, admin = running
    a_id, a = _client(stack, admin, "standard")
    b_id, b = _client(stack, admin, "standard")
    texts_a, texts_b = [], []
    for i in range(12):
        messages = [{"role": "user", "content": f"Question number {i}: summarise it."}]
        ra = a.chat.completions.create(model="demo-chat-1", messages=messages, max_tokens=300)
        rb = b.chat.completions.create(model="demo-chat-1", messages=messages, max_tokens=300)
        texts_a.append(ra.choices[0].message.content or "")
        texts_b.append(rb.choices[0].message.content or "")
        if i < 3:  # the stream carries exactly the same marks as the JSON body
            chunks = a.chat.completions.create(model="demo-chat-1", messages=messages,
                                               max_tokens=300, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks
                           if c.choices) == texts_a[-1]
    assert texts_a != texts_b
    fp = Fingerprinter(SECRET)
    scores = {s.subject: s for s in fp.trace(texts_a, [a_id, b_id])}
    assert scores[a_id].matches == scores[a_id].slots > 10
    assert scores[a_id].p_value < 1e-3 < scores[b_id].p_value
    stack.call(stack.stack.gateway.settle())
    seen = [e for e in recorder.exchanges if e.account_id == a_id]  # type: ignore[attr-defined]
    assert seen and all(e.annotations["countermeasures"]["fingerprint"] for e in seen)
    assert seen[0].response_text() == texts_a[0]  # the record holds what the client got


def test_model_test_through_an_openai_compatible_api(
    running: tuple[StackThread, object, httpx.Client], tmp_path: Path
) -> None:
    """``fingerprint model-test --base-url``: the suspect is queried through its API only.
    Answers served through the gateway carry the model-wide mark; the same model's answers
    to a tier that is not fingerprinted do not."""
    import orjson
    from click.testing import CliRunner

    from distillguard.cli import main
    from distillguard.traceio import write_jsonl

    stack, _, admin = running
    _, marked = _client(stack, admin, "standard")
    _, unmarked = _client(stack, admin, "trusted")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(({"prompt": f"Question {i}: summarise what usually happens."}
                 for i in range(40)), prompts)
    config = tmp_path / "dg.yaml"
    config.write_text(f"countermeasures:\n  fingerprint:\n    secret: {SECRET}\n")
    results = {}
    for name, client in (("marked", marked), ("unmarked", unmarked)):
        run = CliRunner().invoke(main, [
            "--config", str(config), "fingerprint", "model-test", "--base-url",
            stack.stack.base_url, "--model", "demo-chat-1", "--prompts", str(prompts),
            "--api-key", client.api_key, "--out", str(tmp_path / f"{name}.json")])
        assert run.exit_code == 0, run.output
        results[name] = orjson.loads((tmp_path / f"{name}.json").read_bytes())
    assert results["marked"]["slots"] >= 20, results
    assert results["marked"]["trained_on_marked_outputs"], results
    assert not results["unmarked"]["trained_on_marked_outputs"], results


@pytest.mark.parametrize("stream", [False, True])
def test_log_probabilities_do_not_give_back_what_countermeasures_took(
        tmp_path: Path, stream: bool) -> None:
    """Log probabilities list every generated token, the reasoning's included (vLLM's
    do), in the words the model chose: with ``logprobs: true`` a client whose reasoning
    was stripped read it back from them, token by token, and one whose answers were
    fingerprinted read the unmarked wording. When countermeasures change an answer its
    ``logprobs`` are now left out (null), streamed or not; an account they leave alone
    keeps them."""
    from tests.fault_upstream import ANSWER, REASONING, FaultyUpstreamThread

    with FaultyUpstreamThread() as upstream:
        settings = make_settings(tmp_path, upstream={"base_url": upstream.url},
                                 countermeasures={"fingerprint": {"secret": SECRET}})
        stack, _ = start_recorded_stack(settings)
        admin = httpx.Client(base_url=stack.stack.admin_url,
                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            model = "reasoner-logprobs-stream" if stream else "reasoner-logprobs"

            def tokens(client: openai.OpenAI) -> tuple[str, str]:
                """The answer as received, and the text its logprobs spell."""
                kw = {"model": model, "messages": MESSAGES, "logprobs": True,
                      "top_logprobs": 1}
                if not stream:
                    out = client.chat.completions.create(**kw)  # type: ignore[call-overload]
                    lp = out.choices[0].logprobs
                    return (out.choices[0].message.content or "",
                            " ".join(t.token for t in (lp.content if lp else None) or []))
                content, spelt = [], []
                for chunk in client.chat.completions.create(**kw, stream=True):  # type: ignore[call-overload]
                    for choice in chunk.choices:
                        content.append(choice.delta.content or "")
                        if choice.logprobs is not None:
                            spelt += [t.token for t in choice.logprobs.content or []]
                return "".join(content), " ".join(spelt)

            _, standard = _client(stack, admin, "standard")
            answer, spelt = tokens(standard)
            assert "Rayleigh" not in spelt and spelt == "", spelt
            assert answer.strip()
            _, trusted = _client(stack, admin, "trusted")
            settings_trusted_untouched = tokens(trusted)
            assert settings_trusted_untouched[1] == f"{REASONING} {ANSWER}"
        finally:
            admin.close()
            stack.stop()
