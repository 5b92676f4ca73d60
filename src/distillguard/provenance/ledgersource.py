"""Reading exchanges (and inclusion proofs) from the ledger for the provenance look-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from distillguard.provenance.lookup import Match, ProvenanceIndex


def scan_ledger(ctx: click.Context, index: ProvenanceIndex, *, progress: bool
                ) -> tuple[dict[str, Any], list[Match], Callable[[dict[str, Any]], None] | None]:
    try:
        import distillguard.ledger  # noqa: F401
    except ImportError:
        raise click.UsageError("no ledger in this installation: pass --trace FILE") from None
    raise click.UsageError("reading the ledger is not available yet: pass --trace FILE")
