"""The trace in time order, as feature rows: what the batch path reads.

Trace lines are not guaranteed to be in time order, and a trace may be larger than
memory. A trace already in order (as the simulator writes it) is read as it lies, after
one quick pass that checks so (:func:`in_time_order`); any other is sorted: DuckDB reads
the JSON Lines file (each line as one JSON value, so unusual request bodies never trip
schema inference), sorts it by timestamp with a memory limit and spills to a temporary
folder when it must, and hands the rows back in Arrow record batches of bounded size.
Each batch becomes :class:`~distillguard.exchange.Exchange` records, then rows of
features (:class:`~distillguard.detect.features.Extractor`).

On large traces this runs in a second process (``python -m distillguard.detect.reader``,
started by :mod:`.batch`), which imports only what reading needs: the detector's modules
(datasketch, scipy, igraph) would add about a second to its start.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import traceback
from collections.abc import Generator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import orjson

from distillguard.detect.features import Extractor
from distillguard.exchange import Exchange, parse_ts
from distillguard.geoip import GeoIP
from distillguard.traceio import FormatError, iter_jsonl, open_jsonl

BATCH_ROWS = 4_096
# A line that opens with its timestamp, written as RFC 3339 in a form both DuckDB and
# exchange.parse_ts read (the form Exchange.to_trace and the simulator write).
_LEADING_TS = re.compile(
    rb'\{"ts": ?"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d))"')


def in_time_order(trace: str | Path) -> bool:
    """Whether every line of the trace opens with its timestamp (see _LEADING_TS) and
    none is earlier than the line before. Then the file's own order is the order the
    sort would give (by timestamp, ties in file order), and the sort is not needed. A
    line of any other form (no leading ``ts``, a blank line) says no: the sort reads it.

    One pass over the bytes: a timestamp equal to the one before, or of the same length
    in ``Z`` form, compares as text; only others are parsed. (A date that does not
    exist, compared as text, is a bad line when the detector reads it, as it is after
    the sort.)"""
    last = b""
    last_dt: datetime | None = None
    with open(trace, "rb") as f:
        for line in f:
            found = _LEADING_TS.match(line)
            if found is None:
                return False
            ts = found.group(1)
            if ts == last:
                continue
            if len(ts) == len(last) and ts.endswith(b"Z") and last.endswith(b"Z"):
                if ts < last:
                    return False
                last, last_dt = ts, None
                continue
            try:
                dt = parse_ts(ts.decode())
                if last and dt < (last_dt or parse_ts(last.decode())):
                    return False
            except ValueError:      # a date that does not exist, such as 02-30
                return False
            last, last_dt = ts, dt
    return True


def _file_blocks(path: str, batch_rows: int) -> Iterator[tuple[list[int], list[bytes]]]:
    """The file's lines as they lie, in blocks, each line with its line number (a file in
    time order has no blank line: see :func:`in_time_order`)."""
    with open(path, "rb") as f:
        block: list[bytes] = []
        first = 1
        for line in f:
            block.append(line)
            if len(block) == batch_rows:
                yield list(range(first, first + len(block))), block
                first += len(block)
                block = []
        if block:
            yield list(range(first, first + len(block))), block


def iter_sorted_lines(trace: str | Path, *, memory_limit: str = "1GB",
                      temp_dir: str | None = None, batch_rows: int = BATCH_ROWS
                      ) -> Iterator[list[bytes]]:
    """The trace's lines sorted by timestamp (ties in file order), in blocks."""
    for _, lines in _numbered_sorted_lines(trace, memory_limit, temp_dir, batch_rows):
        yield lines


def _numbered_sorted_lines(trace: str | Path, memory_limit: str, temp_dir: str | None,
                           batch_rows: int) -> Iterator[tuple[list[int], list[bytes]]]:
    """As :func:`iter_sorted_lines`, each line with where it came from
    (:func:`_where`): its line number in a file in time order, its place among the
    file's JSON values in a sorted one, its ledger index in a ledger export."""
    path = str(trace)
    if not Path(path).exists():
        raise FormatError(f"{path}: no such trace file")
    if path.endswith(".parquet"):
        yield from _ledger_export_lines(path, memory_limit, temp_dir, batch_rows)
    elif in_time_order(path):
        yield from _file_blocks(path, batch_rows)
    else:
        yield from _sorted_by_duckdb(path, memory_limit, temp_dir, batch_rows)


