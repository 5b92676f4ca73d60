"""``distillguard simulate``: write a simulated trace, accounts and labels."""

from __future__ import annotations

import time

import click

from distillguard.files import output_directory
from distillguard.simulate.engine import run
from distillguard.simulate.presets import PRESETS


@click.command("simulate")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              callback=output_directory, help="Folder for trace.jsonl, accounts.jsonl and labels.jsonl.")
@click.option("--preset", default="smoke", show_default=True, type=click.Choice(list(PRESETS)),
              help="smoke (seconds), tune (development), heldout (held-out), large (scale).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--scale", default=1.0, show_default=True, type=float,
              help="Multiply the number of accounts and campaigns.")
@click.option("--days", type=float, help="Simulated days (default: the preset's).")
@click.option("--workers", default=1, show_default=True, type=int,
              help="Generate in this many processes (the output is the same).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def simulate(out_dir: str, preset: str, seed: int, scale: float, days: float | None,
             workers: int, quiet: bool) -> None:
    """Simulate multi-day API traffic (benign populations and distillation campaigns) with
    per-account ground truth."""
    began = time.perf_counter()
    try:
        result = run(out_dir, preset=preset, seed=seed, scale=scale, days=days,
                     progress=not quiet, workers=workers)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    elapsed = time.perf_counter() - began
    click.echo(f"wrote {result.exchanges} exchanges for {result.account_count} accounts to "
               f"{out_dir} in {elapsed:.1f} s ({result.exchanges / max(elapsed, 1e-9):,.0f} "
               "exchanges/s)", err=True)
