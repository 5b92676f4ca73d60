"""Generating one trace with several processes, byte-identical to one process.

The actors are built once, in the parent (deterministically), then split round-robin over
``workers`` forked processes. Each writes its actors' exchanges, time-ordered, to a part
file whose lines carry the exact float timestamp and the actor's index in front of the
JSON. The parent merges the parts on (timestamp, actor index), which is the order the
single-process merge produces (ties go to the earlier actor), strips the prefix and
writes ``trace.jsonl``. Memory stays one pending line per part.
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

_ACTORS: list[Any] = []   # set in the parent before forking; inherited by the workers


def _tagged(index: int, events: Iterator[tuple[float, dict[str, Any]]],
            ) -> Iterator[tuple[float, int, dict[str, Any]]]:
    for ts, line in events:
        yield ts, index, line


def _work(indices: list[int], part: str, counter: Any) -> None:
    streams = [_tagged(i, _ACTORS[i].events()) for i in indices]
    done = 0
    with open(part, "wb") as fh:
        for ts, index, line in heapq.merge(*streams, key=lambda e: (e[0], e[1])):
            fh.write(f"{ts!r}\t{index}\t".encode())
            fh.write(orjson.dumps(line))
            fh.write(b"\n")
            done += 1
            if done % 2000 == 0:
                with counter.get_lock():
                    counter.value += 2000
    with counter.get_lock():
        counter.value += done % 2000


def _read_part(path: Path) -> Iterator[tuple[tuple[float, int], bytes]]:
    with open(path, "rb") as fh:
        for raw in fh:
            ts, index, body = raw.split(b"\t", 2)
            yield (float(ts), int(index)), body


def generate(actors: list[Any], trace: Path, workers: int, progress: bool,
             desc: str) -> int:
    """Write the merged trace of ``actors`` with ``workers`` processes; return its lines."""
    global _ACTORS
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    parts = [trace.with_name(f".{trace.name}.part{k}") for k in range(workers)]
    _ACTORS = actors
    procs = [ctx.Process(target=_work, args=(list(range(k, len(actors), workers)),
                                             str(parts[k]), counter), daemon=True)
             for k in range(workers)]
    try:
        bar = tqdm(unit=" ex", unit_scale=True, disable=not progress, mininterval=0.5,
                   desc=f"{desc} ({workers} workers)")
        for proc in procs:
            proc.start()
        while any(p.is_alive() for p in procs):
            time.sleep(0.25)
            bar.update(counter.value - bar.n)
        bar.update(counter.value - bar.n)
        bar.close()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"a simulation worker failed (exit codes {failed})")
        merge = tqdm(total=counter.value, unit=" ex", unit_scale=True,
                     disable=not progress, mininterval=0.5, desc="merge")
        count = 0
        with open(trace, "wb") as out:
            for _, body in heapq.merge(*(_read_part(p) for p in parts), key=lambda e: e[0]):
                out.write(body)
                count += 1
                if count % 5000 == 0:
                    merge.update(5000)
        merge.update(count - merge.n)
        merge.close()
        return count
    finally:
        _ACTORS = []
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for part in parts:
            part.unlink(missing_ok=True)
