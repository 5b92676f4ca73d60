"""The follower's pace against the batch path's, on the same features, in one run.

    python3 -m bench.follower_bench --dir DIR [--redis redis://127.0.0.1:6379/0] [--runs 2]

DIR holds a simulated world (``distillguard simulate --out DIR --preset heldout``). The
trace's features are extracted once. Each run then, alternately:

* ``batch``: the features through :func:`distillguard.detect.batch.run_features` (the
  detector alone, in this process);
* ``publish``: the features added to a fresh Redis stream one ``XADD`` at a time, as the
  replicas' stages add them (:class:`~distillguard.detect.stream.StreamPublisher`);
* ``follow``: :class:`~distillguard.detect.stream.Follower` over that stream (decoding,
  account records from a SQLite state store, the detector, verdict rows written).

Medians of the runs and their ratios go to standard output as a Markdown table. The
stream is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from distillguard.detect.batch import run_features
from distillguard.detect.calibration import Calibration
from distillguard.detect.features import ExchangeFeatures
from distillguard.detect.reader import trace_feature_rows
from distillguard.detect.settings import DetectSettings, StreamSettings
from distillguard.detect.stream import Follower, StreamPublisher
from distillguard.store import open_state_store
from distillguard.traceio import read_accounts


async def _publish(features: list[ExchangeFeatures], stream: StreamSettings) -> float:
    publisher = StreamPublisher(stream)
    began = time.perf_counter()
    for f in features:
        await publisher.observe(f)
    elapsed = time.perf_counter() - began
    await publisher.close()
    assert publisher.dropped == 0, "the stream must be reachable"
    return elapsed


async def _follow(state_url: str, accounts: Path, stream: StreamSettings) -> tuple[float, int]:
    store = open_state_store(state_url)
    await store.migrate()
    await store.import_accounts(read_accounts(accounts))
    await store.close()
    follower = Follower(state_url, DetectSettings(runs_in="follower", stream=stream))
    began = time.perf_counter()
    await follower.run(idle_exit_s=0.0)
    return time.perf_counter() - began, follower.read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    import redis

    trace, accounts = args.dir / "trace.jsonl", args.dir / "accounts.jsonl"
    calibration = Calibration.read()
    features = [ExchangeFeatures(*row) for rows in trace_feature_rows(
        trace, memory_limit="1GB", geoip=None) for row in rows if row[1]]
    times: dict[str, list[float]] = {"batch": [], "publish": [], "follow": []}
    client = redis.Redis.from_url(args.redis)
    try:
        for run in range(args.runs):
            began = time.perf_counter()
            run_features(features, calibration, accounts=accounts)
            times["batch"].append(time.perf_counter() - began)
            stream = StreamSettings(url=args.redis, name=f"bench:{uuid.uuid4().hex[:8]}",
                                    max_length=max(1_000, 2 * len(features)))
            try:
                times["publish"].append(asyncio.run(_publish(features, stream)))
                with tempfile.TemporaryDirectory() as tmp:
                    elapsed, read = asyncio.run(_follow(
                        f"sqlite:///{tmp}/state.sqlite", accounts, stream))
                assert read == len(features), (read, len(features))
                times["follow"].append(elapsed)
            finally:
                client.delete(stream.name)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in
                                                  times.items()), flush=True)
    finally:
        client.close()
    n = len(features)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{n:,} exchanges, medians of {args.runs} runs\n")
    print("| step | exchanges/s | ratio to the batch detector |")
    print("|---|---|---|")
    for step in ("batch", "follow", "publish"):
        print(f"| {step} | {n / median[step]:,.0f} | {median['batch'] / median[step]:.2f} |")


if __name__ == "__main__":
    main()