def _where(trace: str | Path, number: int) -> str:
    """How an error names the line ``number`` of :func:`_numbered_sorted_lines` came
    from: ``trace:LINE`` (as ``traces check`` and the other readers say it), or the
    ledger entry of an export. A sorted file's number counts its JSON values (DuckDB
    skips blank lines), so the file is read again, on this error path only, to find the
    line."""
    path = str(trace)
    if path.endswith(".parquet"):
        return f"{path}: ledger entry {number}"
    if in_time_order(path):
        return f"{path}:{number}"
    with open_jsonl(path, "r") as fh:
        values = 0
        for line_number, line in enumerate(fh, 1):
            values += bool(line.strip())
            if values == number:
                return f"{path}:{line_number}"
    return f"{path}: JSON value {number}"


def check_memory_limit(memory_limit: str) -> str:
    """``memory_limit`` if DuckDB takes it as its memory limit (a size such as ``1GB``,
    ``500MB``, ``2GiB``, or a share of RAM such as ``50%``) and can run a query within
    it; otherwise ValueError with a message that says what is wanted. Checked before a
    trace is read, rather than when a trace turns out to need sorting."""
    try:
        with duckdb.connect(config={"memory_limit": memory_limit}) as con:
            con.execute("SELECT 1").fetchall()
    except duckdb.Error:
        raise ValueError(f"{memory_limit!r} is not a memory limit DuckDB can work within: "
                         "give a size such as 1GB, 500MB or 2GiB, or a share of RAM such "
                         "as 50%") from None
    return memory_limit


def _duckdb_batches(path: str, query: str, memory_limit: str, temp_dir: str | None,
                    batch_rows: int) -> Iterator[Any]:
    """``query`` (over ``$path``) on DuckDB, as Arrow record batches, with its memory
    bounded (a sort spills to ``temp_dir``, or a temporary folder removed at the end)."""
    spill = temp_dir or tempfile.mkdtemp(prefix="distillguard-detect-")
    try:
        con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": spill,
                                     "preserve_insertion_order": True})
        try:
            yield from con.sql(query, params={"path": path}).to_arrow_reader(batch_rows)
        except duckdb.Error as exc:
            raise FormatError(f"{path}: cannot read trace ({exc})") from None
        finally:
            con.close()
    finally:
        if temp_dir is None:    # the sort's spill files (gigabytes on a large trace)
            shutil.rmtree(spill, ignore_errors=True)


def _sorted_by_duckdb(path: str, memory_limit: str, temp_dir: str | None, batch_rows: int
                      ) -> Iterator[tuple[list[int], list[bytes]]]:
    query = ("SELECT json::VARCHAR AS line, "
             " try_cast(json_extract_string(json, '$.ts') AS TIMESTAMPTZ) AS ts, "
             " row_number() OVER () AS n "
             "FROM read_ndjson_objects($path) ORDER BY ts NULLS FIRST, n")
    try:
        for batch in _duckdb_batches(path, query, memory_limit, temp_dir, batch_rows):
            yield (batch.column(2).to_pylist(),
                   [v.encode() for v in batch.column(0).to_pylist()])
    except FormatError:
        # DuckDB's message for a line that is not JSON counts lines its own way; name
        # the line as every other reader does (the sort reads the whole file before its
        # first row, so nothing was detected yet)
        for _ in iter_jsonl(path):
            pass
        raise


