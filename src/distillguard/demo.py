"""``distillguard demo``: the whole product on embedded defaults, in one command.

It writes a settings file into the demo folder (SQLite state, in-process counters, the
built-in demo upstream), starts the gateway, registers accounts, sends traffic through the
gateway with the official ``openai`` client, shows the limits and the admin API at work,
and prints what happened. Later stages (ledger, detection, ...) register demo steps in
:data:`DEMO_STEPS`.
"""

from __future__ import annotations

import importlib
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import httpx
import openai
import yaml

from distillguard.config import load_settings
from distillguard.gateway.adminpaths import id_segment
from distillguard.serve import Stack, StackThread

# (title, "module:function"): each step is called with the running StackThread, the demo
# folder and a context dict (settings, keys, admin client) it may add to. One line each.
DEMO_STEPS: list[tuple[str, str]] = [
    ("Simulated campaigns: detection, policy, sharing", "distillguard.simulate.demo:step"),
    ("Tamper-evident ledger", "distillguard.ledger.demo:step"),
    ("Analyst dashboard", "distillguard.dashboard.demo:step"),
]
DemoStep = Callable[[StackThread, Path, dict[str, Any]], None]

_FALLBACK_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between TCP and UDP in two paragraphs.",
    "Summarise the causes of the French Revolution.",
    "What is a good name for a bakery that also sells coffee?",
    "Solve step by step: a train travels 120 km in 1.5 hours. What is its speed?",
]


def _prompts() -> list[str]:
    from distillguard.datasets import benign_prompts

    try:
        return benign_prompts(limit=500) or _FALLBACK_PROMPTS
    except FileNotFoundError:
        return _FALLBACK_PROMPTS


def write_demo_settings(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "distillguard.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump({
            # The campaign step replays simulated clients' addresses as a local proxy would.
            "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0,
                       "trusted_proxies": ["127.0.0.1/32"]},
            "admin": {"token": "adm-" + secrets.token_hex(16)},
            "upstream": {"base_url": "demo"},
            "state": {"url": f"sqlite:///{(workdir / 'state.sqlite').resolve()}"},
            "ledger": {"path": str((workdir / "ledger").resolve())},
            "policy": {"file": str((workdir / "policy.yaml").resolve())},
            "sharing": {"pseudonym_key": secrets.token_hex(24), "partners": {
                "demo-partner": {"token": "partner-" + secrets.token_hex(16)}}},
        }, sort_keys=False))
    policy = workdir / "policy.yaml"
    if not policy.exists():
        policy.write_text(DEMO_POLICY)
    return path


DEMO_POLICY = """\
# The demo's access policy (format: docs/policy.md).
version: 1
rules:
  - name: embargo
    when: {country: [CU, IR, KP, SY]}
    deny: "Access from {country} is not permitted under export regulations."
verdicts:
  rules:
    - {name: flagged, when: {flagged: true}, action: flag}
    - {name: campaign-throttle, when: {risk_at_least: 0.5, in_campaign: true},
       action: throttle, expires_in: 24h}
    - {name: review-high, when: {risk_at_least: 0.95}, action: review, propose: suspend}
"""


def run_demo(workdir: str, *, minutes: float = 1.0, seed: int = 7,
             keep_running: bool = False) -> None:
    folder = Path(workdir)
    settings = load_settings(write_demo_settings(folder))
    stack = StackThread(Stack(settings)).start()
    try:
        admin = httpx.Client(base_url=stack.stack.admin_url,
                             headers={"authorization": f"Bearer {settings.admin.token}"})
        click.echo(f"gateway  {stack.stack.base_url}\nadmin    {stack.stack.admin_url}")
        keys: dict[str, str] = {}
        for i in range(5):
            account_id = f"demo_{i}"
            r = admin.get(f"/admin/v1/accounts/{id_segment(account_id)}")
            if r.status_code == 404:
                admin.post("/admin/v1/accounts", json={
                    "account_id": account_id, "org": f"Demo Org {i}", "country": "DE",
                    "tier": "standard", "payment_fingerprint": f"pf_demo{i}"}).raise_for_status()
            r = admin.post(f"/admin/v1/accounts/{id_segment(account_id)}/keys",
                           json={"name": "demo"})
            r.raise_for_status()
            keys[account_id] = r.json()["key"]
        rng = random.Random(seed)
        prompts = _prompts()
        total = max(20, int(200 * minutes))
        statuses: Counter[str] = Counter()

        def one(i: int) -> None:
            account_id = rng.choice(list(keys))
            client = openai.OpenAI(base_url=stack.stack.base_url, api_key=keys[account_id],
                                   max_retries=0)
            prompt = rng.choice(prompts)
            try:
                if i % 4 == 0:
                    stream = client.chat.completions.create(
                        model="demo-chat-1", messages=[{"role": "user", "content": prompt}],
                        stream=True, max_tokens=200)
                    for _ in stream:
                        pass
                else:
                    client.chat.completions.create(
                        model="demo-chat-1", messages=[{"role": "user", "content": prompt}],
                        max_tokens=300)
                statuses["200"] += 1
            except openai.APIStatusError as exc:
                statuses[str(exc.status_code)] += 1
            finally:
                client.close()

        with click.progressbar(length=total, label="simulated requests") as bar, \
                ThreadPoolExecutor(8) as pool:
            for _ in pool.map(one, range(total)):
                bar.update(1)
        stack.call(stack.stack.gateway.settle())
        click.echo(f"responses by status: {dict(statuses)}")
        context: dict[str, Any] = {"settings": settings, "keys": keys, "admin": admin,
                                   "seed": seed}
        for title, target in DEMO_STEPS:
            click.echo(f"\n== {title}")
            module, _, attr = target.partition(":")
            step: DemoStep = getattr(importlib.import_module(module), attr)
            step(stack, folder, context)
        click.echo(f"\nstate and settings kept in {folder}/ "
                   f"(distillguard -c {folder}/distillguard.yaml accounts list)")
        if keep_running:
            click.echo("gateway running; Ctrl-C to stop")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
