"""Export of a range of the ledger to Parquet, with each row's inclusion proof.

Columns: ``idx``, ``kind``, ``entry_id``, ``ts``, the exchange metadata (``account_id``,
``key_id``, ``client_ip``, ``model``, ``status``, ``prompt_tokens``,
``completion_tokens``, ``latency_ms``), the retained bodies as JSON text (``request``,
``response``, null when not retained or redacted), and what makes each row checkable on
its own: ``leaf`` (the exact leaf bytes), ``leaf_hash`` and ``inclusion_path`` (the RFC
9162 audit path to the checkpoint). The signed checkpoint is in the file's key-value
metadata under ``distillguard.ledger`` (with the export format version and the range).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from distillguard.ledger.core import Ledger
from distillguard.ledger.entry import decode_leaf

EXPORT_VERSION = 1
SCHEMA = pa.schema([
    ("idx", pa.int64()), ("kind", pa.string()), ("entry_id", pa.string()),
    ("ts", pa.string()), ("account_id", pa.string()), ("key_id", pa.string()),
    ("client_ip", pa.string()), ("model", pa.string()), ("status", pa.int32()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("latency_ms", pa.float64()), ("request", pa.string()), ("response", pa.string()),
    ("leaf", pa.binary()), ("leaf_hash", pa.binary(32)),
    ("inclusion_path", pa.list_(pa.binary(32))),
])
_META = ("key_id", "client_ip", "model", "status", "prompt_tokens", "completion_tokens",
         "latency_ms")


def export_parquet(ledger: Ledger, out: Path, *, start: int = 0, end: int | None = None,
                   batch: int = 20_000) -> dict[str, Any]:
    """Write entries ``[start, end)`` (default: up to the latest checkpoint, signing one
    when the range is not covered yet, or when the latest was signed by a key since
    retired) to ``out``; returns the header."""
    ledger.refresh()
    cp = ledger.store.latest_checkpoint()
    want = ledger.size if end is None else end
    if cp is None or cp.tree_size < want or not ledger.signed_by_key(cp):
        cp = ledger.checkpoint()
    assert cp is not None
    end = min(want, cp.tree_size)
    header = {"version": EXPORT_VERSION, "origin": ledger.config.origin, "start": start,
              "end": end, "tree_size": cp.tree_size, "checkpoint": cp.note}
    schema = SCHEMA.with_metadata({b"distillguard.ledger": orjson.dumps(header)})
    rows = 0
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
        for row in ledger.store.iter_rows(start, end):
            leaf = decode_leaf(row.leaf)
            cols["idx"].append(row.idx)
            cols["kind"].append(row.kind)
            cols["entry_id"].append(row.entry_id)
            cols["ts"].append(row.ts)
            cols["account_id"].append(row.account_id)
            for name in _META:
                cols[name].append(leaf.get(name))
            cols["request"].append(row.request.decode() if row.request else None)
            cols["response"].append(row.response.decode() if row.response else None)
            cols["leaf"].append(row.leaf)
            cols["leaf_hash"].append(row.leaf_hash)
            with ledger.lock:
                cols["inclusion_path"].append(ledger.tree.inclusion(row.idx, cp.tree_size))
            rows += 1
            if len(cols["idx"]) >= batch:
                writer.write_table(pa.table(cols, schema=schema))
                cols = {name: [] for name in SCHEMA.names}
        if cols["idx"] or rows == 0:
            writer.write_table(pa.table(cols, schema=schema))
    header["rows"] = rows
    return header
