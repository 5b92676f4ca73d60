"""The campaign step of ``distillguard demo``: simulated traffic with distillation
campaigns sent through the running gateway, then detection, scoring against the ground
truth, policy acting on the verdicts, and a STIX bundle of what was found.

What it shows, in order:

1. ``simulate`` writes a small trace (the ``smoke`` preset: real prompts, benign
   populations and every campaign type) with its accounts and labels.
2. The accounts are imported through the admin API, each gets a key, and every exchange
   of the trace is sent through the gateway with the official ``openai`` client, from
   the trace's client address (``X-Forwarded-For`` from a trusted proxy) and user agent.
   The online detector and the policy check see this traffic as they would in
   production; statuses are counted per population.
3. Batch detection reads the trace file in time order (trace time, not replay time) and
   writes verdicts; ``bench detect`` scores them against the labels (table and PNG).
4. The verdicts go to policy (``POST /admin/v1/policy/verdicts``), whose rules throttle
   and degrade accounts in campaigns; a request from a flagged account shows the result.
5. The campaigns are exported as a pseudonymised STIX 2.1 bundle for a partner.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import httpx
import openai
import orjson

from distillguard.gateway.adminpaths import id_segment
from distillguard.serve import StackThread
from distillguard.simulate import simulate
from distillguard.traceio import iter_jsonl

DEMO_PARTNER = "demo-partner"


def _replay(stack: StackThread, trace: Path, keys: dict[str, str],
            population: dict[str, str]) -> Counter[tuple[str, int]]:
    """Send every exchange of the trace through the gateway; count (population, status)."""
    lines = sorted((obj for _, obj in iter_jsonl(trace)), key=lambda o: o["ts"])
    clients: dict[tuple[str, str, str], openai.OpenAI] = {}
    statuses: Counter[tuple[str, int]] = Counter()

    def client_for(account_id: str, ip: str, agent: str) -> openai.OpenAI:
        ident = (account_id, ip, agent)
        if ident not in clients:
            clients[ident] = openai.OpenAI(
                base_url=stack.stack.base_url, api_key=keys[account_id], max_retries=0,
                default_headers={"x-forwarded-for": ip, "user-agent": agent})
        return clients[ident]

    def send(line: dict[str, Any]) -> None:
        account_id = line["account_id"]
        request = dict(line.get("request") or {})
        group = population.get(account_id, "?")
        if account_id not in keys or not request.get("messages"):
            return
        request.pop("stream", None)
        request.pop("stream_options", None)
        client = client_for(account_id, line.get("client_ip") or "127.0.0.1",
                            line.get("user_agent") or "openai-python")
        try:
            client.chat.completions.create(**request)
            statuses[(group, 200)] += 1
        except openai.APIStatusError as exc:
            statuses[(group, exc.status_code)] += 1
        except openai.APIError:
            statuses[(group, 0)] += 1

    # Clients are created in this thread, in order, so the pool only sends.
    for line in lines:
        if line.get("account_id") in keys:
            client_for(line["account_id"], line.get("client_ip") or "127.0.0.1",
                       line.get("user_agent") or "openai-python")
    with click.progressbar(length=len(lines), label="replaying the simulated trace") as bar, \
            ThreadPoolExecutor(8) as pool:
        for _ in pool.map(send, lines):
            bar.update(1)
    for client in clients.values():
        client.close()
    return statuses


def _populations(labels: Path) -> dict[str, str]:
    out = {}
    for _, label in iter_jsonl(labels):
        out[label["account_id"]] = ("attack: " + label["campaign_type"]
                                    if label.get("campaign_id") else label["population"])
    return out


def step(stack: StackThread, folder: Path, context: dict[str, Any]) -> None:
    from distillguard.benchdetect.metrics import score
    from distillguard.benchdetect.report import table, write_png
    from distillguard.detect.batch import run_batch
    from distillguard.detect.calibration import Calibration

    admin = context["admin"]
    out = folder / "simulated"
    trace, accounts, labels = simulate(out, preset="smoke", seed=int(context.get("seed", 7)))
    population = _populations(labels)
    click.echo(f"simulated {sum(1 for _ in iter_jsonl(trace))} exchanges of "
               f"{len(population)} accounts ({sum(1 for p in population.values() if p.startswith('attack'))}"
               f" in campaigns) -> {out}/")

    admin.post("/admin/v1/accounts/import", content=accounts.read_bytes()).raise_for_status()
    keys = {}
    for account_id in population:
        r = admin.post(f"/admin/v1/accounts/{id_segment(account_id)}/keys",
                       json={"name": "replay"})
        r.raise_for_status()
        keys[account_id] = r.json()["key"]
    statuses = _replay(stack, trace, keys, population)
    stack.call(stack.stack.gateway.settle())
    by_group: dict[str, Counter[int]] = defaultdict(Counter)
    for (group, status), n in statuses.items():
        by_group[group][status] += n
    click.echo("statuses through the gateway, by population:")
    for group in sorted(by_group):
        click.echo(f"  {group:<28} {dict(sorted(by_group[group].items()))}")

    began = time.perf_counter()
    result, _ = run_batch(trace, Calibration.read(None), accounts=accounts)
    elapsed = time.perf_counter() - began
    verdicts_path = folder / "verdicts.json"
    result.verdicts.write(verdicts_path)
    scores = score(trace, accounts, labels, result.verdicts, elapsed_s=elapsed)
    click.echo(f"\nbatch detection over the trace -> {verdicts_path}")
    click.echo(table(scores))
    write_png(scores, folder / "detection-report.png", title="distillguard demo (smoke)")
    click.echo(f"report: {folder}/detection-report.png")
    for campaign in result.verdicts.campaigns[:3]:
        click.echo(f"  campaign {campaign.campaign_id}: {len(campaign.accounts)} accounts, "
                   f"risk {campaign.risk:.2f}; " + "; ".join(campaign.evidence[:2]))

    r = admin.post("/admin/v1/policy/verdicts", content=verdicts_path.read_bytes(),
                   headers={"x-distillguard-actor": "demo"})
    r.raise_for_status()
    click.echo(f"\npolicy on the verdicts: {orjson.dumps(r.json()).decode()[:300]}")
    in_campaign = [a.account_id for a in result.verdicts.accounts if a.flagged and a.campaign_id]
    if in_campaign:
        account_id = in_campaign[0]
        # The policy check reads actions from memory, refreshed in the background.
        time.sleep(2.5)
        r = httpx.post(f"{stack.stack.base_url}/chat/completions",
                       headers={"authorization": f"Bearer {keys[account_id]}"},
                       json={"model": "demo-chat-1", "max_tokens": 20,
                             "messages": [{"role": "user", "content": "Hello again"}]})
        click.echo(f"{account_id} (in a campaign) now: HTTP {r.status_code}, "
                   f"x-ratelimit-limit-requests {r.headers.get('x-ratelimit-limit-requests')}"
                   " (throttled by the verdict rule)")
    r = httpx.post(f"{stack.stack.base_url}/chat/completions",
                   headers={"authorization": f"Bearer {next(iter(keys.values()))}",
                            "x-forwarded-for": "2.176.0.1"},
                   json={"model": "demo-chat-1",
                         "messages": [{"role": "user", "content": "Hello"}]})
    message = r.json().get("error", {}).get("message") if r.status_code != 200 else ""
    click.echo(f"a request from an embargoed country (2.176.0.1): HTTP {r.status_code}, "
               f"x-should-retry {r.headers.get('x-should-retry')}: {message}")

    from distillguard.geoip import default_geoip
    from distillguard.sharing import inputs
    from distillguard.sharing.export import BundleBuilder
    from distillguard.sharing.settings import parse_sharing_settings

    options = parse_sharing_settings(context["settings"].extensions.get("sharing"))
    evidence = inputs.collect_from_files(verdicts_path, trace, accounts, campaigns=None,
                                         min_risk=0.0, geoip=default_geoip())
    bundle, summary = BundleBuilder(options, DEMO_PARTNER).build(evidence)
    bundle_path = folder / "campaigns.stix.json"
    bundle_path.write_text(bundle.serialize(pretty=True) + "\n")
    click.echo(f"STIX 2.1 bundle for {DEMO_PARTNER}: {len(summary.campaigns)} campaign(s), "
               f"{sum(summary.indicators.values())} indicators "
               f"({', '.join(f'{k} {v}' for k, v in sorted(summary.indicators.items()))}), "
               f"pseudonymised -> {bundle_path}")
