"""``distillguard bench``: score detection verdicts, run the reference baseline."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from distillguard.benchdetect.baseline import run_baseline
from distillguard.benchdetect.metrics import score
from distillguard.benchdetect.report import table, write_png
from distillguard.cliparams import positive
from distillguard.files import output_path, write_atomically
from distillguard.verdicts import Verdicts

_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("bench")
def bench() -> None:
    """Measure detection against simulated ground truth."""


@bench.command("detect")
@click.option("--trace", required=True, type=_file)
@click.option("--accounts", required=True, type=_file)
@click.option("--labels", required=True, type=_file, help="labels.jsonl of the simulator.")
@click.option("--verdicts", required=True, type=_file, help="Verdicts document to score.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), callback=output_path,
              help="Write a PNG report here.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              callback=output_path,
              help="Write all metrics as JSON here.")
@click.option("--elapsed", type=float, callback=positive(),
              help="Detector run time in seconds (else the verdicts' elapsed_seconds).")
def detect(trace: Path, accounts: Path, labels: Path, verdicts: Path, report: Path | None,
           json_out: Path | None, elapsed: float | None) -> None:
    """Print precision, recall, false positives, campaigns detected, attribution and time
    to detect, per campaign type and overall."""
    try:
        scores = score(trace, accounts, labels, Verdicts.read(verdicts), elapsed)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(table(scores))
    if report:
        write_png(scores, report, title=f"{verdicts.name} on {trace.parent.name or trace.name}")
        click.echo(f"report: {report}", err=True)
    if json_out:
        write_atomically(json_out, orjson.dumps(scores.to_json(), option=orjson.OPT_INDENT_2))


@bench.command("baseline")
@click.option("--trace", required=True, type=_file)
@click.option("--accounts", required=True, type=_file)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              callback=output_path, help="Where to write the verdicts.")
@click.option("--per-day", default=300, show_default=True, type=click.IntRange(min=1),
              help="Flag an account above this many exchanges in 24 hours.")
def baseline(trace: Path, accounts: Path, out: Path, per_day: int) -> None:
    """Reference baseline detector (volume threshold, payment grouping): writes verdicts."""
    verdicts = run_baseline(trace, accounts, per_day)
    verdicts.write(out)
    flagged = sum(v.flagged for v in verdicts.accounts)
    click.echo(f"baseline-volume: {flagged} of {len(verdicts.accounts)} accounts flagged, "
               f"{len(verdicts.campaigns)} campaigns -> {out}", err=True)
