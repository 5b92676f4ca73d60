"""Online detection: how long the gateway's event loop waits while the detector evaluates.

The online stage (``distillguard.detect.online.DetectionStage``) feeds each exchange to
the detector on the event loop and runs an evaluation, when one is due, in a worker
thread. A thread shares the interpreter lock with the event loop, so while an evaluation
runs, every wake-up of the loop (a request read, an upstream reply, a response write)
may wait for the lock. This measures that wait on a realistic detector state:

1. the detector is warmed with the first ``--warm`` exchanges of a trace (as a gateway
   that has been up for a while);
2. the next ``--ticks`` evaluations' worth of exchanges are fed through the stage's own
   runner (``DetectorThread`` or ``DetectorProcess``), as the stage feeds them, while a heartbeat task on the same loop asks to wake every millisecond and
   records how late each wake-up is.

Lateness is reported over the whole feed, and for the thread modes also for the
heartbeats that fell while an evaluation ran, for each way of running the detector, side
by side in one run:

* ``thread``: the detector in the gateway's process, an evaluation in a worker thread,
  with the interpreter's switch interval as it is (5 ms by default: a thread holding the
  lock keeps it that long before handing it over);
* ``thread-1ms``: the same with ``sys.setswitchinterval(0.001)``;
* ``process``: the detector in a process of its own (``detect.runs_in: process``, the
  default): the loop only writes each exchange's features to a pipe.

    python -m bench.online_stall --trace ldev3/trace.jsonl --accounts ldev3/accounts.jsonl \\
        --warm 300000 --ticks 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np

from distillguard.detect.batch import facts_from_accounts
from distillguard.detect.calibration import Calibration
from distillguard.detect.features import ExchangeFeatures
from distillguard.detect.online import DetectorThread
from distillguard.detect.reader import trace_feature_rows
from distillguard.detect.scoring import AccountFacts
from distillguard.detect.worker import DetectorProcess

HEARTBEAT_S = 0.001


def read_features(trace: Path, warm: int, ticks: int, tick: float
                  ) -> tuple[list[ExchangeFeatures], list[ExchangeFeatures]]:
    """The first ``warm`` exchanges, and those of the next ``ticks`` ticks after them."""
    blocks = trace_feature_rows(trace, memory_limit="1GB", geoip=None)
    rows = (ExchangeFeatures(*row) for block in blocks for row in block if row[1])
    first = list(islice(rows, warm))
    rest: list[ExchangeFeatures] = []
    end = None
    for f in rows:
        if end is None:
            end = (f.ts // tick + ticks + 1) * tick
        if f.ts >= end:
            break
        rest.append(f)
    blocks.close()
    return first, rest


async def warmed(runs_in: str, features: list[ExchangeFeatures],
                 facts: list[tuple[str, AccountFacts]]) -> DetectorThread | DetectorProcess:
    """The online stage's detector runner, fed the warm-up exchanges and finished."""
    async def drop(changes: object) -> None:
        pass

    runner = (DetectorThread if runs_in == "thread" else DetectorProcess)(
        Calibration.read(), 300.0, drop)
    for account_id, record in facts:
        await runner.add_account(account_id, record)
    for f in features:
        await runner.observe(f)
    await runner.finish()
    return runner


async def feed(runner: DetectorThread | DetectorProcess, features: list[ExchangeFeatures],
               busy: list[tuple[float, float]]) -> None:
    """Feed as DetectionStage.on_exchange does, then finish (until every evaluation is
    done); ``busy`` gets the span of each evaluation run in this process."""
    here = runner.detector if isinstance(runner, DetectorThread) else None
    for n, f in enumerate(features):
        tick = here.next_tick if here is not None else None
        start = time.perf_counter()
        await runner.observe(f)
        if here is not None and tick is not None and here.next_tick != tick:   # evaluated
            busy.append((start, time.perf_counter()))
        if not n % 50:
            await asyncio.sleep(0)     # exchanges arrive over time: let the loop run
    await runner.finish()


async def heartbeat(stop: asyncio.Event, late: list[tuple[float, float]]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        asked = loop.time()
        await asyncio.sleep(HEARTBEAT_S)
        now = loop.time()
        late.append((time.perf_counter(), now - asked - HEARTBEAT_S))


async def measure(runs_in: str, warm: list[ExchangeFeatures], rest: list[ExchangeFeatures],
                  facts: list[tuple[str, AccountFacts]]
                  ) -> tuple[list[float], list[float], list[float]]:
    """Warm a runner (not timed), then feed ``rest`` with the heartbeat on the loop."""
    runner = await warmed(runs_in, warm, facts)
    busy: list[tuple[float, float]] = []
    late: list[tuple[float, float]] = []
    stop = asyncio.Event()
    beat = asyncio.create_task(heartbeat(stop, late))
    try:
        await feed(runner, rest, busy)
    finally:
        stop.set()
        await beat
        await runner.close()
    spans = np.array(busy) if busy else np.zeros((0, 2))
    during: list[float] = []
    outside: list[float] = []
    for at, value in late:
        inside = bool(len(spans)) and bool(((spans[:, 0] <= at) & (at <= spans[:, 1])).any())
        (during if inside else outside).append(value * 1e3)
    return during, outside, [(b - a) * 1e3 for a, b in busy]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--accounts", type=Path)
    ap.add_argument("--warm", type=int, default=300_000)
    ap.add_argument("--ticks", type=int, default=20)
    args = ap.parse_args()
    print(f"reading {args.warm:,} + the next {args.ticks} ticks' exchanges ...", flush=True)
    warm, rest = read_features(args.trace, args.warm, args.ticks, 300.0)
    facts = list(facts_from_accounts(args.accounts)) if args.accounts else []
    results = {}
    for mode, interval in (("thread", None), ("thread-1ms", 0.001), ("process", None)):
        print(f"{mode}: warming a detector on {len(warm):,} exchanges ...", flush=True)
        before = sys.getswitchinterval()
        if interval is not None:
            sys.setswitchinterval(interval)
        try:
            runs_in = "process" if mode == "process" else "thread"
            results[mode] = asyncio.run(measure(runs_in, warm, rest, facts))
        finally:
            sys.setswitchinterval(before)
    print(f"\n{len(rest):,} exchanges fed after {len(warm):,}; heartbeat every "
          f"{HEARTBEAT_S * 1e3:.0f} ms; lateness in ms")
    print("| mode | all heartbeats: median / p99 / p99.9 / max | during an evaluation "
          "(count, evaluation ms median): median / p99 / max | otherwise: median / p99 |")
    print("|---|---|---|---|")
    for mode, (during, outside, spans) in results.items():
        every = during + outside
        inside = (f"{len(spans)}, {statistics.median(spans):.0f} ms: {pct(during, 50):.2f} / "
                  f"{pct(during, 99):.2f} / {max(during, default=0):.2f}") if spans else "-"
        print(f"| {mode} | {pct(every, 50):.2f} / {pct(every, 99):.2f} / "
              f"{pct(every, 99.9):.2f} / {max(every, default=0):.2f} | {inside} | "
              f"{pct(outside, 50):.2f} / {pct(outside, 99):.2f} |")


if __name__ == "__main__":
    main()