def _ledger_export_lines(path: str, memory_limit: str, temp_dir: str | None,
                         batch_rows: int) -> Iterator[tuple[list[int], list[bytes]]]:
    """A ledger's Parquet export (``ledger export``, docs/ledger.md): its exchange entries
    as trace lines, sorted by time, ties in ledger order (as ``detect --ledger`` reads the
    ledger itself). Kind and time are the leaf's, not the ``kind`` and ``ts`` columns; a
    retained body that does not have the hash its leaf commits to stops the read. Whether
    the leaves are the ledger's is for ``ledger verify-proof FILE.parquet --key``."""
    from distillguard.ledger.entry import export_trace_line

    leaf = "json(decode(leaf))"
    query = (f"SELECT leaf, request, response, idx FROM read_parquet($path) "
             f"WHERE json_extract_string({leaf}, '$.kind') = 'exchange' "
             f"ORDER BY try_cast(json_extract_string({leaf}, '$.ts') AS TIMESTAMPTZ) "
             "NULLS FIRST, idx")
    for batch in _duckdb_batches(path, query, memory_limit, temp_dir, batch_rows):
        columns = batch.to_pydict()
        numbers: list[int] = []
        lines: list[bytes] = []
        for entry in zip(columns["leaf"], columns["request"], columns["response"],
                         columns["idx"], strict=True):
            try:
                line = export_trace_line(*entry)
            except ValueError as exc:
                raise FormatError(f"{path}: ledger entry {entry[3]}: {exc}") from None
            if line is not None:
                numbers.append(entry[3])
                lines.append(line)
        yield numbers, lines


def trace_feature_rows(trace: str | Path, *, memory_limit: str, geoip: GeoIP | None,
                       temp_dir: str | None = None
                       ) -> Generator[list[tuple[Any, ...]], None, None]:
    """The trace's features in time order, block by block, as plain tuples
    (:meth:`~distillguard.detect.features.Extractor.take_rows`)."""
    block = Extractor(geoip)
    for numbers, lines in _numbered_sorted_lines(trace, memory_limit, temp_dir, BATCH_ROWS):
        for number, line in zip(numbers, lines, strict=True):
            try:
                exchange = Exchange.from_trace(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise FormatError(f"{_where(trace, number)}: not valid JSON ({exc.msg})"
                                  ) from None
            except (ValueError, TypeError, KeyError) as exc:
                raise FormatError(f"{_where(trace, number)}: {exc}") from None
            block.add(exchange)   # keeps what features need; the parsed line goes now
        yield block.take_rows()


# Messages over a pipe (the reader process's, the online detector process's): the byte
# length of the pickled (kind, payload), then the pickle.
MESSAGE_HEADER = struct.Struct("<Q")


def framed(kind: str, payload: object) -> bytes:
    """One message as it goes over the pipe."""
    data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    return MESSAGE_HEADER.pack(len(data)) + data


def send(out: BinaryIO, kind: str, payload: object) -> None:
    out.write(framed(kind, payload))


def receive(stream: BinaryIO) -> tuple[str, Any] | None:
    """The next message (see :func:`framed`); None when the pipe ended without one."""
    header = stream.read(MESSAGE_HEADER.size)
    if len(header) < MESSAGE_HEADER.size:
        return None
    (size,) = MESSAGE_HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    kind, payload = pickle.loads(data)
    return kind, payload


def reader_main(trace: str, memory_limit: str, temp_dir: str, fd: int) -> None:
    """The reader process (``python -m distillguard.detect.reader``): sort, parse and
    extract; write each block of feature rows to ``fd`` (a write blocks while the
    detector is behind, so at most a pipe's worth is in flight), then ``("end",
    None)``. A bad trace is sent as ``("error", message)``, anything else as
    ``("crash", traceback)``."""
    with os.fdopen(fd, "wb", buffering=1 << 20) as out:
        try:
            for rows in trace_feature_rows(trace, memory_limit=memory_limit, geoip=None,
                                           temp_dir=temp_dir):
                send(out, "rows", rows)
            send(out, "end", None)
        except FormatError as exc:
            send(out, "error", str(exc))
        except BrokenPipeError:
            return            # the detector stopped reading (it failed or was stopped)
        except Exception:     # reported to the detector's process, which raises
            send(out, "crash", traceback.format_exc())


if __name__ == "__main__":      # the reader process of batch._trace_features_in_reader
    reader_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
