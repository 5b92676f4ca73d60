"""Provenance look-up: which accounts a suspect data set was harvested by.

See docs/provenance.md. :class:`ProvenanceIndex` (LSH over word shingles) finds the
exchanges; :func:`build_report` attributes items to accounts.
"""

from distillguard.provenance.lookup import Match, ProvenanceIndex
from distillguard.provenance.report import AttributionRule, build_report
from distillguard.provenance.suspect import SuspectItem, read_suspect

__all__ = ["AttributionRule", "Match", "ProvenanceIndex", "SuspectItem", "build_report",
           "read_suspect"]
