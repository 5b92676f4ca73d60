"""The tamper-evident access ledger: an RFC 9162 Merkle tree of every exchange and audit
event, with Ed25519-signed checkpoints, inclusion and consistency proofs, verification
and Parquet export. See docs/ledger.md.

Other components record audit events through the process-wide writer::

    writer = distillguard.ledger.writer_for(settings)
    index = await writer.append_event("policy:account:suspend", "account:acct_17",
                                      actor="analyst@example", reason="campaign c-3",
                                      detail={"campaign_id": "c-3"})
"""

from __future__ import annotations

from distillguard.ledger.writer import LedgerWriter, close_writers, writer_for

__all__ = ["LedgerWriter", "close_writers", "writer_for"]
