"""Policy: what the ``policy`` request check costs per request, in the gateway and alone.

Side by side in one run, alternating, medians of --rounds:

* gateway: two ``distillguard serve`` processes on the same fast mock upstream, one with
  the policy component (a realistic policy file: 8 jurisdiction rules, tier gates,
  5,000 anonymizer networks, a 2,000-entry screening list, 1,000 active actions on other
  accounts) and one with ``policy.enabled: false``. Requests come through a trusted
  proxy with ``X-Forwarded-For`` addresses drawn from 500 public addresses, so geo-IP
  look-ups are real. Gateways are pinned to CPU 1, the load client and the mock upstream
  to CPU 0 (``taskset``) when there are two CPUs.
  Reported: gateway CPU time per request (user + system, from psutil: the least
  sensitive to other load on a shared machine), throughput and latency percentiles.
* check alone: ``PolicyCheck.decide`` on the same exchange stream, next to ``orjson.loads``
  of each request body (work the gateway already does per request).

    python -m bench.policy_overhead --requests 3000 --concurrency 16 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from distillguard.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-admin-token-0123456789"
ANSWER = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Fine."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})


def mock_upstream(port: int) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m1", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def public_ips(n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        ip = ".".join(str(x) for x in (rng.randrange(1, 223), rng.randrange(256),
                                        rng.randrange(256), rng.randrange(1, 255)))
        first = int(ip.split(".")[0])
        if first not in (10, 100, 127, 169, 172, 192, 198, 203):
            out.append(ip)
    return out


def write_policy(folder: Path, rng: random.Random) -> Path:
    anon = [f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24"
            for _ in range(5000)]
    (folder / "anon.txt").write_text("\n".join(anon) + "\n")
    names = ["Alpha", "Beta", "Gamma", "Delta", "Orion", "Vega", "Nova", "Atlas", "Zenith"]
    rows = ["id,source,name,alt_names"]
    for i in range(2000):
        rows.append(f"e{i},bench,{rng.choice(names)} {rng.choice(names)} Industries {i} Ltd,")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    policy = {
        "version": 1,
        "tiers": {"unverified": {"models": ["m1"], "reasoning": "strip"},
                  "standard": {"models": ["m*"]}},
        "networks": {"anonymizer_files": ["anon.txt"]},
        "rules": [
            {"name": "embargo", "when": {"country": ["KP", "IR", "SY", "CU"]}, "deny": "no"},
            {"name": "eu-models", "when": {"model": ["eu-*"], "country_not": ["DE", "FR"]},
             "deny": "no"},
            {"name": "hosting-frontier", "when": {"model": ["frontier-*"], "hosting": True},
             "require_tier": "trusted"},
            {"name": "anon", "when": {"anonymizer": True, "model": ["frontier-*"]},
             "deny": "no"},
            {"name": "asn", "when": {"asn_name": ["bulletproof"]}, "deny": "no"},
            {"name": "nets", "when": {"networks": ["192.0.2.0/24", "198.51.100.0/24"]},
             "deny": "no"},
            {"name": "verified-only", "when": {"model": ["research-*"]},
             "require_tier": "verified"},
            {"name": "degrade-ru", "when": {"declared_country": ["RU"]},
             "degrade": {"reasoning": "strip"}},
        ],
        "screening": {"lists": ["list.csv"], "interval_s": 3600},
    }
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def config(folder: Path, name: str, upstream: int,
           policy: dict[str, Any]) -> tuple[Path, int, int]:
    port, admin_port = free_port(), free_port()
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"port": port, "admin_port": admin_port,
                   "trusted_proxies": ["127.0.0.1/32"]},
        "admin": {"token": TOKEN},
        "upstream": {"base_url": f"http://127.0.0.1:{upstream}/v1", "models": ["m1"]},
        "state": {"url": f"sqlite:///{folder / name}.sqlite"},
        "ledger": {"enabled": False},
        "limits": {"tiers": {"standard": {"requests_per_minute": None,
                                          "tokens_per_minute": None,
                                          "tokens_per_day": None}}},
        "policy": policy}))
    return path, port, admin_port


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if (os.cpu_count() or 1) >= 2 else []


def gateway_cpu(proc: subprocess.Popen[bytes]) -> float:
    """CPU seconds (user + system) the gateway process has used so far: less sensitive to
    other load on a shared machine than throughput."""
    import psutil

    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(600):
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def setup(admin_port: int, actions: bool) -> str:
    base = f"http://127.0.0.1:{admin_port}"
    h = {"authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=h) as s:
        async with s.post(base + "/admin/v1/accounts",
                          json={"account_id": "bench", "country": "DE"}) as r:
            r.raise_for_status()
        async with s.post(base + "/admin/v1/accounts/bench/keys", json={}) as r:
            key = (await r.json())["key"]
        if actions:
            ids = [f"other_{i}" for i in range(1000)]
            async with s.post(base + "/admin/v1/accounts/import", data=b"\n".join(
                    orjson.dumps({"account_id": a}) for a in ids)) as r:
                r.raise_for_status()
            for chunk in range(0, 1000, 100):
                async with s.post(base + "/admin/v1/policy/actions", json={
                        "account_ids": ids[chunk:chunk + 100], "action": "throttle",
                        "reason": "bench"}) as r:
                    r.raise_for_status()
    return str(key)


async def round_(url: str, key: str, ips: list[str], n: int, conc: int) -> dict[str, float]:
    body = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "hello"}]})
    lat: list[float] = []
    errors = 0
    counter = iter(range(n))
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {key}",
                                              "content-type": "application/json"}) as s:
        async def worker() -> None:
            nonlocal errors
            for i in counter:
                t0 = time.perf_counter()
                async with s.post(url, data=body,
                                  headers={"x-forwarded-for": ips[i % len(ips)]}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - start
    lat.sort()
    return {"rps": n / wall, "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1000, "errors": errors}


def allowed_only(policy_path: Path, ips: list[str]) -> list[str]:
    """Keep the addresses the policy lets through, so both gateways do the same work."""
    from distillguard.policy.compiled import load_policy
    from distillguard.policy.jurisdiction import RequestFacts, evaluate

    policy = load_policy(policy_path)
    out = []
    for ip in ips:
        facts = RequestFacts(model="m1", endpoint="/v1/chat/completions", tier="standard",
                             tier_rank=policy.rank("standard"), declared_country="DE",
                             network=policy.networks.lookup(ip))
        if evaluate(policy.rules, facts).denied_by is None:
            out.append(ip)
    return out


def check_alone(policy_path: Path, ips: list[str], n: int) -> dict[str, float]:
    from distillguard.auth import Principal
    from distillguard.policy.actions import Action, ActiveActions
    from distillguard.policy.audit import DenialAggregator
    from distillguard.policy.check import PolicyCheck
    from distillguard.policy.compiled import PolicyHolder, load_policy
    from distillguard.policy.schema import now_ts
    from distillguard.store.models import Account, ApiKey
    from tests.factories import make_exchange

    policy = load_policy(policy_path)
    active = ActiveActions()
    for i in range(1000):
        active.apply(Action(f"a{i}", f"other_{i}", "throttle", "r", "verdicts", "c", "d",
                            now_ts(), None))
    check = PolicyCheck(PolicyHolder(policy_path, policy), active, DenialAggregator())
    principal = Principal(Account("bench", country="DE"),
                          ApiKey("key_000000000001", "bench", "h"))
    exchanges = []
    for i in range(n):
        ex = make_exchange(account_id="bench", client_ip=ips[i % len(ips)], model="m1")
        ex.principal = principal
        exchanges.append(ex)
    raws = [orjson.dumps(ex.request) for ex in exchanges]
    policy.networks.lookup("8.8.8.8")
    out: dict[str, list[float]] = {"decide": [], "loads": []}
    for _ in range(3):
        t0 = time.perf_counter()
        for ex in exchanges:
            check.decide(ex, policy)
        out["decide"].append((time.perf_counter() - t0) / n * 1e6)
        t0 = time.perf_counter()
        for raw in raws:
            orjson.loads(raw)
        out["loads"].append((time.perf_counter() - t0) / n * 1e6)
    return {k: statistics.median(v) for k, v in out.items()}


async def main_async(args: argparse.Namespace) -> None:
    rng = random.Random(7)
    ips = public_ips(500, rng)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        policy_path = write_policy(folder, rng)
        ips = allowed_only(policy_path, ips)
        up = free_port()
        procs = [subprocess.Popen([*pinned(0), sys.executable, __file__, "--mock-upstream",
                                   str(up)])]
        on_cfg, on_port, on_admin = config(folder, "on", up, {"file": str(policy_path)})
        off_cfg, off_port, off_admin = config(folder, "off", up, {"enabled": False})
        for cfg in (on_cfg, off_cfg):
            procs.append(subprocess.Popen(
                [*pinned(1), sys.executable, "-m", "distillguard.cli", "-c", str(cfg), "serve"],
                cwd=ROOT, stderr=subprocess.DEVNULL))
        try:
            for port in (on_port, off_port):
                await wait_ready(f"http://127.0.0.1:{port}/ready")
            keys = {"on": await setup(on_admin, True), "off": await setup(off_admin, False)}
            pids = {"on": 1, "off": 2}
            urls = {"on": f"http://127.0.0.1:{on_port}/v1/chat/completions",
                    "off": f"http://127.0.0.1:{off_port}/v1/chat/completions"}
            for name in ("on", "off"):   # warm-up
                await round_(urls[name], keys[name], ips, 300, args.concurrency)
            idle0 = {n: gateway_cpu(procs[pids[n]]) for n in pids}
            await asyncio.sleep(args.idle_s)
            idle = {n: (gateway_cpu(procs[pids[n]]) - idle0[n]) / args.idle_s * 1e3
                    for n in pids}
            results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
            for r in range(args.rounds):
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                for name in order:
                    cpu0 = gateway_cpu(procs[pids[name]])
                    res = await round_(urls[name], keys[name], ips, args.requests,
                                       args.concurrency)
                    res["cpu_ms"] = (gateway_cpu(procs[pids[name]]) - cpu0) / args.requests * 1e3
                    results[name].append(res)
            def med(name: str, k: str) -> float:
                return statistics.median(x[k] for x in results[name])
            print(f"gateway, {args.rounds} rounds x {args.requests} requests, "
                  f"concurrency {args.concurrency}")
            print("| | with policy | without | ratio with/without |\n|---|---|---|---|")
            for k in ("cpu_ms", "rps", "p50_ms", "p99_ms"):
                print(f"| {k} | {med('on', k):.1f} | {med('off', k):.1f} | "
                      f"{med('on', k) / med('off', k):.3f} |")
            print(f"idle (no traffic) CPU: with policy {idle['on']:.1f} ms/s, "
                  f"without {idle['off']:.1f} ms/s")
            print(f"errors: on {sum(x['errors'] for x in results['on'])}, "
                  f"off {sum(x['errors'] for x in results['off'])}")
            for name in ("on", "off"):
                print(f"per-round {name:>3}: rps", [round(x["rps"]) for x in results[name]],
                      "cpu ms/request", [round(x["cpu_ms"], 3) for x in results[name]])
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=30)
        alone = check_alone(policy_path, ips, 20_000)
        print(f"check alone: PolicyCheck.decide {alone['decide']:.1f} us/request, "
              f"orjson.loads of the body {alone['loads']:.1f} us "
              f"(ratio {alone['decide'] / alone['loads']:.1f})")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--mock-upstream":
        mock_upstream(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=10.0,
                        help="Seconds without traffic to measure background CPU.")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
