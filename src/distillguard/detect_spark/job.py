"""Batch detection on Apache Spark: the same detector as the DuckDB path.

What runs where:

* **distributed** (Spark executors, in parallel): reading the JSON Lines trace (local
  files, HDFS, S3 or any Hadoop file system; globs and ``.gz`` accepted) or a ledger's
  Parquet export (a path ending in ``.parquet``: its exchange entries), parsing each
  line into an :class:`~distillguard.exchange.Exchange`, per-exchange feature extraction
  with the project's own :class:`~distillguard.detect.features.Extractor` (inside
  ``mapPartitions``, in blocks of :data:`~distillguard.detect.batch.BATCH_ROWS`), kept
  on the executors' disks, and the global sort by (timestamp, position in the input), a
  range-partitioned shuffle that spills to disk;
* **sequential** (the driver): the sorted feature rows stream back one partition at a
  time (``toLocalIterator``) into the same :class:`~distillguard.detect.engine.Detector`
  the DuckDB path and the online stage use. The detector's account sketches,
  cross-account links and graph are one ordered state, so this pass is a single process.

Ties in the timestamp keep input order (file order, files in name order), exactly as the
DuckDB path's ``ORDER BY ts, row_number``, so both paths hand the detector the same
exchanges in the same order and the verdicts are identical.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from distillguard.detect.batch import TICK_SECONDS, BatchResult, run_features
from distillguard.detect.calibration import Calibration
from distillguard.detect.engine import Detector
from distillguard.detect.features import ExchangeFeatures, Extractor
from distillguard.detect.reader import BATCH_ROWS
from distillguard.exchange import Exchange
from distillguard.traceio import FormatError

if TYPE_CHECKING:
    from pyspark import RDD
    from pyspark.sql import SparkSession

# Sort key of a line that failed to parse: before every exchange, so the driver sees it
# first and stops with the line number.
_BAD = -math.inf

Row = tuple[tuple[float, int, int], Any]


def _block(part: int, block: list[tuple[bytes, int]]) -> Iterator[Row]:
    extractor = Extractor()
    positions: list[int] = []
    for raw, n in block:
        try:
            exchange = Exchange.from_trace(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            yield (_BAD, part, n), f"not valid JSON ({exc.msg})"
            continue
        except (ValueError, TypeError, KeyError) as exc:
            yield (_BAD, part, n), str(exc)
            continue
        extractor.add(exchange)
        positions.append(n)
    for features, n in zip(extractor.take(), positions, strict=True):
        # Exchanges without an account are counted but not observed (as in the DuckDB path).
        yield (features.ts, part, n), features if features.account_id else None


def _in_blocks(part: int, lines: Iterable[tuple[bytes, int]]) -> Iterator[Row]:
    """(trace line, position) pairs through :func:`_block`, BATCH_ROWS at a time."""
    block: list[tuple[bytes, int]] = []
    for entry in lines:
        block.append(entry)
        if len(block) >= BATCH_ROWS:
            yield from _block(part, block)
            block = []
    if block:
        yield from _block(part, block)


def extract_partition(part: int, lines: Iterable[str]) -> Iterator[Row]:
    """Lines of input split ``part`` -> ((ts, part, line in split), features | None | error
    message); features are extracted in blocks of BATCH_ROWS. Splits are numbered in input
    order (files by name, then offset), so (part, line) is the position in the input."""
    return _in_blocks(part, ((raw.encode(), n) for n, line in enumerate(lines)
                             if (raw := line.strip())))


def extract_ledger_partition(part: int, rows: Iterable[Any]) -> Iterator[Row]:
    """Rows of a ledger's Parquet export -> ((ts, 0, ledger index), features | None |
    error message) for its exchange entries (by their leaves, not the ``kind`` column):
    ties in the timestamp keep ledger order, as ``detect --ledger`` and the DuckDB path's
    reading of the export do. A body that does not have the hash its leaf commits to is
    an error, as a line that is not JSON is."""
    from distillguard.ledger.entry import export_trace_line

    errors: list[Row] = []

    def lines() -> Iterator[tuple[bytes, int]]:
        for row in rows:
            try:
                line = export_trace_line(bytes(row.leaf), row.request, row.response,
                                         row.idx)
            except ValueError as exc:
                errors.append(((_BAD, 0, row.idx), str(exc)))
                continue
            if line is not None:
                yield line, row.idx

    yield from _in_blocks(0, lines())
    yield from errors


def session(master: str | None = None, *, app_name: str = "distillguard-detect",
            conf: dict[str, str] | None = None) -> SparkSession:
    """A Spark session. ``master`` None keeps what ``spark-submit`` set (or local[*])."""
    from pyspark.sql import SparkSession

    # Local mode: executors' Python is this interpreter (where distillguard is installed).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _input(spark: SparkSession, path: str, partitions: int | None
           ) -> tuple[RDD[Any], Callable[[int, Any], Iterator[Row]]]:
    """The input's records and what turns a split of them into sort keys and features:
    lines of a JSON Lines trace, or the exchange entries of a ledger's Parquet export (a
    path ending in ``.parquet``, docs/ledger.md)."""
    if path.endswith(".parquet"):
        rows: RDD[Any] = spark.read.parquet(path).select(
            "leaf", "request", "response", "idx").rdd
        return (rows.repartition(partitions) if partitions else rows), \
            extract_ledger_partition
    sc = spark.sparkContext
    lines = sc.textFile(path, minPartitions=partitions) if partitions else sc.textFile(path)
    return lines, extract_partition


def _where(source: RDD[Any], path: str, part: int, n: int) -> str:
    """How an error names record ``n`` of input split ``part``: ``FILE:LINE`` as the
    DuckDB path and ``traces check`` say it, or the ledger entry of an export. A split of
    a text file starts anywhere in the file, so on this error path only the lines of the
    file's earlier splits are counted (one more pass over them)."""
    if path.endswith(".parquet"):
        return f"{path}: ledger entry {n}"
    try:   # the Hadoop file splits behind sc.textFile, through the JVM
        splits = source._jrdd.rdd().partitions()
        files = [str(splits[i].inputSplit().value().getPath().toString())
                 for i in range(part + 1)]
    except Exception:   # not file splits: the split and its line is all there is
        return f"{path}: line {n + 1} of input split {part}"
    earlier = {i for i in range(part) if files[i] == files[part]}

    def count(i: int, lines: Iterable[Any]) -> Iterator[int]:
        if i in earlier:
            yield sum(1 for _ in lines)

    before = sum(source.mapPartitionsWithIndex(count).collect()) if earlier else 0
    name = files[part].removeprefix("file:")
    return f"{name}:{before + n + 1}"


