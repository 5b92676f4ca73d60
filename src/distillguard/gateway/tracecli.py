"""``distillguard traces``: import and check files in the public trace format.

``traces import`` replays recorded exchanges (from this gateway's trace log, see
``pipeline.trace_path``, or from another gateway's logs) into the stages of the configured
components, exactly as if they had just passed through the gateway: the ledger, the
detectors and the dashboard index see them; the upstream is not called and no rate limit
is charged. A file with a bad line is refused before anything of it is imported, and an
exchange the ledger already holds (by exchange id) is skipped, so an import run twice
records each exchange once.
``traces check`` validates a file without importing it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import click

from distillguard.config import Settings
from distillguard.exchange import Exchange, format_ts
from distillguard.pipeline import Pipeline
from distillguard.traceio import read_trace


@click.group()
def traces() -> None:
    """Import and check traces (the public trace format, JSON Lines)."""


def _exchanges(paths: Iterable[str], sort: bool) -> Iterator[Exchange]:
    """The exchanges of ``paths`` in the order to replay them. Every line of every file
    is read and checked before this returns, so a bad line stops the import before its
    first exchange: a partial import, run again once the line is mended, would record
    the lines before it twice. Files are read twice (checked, then streamed); standard
    input, and everything under ``sort``, once into memory."""
    if sort or "-" in paths:
        everything = [ex for path in paths for ex in read_trace(path)]
        if sort:
            everything.sort(key=lambda ex: ex.ts)
        return iter(everything)
    for path in paths:
        for _ in read_trace(path):
            pass
    return (ex for path in paths for ex in read_trace(path))


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: int
    already_in_ledger: int
    stage_errors: dict[str, int]


# Exchanges handed to the pipeline at once: the ledger writes each batch in one commit.
IMPORT_BATCH = 512


async def import_traces(settings: Settings, exchanges: Iterable[Exchange], *,
                        on_progress: Callable[[int], None] | None = None) -> ImportResult:
    """Feed ``exchanges`` through the stages of the configured components, in order, in
    batches of IMPORT_BATCH (:meth:`Pipeline.submit_many`: one ledger commit per batch,
    where one per exchange made an import wait for a disk sync per line).
    ``on_progress`` is told how many exchanges were read so far, after each batch.

    An exchange whose id the ledger already holds is skipped, by every stage: importing a
    file again (after a failure, or by mistake) recorded each exchange twice in the
    ledger and counted it twice in detection. Returns how many were imported, how many
    were skipped so, and the count of stage failures by stage name.
    """
    from distillguard.components import load_extensions
    from distillguard.ledger.stage import LedgerStage

    stages = [s for e in load_extensions(settings) for s in e.stages]
    writers = [s.writer for s in stages if isinstance(s, LedgerStage)]
    pipeline = Pipeline(stages, queue_size=settings.pipeline.queue_size)
    await pipeline.start()
    count = already = 0
    try:
        ledger = writers[0].ledger if writers else None
        source = iter(exchanges)
        while chunk := list(islice(source, IMPORT_BATCH)):
            batch: list[Exchange] = []
            seen: set[str] = set()
            for exchange in chunk:
                # by entry id (Ledger.find would read an id of digits as an index); the
                # same line twice in one batch is not in the ledger yet either
                if exchange.id in seen or (ledger is not None
                                           and ledger.store.find(exchange.id) is not None):
                    already += 1
                    continue
                seen.add(exchange.id)
                exchange.retention = settings.pipeline.retention
                batch.append(exchange)
            await pipeline.submit_many(batch)
            count += len(batch)
            if on_progress is not None:
                on_progress(count + already)
    finally:
        await pipeline.close()
    return ImportResult(count, already, dict(pipeline.stage_errors))


@traces.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("--sort", is_flag=True,
              help="Replay in time order (reads every file into memory first).")
@click.pass_context
def traces_import(ctx: click.Context, paths: tuple[str, ...], sort: bool) -> None:
    """Replay trace files into the pipeline stages (ledger, detection, dashboard)."""
    from tqdm import tqdm

    settings = ctx.obj.settings
    exchanges = _exchanges(paths, sort)    # every line checked first (a bad one stops here)
    with tqdm(unit="ex", desc="import", disable=None, mininterval=1.0,
              file=sys.stderr) as bar:
        result = asyncio.run(import_traces(settings, exchanges,
                                           on_progress=lambda n: bar.update(n - bar.n)))
    click.echo(f"imported {result.imported} exchanges" + (
        f" ({result.already_in_ledger} already in the ledger were skipped)"
        if result.already_in_ledger else ""), err=True)
    if result.stage_errors:
        detail = ", ".join(f"{name}: {n}" for name, n in sorted(result.stage_errors.items()))
        click.echo(f"error: stage failures ({detail}); see the log", err=True)
        ctx.exit(1)


@traces.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(allow_dash=True))
def traces_check(paths: tuple[str, ...]) -> None:
    """Validate trace files: every line parses; prints counts per file."""
    for path in paths:
        count = 0
        accounts: set[str] = set()
        first = last = None
        for exchange in read_trace(path):
            count += 1
            if exchange.account_id:
                accounts.add(exchange.account_id)
            first = exchange.ts if first is None or exchange.ts < first else first
            last = exchange.ts if last is None or exchange.ts > last else last
        span = f", {format_ts(first)} to {format_ts(last)}" if first and last else ""
        click.echo(f"{path}: {count} exchanges, {len(accounts)} accounts{span}")
