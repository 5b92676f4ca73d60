"""``distillguard provenance SUSPECT.jsonl --trace TRACE.jsonl --out REPORT.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson

from distillguard.cliparams import within
from distillguard.files import output_path, write_atomically
from distillguard.provenance.lookup import ProvenanceIndex, default_workers
from distillguard.provenance.report import SKIPPED_EXAMPLES, AttributionRule, build_report
from distillguard.provenance.suspect import read_suspect


def _fingerprinter(ctx: click.Context) -> Any:
    from distillguard.countermeasures import fingerprinter_from
    from distillguard.countermeasures.settings import parse_settings

    try:
        settings = ctx.find_root().obj.settings
    except Exception:  # no usable settings: the fingerprint check is optional
        return None
    return fingerprinter_from(parse_settings(settings.extensions.get("countermeasures")))


@click.command("provenance")
@click.argument("suspect", type=click.Path(exists=True, dir_okay=False))
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
              help="Search this trace (JSON Lines) instead of the ledger.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              callback=output_path,
              help="Where to write the JSON report.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), callback=output_path,
              help="Also write an HTML summary (with a PNG chart next to it).")
@click.option("--min-containment", default=0.5, show_default=True, type=float,
              callback=within(0, 1, low_open=True),
              help="Share of an item's shingles that must occur in the exchange.")
@click.option("--min-items", default=3, show_default=True, type=click.IntRange(min=1),
              help="Items an account must be credited with to be named.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes that look answers up (default: one per core).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def provenance(ctx: click.Context, suspect: str, trace_path: str | None, out_path: str,
               html_path: str | None, min_containment: float, min_items: int,
               workers: int | None, quiet: bool) -> None:
    """Find which accounts harvested the responses in SUSPECT (JSON Lines)."""
    skipped: list[int] = []
    items = list(read_suspect(suspect, skipped))
    index = ProvenanceIndex(items, min_containment=min_containment)
    if trace_path:
        from distillguard.traceio import read_trace

        source: dict[str, Any] = {"kind": "trace", "path": trace_path}
        matches = index.scan(read_trace(trace_path), progress=not quiet,
                             workers=workers or default_workers())
        proofs = None
    else:
        from distillguard.provenance.ledgersource import scan_ledger

        source, matches, proofs = scan_ledger(ctx, index, progress=not quiet,
                                              workers=workers or default_workers())
    report = build_report(index, matches, rule=AttributionRule(min_items=min_items),
                          source=source, fingerprinter=_fingerprinter(ctx),
                          skipped_lines=skipped)
    if proofs is not None:
        proofs(report)
    write_atomically(out_path, orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if html_path:
        from distillguard.provenance.html import write_html

        write_html(report, Path(html_path))
    named = ", ".join(f"{a['account_id']} ({a['share']:.1%})" for a in report["accounts"])
    click.echo(f"{report['suspect']['matched']}/{report['suspect']['items']} items matched; "
               f"accounts named: {named or 'none'}; report: {out_path}")
    if skipped:
        shown = ", ".join(map(str, skipped[:SKIPPED_EXAMPLES]))
        more = ", ..." if len(skipped) > SKIPPED_EXAMPLES else ""
        lines = "line" if len(skipped) == 1 else "lines"
        click.echo(f"{len(skipped)} {lines} of {suspect} had no response to look for and "
                   f"were skipped ({lines} {shown}{more})", err=True)
