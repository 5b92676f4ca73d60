"""``distillguard dashboard``: fill the dashboard's index from trace files.

The gateway indexes what it serves as it serves it. Exchanges that reach the state
store another way (an imported log, simulated traffic, a ledger written before the
dashboard was enabled) are indexed with::

    distillguard dashboard index TRACE.jsonl[.gz] ...

Exchanges already in the index are skipped, so the command can be re-run.
"""

from __future__ import annotations

import asyncio

import click
from tqdm import tqdm

from distillguard.dashboard.index import create_schema, row_of, write_rows
from distillguard.store import open_state_store
from distillguard.traceio import read_trace


@click.group("dashboard")
def dashboard() -> None:
    """The analyst dashboard (served on the admin port at /dashboard)."""


@dashboard.command("index")
@click.argument("traces", nargs=-1, required=True, type=click.Path(exists=True,
                                                                   dir_okay=False))
@click.option("--batch", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Rows per transaction.")
@click.pass_context
def index_traces(ctx: click.Context, traces: tuple[str, ...], batch: int) -> None:
    """Index trace files (the public trace format) for the dashboard's pages."""
    settings = ctx.obj.settings

    async def run() -> tuple[int, int]:
        store = open_state_store(settings.state.url)
        added = seen = 0
        try:
            await store.migrate()
            engine = store.engine  # type: ignore[attr-defined]
            await create_schema(engine)
            rows = []
            with tqdm(desc="exchanges", unit="ex") as bar:
                for path in traces:
                    for exchange in read_trace(path):
                        rows.append(row_of(exchange))
                        if len(rows) >= batch:
                            added += await write_rows(engine, rows)
                            seen += len(rows)
                            bar.update(len(rows))
                            rows = []
                added += await write_rows(engine, rows)
                seen += len(rows)
                bar.update(len(rows))
        finally:
            await store.close()
        return seen, added

    seen, added = asyncio.run(run())
    click.echo(f"indexed {added} of {seen} exchanges ({seen - added} were already indexed)")
