"""Reading and writing the public trace and accounts formats (JSON Lines).

Both formats are specified in ``docs/formats.md``. Readers stream (constant memory), name
the file and line of the first bad record, and accept ``-`` for standard input/output.
Unknown fields are preserved in both directions.
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import orjson

from distillguard.exchange import Exchange, Retention
from distillguard.store.models import Account, AccountImport

TRACE_FORMAT_VERSION = 1
ACCOUNTS_FORMAT_VERSION = 1


class FormatError(ValueError):
    """A record does not follow its format; the message names file and line."""


@contextmanager
def open_jsonl(path: str | Path, mode: str) -> Iterator[IO[bytes]]:
    """A JSON Lines file as bytes, ``mode`` "r" or "w": ``-`` is standard input or
    output, a name ending in ``.gz`` is gzip-compressed."""
    if str(path) == "-":
        yield sys.stdin.buffer if "r" in mode else sys.stdout.buffer
        return
    p = Path(path)
    if "w" in mode:
        p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".gz":
        with gzip.open(p, mode + "b") as gz:
            yield gz  # type: ignore[misc]
    else:
        with open(p, mode + "b") as fh:
            yield fh


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    with open_jsonl(path, "r") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield number, orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise FormatError(f"{path}:{number}: not valid JSON ({exc.msg})") from None


def read_trace(path: str | Path) -> Iterator[Exchange]:
    for number, obj in iter_jsonl(path):
        try:
            yield Exchange.from_trace(obj)
        except (ValueError, TypeError, KeyError) as exc:
            raise FormatError(f"{path}:{number}: {exc}") from None


def read_accounts(path: str | Path) -> Iterator[Account]:
    for account, _status_given in read_account_lines(path):
        yield account


def read_account_lines(path: str | Path) -> Iterator[tuple[Account, bool]]:
    """Each account, and whether its line gives its status (:class:`AccountImport`)."""
    for number, obj in iter_jsonl(path):
        try:
            yield AccountImport.line(obj)
        except (ValueError, TypeError) as exc:
            raise FormatError(f"{path}:{number}: {exc}") from None


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    count = 0
    with open_jsonl(path, "w") as fh:
        for record in records:
            fh.write(orjson.dumps(record))
            fh.write(b"\n")
            count += 1
    return count


def write_trace(exchanges: Iterable[Exchange], path: str | Path,
                retention: Retention | None = None) -> int:
    return write_jsonl((ex.to_trace(retention) for ex in exchanges), path)


def write_accounts(accounts: Iterable[Account], path: str | Path) -> int:
    return write_jsonl((a.to_public() for a in accounts), path)
