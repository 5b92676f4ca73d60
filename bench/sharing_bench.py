"""Sharing: the cost of the ``sharing`` request check, of an export and of an import.

Measured side by side in one run, alternating, medians of --runs:

* request check: :class:`SharingCheck` on the same stream of exchanges with no indicators
  and with --indicators partner indicators loaded (networks of mixed prefix lengths, user
  agents, regular expressions, AS names, template fingerprints), next to ``orjson.loads``
  of each exchange's request body (what the gateway already spends per request);
* export: building the evidence and the STIX bundle from a trace of --exchanges lines,
  next to only parsing the same trace (``read_trace``);
* import: validating (``parse_bundle``) and importing a bundle into SQLite, next to only
  validating it.

    python -m bench.sharing_bench --indicators 10000 --exchanges 100000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import text

from distillguard.exchange import Exchange
from distillguard.geoip import default_geoip
from distillguard.sharing.export import BundleBuilder
from distillguard.sharing.inputs import collect_from_files
from distillguard.sharing.matcher import IndicatorMatcher, SharingCheck
from distillguard.sharing.settings import parse_sharing_settings
from distillguard.sharing.store import SharingStore, create_schema, ts
from distillguard.sharing.validate import parse_bundle
from distillguard.store import open_state_store
from distillguard.traceio import read_trace, write_jsonl
from tests import sharingworld as world


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def load_indicators(url: str, n: int, rng: random.Random) -> None:
    store = open_state_store(url)
    await store.migrate()
    engine = store.engine  # type: ignore[attr-defined]
    await create_schema(engine)
    rows = []
    until = ts(datetime.now(UTC) + timedelta(days=30))
    for i in range(n):
        kind = rng.choice(["ip", "ip", "ip", "user_agent", "template", "asn", "ua_rx"])
        op = "="
        if kind == "ip":
            length = rng.choice([16, 20, 24, 24, 32])
            net = ipaddress.ip_network(f"{rng.randrange(1, 223)}.{rng.randrange(256)}."
                                       f"{rng.randrange(256)}.0/{length}", strict=False)
            value, op = str(net), "in"
        elif kind == "user_agent":
            value = f"harvester/{i}.{rng.randrange(100)}"
        elif kind == "ua_rx":
            kind, op, value = "user_agent", "MATCHES", f"^bot-{i}/"
        elif kind == "template":
            value = f"tfp1:{rng.getrandbits(64):016x}"
        else:
            value = f"example hosting {i}"
        rows.append({"p": "bench", "i": f"indicator--{i}", "n": 0, "k": kind, "op": op,
                     "v": value, "exp": until, "at": until})
    async with engine.begin() as conn:
        if not rows:
            return await store.close()
        await conn.execute(text(
            "INSERT INTO sharing_indicators VALUES (:p, :i, :n, :k, :op, :v, NULL, NULL,"
            " NULL, NULL, :exp, 'b', :at)"), rows)
    await store.close()


async def check_times(url: str, exchanges: list[Exchange]) -> float:
    options = parse_sharing_settings(world.sharing_section())
    store = open_state_store(url)
    matcher = IndicatorMatcher(options, lambda: store.engine)  # type: ignore[attr-defined]
    await create_schema(store.engine)  # type: ignore[attr-defined]
    await matcher.refresh()
    check = SharingCheck(matcher)
    start = time.perf_counter()
    for ex in exchanges:
        await check.check(ex)
    elapsed = time.perf_counter() - start
    await store.close()
    return elapsed


def make_exchanges(n: int, rng: random.Random) -> tuple[list[Exchange], list[bytes]]:
    out, bodies = [], []
    for i in range(n):
        line = world.trace_lines()[i % 180]
        line = {**line, "client_ip": f"{rng.randrange(1, 223)}.{rng.randrange(256)}."
                                     f"{rng.randrange(256)}.{rng.randrange(256)}"}
        out.append(Exchange.from_trace(line))
        bodies.append(orjson.dumps(line["request"]))
    return out, bodies


def big_trace(path: Path, n: int) -> None:
    base = world.trace_lines()
    write_jsonl(({**base[i % len(base)], "client_ip": base[i % len(base)]["client_ip"]}
                 for i in range(n)), path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--indicators", type=int, default=10_000)
    parser.add_argument("--exchanges", type=int, default=100_000)
    parser.add_argument("--checks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(5)
    tmp = Path(tempfile.mkdtemp(prefix="sharing-bench-"))
    default_geoip()
    empty, full = f"sqlite:///{tmp}/empty.sqlite", f"sqlite:///{tmp}/full.sqlite"
    asyncio.run(load_indicators(empty, 0, rng))
    asyncio.run(load_indicators(full, args.indicators, rng))
    exchanges, bodies = make_exchanges(args.checks, rng)

    results: dict[str, list[float]] = {k: [] for k in (
        "parse", "check0", "checkN", "read", "export", "validate", "import")}
    paths = world.write_world(tmp)
    big = tmp / "big.jsonl"
    big_trace(big, args.exchanges)
    options = parse_sharing_settings(world.sharing_section())
    bundle: dict[str, Any] = {}

    def export() -> None:
        ev = collect_from_files(paths["verdicts"], big, paths["accounts"], campaigns=None,
                                min_risk=0.9, geoip=default_geoip())
        b, _ = BundleBuilder(options, "acme").build(ev)
        bundle.update(json.loads(b.serialize()))

    for run in range(args.runs):
        results["parse"].append(timed(lambda: [orjson.loads(b) for b in bodies]))
        results["check0"].append(asyncio.run(check_times(empty, exchanges)))
        results["checkN"].append(asyncio.run(check_times(full, exchanges)))
        results["read"].append(timed(lambda: sum(1 for _ in read_trace(big))))
        results["export"].append(timed(export))
        raw = json.dumps(bundle).encode()
        results["validate"].append(timed(partial(parse_bundle, raw, max_bytes=10**8)))
        url = f"sqlite:///{tmp}/import{run}.sqlite"

        async def do_import(url: str = url, raw: bytes = raw) -> None:
            store = open_state_store(url)
            await create_schema(store.engine)  # type: ignore[attr-defined]
            parsed = parse_bundle(raw, max_bytes=10**8)
            await SharingStore(store.engine, ttl=timedelta(days=30)).import_bundle(  # type: ignore[attr-defined]
                partner="acme", bundle_id=parsed.bundle_id, objects=parsed.objects,
                source="bench", sha256=parsed.sha256)
            await store.close()
        results["import"].append(timed(lambda: asyncio.run(do_import())))

    med = {k: statistics.median(v) for k, v in results.items()}
    per = lambda k: med[k] / args.checks * 1e6  # noqa: E731
    print(f"request check, {args.checks} exchanges, {args.indicators} indicators loaded")
    print(f"  orjson.loads of the request body: {per('parse'):.2f} us/exchange (1.00)")
    print(f"  check, no indicators:             {per('check0'):.2f} us "
          f"({med['check0'] / med['parse']:.2f})")
    print(f"  check, {args.indicators} indicators:       {per('checkN'):.2f} us "
          f"({med['checkN'] / med['parse']:.2f})")
    print(f"export of {args.exchanges} exchanges: read_trace {med['read']:.2f} s (1.00), "
          f"export {med['export']:.2f} s ({med['export'] / med['read']:.2f}); "
          f"{len(bundle['objects'])} objects")
    print(f"import of that bundle: validate {med['validate'] * 1000:.1f} ms (1.00), "
          f"validate + import {med['import'] * 1000:.1f} ms "
          f"({med['import'] / med['validate']:.2f})")


if __name__ == "__main__":
    main()