def sorted_features(spark: SparkSession, trace: str | Path, *,
                    partitions: int | None = None) -> Iterator[ExchangeFeatures | None]:
    """Every exchange's features (None for exchanges without an account), sorted by
    timestamp with ties in input order, streamed to the caller one partition at a time."""
    from pyspark import StorageLevel

    path = str(trace)
    try:
        source, extract = _input(spark, path, partitions)
        parts = partitions or max(1, source.getNumPartitions())
        # sortByKey passes over its input three times (a count, a sample for the range
        # bounds, then the shuffle): kept on the executors' disks after the first, the
        # features are extracted once instead of three times.
        extracted: RDD[Row] = source.mapPartitionsWithIndex(extract).persist(
            StorageLevel.DISK_ONLY)
        try:
            ordered: RDD[Row] = extracted.sortByKey(ascending=True, numPartitions=parts)
            for (ts, part, n), value in ordered.toLocalIterator(prefetchPartitions=True):
                if ts == _BAD:
                    raise FormatError(f"{_where(source, path, part, n)}: {value}")
                yield value
        finally:
            extracted.unpersist()
    except FormatError:
        raise
    except Exception as exc:  # py4j / Spark errors: a missing path, an unreadable file
        if type(exc).__module__.startswith(("py4j", "pyspark")):
            message = str(exc).strip().splitlines()
            raise FormatError(f"{path}: cannot read trace ({message[0] if message else exc})"
                              ) from None
        raise


def run_spark(spark: SparkSession, trace: str | Path, calibration: Calibration, *,
              accounts: str | Path | None = None, tick_seconds: float = TICK_SECONDS,
              partitions: int | None = None,
              on_progress: Callable[[int], None] | None = None) -> tuple[BatchResult, Detector]:
    """Detect over a whole trace with Spark doing the reading, features and sort; the
    detector pass is the DuckDB path's own (:func:`~distillguard.detect.batch.run_features`)."""
    return run_features(sorted_features(spark, trace, partitions=partitions), calibration,
                        accounts=accounts, tick_seconds=tick_seconds, on_progress=on_progress)
