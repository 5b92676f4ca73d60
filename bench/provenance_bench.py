"""Provenance look-up over a large trace: distillguard (MinHash LSH) vs naive baselines.

The trace is N exchanges: the leak scenario of tests/leakworld.py (campaign, benign and
evaluation-runner accounts answering real prompts) mixed into background traffic whose
answers come from the demo upstream's generator (every answer distinct). Exchanges are
generated as trace lines and parsed with ``Exchange.from_trace`` as a trace file would be.

Measured side by side in one run, alternating, medians of --runs:
* distillguard: ProvenanceIndex over the suspect set, one pass over the trace;
* exact-hash baseline: SHA-256 of each normalised answer looked up in a set of the
  suspect items' hashes (finds verbatim copies only);
* brute-force baseline: exact Jaccard/containment of every suspect item against every
  exchange, on a sample of --brute-sample exchanges, extrapolated to N.
Peak memory: the process's peak RSS after the first distillguard pass, next to the RSS
before it (the leak scenario and the interpreter); the trace is streamed, never held.

    python -m bench.provenance_bench --n 1000000 --runs 3 [--workers 2]

With ``--workers N`` each run also scans in N processes (ProvenanceIndex.scan's
``workers``) and checks that the report names the same accounts.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import resource
import statistics
import time
from collections.abc import Iterator

from distillguard.demo_upstream import answer_tokens
from distillguard.exchange import Exchange
from distillguard.provenance import ProvenanceIndex, build_report
from distillguard.provenance.minhash import containment, shingles, words
from distillguard.provenance.suspect import parse_item
from tests.leakworld import World, build_world


def trace_lines(world: World, n: int, seed: int = 1) -> Iterator[Exchange]:
    rng = random.Random(seed)
    every = max(1, n // max(1, len(world.exchanges)))
    planted = iter(world.exchanges)
    for i in range(n):
        ex = next(planted, None) if i % every == 0 else None
        if ex is not None:
            yield Exchange.from_trace(ex.to_trace())
            continue
        prompt = f"background request {i} {rng.random()}"
        answer = " ".join(answer_tokens(prompt, "demo-chat-1", None))
        yield Exchange.from_trace({
            "ts": "2026-03-02T00:00:00Z", "account_id": f"bg_{i % 5000}",
            "request": {"model": "demo-chat-1",
                        "messages": [{"role": "user", "content": prompt}]},
            "response": {"choices": [{"index": 0, "message": {"role": "assistant",
                                                              "content": answer}}]},
            "status": 200})


def run_distillguard(world: World, n: int, workers: int = 1) -> tuple[float, int, dict]:
    items = [parse_item(i + 1, o) for i, o in enumerate(world.suspect)]
    t = time.perf_counter()
    index = ProvenanceIndex([i for i in items if i is not None])
    matches = index.scan(trace_lines(world, n), total=n, progress=False, workers=workers)
    report = build_report(index, matches)
    elapsed = time.perf_counter() - t
    return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, report


def _norm_hash(text: str) -> bytes:
    return hashlib.sha256(" ".join(words(text)).encode()).digest()


def run_exact(world: World, n: int) -> tuple[float, int]:
    t = time.perf_counter()
    wanted = {_norm_hash(s["output"]): i for i, s in enumerate(world.suspect)}
    found = set()
    for ex in trace_lines(world, n):
        i = wanted.get(_norm_hash(ex.response_text()))
        if i is not None:
            found.add(i)
    return time.perf_counter() - t, len(found)


def run_brute(world: World, sample: int) -> float:
    sets = [shingles(s["output"]) for s in world.suspect]
    t = time.perf_counter()
    for ex in trace_lines(world, sample, seed=2):
        e = shingles(ex.response_text())
        for s in sets:
            containment(s, e)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--brute-sample", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=0,
                        help="Also time the scan in this many processes (0: none)")
    args = parser.parse_args()
    world = build_world()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dg, exact, brute, peaks, spread = [], [], [], [], []
    report: dict = {}
    exact_found = 0
    for run in range(args.runs):
        t, peak, report = run_distillguard(world, args.n)
        dg.append(t)
        peaks.append(peak)
        te, exact_found = run_exact(world, args.n)
        exact.append(te)
        brute.append(run_brute(world, args.brute_sample) * args.n / args.brute_sample)
        also = ""
        if args.workers > 1:
            tw, _, spread_report = run_distillguard(world, args.n, args.workers)
            assert spread_report["accounts"] == report["accounts"], "workers changed the report"
            spread.append(tw)
            also = f", distillguard in {args.workers} processes {tw:.1f}s"
        print(f"run {run + 1}: distillguard {t:.1f}s, exact-hash {te:.1f}s, "
              f"brute-force (extrapolated) {brute[-1]:.0f}s{also}", flush=True)
    truth = sum(1 for s in world.suspect if s["_account"])
    named = sorted(a["account_id"] for a in report["accounts"])
    med = statistics.median
    print(f"\nexchanges: {args.n:,}; suspect items: {len(world.suspect)} ({truth} leaked)")
    print(f"distillguard: median {med(dg):.1f}s, {args.n / med(dg):,.0f} exchanges/s, "
          f"peak RSS {peaks[0] / 2**20:.0f} MiB (before: {rss_before / 2**20:.0f} MiB); "
          f"items matched {report['suspect']['matched']}/{truth}; named {named}")
    print(f"exact-hash baseline: time ratio distillguard/exact = {med(dg) / med(exact):.2f}; "
          f"items found {exact_found}/{truth} "
          f"(recall ratio distillguard/exact = {report['suspect']['matched'] / max(exact_found, 1):.2f})")
    print(f"brute-force baseline: time ratio brute/distillguard = {med(brute) / med(dg):.0f}x")
    if spread:
        print(f"in {args.workers} processes: median {med(spread):.1f}s, "
              f"{args.n / med(spread):,.0f} exchanges/s; time ratio one process / "
              f"{args.workers} processes = {med(dg) / med(spread):.2f} (same report)")


if __name__ == "__main__":
    main()
